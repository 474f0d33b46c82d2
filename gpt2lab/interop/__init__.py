"""Import and export: the formats other tools read, kept apart from the model (which imports none of this).

    hf.py            Hugging Face GPT-2 folders: the state-dict adapter, config.json, the complete folder
    hf_tokenizer.py  gpt2lab tokenizers as tokenizer.json / vocab.json + merges.txt / tokenizer_config.json
    peft.py          LoRA adapters in peft's format (written by finetune, read by --adapter)
    gguf.py          GGUF files for llama.cpp's `gpt2` architecture (llama.cpp, Ollama, LM Studio)
    convert.py       `gpt2lab convert`: each direction, checked by reading the result back

Dependency direction: interop -> checkpoint, lora, sft, tokenizer -> model. Optional packages
(safetensors aside: transformers, peft, gguf) are imported inside the functions that need them.

    from gpt2lab.interop import load_pretrained, save_pretrained
    model = load_pretrained("gpt2")                  # a Hugging Face GPT-2 folder or hub name -> GPT
    save_pretrained(model, "out/hf", tokenizer=tok)  # a folder transformers, vLLM and lm-eval load
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from gpt2lab.errors import UserError
from gpt2lab.interop.hf import load_pretrained, save_pretrained

__all__ = ["load_any", "load_pretrained", "save_pretrained"]


def load_any(
    ckpt: str | Path | None = None,
    pretrained: str | Path | None = None,
    device: str = "auto",
    dtype: torch.dtype = torch.float32,
) -> tuple[Any, dict[str, Any] | None]:
    """The model of --ckpt DIR (a checkpoint or a run directory) or --pretrained NAME_OR_DIR (Hugging
    Face GPT-2), in eval mode on `device`, and its tokenizer spec (None: GPT-2's own vocabulary).

    Every command that runs a model loads it here: `gpt2lab eval` directly, `sample`, `chat` and `serve`
    through generate.load_for_sampling (which adds the tokenizer, an adapter and int8 weights).
    """
    from gpt2lab import checkpoint
    from gpt2lab.distributed import pick_device
    from gpt2lab.interop.hf import pretrained_tokenizer

    if (ckpt is None) == (pretrained is None):
        raise UserError("give exactly one of --ckpt DIR or --pretrained NAME_OR_DIR")
    if ckpt is not None:
        model, spec = checkpoint.load_model(ckpt), checkpoint.read_config(ckpt).get("tokenizer")
    else:
        model, spec = load_pretrained(pretrained), pretrained_tokenizer(pretrained)
    try:
        model = model.to(device=pick_device(device), dtype=dtype)
    except (RuntimeError, AssertionError) as e:
        raise UserError(f"cannot use device {device!r}: {e}") from None
    return model.eval(), spec
