"""`gpt2lab convert`: every direction, each checked by reading the written files back.

--ckpt RUN --out DIR                         -> a complete Hugging Face folder (weights, tokenizer, card)
--ckpt RUN --format gguf --out F.gguf        -> llama.cpp's gpt2 GGUF (--outtype f32|f16|q8_0)
--pretrained NAME_OR_DIR --out CKPT          -> a gpt2lab checkpoint (with the folder's tokenizer)
--adapter OLD_ADAPTER --out DIR              -> the adapter in peft's format
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from gpt2lab.errors import UserError

FORMATS = ("hf", "gguf")


def convert(
    out: str | Path,
    ckpt: str | Path | None = None,
    pretrained: str | Path | None = None,
    adapter: str | Path | None = None,
    format: str = "hf",
    outtype: str = "f32",
    gpt2_vocab: str | Path | None = None,
) -> str:
    """Convert one source (exactly one of ckpt, pretrained, adapter) into `out`; a one-line report."""
    if sum(x is not None for x in (ckpt, pretrained, adapter)) != 1:
        raise UserError("convert needs exactly one of --ckpt DIR, --pretrained NAME_OR_DIR or --adapter DIR")
    if format not in FORMATS:
        raise UserError(f"--format must be one of {FORMATS}, got {format!r}")
    if format == "gguf" and ckpt is None:
        raise UserError("--format gguf converts a gpt2lab checkpoint: give --ckpt DIR")
    if adapter is not None:
        from gpt2lab.interop.peft import convert_adapter

        return convert_adapter(adapter, out, gpt2_vocab)
    if pretrained is not None:
        return _to_checkpoint(pretrained, out)
    model, tokenizer, config = _load_checkpoint(ckpt, gpt2_vocab)
    if format == "gguf":
        return _to_gguf(model, tokenizer, out, outtype, Path(str(ckpt)).resolve().name)
    return _to_hf(model, tokenizer, out, {**config, "name": Path(str(ckpt)).resolve().name})


def _load_checkpoint(ckpt: Any, gpt2_vocab: Any) -> tuple[Any, Any, dict[str, Any]]:
    """(model, tokenizer, checkpoint config); a model family other than GPT-2 is refused by name."""
    from gpt2lab import checkpoint
    from gpt2lab.model import GPT
    from gpt2lab.tokenizer import model_tokenizer

    config = checkpoint.read_config(ckpt)
    family = config.get("family") or config.get("model_family") or (config.get("model") or {}).get("family")
    if family not in (None, "gpt", "gpt2", "transformer"):
        raise UserError(
            f"{ckpt} holds a {family!r} model; only GPT-2 transformers convert (Hugging Face, GGUF)"
        )
    model = checkpoint.load_model(ckpt)
    if not isinstance(model, GPT):
        raise UserError(f"{ckpt} holds a {type(model).__name__} model; only GPT-2 transformers convert")
    return model, model_tokenizer(config.get("tokenizer"), gpt2_vocab), config


def _max_diff(a: Any, b: Any) -> float:
    cfg = a.config
    idx = torch.randint(
        0, cfg.vocab_size, (1, min(64, cfg.block_size)), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        return (a(idx) - b(idx)).abs().max().item()


def _to_hf(model: Any, tokenizer: Any, out: Any, card: dict[str, Any]) -> str:
    from gpt2lab.interop.hf import load_pretrained, save_pretrained
    from gpt2lab.interop.hf_tokenizer import read_hf_tokenizer

    save_pretrained(model, out, tokenizer, card=card)
    diff = _max_diff(model, load_pretrained(out))
    if diff != 0.0:
        raise RuntimeError(f"conversion check failed: the exported model's logits differ by {diff:g}")
    back = read_hf_tokenizer(Path(out))
    sample = tokenizer.decode(range(min(tokenizer.vocab_size, 512))) + "".join(tokenizer.special_tokens)
    if back is None or back.encode(sample, "all") != tokenizer.encode(sample, "all"):
        raise RuntimeError("conversion check failed: the exported tokenizer encodes differently")
    chat = " (chat template)" if "<|end|>" in tokenizer.special_tokens else ""
    return (
        f"wrote Hugging Face folder {out}: {model.num_params():,} parameters, tokenizer {tokenizer.name} "
        f"({tokenizer.vocab_size} tokens){chat}; read back: identical logits and token ids"
    )


def _to_gguf(model: Any, tokenizer: Any, out: Any, outtype: str, name: str) -> str:
    import numpy as np

    from gpt2lab.interop.gguf import gguf_tensors, read_gguf, save_gguf

    path = save_gguf(model, tokenizer, out, outtype, name)
    back = read_gguf(path)["tensors"]
    want = gguf_tensors(model)
    if sorted(back) != sorted(want):
        raise RuntimeError(f"conversion check failed: {path} holds tensors {sorted(back)}")
    diff = max(float(np.abs(back[k] - v).max()) for k, v in want.items())
    if outtype == "f32" and diff != 0.0:
        raise RuntimeError(f"conversion check failed: f32 tensors differ by {diff:g}")
    size = path.stat().st_size
    return (
        f"wrote GGUF {path} ({outtype}, {size / 1e6:.1f} MB, {len(want)} tensors, {model.config.vocab_size} "
        f"tokens); read back: max |tensor diff| = {diff:.3g}"
    )


def _to_checkpoint(pretrained: Any, out: Any) -> str:
    from gpt2lab import checkpoint
    from gpt2lab.interop.hf import load_pretrained, pretrained_tokenizer

    model = load_pretrained(pretrained)
    spec = pretrained_tokenizer(pretrained)
    extra: dict[str, Any] = {"source": str(pretrained)}
    if spec is not None:
        extra["tokenizer"] = spec
    checkpoint.save_checkpoint(out, model, extra=extra)
    diff = _max_diff(model, checkpoint.load_model(out))
    if diff != 0.0:
        raise RuntimeError(f"conversion check failed: reloaded model differs by {diff:g} in logits")
    return f"wrote gpt2lab checkpoint {out} ({model.num_params():,} parameters); reloaded logits identical"
