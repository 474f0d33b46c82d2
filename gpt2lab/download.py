"""Every file gpt2lab downloads, pinned, verified, and kept in one cache.

A pinned file lives in the cache (`$GPT2LAB_CACHE`, default ~/.cache/gpt2lab) under a fixed name
and is checked against its SHA-256 before use. When it is absent it is downloaded to a temporary
name, hashed as it streams, and renamed onto its name only when whole and verified. A file whose
hash differs (a captive portal's page, a truncated transfer, a changed upstream, a flipped bit) is
moved aside as NAME.bad-<hash prefix> and never used; the error is one line with both hashes.

A machine without internet is seeded with `gpt2lab cache add FILE_OR_FOLDER ...`: every file whose
SHA-256 is pinned here is copied in under its name (`gpt2lab cache` lists the names and hashes;
copying the files there by hand works the same).

Hugging Face downloads are pinned by revision, a commit hash, which fixes every file of the
repository: the datasets `prepare` streams (`DATASET_REVISIONS`) and OpenAI's weights `--pretrained`
fetches (`HUB_REVISIONS`), whose files are also checked against SHA-256 where it is on record
(`HUB_SHA256`). Those live in Hugging Face's own cache, not this one.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import shutil
import sys
import urllib.request
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from gpt2lab.errors import UserError


@dataclass(frozen=True)
class Pinned:
    """A file gpt2lab may download: where it goes in the cache, where it comes from, what it must be."""

    name: str  # path inside the cache
    url: str
    sha256: str
    size: int  # bytes
    what: str  # for messages


# The hashes and sizes are recorded in ../shared/data/SOURCES.md with the repository and commit of
# each copy; the GPT-2 files' hashes are also the ones tiktoken pins (tiktoken_ext/openai_public.py).
TINYSHAKESPEARE = Pinned(
    "data/tinyshakespeare.txt",
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
    "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
    1_115_394,
    "tinyshakespeare (char-rnn)",
)
GPT2_ENCODER = Pinned(
    "gpt2/encoder.json",
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
    "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    1_042_301,
    "GPT-2's encoder.json",
)
GPT2_MERGES = Pinned(
    "gpt2/vocab.bpe",
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
    "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    456_318,
    "GPT-2's vocab.bpe",
)
# Size and SHA-256 from the Git LFS pointer of a copy of rowanz/hellaswag's file
# (liujch1998/rainier@118e83cb data/hellaswag/hellaswag_val.jsonl).
HELLASWAG_VAL = Pinned(
    "hellaswag/hellaswag_val.jsonl",
    "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl",
    "0aa3b88843990f3f10a97b9575c94d7b71fb2205240ba04ae4884d9e9c992588",
    12_246_618,
    "HellaSwag validation (rowanz/hellaswag)",
)
PINNED = (TINYSHAKESPEARE, GPT2_ENCODER, GPT2_MERGES, HELLASWAG_VAL)

# Hugging Face commits, as recorded by several public projects that pin them.
DATASET_REVISIONS = {
    "roneneldan/TinyStories": "f54c09fd23315a6f9c86f9dc80f725de7d8f9c64",
    "Salesforce/wikitext": "b08601e04326c79dfdd32d625aee71d232d685c3",
    "HuggingFaceFW/fineweb-edu": "87f09149ef4734204d70ed1d046ddc9ca3f2b8f9",
}
HUB_REVISIONS = {
    "openai-community/gpt2": "607a30d783dfa663caf39e06633721c8d4cfcd7e",
    "openai-community/gpt2-medium": "6dcaa7a952f72f9298047fd5137cd6e4f05f41da",
    "openai-community/gpt2-large": "32b71b12589c2f8d625668d2335a01cac3249519",
    "openai-community/gpt2-xl": "15ea56dee5df4983c59b2538573817e1667135e2",
}
HUB_SHA256 = {  # at the revisions above; the other files are fixed by the revision alone
    "openai-community/gpt2": {
        "config.json": "0daed7749b4f02b8f76240d5444551d7b08712dab4d0adb8239c56ba823bb7b4",
        "model.safetensors": "248dfc3911869ec493c76e65bf2fcf7f615828b0254c12b473182f0f81d3a707",
    },
    "openai-community/gpt2-xl": {
        "model.safetensors": "0f8b28eb05a8075f48b61b6f35332978c74fc7763fa9fb4051a1c30511736a6a",
    },
}


def cache_dir() -> Path:
    """$GPT2LAB_CACHE, else ~/.cache/gpt2lab: where every pinned file is looked up and downloaded to."""
    env = os.environ.get("GPT2LAB_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "gpt2lab"


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


# Files this process has hashed and found right, by (path, size, mtime, inode, expected hash): a file
# used many times (the GPT-2 vocabulary in every tokenizer) is hashed once unless it changes.
_verified: set[tuple] = set()


def _identity(path: Path, sha256: str) -> tuple:
    st = path.stat()
    return (str(path), st.st_size, st.st_mtime_ns, st.st_ino, sha256)


def _move_aside(src: Path, path: Path, got: str) -> Path:
    """Rename src (path itself, or a download of it) to NAME.bad-<hash prefix> beside path."""
    aside = path.with_name(f"{path.name}.bad-{got[:12]}")
    with contextlib.suppress(FileNotFoundError):  # another process (a DDP rank) moved it first
        os.replace(src, aside)
    return aside


def verify(path: str | Path, sha256: str, what: str) -> Path:
    """path, after checking that its bytes have this SHA-256. Otherwise the file (a symlink's target) is
    moved aside, never to be used, and UserError names it with both hashes."""
    path = Path(path)
    real = path.resolve()
    key = _identity(real, sha256)
    if key in _verified:
        return path
    got = sha256_file(real)
    if got != sha256:
        aside = _move_aside(real, real, got)
        raise UserError(
            f"{path} is not {what}: sha256 {got}, expected {sha256}; moved aside to {aside.name}, "
            "not used (run again to download it afresh, or seed the cache: gpt2lab cache add FILE)"
        )
    _verified.add(key)
    return path


def _remove_dead_partials(path: Path) -> None:
    """Delete the temporary files of downloads whose process is gone (a kill, a power cut)."""
    for part in path.parent.glob(f".{path.name}.part-*"):
        pid = part.name.rsplit("-", 1)[-1]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            part.unlink(missing_ok=True)
        except OSError:
            pass  # alive, or not ours to signal


def fetch(pin: Pinned, offline_hint: str) -> Path:
    """The cached file of `pin`, verified; downloaded first when it is not there.

    offline_hint: what the user can do instead when the download fails (named in the error)."""
    path = cache_dir() / pin.name
    if path.exists():
        return verify(path, pin.sha256, pin.what)
    tmp = path.with_name(f".{path.name}.part-{os.getpid()}")
    h, size = hashlib.sha256(), 0
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_dead_partials(path)
        print(f"downloading {pin.what} ({pin.size / 1e6:.1f} MB) from {pin.url}", file=sys.stderr)
        with urllib.request.urlopen(pin.url, timeout=60) as response, open(tmp, "wb") as f:
            while chunk := response.read(1 << 16):
                h.update(chunk)
                f.write(chunk)
                size += len(chunk)
            declared = (getattr(response, "headers", None) or {}).get("Content-Length")
            if declared is not None and int(declared) != size:  # http.client reads a cut body as EOF
                raise http.client.IncompleteRead(b"", int(declared) - size)
            f.flush()
            os.fsync(f.fileno())
    except (OSError, http.client.HTTPException) as e:  # no network, HTTP error, cut transfer, full disk
        tmp.unlink(missing_ok=True)
        raise UserError(
            f"could not download {pin.what} from {pin.url} ({type(e).__name__}: {e}); {offline_hint}, "
            f"or seed the cache: gpt2lab cache add FILE (a copy with sha256 {pin.sha256})"
        ) from None
    got = h.hexdigest()
    if got != pin.sha256:
        aside = _move_aside(tmp, path, got)
        raise UserError(
            f"downloaded {pin.url} is not {pin.what}: sha256 {got}, expected {pin.sha256} ({size:,} bytes, "
            f"expected {pin.size:,}); moved aside to {aside}, not used"
        )
    os.replace(tmp, path)
    _verified.add(_identity(path.resolve(), pin.sha256))
    return path


def is_pinned(path: str | Path, pin: Pinned) -> bool:
    """Whether the file at path has pin's bytes (hashed once per process while it is unchanged)."""
    real = Path(path).resolve()
    if not real.is_file() or real.stat().st_size != pin.size:
        return False
    key = _identity(real, pin.sha256)
    if key not in _verified and sha256_file(real) == pin.sha256:
        _verified.add(key)
    return key in _verified


def remember(path: str | Path, pin: Pinned) -> bool:
    """Copy a local file into the cache under pin's name when its bytes are the pinned ones, so later
    commands find it there; True when the cache now holds it. A read-only cache only costs that."""
    dest = cache_dir() / pin.name
    if is_pinned(dest, pin):
        return True
    if not is_pinned(path, pin):
        return False
    from gpt2lab.atomic import atomic_write

    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(dest, lambda tmp: shutil.copyfile(path, tmp))
    except OSError:
        return False
    return True


def verify_hub_files(repo: str, snapshot: Path, files: Iterable[str]) -> Path:
    """snapshot (a Hugging Face snapshot directory of repo), after checking each of its files whose
    SHA-256 is on record (HUB_SHA256). A wrong file's blob is moved aside, so the hub client fetches it
    again next time."""
    for name in files:
        sha = HUB_SHA256.get(repo, {}).get(name)
        if sha is not None:
            verify(snapshot / name, sha, f"{repo}'s {name}")
    return snapshot


# --- `gpt2lab cache` ------------------------------------------------------------------------------


def _files(paths: Iterable[str | Path]) -> Iterator[Path]:
    for p in map(Path, paths):
        if p.is_dir():
            yield from sorted(q for q in p.rglob("*") if q.is_file())
        elif p.is_file():
            yield p
        else:
            raise UserError(f"{str(p)!r} does not exist")


def add(paths: Iterable[str | Path]) -> list[tuple[Path, Pinned]]:
    """Seed the cache: each file (folders are searched) whose SHA-256 is pinned is copied in under its
    name. Returns (file, pin) for every pinned file found."""
    by_size: dict[int, list[Pinned]] = {}
    for pin in PINNED:
        by_size.setdefault(pin.size, []).append(pin)
    found = []
    for f in _files(paths):
        candidates = by_size.get(f.stat().st_size, [])
        if not candidates:
            continue
        got = sha256_file(f)
        for pin in candidates:
            if pin.sha256 == got:
                if not remember(f, pin):
                    raise UserError(f"cannot write {cache_dir() / pin.name} (is the cache writable?)")
                found.append((f, pin))
    return found


def status(pin: Pinned) -> str:
    path = cache_dir() / pin.name
    if not path.exists():
        return "missing"
    return "ok" if is_pinned(path, pin) else f"WRONG: sha256 {sha256_file(path)}"


def run_cache(action: str, paths: list[str]) -> None:
    """`gpt2lab cache [list]` and `gpt2lab cache add FILE_OR_FOLDER ...`."""
    root = cache_dir()
    if action == "add":
        found = add(paths)
        for f, pin in found:
            print(f"{pin.name:32s} <- {f}")
        print(f"{len(found)} pinned file(s) copied into {root}" if found else "no pinned file found there")
        return
    print(f"cache: {root}  (set $GPT2LAB_CACHE to move it)")
    print(f"{'file':32s}  {'status':10s}  {'bytes':>10s}  sha256 / url")
    for pin in PINNED:
        print(f"{pin.name:32s}  {status(pin):10s}  {pin.size:>10,}  {pin.sha256}")
        print(f"{'':56s}  {pin.url}")
    print("Hugging Face downloads, pinned by revision (kept in Hugging Face's cache):")
    for repo, rev in {**DATASET_REVISIONS, **HUB_REVISIONS}.items():
        print(f"  {repo}@{rev}")
