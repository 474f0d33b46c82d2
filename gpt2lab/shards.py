"""Documents -> EOT-separated tokens -> fixed-size binary shards + manifest.json (`gpt2lab prepare`).

Shard file: a 32-byte header (magic b"GPT2LABS", version, bytes per token, token count), then the
tokens as little-endian uint16 (uint32 when the vocabulary exceeds 65535). Every document is
written as EOT followed by its tokens, as GPT-2 separated documents.

Robustness: each shard is written under a temporary name and renamed when complete; after each
shard a small state file records how far the source has been consumed, so a killed run resumes
where it stopped and produces the same bytes. manifest.json is written last: a loader reads only
directories that have one, so an unfinished prepare is never trained on.
"""

from __future__ import annotations

import json
import multiprocessing
import struct
import time
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from gpt2lab.atomic import atomic_write, read_json, remove_stale_temporaries, write_json
from gpt2lab.config import PrepareConfig
from gpt2lab.errors import UserError
from gpt2lab.progress import Progress
from gpt2lab.sources import Corpus, ReplacementCounter, open_corpus

MAGIC = b"GPT2LABS"
VERSION = 1
HEADER = struct.Struct("<8sIIQ8x")  # magic, version, bytes per token, token count, 8 reserved: 32 bytes
FORMAT = "gpt2lab-shards"
STATE = ".prepare-state.json"
MANIFEST = "manifest.json"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 65535 else np.uint32)


def write_shard(path: Path, tokens: np.ndarray) -> None:
    """Write a shard atomically: header + tokens (uint16 or uint32, little-endian)."""
    tokens = tokens.astype(tokens.dtype.newbyteorder("<"), copy=False)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(HEADER.pack(MAGIC, VERSION, tokens.dtype.itemsize, len(tokens)))
            f.write(tokens.tobytes())

    atomic_write(path, write)


def read_shard(path: str | Path) -> np.ndarray:
    """The tokens of a shard as a read-only memory map, after checking its header and length."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(HEADER.size)
    except OSError as e:
        raise UserError(f"cannot read shard {path}: {e}") from None
    if len(raw) < HEADER.size:
        raise UserError(f"{path} is not a gpt2lab shard: shorter than its {HEADER.size}-byte header")
    magic, version, itemsize, count = HEADER.unpack(raw)
    if magic != MAGIC:
        raise UserError(f"{path} is not a gpt2lab shard (magic {magic!r})")
    if version != VERSION or itemsize not in (2, 4):
        raise UserError(f"{path}: unsupported shard version {version} / token size {itemsize}")
    expected = HEADER.size + count * itemsize
    if path.stat().st_size != expected:
        raise UserError(
            f"{path} is truncated or corrupt: {path.stat().st_size} bytes, header says {expected}"
        )
    dtype = np.dtype("<u2" if itemsize == 2 else "<u4")
    if count == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER.size, shape=(count,))


def read_manifest(data_dir: str | Path) -> dict[str, Any]:
    path = Path(data_dir) / MANIFEST
    manifest = read_json(
        path, f"{data_dir} has no {MANIFEST}: prepare it first (gpt2lab prepare SOURCE --out DIR)"
    )
    kind = (manifest.get("format"), manifest.get("version")) if isinstance(manifest, dict) else None
    if kind != (FORMAT, VERSION):
        raise UserError(f"{path} is not a version-{VERSION} {FORMAT} manifest")
    return manifest


# --- splitting a corpus into train and val -----------------------------------------------------


def split_streams(corpus: Corpus, cfg: PrepareConfig) -> dict[str, Any]:
    """{split: () -> documents}, in the order the splits are written, and the val policy used.

    A corpus with its own validation split keeps it. Otherwise val is either the first
    `val_docs` documents, or the last `val_fraction` of the text by characters: the document that
    crosses the boundary is cut there (as nanoGPT cuts tinyshakespeare at 90%).
    """
    if "all" not in corpus.splits:
        if cfg.val_docs is not None or cfg.val_fraction is not None:
            raise UserError(f"{corpus.name} has its own validation split; drop --val-docs / --val-fraction")
        return {"splits": dict(corpus.splits), "val": "the dataset's own validation split"}
    stream = corpus.splits["all"]
    policy = {"val_fraction": cfg.val_fraction, "val_docs": cfg.val_docs}
    if policy == {"val_fraction": None, "val_docs": None}:
        policy = {"val_fraction": None, "val_docs": None, **corpus.default_val}
    if policy["val_docs"] is not None:
        n = policy["val_docs"]
        return {
            "splits": {"val": lambda: islice(stream(), n), "train": lambda: islice(stream(), n, None)},
            "val": f"the first {n} documents",
        }
    frac = policy["val_fraction"]
    cut = round(sum(len(d) for d in stream()) * (1 - frac))  # one counting pass over the text

    def part(want_val: bool) -> Iterator[str]:
        offset = 0
        for doc in stream():
            start, offset = offset, offset + len(doc)
            if offset <= cut:  # wholly before the boundary
                if not want_val:
                    yield doc
            elif start >= cut:  # wholly after
                if want_val:
                    yield doc
            else:
                piece = doc[cut - start :] if want_val else doc[: cut - start]
                if piece.strip():
                    yield piece

    return {
        "splits": {"train": lambda: part(False), "val": lambda: part(True)},
        "val": f"the last {frac:g} of the text by characters",
    }


# --- tokenizing in worker processes ------------------------------------------------------------

_worker_tok = None


def _init_worker(spec: dict[str, Any], vocab_dir: str | None) -> None:
    global _worker_tok
    from gpt2lab.tokenizer import get_tokenizer

    _worker_tok = get_tokenizer(spec, vocab_dir=vocab_dir)


def _encode_docs(docs: list[str], tok: Any = None) -> list[np.ndarray]:
    """[EOT, *tokens] per document; special-token text inside a document is encoded as plain text.

    One document at a time on one thread: tiktoken's encode_batch starts a thread per document,
    which measured 2x slower here; parallelism comes from the worker processes instead.
    """
    tok = tok or _worker_tok
    eot = [tok.eot_id]
    return [np.array(eot + tok.encode(doc, allowed_special=set()), dtype=np.int64) for doc in docs]


def _batches(docs: Iterator[str], max_chars: int = 1 << 18, max_docs: int = 1024) -> Iterator[list[str]]:
    batch: list[str] = []
    size = 0
    for doc in docs:
        batch.append(doc)
        size += len(doc)
        if size >= max_chars or len(batch) >= max_docs:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def worker_pool(tok: Any, workers: int, vocab_dir: str | None) -> Any:
    """Tokenizer processes (None for workers=1: tokenize in this process). Spawned, not forked, so
    that threads of torch or the tokenizer in this process cannot deadlock them."""
    if workers <= 1:
        return None
    ctx = multiprocessing.get_context("spawn")
    return ctx.Pool(workers, initializer=_init_worker, initargs=(tok.to_spec(), vocab_dir))


def tokenized(docs: Iterator[str], tok: Any, pool: Any) -> Iterator[tuple[int, np.ndarray]]:
    """(characters, tokens) per document, in document order, with or without a worker pool."""
    if pool is None:
        for batch in _batches(docs):
            yield from zip(map(len, batch), _encode_docs(batch, tok), strict=True)
        return
    pending: list[tuple[list[int], Any]] = []
    for batch in _batches(docs):  # a bounded number of batches in flight, results taken in order
        pending.append(([len(d) for d in batch], pool.apply_async(_encode_docs, (batch,))))
        if len(pending) > 2 * pool._processes:
            lengths, result = pending.pop(0)
            yield from zip(lengths, result.get(), strict=True)
    for lengths, result in pending:
        yield from zip(lengths, result.get(), strict=True)


# --- prepare ------------------------------------------------------------------------------------


def _settings(cfg: PrepareConfig, corpus: Corpus, tok: Any, val: str) -> dict[str, Any]:
    return {
        "source": cfg.source,
        "source_description": corpus.description,
        "tokenizer": tok.to_spec(),
        "separator": cfg.separator,
        "text_field": cfg.text_field,
        "val": val,
        "shard_tokens": cfg.shard_tokens,
        "max_tokens": cfg.max_tokens,
    }


def prepare(cfg: PrepareConfig, tok: Any, log: Any = print) -> dict[str, Any]:
    """Tokenize cfg.source with `tok` into shards under cfg.out; returns the manifest.

    Re-running with the same settings resumes an interrupted run (or does nothing when complete);
    an out dir prepared with other settings is refused, and nothing in it is touched.
    """
    out = Path(cfg.out)
    corpus = open_corpus(cfg.source, cfg.separator, cfg.text_field, cfg.revision)
    plan = split_streams(corpus, cfg)
    settings = _settings(cfg, corpus, tok, plan["val"])
    name = cfg.name or corpus.name

    if (out / MANIFEST).is_file():
        manifest = read_manifest(out)
        _check_same(manifest["settings"], settings, out)
        log(f"{out} is already prepared with these settings; nothing to do")
        return manifest
    state: dict[str, Any] = {"settings": settings, "splits": {}}
    if (out / STATE).is_file():
        previous = json.loads((out / STATE).read_text())
        _check_same(previous["settings"], settings, out)
        state = previous
        log(f"resuming the interrupted prepare in {out}")
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    pool = worker_pool(tok, cfg.workers, cfg.gpt2_vocab)
    try:
        for split, stream in plan["splits"].items():
            _write_split(cfg, split, stream, state, tok, pool, out / name, log)
    finally:
        if pool is not None:
            pool.terminate()

    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "name": name,
        "tokenizer": tok.to_spec(),
        "vocab_size": tok.vocab_size,
        "eot_id": tok.eot_id,
        "dtype": token_dtype(tok.vocab_size).name,
        "source": corpus.description,
        "settings": settings,
        "replaced_undecodable_bytes": state.get("replaced", 0),
        "splits": {
            split: {"tokens": st["tokens"], "documents": st["documents"], "shards": st["shards"]}
            for split, st in state["splits"].items()
        },
    }
    write_json(out / MANIFEST, manifest)
    (out / STATE).unlink(missing_ok=True)
    if manifest["replaced_undecodable_bytes"]:
        n = manifest["replaced_undecodable_bytes"]
        log(f"warning: {n} undecodable byte sequences were replaced by U+FFFD")
    return manifest


def _write_split(
    cfg: PrepareConfig,
    split: str,
    stream: Any,
    state: dict[str, Any],
    tok: Any,
    pool: Any,
    prefix: Path,
    log: Any,
) -> None:
    """Tokenize one split into shards `<prefix>_<split>_NNNNNN.bin`, saving the state after each shard.

    The state says how many of the split's documents are wholly in shards (docs_done) and how many
    tokens of the next one are (skip), so a resumed run re-tokenizes only from that document on.
    """
    st = state["splits"].setdefault(
        split, {"shards": [], "docs_done": 0, "skip": 0, "tokens": 0, "documents": 0, "done": False}
    )
    if st["done"]:
        return
    out = prefix.parent
    cap = cfg.max_tokens if split == "train" else None
    buffer = np.empty(cfg.shard_tokens, dtype=token_dtype(tok.vocab_size))
    fill, progress, t0 = 0, Progress(f"{prefix.name} {split} docs"), time.perf_counter()
    n_docs = n_tokens = n_chars = 0

    def throughput() -> str:
        dt = max(time.perf_counter() - t0, 1e-9)
        return f"{n_tokens:,} tokens, {n_chars / dt / 1e6:.1f} MB/s, {n_tokens / dt / 1e3:.0f}K tok/s"

    def flush(n: int) -> None:
        shard = f"{prefix.name}_{split}_{len(st['shards']):06d}.bin"
        write_shard(out / shard, buffer[:n])
        st["shards"].append(shard)
        st["tokens"] += n

    # Every pass reads the source from its start (skipping what is written), so the largest count
    # of replaced byte sequences seen in one pass is the source's.
    ReplacementCounter.count = 0
    base = st["docs_done"]
    for i, (chars, toks) in enumerate(tokenized(islice(stream(), base, None), tok, pool)):
        n_docs, n_tokens, n_chars = n_docs + 1, n_tokens + len(toks), n_chars + chars
        progress.update(n_docs, throughput())
        skip = st["skip"] if i == 0 else 0  # tokens of this document already in the last shard
        if skip == 0:
            st["documents"] += 1
        if cap is not None:
            toks = toks[: skip + max(0, cap - st["tokens"] - fill)]
        pos = skip
        while pos < len(toks):
            take = min(len(toks) - pos, cfg.shard_tokens - fill)
            buffer[fill : fill + take] = toks[pos : pos + take]
            fill, pos = fill + take, pos + take
            if fill == cfg.shard_tokens:
                flush(fill)
                fill = 0
                whole = pos == len(toks)
                st["docs_done"], st["skip"] = base + i + int(whole), 0 if whole else pos
                write_json(out / STATE, state)
        if cap is not None and st["tokens"] + fill >= cap:
            break
    progress.close()
    if fill:
        flush(fill)
    if st["tokens"] == 0:
        raise UserError(f"{cfg.source}: the {split} split has no documents (empty corpus?)")
    st["done"] = True
    state["replaced"] = max(state.get("replaced", 0), ReplacementCounter.count)
    write_json(out / STATE, state)
    log(f"{prefix.name} {split}: {len(st['shards'])} shard(s), {n_docs:,} docs, {throughput()}")


def _check_same(previous: dict[str, Any], settings: dict[str, Any], out: Path) -> None:
    for key, value in settings.items():
        if previous.get(key) != value:
            raise UserError(
                f"{out} was prepared with {key} {previous.get(key)!r}, not {value!r}; "
                "use another --out directory (nothing was changed)"
            )


def build_tokenizer(cfg: PrepareConfig, corpus: Corpus) -> Any:
    """The tokenizer cfg.tokenizer names; "char" takes its alphabet from every document of the corpus."""
    from gpt2lab.tokenizer import CharTokenizer, get_tokenizer

    if cfg.tokenizer == "char":
        chars: set[str] = set()
        for stream in corpus.splits.values():
            for doc in stream():
                chars.update(doc)
        return CharTokenizer(sorted(chars))
    return get_tokenizer(cfg.tokenizer, vocab_dir=cfg.gpt2_vocab)


def run(cfg: PrepareConfig) -> dict[str, Any]:
    """`gpt2lab prepare`: build the tokenizer, write the shards, print a summary."""
    if not cfg.source or not cfg.out:
        raise UserError("prepare needs a SOURCE and --out DIR")
    t0 = time.perf_counter()
    corpus = open_corpus(cfg.source, cfg.separator, cfg.text_field, cfg.revision)
    manifest = prepare(cfg, build_tokenizer(cfg, corpus))
    counts = ", ".join(
        f"{split} {s['tokens']:,} tokens / {s['documents']:,} docs in {len(s['shards'])} shard(s)"
        for split, s in manifest["splits"].items()
    )
    took = time.perf_counter() - t0
    print(f"{cfg.out}: {counts}; vocab {manifest['vocab_size']}, {manifest['dtype']} ({took:.1f}s)")
    return manifest
