"""LoRA adapters in peft's format, so an adapter moves between gpt2lab, peft and vLLM.

An adapter folder (what `gpt2lab finetune --method lora` writes as OUT_DIR/adapter):
  adapter_config.json        peft's LoraConfig: peft_type "LORA", r, lora_alpha, lora_dropout,
                             target_modules, fan_in_fan_out (GPT-2's Conv1D), base_model_name_or_path,
                             trainable_token_indices (the rows fine-tuning trained, see below)
  adapter_model.safetensors  peft's names: base_model.model.transformer.h.0.attn.c_attn.lora_A.weight
                             (r, in) and .lora_B.weight (out, r), the same layouts as ours; the trained
                             embedding rows as ...transformer.wte.token_adapter.trainable_tokens_delta
  tokenizer files            the base's tokenizer plus the chat template's tokens and chat_template
  gpt2lab_adapter.json       what peft has no field for: the base architecture, the template tokens,
                             the vocabulary padding, the step
The chat template's tokens have no trained row in the base, so their rows are part of the adapter:
every row from the first template token to the end of the (possibly grown) embedding, which makes
the adapter exact whether the template took the base's padding rows or grew the matrix. A base that
had to grow is resized first (transformers: model.resize_token_embeddings(gpt2lab_adapter.json's
vocab_rows)); the adapter then overwrites every row the resize made.

Read back (`--adapter DIR`): peft's format, made by gpt2lab or by peft itself, and the format of
gpt2lab before peft's (adapter.safetensors + adapter_config.json with format "gpt2lab-lora-adapter"),
so adapters users already have keep working; `gpt2lab convert --adapter OLD --out NEW` rewrites one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from gpt2lab import lora
from gpt2lab.atomic import atomic_write, read_json, write_json
from gpt2lab.checkpoint import copy_weights, read_safetensors
from gpt2lab.errors import UserError
from gpt2lab.model import GPT

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
INFO = "gpt2lab_adapter.json"
PREFIX = "base_model.model."  # peft's names: PeftModel.base_model (LoraModel).model (the transformers model)
TOKEN_ROWS = ".token_adapter.trainable_tokens_delta"
OLD_FORMAT, OLD_WEIGHTS = "gpt2lab-lora-adapter", "adapter.safetensors"
ARCH_FIELDS = (
    "block_size", "vocab_size", "n_layer", "n_head", "n_embd", "n_inner", "bias", "tie_weights",
    "pos_embedding", "norm_position", "activation",
)  # fmt: skip
# adapter_config.json keys that do not change what a LoRA adapter computes at inference. Any other key
# with a value (use_dora, use_rslora, rank_pattern, modules_to_save, lora_bias, ...) is refused by name.
NEUTRAL_KEYS = {
    "peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "target_modules", "fan_in_fan_out",
    "base_model_name_or_path", "revision", "inference_mode", "init_lora_weights", "peft_version",
    "auto_mapping", "trainable_token_indices", "megatron_core", "qalora_group_size", "layers_pattern",
    "exclude_modules", "ensure_weight_tying", "bias",
}  # fmt: skip


def save_adapter(
    model: GPT,
    out_dir: str | Path,
    *,
    base: str | None = None,
    tokenizer: Any = None,
    template_tokens: dict[str, int] | None = None,
    extra: dict[str, Any] | None = None,
    rows: list[int] | None = None,
) -> Path:
    """Write an adapted model's LoRA weights (and trained token rows) as a peft adapter folder.

    rows: the embedding rows to store; default every row from the first template token to the end.
    """
    from safetensors.torch import save_file

    from gpt2lab.interop.hf_tokenizer import tokenizer_files

    settings = lora.lora_settings(model)
    tensors = {}
    for name, layer in lora.lora_layers(model).items():
        tensors[f"{PREFIX}{name}.lora_A.weight"] = layer.lora_A.detach().cpu().contiguous()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = layer.lora_B.detach().cpu().contiguous()
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": settings["rank"],
        "lora_alpha": settings["alpha"],
        "lora_dropout": settings["dropout"],
        "target_modules": settings["targets"],
        "fan_in_fan_out": True,  # transformers' GPT-2 keeps these layers as Conv1D, weight (in, out)
        "bias": "none",
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
        "use_rslora": False,
        "use_dora": False,
        "trainable_token_indices": None,
    }
    if template_tokens and rows is None:
        rows = list(range(min(template_tokens.values()), model.config.vocab_size))
    if rows:
        indices = {"wte": rows}
        tensors[f"{PREFIX}transformer.wte{TOKEN_ROWS}"] = model.transformer.wte.weight[rows].detach().cpu()
        if not model.config.tie_weights:
            indices["lm_head"] = rows
            tensors[f"{PREFIX}lm_head{TOKEN_ROWS}"] = model.lm_head.weight[rows].detach().cpu()
        config["trainable_token_indices"] = indices
    info = {
        "format": "gpt2lab-adapter-info",
        "version": 1,
        "model": model.config.to_dict(),
        "vocab_rows": model.config.vocab_size,
        "template_tokens": dict(template_tokens or {}),
        **(extra or {}),
    }
    files = {} if tokenizer is None else tokenizer_files(tokenizer, model.config.block_size)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / WEIGHTS, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    for name, text in files.items():
        atomic_write(out / name, lambda p, text=text: p.write_text(text, encoding="utf-8"))
    write_json(out / INFO, info)
    write_json(out / CONFIG, config)  # last: a folder with adapter_config.json is complete
    return out


# --- reading ------------------------------------------------------------------------------------


def read_adapter(adapter_dir: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]:
    """(LoRA settings, tensors under our names, info) of an adapter folder in peft's or the old format.

    settings: lora.lora_settings' dict with the wrapped layers' full names as targets. tensors: the
    `...lora_A` / `...lora_B` weights, and "rows:transformer.wte" / "rows:lm_head" -> (indices, rows).
    """
    d = Path(adapter_dir)
    config = read_json(d / CONFIG, f"{d} is not a LoRA adapter directory: no {CONFIG}")
    if not isinstance(config, dict):
        raise UserError(f"{d / CONFIG} is not a JSON object")
    if config.get("format") == OLD_FORMAT:
        return _read_old(d, config)
    if config.get("peft_type") != "LORA":
        raise UserError(
            f"{d / CONFIG}: peft_type is {config.get('peft_type')!r}; gpt2lab reads LoRA adapters"
        )
    for key, value in config.items():
        if key not in NEUTRAL_KEYS and value not in (None, False, {}, [], "", "none"):
            raise UserError(f"{d / CONFIG}: {key} = {value!r} is a peft option gpt2lab does not implement")
    if config.get("bias", "none") != "none":
        raise UserError(f"{d / CONFIG}: bias = {config['bias']!r}; gpt2lab's LoRA trains no biases")
    raw = read_safetensors(d / WEIGHTS)
    tensors: dict[str, Any] = {}
    indices = config.get("trainable_token_indices") or {}
    if isinstance(indices, list):
        indices = {"wte": indices}
    for key, t in raw.items():
        name = key.removeprefix(PREFIX)
        if name.endswith((".lora_A.weight", ".lora_B.weight")):
            tensors[name.removesuffix(".weight")] = t
        elif name.endswith(TOKEN_ROWS):
            module = name.removesuffix(TOKEN_ROWS)
            ids = indices.get(module.split(".")[-1])
            if ids is None or len(ids) != t.shape[0]:
                raise UserError(f"{d / WEIGHTS}: {key} does not match trainable_token_indices {indices}")
            tensors[f"rows:{module}"] = (list(ids), t)
        else:
            raise UserError(f"{d / WEIGHTS}: tensor {key!r} is not a LoRA weight gpt2lab can apply")
    layers = sorted({k.rsplit(".", 1)[0] for k in tensors if not k.startswith("rows:")})
    if not layers:
        raise UserError(f"{d / WEIGHTS}: no lora_A / lora_B tensors")
    settings = {
        "rank": int(config["r"]),
        "alpha": config["lora_alpha"],
        "dropout": float(config.get("lora_dropout") or 0.0),
        "targets": layers,
    }
    info = read_json(d / INFO, "") if (d / INFO).is_file() else {}
    return settings, tensors, info


def _read_old(d: Path, config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The adapter format of gpt2lab before peft's: our names, `token_rows` from token_rows_start."""
    tensors: dict[str, Any] = dict(read_safetensors(d / OLD_WEIGHTS))
    rows = tensors.pop("token_rows", None)
    if rows is not None:
        start = config["token_rows_start"]
        tensors["rows:transformer.wte"] = (list(range(start, start + rows.shape[0])), rows)
    settings = {k: config[k] for k in ("rank", "alpha", "dropout", "targets")}
    info = {
        k: config[k]
        for k in ("model", "template_tokens", "pad_vocab_multiple", "tokenizer", "base")
        if k in config
    }
    return settings, tensors, info


def check_architecture(model: GPT, expected: dict[str, Any], source: str) -> None:
    """UserError naming every architecture field in which the model differs from `expected`."""
    have = model.config.to_dict()
    diff = [f"{k} {expected.get(k)!r} vs {have[k]!r}" for k in ARCH_FIELDS if expected.get(k) != have[k]]
    if diff:
        raise UserError(f"{source} was trained on another base architecture ({', '.join(diff)})")


def load_adapter(model: GPT, adapter_dir: str | Path) -> GPT:
    """Put a saved adapter onto a base model (its added tokens already in place: attach_adapter does
    that), merged into the weights. The base must have the adapter's architecture and shapes."""
    settings, tensors, info = read_adapter(adapter_dir)
    if info.get("model"):
        check_architecture(model, info["model"], f"adapter {adapter_dir}")
    lora.apply_lora_settings(model, settings)
    names = [k for k in model.state_dict() if k.endswith((".lora_A", ".lora_B"))]
    lora_tensors = {k: v for k, v in tensors.items() if not k.startswith("rows:")}
    copy_weights(model, lora_tensors, f"adapter {adapter_dir}", names=names)
    with torch.no_grad():
        for key, (ids, rows) in ((k, v) for k, v in tensors.items() if k.startswith("rows:")):
            weight = model.get_submodule(key.removeprefix("rows:")).weight
            if max(ids) >= weight.shape[0] or rows.shape[1] != weight.shape[1]:
                raise UserError(
                    f"adapter {adapter_dir}: rows {min(ids)}..{max(ids)} of {key[5:]} do not fit the base's "
                    f"{tuple(weight.shape)}; resize the base's vocabulary first"
                )
            weight[ids] = rows.to(weight.dtype)
    return lora.merge_lora(model)


def attach_adapter(model: GPT, tok: Any, adapter_dir: str | Path) -> Any:
    """Put a LoRA adapter (with its template tokens' rows) onto its base model, merged; the tokenizer
    with the template tokens. UserError when the base is not the adapter's (architecture, tokens)."""
    from gpt2lab import sft
    from gpt2lab.interop.hf_tokenizer import read_hf_tokenizer

    _, _, info = read_adapter(adapter_dir)
    expected = info.get("template_tokens")
    if expected is None:  # a peft-made adapter: its tokenizer files say which tokens it added
        own = read_hf_tokenizer(Path(adapter_dir))
        expected = {t: own.special_tokens[t] for t in sft.TEMPLATE_TOKENS if own and t in own.special_tokens}
    if expected:
        tok, _ = sft.add_template_tokens(model, tok, info.get("pad_vocab_multiple", 64))
        have = {t: tok.special_tokens.get(t) for t in expected}
        if have != expected:
            raise UserError(
                f"adapter {adapter_dir} has template tokens {expected}; this base gives them {have}"
            )
    load_adapter(model, adapter_dir)
    return tok


def convert_adapter(src: str | Path, out: str | Path, gpt2_vocab: str | Path | None = None) -> str:
    """Rewrite an adapter of gpt2lab's old format in peft's (with its tokenizer files); a one-line report.

    The old format kept only the template tokens' rows, so those are the converted adapter's rows.
    """
    from gpt2lab.config import GPTConfig
    from gpt2lab.tokenizer import model_tokenizer

    d = Path(src)
    config = read_json(d / CONFIG, f"{d} is not a LoRA adapter directory: no {CONFIG}")
    if not isinstance(config, dict) or config.get("format") != OLD_FORMAT:
        raise UserError(f"{d} is not an adapter in gpt2lab's old format (a peft adapter needs no conversion)")
    settings, tensors, info = _read_old(d, config)
    model = GPT(GPTConfig.from_dict(info["model"]))
    lora.apply_lora_settings(model, settings)
    names = [k for k in model.state_dict() if k.endswith((".lora_A", ".lora_B"))]
    ids, rows = tensors.pop("rows:transformer.wte", ([], None))
    copy_weights(model, tensors, str(d / OLD_WEIGHTS), names=names)
    if rows is not None:
        with torch.no_grad():
            model.transformer.wte.weight[ids] = rows
    tok = model_tokenizer(info.get("tokenizer"), gpt2_vocab)
    extra = {k: info[k] for k in ("pad_vocab_multiple", "base") if k in info}
    template = info.get("template_tokens") or {}
    save_adapter(
        model, out, base=info.get("base"), tokenizer=tok, template_tokens=template, extra=extra, rows=ids
    )
    return f"wrote peft adapter {out} ({len(lora.lora_layers(model))} adapted layers) from {d}"
