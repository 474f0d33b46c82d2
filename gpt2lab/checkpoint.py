"""Checkpoints on disk: model.safetensors (GPT-2 names, raw weights) + config.json, written atomically.

A checkpoint is a directory. It is written complete under a temporary name and renamed into
place, so a crash leaves either the old checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch

from gpt2lab.atomic import atomic_write, read_json, write_json  # noqa: F401  (re-exported for callers)
from gpt2lab.config import GPTConfig
from gpt2lab.errors import UserError
from gpt2lab.model import GPT

FORMAT = "gpt2lab-checkpoint"
VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
STATE = "state.pt"
LATEST, BEST = "latest", "best"  # pointer files in a run directory: the name of a step_NNNNNN checkpoint


def model_tensors(model: GPT, tensors: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The model's weights by name (or `tensors`, gathered by the caller from a sharded model), on CPU,
    contiguous; a tied lm_head is left out (it is wte)."""
    source = model.state_dict() if tensors is None else tensors
    tensors = {k: v.detach().cpu().contiguous() for k, v in source.items()}
    if model.config.tie_weights:
        tensors.pop("lm_head.weight", None)
    return tensors


def copy_weights(
    model: GPT, tensors: dict[str, torch.Tensor], source: str, names: Collection[str] | None = None
) -> None:
    """Copy named tensors into the model, after checking that the names and shapes match exactly.

    The one loader behind our checkpoints, Hugging Face imports and LoRA adapters: any missing,
    unexpected or mis-shaped tensor is a UserError naming it and `source`. A tied lm_head may be
    absent. names: only these of the model's tensors are expected (an adapter's), not all of them.
    """
    expected = {k: v for k, v in model.state_dict().items() if names is None or k in names}
    if model.config.tie_weights:
        expected.pop("lm_head.weight", None)
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


def save_checkpoint(
    out_dir: str | Path,
    model: GPT,
    extra: dict[str, Any] | None = None,
    state: dict[str, Any] | None = None,
    tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write out_dir/{model.safetensors, config.json[, state.pt]} as one atomic directory.

    config.json = {"format", "version", "model": GPTConfig fields, **extra}; state.pt (optimizer,
    step, data position, RNG states: tensors and plain containers only) loads with weights_only=True.
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        save_file(model_tensors(model, tensors), tmp / WEIGHTS, metadata={"format": "pt"})
        config = {"format": FORMAT, "version": VERSION, "model": model.config.to_dict(), **(extra or {})}
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        if state is not None:
            torch.save(state, tmp / STATE)
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


def step_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / f"step_{step:06d}"


def set_pointer(run_dir: str | Path, name: str, ckpt: Path) -> None:
    """Point run_dir/<name> ("latest" or "best") at a checkpoint; written last, atomically."""
    atomic_write(Path(run_dir) / name, lambda p: p.write_text(ckpt.name + "\n"))


def resolve(path: str | Path, pointer: str = LATEST) -> Path:
    """A checkpoint directory as given, or the one a run directory's `latest` (or `best`) points at."""
    path = Path(path)
    if (path / CONFIG).is_file():
        return path
    if (path / pointer).is_file():
        target = path / (path / pointer).read_text().strip()
        if (target / CONFIG).is_file():
            return target
        raise UserError(f"{path / pointer} points at {target.name}, which is not a complete checkpoint")
    if not path.exists():
        raise UserError(f"checkpoint {str(path)!r} does not exist")
    raise UserError(f"{path} is not a gpt2lab checkpoint: no {CONFIG} and no {pointer!r} pointer")


def prune(run_dir: str | Path, keep_last: int) -> None:
    """Delete step checkpoints except the newest keep_last and those `latest` and `best` point at.

    Also removes what a killed writer left: `.step_*.tmp-*` (never renamed into place) directories.
    """
    run_dir = Path(run_dir)
    for stale in run_dir.glob(".step_*.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    keep = {(run_dir / p).read_text().strip() for p in (LATEST, BEST) if (run_dir / p).is_file()}
    steps = sorted(d for d in run_dir.glob("step_*") if d.is_dir())
    for d in steps[: max(0, len(steps) - keep_last)]:
        if d.name not in keep:
            shutil.rmtree(d, ignore_errors=True)


def load_state(ckpt_dir: str | Path) -> dict[str, Any]:
    """state.pt of a training checkpoint, loaded with weights_only=True (no code runs from the file)."""
    path = Path(ckpt_dir) / STATE
    if not path.is_file():
        raise UserError(f"{ckpt_dir} has no {STATE}: it holds weights only and cannot resume training")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated or foreign file: pickle, zip and torch raise many types
        raise UserError(f"{path} cannot be read ({type(e).__name__}: {e})") from None


def read_config(ckpt_dir: str | Path) -> dict[str, Any]:
    """config.json of a gpt2lab checkpoint (or of the one a run directory's `latest` points at)."""
    ckpt_dir = resolve(ckpt_dir)
    path = ckpt_dir / CONFIG
    config = read_json(path, f"{ckpt_dir} is not a gpt2lab checkpoint: no {CONFIG}")
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise UserError(f"{path} is not a gpt2lab checkpoint config (format is not {FORMAT!r})")
    if config.get("version") != VERSION:
        raise UserError(
            f"{path} has checkpoint version {config.get('version')!r}; this gpt2lab reads {VERSION}"
        )
    return config


def is_checkpoint(path: str | Path) -> bool:
    """Whether path is a gpt2lab checkpoint or a run directory with a `latest` one (not a HF directory)."""
    path = Path(path)
    if (path / LATEST).is_file():
        return True
    try:
        return json.loads((path / CONFIG).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; UserError when it cannot be read (missing, truncated, foreign)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path} cannot be read: {e}") from None


def load_model(ckpt_dir: str | Path, merge: bool = True, **overrides: Any) -> GPT:
    """The GPT stored in a checkpoint directory, in eval mode; overrides set config fields.

    A LoRA run's checkpoint (config "lora") holds the frozen base and the adapter: it comes back
    with the adapter merged into the weights (merge=False: adapters kept apart, as training resumes).
    """
    ckpt_dir = resolve(ckpt_dir)
    config = read_config(ckpt_dir)
    model = GPT(GPTConfig.from_dict({**config["model"], **overrides}))
    if config.get("lora"):
        from gpt2lab.lora import apply_lora_settings

        apply_lora_settings(model, config["lora"])
    weights = Path(ckpt_dir) / WEIGHTS
    if not weights.is_file():
        raise UserError(f"{ckpt_dir}: no {WEIGHTS}")
    copy_weights(model, read_safetensors(weights), str(weights))
    if config.get("lora") and merge:
        from gpt2lab.lora import merged_copy

        return merged_copy(model)
    return model.eval()
