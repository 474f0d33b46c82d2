"""Writing files so that a crash leaves the old file or the whole new one, never a half-written one;
locking a directory to one process; reading JSON with a one-line error.

Temporary files and directories are named `.NAME.tmp-PID` beside their target and created with the
ordinary modes (the user's umask), like every other file gpt2lab writes. A failed write (a full disk,
a quota, permissions) removes its partial output and raises WriteError naming the file.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from gpt2lab.errors import UserError, WriteError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; directories are not locked there
    fcntl = None

LOCK = ".lock"


def temporary(path: Path) -> Path:
    """The temporary name a write of `path` uses: `.NAME.tmp-PID` beside it."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextlib.contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Turn an OSError raised while writing `path` into a one-line WriteError naming it."""
    try:
        yield
    except OSError as e:
        reason = e.strerror or str(e) or type(e).__name__
        raise WriteError(f"cannot write {path}: {reason}") from None


def umask() -> int:
    """This process's umask, read without changing it where the OS allows (Linux), else briefly set."""
    try:
        with open("/proc/self/status") as f:
            return int(next(line for line in f if line.startswith("Umask:")).split()[1], 8)
    except (OSError, StopIteration, ValueError, IndexError):
        old = os.umask(0o022)
        os.umask(old)
        return old


def ordinary_mode(path: Path) -> None:
    """Give a file the mode the user's umask gives new files (some writers, safetensors among them,
    create theirs 0600: a run directory shared with a team would hide its checkpoints)."""
    os.chmod(path, 0o666 & ~umask())


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call write(tmp) on a temporary sibling, fsync it, then os.replace it onto `path`."""
    path = Path(path)
    tmp = temporary(path)
    try:
        with writing(path):
            write(tmp)
            ordinary_mode(tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_directory(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Write the directory `path` all or nothing: write(tmp) fills a new temporary sibling (made with
    the umask's mode), whose files then get the ordinary mode and are fsynced before tmp is renamed
    onto `path`. An existing `path` is moved aside (`.NAME.old-PID`) until the new one is in place, so
    a crash leaves the old directory or the new one. For flat directories (files only)."""
    path = Path(path)
    with writing(path.parent):
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary(path)
    shutil.rmtree(tmp, ignore_errors=True)  # left by a killed process that had our pid
    try:
        with writing(path):
            os.mkdir(tmp)  # the umask's mode, like every directory the user makes
            write(tmp)
            for f in tmp.iterdir():
                ordinary_mode(f)
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            if path.exists():  # keep the old one whole until the new one is in place
                old = path.with_name(f".{path.name}.old-{os.getpid()}")
                os.rename(path, old)
                os.rename(tmp, path)
                shutil.rmtree(old)
            else:
                os.rename(tmp, path)
            fsync_directory(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write(path, lambda p: p.write_text(json.dumps(obj, indent=2) + "\n"))


def read_json(path: str | Path, missing: str) -> Any:
    """The parsed JSON file at path; UserError `missing` when there is none, or naming the parse error."""
    path = Path(path)
    if not path.is_file():
        raise UserError(missing)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON: {e}") from None
    except (OSError, RecursionError) as e:  # unreadable, or nested deeper than the parser goes
        raise UserError(
            f"{path} cannot be read: {getattr(e, 'strerror', None) or type(e).__name__}"
        ) from None


def fsync_directory(directory: Path) -> None:
    """Make renames inside `directory` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_stale_temporaries(directory: Path, names: Iterable[str]) -> list[str]:
    """Delete what killed writers of `names` (glob patterns of final names) left in `directory`:
    `.NAME.tmp-*` files and directories, and `.NAME.old-*` directories. Nothing else is touched.
    Call it only while holding the directory's lock, so no live writer's temporary is taken."""
    removed = []
    for name in names:
        for pattern in (f".{name}.tmp-*", f".{name}.old-*"):
            for p in directory.glob(pattern):
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
                removed.append(p.name)
    return removed


@contextlib.contextmanager
def directory_lock(directory: str | Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock on `directory` (created if needed) while the block runs.

    The lock is the kernel's (flock) on directory/.lock, so a process that dies, even by SIGKILL,
    releases it; the file stays and names the last holder's pid. UserError when another process
    holds it. `what` names the job in the message ("training run", "prepare").
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise UserError(f"{directory} is a file, not a directory")
    with writing(directory):
        directory.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        yield
        return
    with writing(directory / LOCK):
        fd = os.open(directory / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise WriteError(f"cannot lock {directory / LOCK}: {e.strerror}") from None
            holder = os.read(fd, 32).decode("ascii", "replace").strip() or "?"
            raise UserError(
                f"{directory} is in use by another {what} (pid {holder}); wait for it to end or stop it"
            ) from None
        with contextlib.suppress(OSError):  # the pid is only for the message above
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)  # releases the lock
