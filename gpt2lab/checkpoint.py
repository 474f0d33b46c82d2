"""Checkpoints on disk: model.safetensors (GPT-2 names, raw weights) + config.json, written atomically.

A checkpoint is a directory. It is written complete under a temporary name and renamed into
place, so a crash leaves either the old checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from gpt2lab.atomic import atomic_write, write_json  # noqa: F401  (re-exported for callers)
from gpt2lab.config import GPTConfig
from gpt2lab.errors import UserError
from gpt2lab.model import GPT

FORMAT = "gpt2lab-checkpoint"
VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def model_tensors(model: GPT) -> dict[str, torch.Tensor]:
    """The model's weights by name, on CPU, contiguous; a tied lm_head is left out (it is wte)."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_weights:
        tensors.pop("lm_head.weight")
    return tensors


def copy_weights(model: GPT, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy named tensors into the model, after checking that the names and shapes match exactly.

    The one loader behind our checkpoints and Hugging Face imports: any missing, unexpected or
    mis-shaped tensor is a UserError naming it and `source`. A tied lm_head may be absent.
    """
    expected = dict(model.state_dict())
    if model.config.tie_weights:
        expected.pop("lm_head.weight")
        tensors = {k: v for k, v in tensors.items() if k != "lm_head.weight"}
    missing = [k for k in expected if k not in tensors]
    extra = [k for k in tensors if k not in expected]
    if missing:
        raise UserError(f"{source}: missing tensor {_names(missing)} for this model config")
    if extra:
        raise UserError(f"{source}: unexpected tensor {_names(extra)} for this model config")
    for name, target in expected.items():
        got = tensors[name]
        if tuple(got.shape) != tuple(target.shape):
            raise UserError(
                f"{source}: tensor {name!r} has shape {tuple(got.shape)}, expected {tuple(target.shape)}"
            )
    with torch.no_grad():
        for name, target in expected.items():
            target.copy_(tensors[name])


def _names(names: list[str]) -> str:
    return repr(names[0]) + (f" (and {len(names) - 1} more)" if len(names) > 1 else "")


def save_checkpoint(out_dir: str | Path, model: GPT, extra: dict[str, Any] | None = None) -> Path:
    """Write out_dir/{model.safetensors, config.json}; config.json = {"model": GPTConfig fields, **extra}."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        save_file(model_tensors(model), tmp / WEIGHTS, metadata={"format": "pt"})
        config = {"format": FORMAT, "version": VERSION, "model": model.config.to_dict(), **(extra or {})}
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if out_dir.exists():  # keep the old one whole until the new one is in place
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            os.rename(out_dir, old)
            os.rename(tmp, out_dir)
            shutil.rmtree(old)
        else:
            os.rename(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def read_config(ckpt_dir: str | Path) -> dict[str, Any]:
    """config.json of a gpt2lab checkpoint, checked for format and version."""
    path = Path(ckpt_dir) / CONFIG
    if not path.is_file():
        raise UserError(f"{ckpt_dir} is not a gpt2lab checkpoint: no {CONFIG}")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise UserError(f"{path} is not a gpt2lab checkpoint config (format is not {FORMAT!r})")
    if config.get("version") != VERSION:
        raise UserError(
            f"{path} has checkpoint version {config.get('version')!r}; this gpt2lab reads {VERSION}"
        )
    return config


def load_model(ckpt_dir: str | Path, **overrides: Any) -> GPT:
    """The GPT stored in a checkpoint directory, in eval mode; overrides set config fields."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    config = read_config(ckpt_dir)
    model = GPT(GPTConfig.from_dict({**config["model"], **overrides}))
    weights = Path(ckpt_dir) / WEIGHTS
    if not weights.is_file():
        raise UserError(f"{ckpt_dir}: no {WEIGHTS}")
    try:
        tensors = load_file(weights)
    except (SafetensorError, OSError) as e:
        raise UserError(f"{weights} cannot be read: {e}") from None
    copy_weights(model, tensors, str(weights))
    return model.eval()
