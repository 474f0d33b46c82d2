"""GPT-2 in Hugging Face's layout, both ways: the state-dict adapter, config.json, and the full model folder.

The layout: config.json (GPT2Config) + model.safetensors (or pytorch_model.bin), tensor names
`transformer.h.0.attn.c_attn.weight`, ... (or the same without `transformer.`, as the hub's own
gpt2 files have them). The names are ours too; the one real difference is that GPT-2 stores its
four projections as Conv1D, weight (in, out), the transpose of nn.Linear's (out, in).

An exported folder is complete: weights and config, the tokenizer (hf_tokenizer.py), a
generation_config.json with the model's own end-of-text id, and a model card. Architecture options
GPT2Config cannot hold are refused by name (`check_convertible`), never exported as another function.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import torch

from gpt2lab.atomic import atomic_write, read_json, write_json
from gpt2lab.checkpoint import copy_weights, model_tensors, read_pickle
from gpt2lab.config import GPTConfig
from gpt2lab.errors import UserError
from gpt2lab.ladder import build_model
from gpt2lab.model import GPT

HUB_NAMES = {  # OpenAI's four GPT-2 sizes on the Hugging Face hub
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
}
HUB_FILES = ["config.json", "model.safetensors", "vocab.json", "merges.txt", "tokenizer.json"]
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
MASK_BUFFERS = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers older files carry; not weights
TANH_GELU = ("gelu_new", "gelu_pytorch_tanh")  # transformers' names for GPT-2's tanh-approximated GELU
EXACT_GELU = ("gelu",)  # transformers' name for the exact (erf) GELU

# What transformers' GPT2Config can hold, per GPTConfig field: None = any value, else the values that
# convert. A field not listed converts only at its default (every default is GPT-2's own behaviour),
# so an architecture option added later is refused by name until someone maps it here.
ANY = None
HF_CONVERTIBLE: dict[str, tuple[Any, ...] | None] = {
    "block_size": ANY,
    "vocab_size": ANY,
    "n_layer": ANY,
    "n_head": ANY,
    "n_embd": ANY,
    "n_inner": ANY,
    "dropout": ANY,
    "bias": ANY,  # no bias is exported as zero biases: the same function
    "tie_weights": ANY,
    "attn_impl": ANY,  # how attention is computed, not what
    "activation": ("gelu_tanh", "gelu"),
    "layer_norm_epsilon": ANY,
    "init_std": ANY,
    "zero_init": ANY,  # how training starts, not the function
    "pos_embedding": ("learned",),  # GPT2Config has no sinusoidal positions
    "norm_position": ("pre",),  # nor post-LayerNorm blocks
}


def check_convertible(cfg: Any, table: dict[str, tuple[Any, ...] | None], target: str) -> None:
    """UserError naming the first config field whose value `target` cannot express (see HF_CONVERTIBLE)."""
    if not isinstance(cfg, GPTConfig):
        raise UserError(f"cannot export to {target}: a {type(cfg).__name__} model is not a GPT-2 transformer")
    for field in dataclasses.fields(cfg):
        value = getattr(cfg, field.name)
        allowed = table.get(field.name, (field.default,))
        if allowed is not ANY and value not in allowed:
            raise UserError(
                f"cannot export to {target}: GPTConfig.{field.name} = {value!r} has no equivalent there "
                f"(it holds {' or '.join(repr(a) for a in allowed)})"
            )


# --- the state-dict adapter ----------------------------------------------------------------------


def with_biases(model: GPT) -> dict[str, torch.Tensor]:
    """The model's tensors (model_tensors: on CPU, a tied lm_head left out) with zero biases where a
    bias-free model has none: GPT-2's formats always have biases, and zeros compute the same function."""
    tensors = model_tensors(model)
    if not model.config.bias:
        for name, module in model.named_modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.LayerNorm)) and name != "lm_head":
                tensors[f"{name}.bias"] = torch.zeros(module.weight.shape[0], dtype=module.weight.dtype)
    return tensors


def to_hf_tensors(model: GPT) -> dict[str, torch.Tensor]:
    """Our weights under transformers' GPT2LMHeadModel names and layouts (Conv1D transposed)."""
    return {k: v.t().contiguous() if k.endswith(CONV1D) else v for k, v in with_biases(model).items()}


def from_hf_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' GPT-2 tensors (GPT2LMHeadModel or GPT2Model names) under our names and layouts."""
    out = {}
    for name, t in tensors.items():
        if name.endswith(MASK_BUFFERS):
            continue
        if not name.startswith(("transformer.", "lm_head.")):
            name = "transformer." + name  # GPT2Model files: the hub's own gpt2 weights are stored this way
        out[name] = t.t() if name.endswith(CONV1D) else t
    return out


def config_from_hf(hf: dict[str, Any], source: str, **overrides: Any) -> GPTConfig:
    """GPTConfig for a transformers GPT2Config dict; anything we would compute differently is an error."""
    if hf.get("model_type", "gpt2") != "gpt2":
        raise UserError(f"{source}: model_type is {hf.get('model_type')!r}, not 'gpt2'")
    act = hf.get("activation_function", "gelu_new")
    if act not in TANH_GELU + EXACT_GELU:
        raise UserError(f"{source}: activation_function {act!r} is not a GELU {TANH_GELU + EXACT_GELU}")
    if not hf.get("scale_attn_weights", True) or hf.get("scale_attn_by_inverse_layer_idx", False):
        raise UserError(f"{source}: attention scaling differs from GPT-2's 1/sqrt(head_size)")
    try:
        fields = dict(
            block_size=hf["n_positions"],
            vocab_size=hf["vocab_size"],
            n_layer=hf["n_layer"],
            n_head=hf["n_head"],
            n_embd=hf["n_embd"],
        )
    except KeyError as e:
        raise UserError(f"{source}: config.json has no {e.args[0]!r}") from None
    fields.update(
        n_inner=hf.get("n_inner"),
        layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
        tie_weights=hf.get("tie_word_embeddings", True),
        activation="gelu" if act in EXACT_GELU else "gelu_tanh",
        dropout=0.0,  # a loaded model is for evaluation or fine-tuning; ask for dropout explicitly
    )
    return GPTConfig.from_dict({**fields, **overrides})


def config_to_hf(cfg: GPTConfig, eot_id: int | None = None) -> dict[str, Any]:
    """The transformers GPT2Config dict for a convertible GPTConfig; eot_id: the tokenizer's <|endoftext|>."""
    check_convertible(cfg, HF_CONVERTIBLE, "Hugging Face GPT-2")
    hf: dict[str, Any] = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.block_size,
        "n_ctx": cfg.block_size,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": cfg.n_inner,
        "activation_function": "gelu" if cfg.activation == "gelu" else "gelu_new",
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout,
        "layer_norm_epsilon": cfg.layer_norm_epsilon,
        "initializer_range": cfg.init_std,
        "scale_attn_weights": True,
        "tie_word_embeddings": cfg.tie_weights,
        "use_cache": True,
        "torch_dtype": "float32",
    }
    # GPT2Config's defaults are GPT-2's own id 50256: a model with another vocabulary must say its own,
    # or transformers warns and generate() never stops at the model's <|endoftext|>.
    hf["bos_token_id"] = hf["eos_token_id"] = eot_id
    return hf


# --- reading a Hugging Face folder ---------------------------------------------------------------


def resolve(name_or_dir: str | Path) -> Path:
    """A local directory as given, or a hub name ("gpt2", ...) downloaded (once) into the HF cache."""
    path = Path(name_or_dir)
    if path.is_dir():
        return path
    name = str(name_or_dir)
    if name not in HUB_NAMES:
        raise UserError(f"{name!r} is neither a directory nor one of the hub models {list(HUB_NAMES)}")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise UserError(
            f"downloading {name!r} needs huggingface_hub: pip install 'gpt2lab[hf]', "
            "or pass a local directory with config.json and model.safetensors"
        ) from None
    from gpt2lab.download import HUB_REVISIONS, verify_hub_files

    repo = HUB_NAMES[name]
    try:  # a pinned commit: the same files every time, whatever the repository's main branch becomes
        path = Path(snapshot_download(repo, revision=HUB_REVISIONS[repo], allow_patterns=HUB_FILES))
    except Exception as e:  # offline, proxy, disk: the hub client raises many types
        raise UserError(
            f"could not download {name!r} from the Hugging Face hub ({type(e).__name__}); when offline, "
            "copy its config.json and model.safetensors into a directory and pass that directory"
        ) from None
    return verify_hub_files(repo, path, HUB_FILES)


def read_hf_tensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a Hugging Face model directory: safetensors (single or sharded) or pytorch_model.bin."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        if (path / "model.safetensors").is_file():
            return load_file(path / "model.safetensors")
        index = path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = read_json(index, "")
            weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise UserError(f"{index}: 'weight_map' must map tensor names to file names")
            shards = sorted(set(weight_map.values()))
            return {k: v for shard in shards for k, v in load_file(path / shard).items()}
        if (path / "pytorch_model.bin").is_file():
            # weights_only: a pickle from the internet must not be able to run code.
            bin_file = path / "pytorch_model.bin"
            state = read_pickle(bin_file, "a PyTorch state dict")
            if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
                raise UserError(f"{bin_file} is not a state dict (tensors by name)")
            return state
    except (SafetensorError, OSError, RuntimeError, KeyError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: the weights cannot be read ({type(e).__name__}: {e})") from None
    raise UserError(f"{path}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def load_pretrained(name_or_dir: str | Path, **overrides: Any) -> GPT:
    """A GPT with the weights of a Hugging Face GPT-2 directory or hub name, in eval mode.

    overrides set GPTConfig fields (e.g. dropout=0.1). The folder's tokenizer: `pretrained_tokenizer`.
    """
    path = resolve(name_or_dir)
    hf_config = read_json(
        path / "config.json", f"{path}: no config.json (expected a Hugging Face GPT-2 directory)"
    )
    model = build_model(config_from_hf(hf_config, str(path), **overrides), str(path / "config.json"))
    copy_weights(model, from_hf_tensors(read_hf_tensors(path)), str(path))
    return model.eval()


def pretrained_tokenizer(name_or_dir: str | Path) -> dict[str, Any] | None:
    """The tokenizer spec of a Hugging Face folder's own tokenizer files; None: GPT-2's vocabulary
    (read from the folder's vocab.json + merges.txt when it has them, else found as gpt2lab finds it)."""
    from gpt2lab.interop.hf_tokenizer import read_hf_tokenizer

    tok = read_hf_tokenizer(resolve(name_or_dir))
    return None if tok is None else tok.to_spec()


# --- writing a Hugging Face folder ---------------------------------------------------------------


def save_pretrained(
    model: GPT,
    out_dir: str | Path,
    tokenizer: Any = None,
    *,
    card: dict[str, Any] | None = None,
) -> Path:
    """Write a Hugging Face GPT-2 folder that transformers loads to the same function.

    With a tokenizer (a gpt2lab Tokenizer) the folder is complete: tokenizer files, the chat template
    of fine-tuned models, generation_config.json and a model card (README.md, from `card`: the
    checkpoint's config). Without one it holds config.json and model.safetensors only. Other files in
    out_dir are kept; each written file is replaced atomically.
    """
    from safetensors.torch import save_file

    from gpt2lab.interop import hf_tokenizer

    cfg = model.config
    eot_id = None if tokenizer is None else tokenizer.eot_id
    hf_config = config_to_hf(cfg, eot_id)  # refuses what GPT2Config cannot hold, before anything is written
    if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
        raise UserError(
            f"tokenizer {tokenizer.name!r} has {tokenizer.vocab_size} tokens, more than the model's "
            f"vocab_size {cfg.vocab_size}"
        )
    files = {} if tokenizer is None else hf_tokenizer.tokenizer_files(tokenizer, cfg.block_size)
    tensors = to_hf_tensors(model)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / "model.safetensors", lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    write_json(out_dir / "config.json", hf_config)
    for name, text in files.items():
        atomic_write(out_dir / name, lambda p, text=text: p.write_text(text, encoding="utf-8"))
    if tokenizer is not None:
        write_json(out_dir / "generation_config.json", generation_config(tokenizer, cfg))
        atomic_write(out_dir / "README.md", lambda p: p.write_text(model_card(model, tokenizer, card or {})))
    return out_dir


def generation_config(tokenizer: Any, cfg: GPTConfig) -> dict[str, Any]:
    """generation_config.json: the model's own end ids, and its padding rows never sampled.

    A chat model ends a reply with <|end|> (sft.py's template) or <|endoftext|>: both are eos ids, as
    gpt2lab chat stops at either. Rows past the tokenizer (vocab_size padded to a multiple of 64) are
    no token: suppress_tokens keeps transformers' generate() off them, as gpt2lab's sampling is.
    """
    from gpt2lab import sft

    eos: Any = tokenizer.eot_id
    if sft.END in tokenizer.special_tokens:
        eos = sft.chat_stop_ids(tokenizer)
    out: dict[str, Any] = {
        "bos_token_id": tokenizer.eot_id,
        "eos_token_id": eos,
        "pad_token_id": tokenizer.eot_id,
        "max_length": cfg.block_size,
    }
    if cfg.vocab_size > tokenizer.vocab_size:
        out["suppress_tokens"] = list(range(tokenizer.vocab_size, cfg.vocab_size))
    return out


def model_card(model: GPT, tokenizer: Any, info: dict[str, Any]) -> str:
    """README.md: architecture, data, tokens seen, val loss, and how to load the folder."""
    from gpt2lab import sft

    cfg, train = model.config, info.get("train") or {}
    step = info.get("step")
    tokens = info.get("tokens")
    if tokens is None and step is not None and train.get("total_batch_size"):
        tokens = step * train["total_batch_size"]
    best = info.get("best_val")
    best = None if best is None or not math.isfinite(best) else best
    chat = sft.END in tokenizer.special_tokens
    rows = [
        ("architecture", f"GPT-2: {cfg.n_layer} layers, {cfg.n_head} heads, width {cfg.n_embd}, "
         f"context {cfg.block_size}, MLP {cfg.mlp_size}, activation {cfg.activation}"),
        ("parameters", f"{model.num_params():,}"),
        ("vocabulary", f"{tokenizer.name} ({tokenizer.vocab_size} tokens; {cfg.vocab_size} embedding rows)"),
        ("training data", str(train.get("data") or "not recorded")),
        ("started from", str(train.get("init_from") or "not recorded")),
        ("steps", "not recorded" if step is None else f"{step:,}"),
        ("tokens seen", "not recorded" if tokens is None else f"{tokens:,}"),
        ("best val loss", "not recorded" if best is None else f"{best:.4f}"),
        ("chat template", "yes (sft.render_chat's)" if chat else "no"),
    ]  # fmt: skip
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    chat_use = (
        '\nmessages = [{"role": "user", "content": "Hello!"}]\n'
        "ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors='pt')\n"
        if chat
        else ""
    )
    return f"""---
library_name: transformers
pipeline_tag: text-generation
tags: [gpt2, gpt2lab]
---
# {info.get("name") or "gpt2lab model"}

A GPT-2 trained with gpt2lab and exported by `gpt2lab convert`.

| | |
|---|---|
{table}

## Load

```python
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

tok = AutoTokenizer.from_pretrained("PATH")
model = AutoModelForCausalLM.from_pretrained("PATH")
print(pipeline("text-generation", model=model, tokenizer=tok)("Once upon a time", max_new_tokens=40))
{chat_use}```

Also: `vllm serve PATH`, `lm_eval --model hf --model_args pretrained=PATH`, and back into gpt2lab with
`gpt2lab sample --pretrained PATH` or `gpt2lab convert --pretrained PATH --out CKPT`.
"""
