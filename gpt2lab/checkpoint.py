"""Checkpoints on disk: model.safetensors (GPT-2 names, raw weights) + config.json, written atomically.

A checkpoint is a directory. It is written complete under a temporary name and renamed into
place, so a crash leaves either the old checkpoint or the new one, never half of one. A run
directory holds step_NNNNNN checkpoints and two pointer files, `latest` and `best`, each naming
one of them; a pointer is replaced atomically after the checkpoint it names is complete.

Everything read here is validated where it is read (config, state, pointers, tensor names, shapes
and values, the model's size against this machine's memory): a bad file is one UserError naming
the file and the problem, never a traceback, and no code in a file ever runs (weights_only loads).
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import warnings
from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch

from gpt2lab.atomic import (  # noqa: F401  (atomic_write, write_json: re-exported for callers)
    atomic_directory,
    atomic_write,
    fsync_directory,
    read_json,
    remove_stale_temporaries,
    write_json,
    writing,
)
from gpt2lab.config import is_count, model_config_from_dict
from gpt2lab.errors import UserError, WriteError, quote
from gpt2lab.ladder import build_model
from gpt2lab.model import GPT

FORMAT = "gpt2lab-checkpoint"
VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
STATE = "state.pt"
LATEST, BEST = "latest", "best"  # pointer files in a run directory: the name of a step_NNNNNN checkpoint
STEP_RE = re.compile(r"step_\d{6,}")
# What a training run writes into its directory (besides step_NNNNNN checkpoints): a directory that holds
# any of these, or a checkpoint, holds a run. Nothing else there is ever touched.
RUN_FILES = (LATEST, BEST, "metrics.jsonl", "loss.png", "adapter", "merged", "tensorboard")


def model_tensors(model: GPT, tensors: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The model's weights by name (or `tensors`, gathered by the caller from a sharded model), on CPU,
    contiguous; a tied lm_head is left out (it is wte)."""
    source = model.state_dict() if tensors is None else tensors
    tensors = {k: v.detach().cpu().contiguous() for k, v in source.items()}
    if getattr(model.config, "tie_weights", False):
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
    if getattr(model.config, "tie_weights", False):  # GPT's; the ladder's families tie nothing
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
        if got.is_floating_point() and not torch.isfinite(got).all():
            raise UserError(
                f"{source}: tensor {name!r} holds NaN or infinite values; these weights are unusable"
            )
    with torch.no_grad():
        for name, target in expected.items():
            target.copy_(tensors[name])


def _names(names: list[str]) -> str:
    return repr(names[0]) + (f" (and {len(names) - 1} more)" if len(names) > 1 else "")


def _write_failure(e: Exception, path: Path) -> str | None:
    """Why a serializer failed, when it failed to write: torch.save and safetensors hide the OSError of
    a full disk in their own exception types. None when `e` is not about writing."""
    message = str(e).splitlines()[0] if str(e) else type(e).__name__
    match = re.search(r"I/O error: (.*?)(?: \(os error \d+\))?$", message)
    if match:
        return match.group(1)
    try:
        if shutil.disk_usage(path).free < (1 << 20):
            return "No space left on device"
    except OSError:
        pass
    return None


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
    A failed write (a full disk) raises WriteError and leaves no trace; an existing out_dir stays whole.
    """
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    out_dir = Path(out_dir)

    def write(tmp: Path) -> None:
        try:
            save_file(model_tensors(model, tensors), tmp / WEIGHTS, metadata={"format": "pt"})
            config = {"format": FORMAT, "version": VERSION, "model": model.config.to_dict(), **(extra or {})}
            (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
            if state is not None:
                torch.save(state, tmp / STATE)
        except (RuntimeError, SafetensorError) as e:
            reason = _write_failure(e, tmp)
            if reason is None:
                raise
            raise WriteError(f"cannot write {out_dir}: {reason}") from None

    return atomic_directory(out_dir, write)


def step_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / f"step_{step:06d}"


def set_pointer(run_dir: str | Path, name: str, ckpt: Path) -> None:
    """Point run_dir/<name> ("latest" or "best") at a checkpoint; written last, atomically."""
    atomic_write(Path(run_dir) / name, lambda p: p.write_text(ckpt.name + "\n"))
    fsync_directory(Path(run_dir))


def read_pointer(run_dir: str | Path, name: str = LATEST) -> Path | None:
    """The checkpoint directory run_dir/<name> names (not checked to exist), or None with no pointer."""
    path = Path(run_dir) / name
    if not path.exists():
        return None
    try:
        target = path.read_bytes()[:256].decode("utf-8").strip()
    except (OSError, UnicodeDecodeError):
        target = ""
    if not target or target in (".", "..") or any(c in target for c in "/\\\n\0"):
        raise UserError(
            f"{path} is not a checkpoint pointer: it should hold the name of a step_NNNNNN folder"
        )
    return path.parent / target


def resolve(path: str | Path, pointer: str = LATEST) -> Path:
    """A checkpoint directory as given, or the one a run directory's `latest` (or `best`) points at."""
    path = Path(path)
    if (path / CONFIG).is_file():
        return path
    target = read_pointer(path, pointer)
    if target is not None:
        if (target / CONFIG).is_file():
            return target
        raise UserError(f"{path / pointer} points at {target.name}, which is not a complete checkpoint")
    if not path.exists():
        raise UserError(f"checkpoint {str(path)!r} does not exist")
    raise UserError(f"{path} is not a gpt2lab checkpoint: no {CONFIG} and no {pointer!r} pointer")


def step_checkpoints(run_dir: str | Path) -> list[Path]:
    """The run directory's step_NNNNNN checkpoint directories, oldest first."""
    return sorted(d for d in Path(run_dir).glob("step_*") if d.is_dir() and STEP_RE.fullmatch(d.name))


def run_contents(run_dir: str | Path) -> list[str]:
    """The names of what a training run wrote in run_dir (empty: the directory holds no run)."""
    run_dir = Path(run_dir)
    return [p.name for p in step_checkpoints(run_dir)] + [n for n in RUN_FILES if (run_dir / n).exists()]


def remove_run(run_dir: str | Path) -> list[str]:
    """Delete what a training run wrote in run_dir (run_contents; other files stay); their names."""
    run_dir = Path(run_dir)
    names = run_contents(run_dir)
    for name in names:
        p = run_dir / name
        with writing(p):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
    return names


def repair(run_dir: str | Path) -> None:
    """Finish or undo what a killed writer left in a run directory; call it holding the run's lock.

    Temporaries of checkpoints, pointers and logs are removed; a checkpoint moved aside while it was
    being replaced (`.step_N.old-PID`) is put back if its replacement never arrived; and `best` is
    moved to the latest checkpoint when that one says it is the best (the kill fell between the two
    pointer writes: `latest` is always written first).
    """
    run_dir = Path(run_dir)
    for old in run_dir.glob(".step_*.old-*"):
        target = run_dir / old.name[1:].rsplit(".old-", 1)[0]
        if old.is_dir() and not target.exists() and STEP_RE.fullmatch(target.name):
            os.rename(old, target)
    remove_stale_temporaries(run_dir, ["step_*", "merged", *RUN_FILES])
    latest = read_pointer(run_dir, LATEST)
    if latest is None or not (latest / CONFIG).is_file():
        return
    config = read_json(latest / CONFIG, f"{latest} has no {CONFIG}")
    if isinstance(config, dict) and config.get("is_best") is True and read_pointer(run_dir, BEST) != latest:
        set_pointer(run_dir, BEST, latest)


def prune(run_dir: str | Path, keep_last: int) -> None:
    """Delete step checkpoints except the newest keep_last and those `latest` and `best` point at."""
    run_dir = Path(run_dir)
    keep = {p.name for p in (read_pointer(run_dir, LATEST), read_pointer(run_dir, BEST)) if p is not None}
    steps = step_checkpoints(run_dir)
    for d in steps[: max(0, len(steps) - keep_last)]:
        if d.name not in keep:
            shutil.rmtree(d, ignore_errors=True)


def read_pickle(path: Path, what: str = "a file gpt2lab wrote") -> Any:
    """A torch.save file loaded with weights_only=True: tensors and plain containers only, no code from
    the file ever runs. A file it refuses is one UserError; torch's own message runs over many lines
    and advises weights_only=False, which would run the file's code. `what` the file should be."""
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickle protocols: the error says it all
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated or foreign file: pickle, zip and torch raise many types
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        if isinstance(e, pickle.UnpicklingError) and any("GLOBAL" in line for line in lines):
            raise UserError(
                f"{path} holds objects other than tensors and plain containers (not {what}); "
                "refused without running any of it"
            ) from None
        boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation")
        detail = next((line for line in lines if not line.startswith(boilerplate)), "")
        raise UserError(f"{path} cannot be read: not {what} ({type(e).__name__}: {detail[:150]})") from None


def _rng_states(v: Any) -> bool:
    cpu, cuda = (v.get("cpu"), v.get("cuda")) if isinstance(v, dict) else (None, None)
    return (
        isinstance(cpu, torch.Tensor)
        and cpu.dtype == torch.uint8
        and cpu.shape == torch.get_rng_state().shape
        and isinstance(cuda, list)
        and all(isinstance(t, torch.Tensor) and t.dtype == torch.uint8 for t in cuda)
    )


# state.pt's fields: what each must be, and how that is checked
_STATE_FIELDS: dict[str, tuple[Any, str]] = {
    "step": (is_count, "a non-negative integer"),
    "optimizer": (lambda v: isinstance(v, dict) and isinstance(v.get("state"), dict), "an optimizer state"),
    "scaler": (lambda v: isinstance(v, dict), "a GradScaler state"),
    "loader": (
        lambda v: isinstance(v, dict) and is_count(v.get("step")) and is_count(v.get("micro")),
        "a data-loader position",
    ),
    "best_val": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
    "bad_evals": (is_count, "a non-negative integer"),
    "skips": (is_count, "a non-negative integer"),
    "rng": (_rng_states, "RNG states (a CPU generator state and a list of CUDA ones)"),
}


def load_state(ckpt_dir: str | Path) -> dict[str, Any]:
    """state.pt of a training checkpoint, loaded with weights_only=True (no code runs from the file),
    each field checked (a step that is an integer, RNG states of the right size, ...)."""
    path = Path(ckpt_dir) / STATE
    if not path.is_file():
        raise UserError(f"{ckpt_dir} has no {STATE}: it holds weights only and cannot resume training")
    state = read_pickle(path)
    if not isinstance(state, dict):
        raise UserError(f"{path} is not a training state (a {type(state).__name__}, not a dict)")
    for name, (ok, what) in _STATE_FIELDS.items():
        if name not in state:
            raise UserError(f"{path} has no {name!r}: not a complete training state")
        if not ok(state[name]):
            raise UserError(f"{path}: {name!r} must be {what}, got {quote(state[name])}")
    return state


def read_config(ckpt_dir: str | Path) -> dict[str, Any]:
    """config.json of a gpt2lab checkpoint (or of the one a run directory's `latest` points at)."""
    ckpt_dir = resolve(ckpt_dir)
    path = ckpt_dir / CONFIG
    config = read_json(path, f"{ckpt_dir} is not a gpt2lab checkpoint: no {CONFIG}")
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise UserError(f"{path} is not a gpt2lab checkpoint config (format is not {FORMAT!r})")
    if config.get("version") != VERSION:
        raise UserError(
            f"{path} has checkpoint version {quote(config.get('version'))}; this gpt2lab reads {VERSION}"
        )
    for key, kind in (("model", "an object of GPTConfig fields"), ("tokenizer", "a tokenizer spec object"),
                      ("lora", "an object of LoRA settings")):  # fmt: skip
        if (key == "model" or config.get(key) is not None) and not isinstance(config.get(key), dict):
            raise UserError(f"{path}: {key!r} must be {kind}, got {quote(config.get(key))}")
    return config


def is_checkpoint(path: str | Path) -> bool:
    """Whether path is a gpt2lab checkpoint or a run directory with a `latest` one (not a HF directory)."""
    path = Path(path)
    if (path / LATEST).is_file():
        return True
    try:
        return json.loads((path / CONFIG).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError, RecursionError):
        return False


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; UserError when it cannot be read (missing, truncated, foreign)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UserError(f"{path} cannot be read: {first}") from None


def load_model(ckpt_dir: str | Path, merge: bool = True, **overrides: Any) -> GPT:
    """The model stored in a checkpoint directory, in eval mode; overrides set config fields.

    config.json's "model" dict names the family (ladder.build_model; absent: a GPT).

    A LoRA run's checkpoint (config "lora") holds the frozen base and the adapter: it comes back
    with the adapter merged into the weights (merge=False: adapters kept apart, as training resumes).
    """
    ckpt_dir = resolve(ckpt_dir)
    config = read_config(ckpt_dir)
    path = ckpt_dir / CONFIG
    try:
        model_config = model_config_from_dict({**config["model"], **overrides})
    except UserError as e:
        raise UserError(f"{path}: {e}") from None
    model = build_model(model_config, str(path))
    if config.get("lora"):
        from gpt2lab.lora import apply_lora_settings

        try:
            apply_lora_settings(model, config["lora"])
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{path}: 'lora' settings are incomplete or malformed ({quote(e)})") from None
    weights = Path(ckpt_dir) / WEIGHTS
    if not weights.is_file():
        raise UserError(f"{ckpt_dir}: no {WEIGHTS}")
    copy_weights(model, read_safetensors(weights), str(weights))
    if config.get("lora") and merge:
        from gpt2lab.lora import merged_copy

        return merged_copy(model)
    return model.eval()
