"""Writing files so that a crash leaves the old file or the whole new one, never a half-written one."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gpt2lab.errors import UserError


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call write(tmp) on a temporary sibling, fsync it, then os.replace it onto `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write(path, lambda p: p.write_text(json.dumps(obj, indent=2) + "\n"))


def read_json(path: str | Path, missing: str) -> Any:
    """The parsed JSON file at path; UserError `missing` when there is none, or naming the parse error."""
    path = Path(path)
    if not path.is_file():
        raise UserError(missing)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON: {e}") from None


def remove_stale_temporaries(directory: Path) -> None:
    """Delete what killed writers left behind (`.NAME.tmp-PID`); finished files are never touched."""
    for p in directory.glob(".*.tmp-*"):
        if p.is_file():
            p.unlink(missing_ok=True)
