"""Documents -> EOT-separated tokens -> fixed-size binary shards + manifest.json (`gpt2lab prepare`).

Shard file: a 32-byte header (magic b"GPT2LABS", version, bytes per token, token count), then the
tokens as little-endian uint16 (uint32 when the vocabulary exceeds 65535). Every document is
written as EOT followed by its tokens, as GPT-2 separated documents.

Robustness: each shard is written under a temporary name and renamed when complete; after each
shard a small state file records how far the source has been consumed, so a killed run resumes
where it stopped and produces the same bytes. manifest.json is written last: a loader reads only
directories that have one, so an unfinished prepare is never trained on. The output directory is
locked while prepare runs, and only prepare's own temporaries are ever removed from it.

Trust: manifest.json records each shard's largest token id (`max_ids`), so a reader checks at once
that the data fits a model's vocabulary; the loaders also check the ids of every batch they read.
"""

from __future__ import annotations

import multiprocessing
import random
import struct
import time
from collections.abc import Iterator
from itertools import chain, islice
from pathlib import Path
from typing import Any

import numpy as np

from gpt2lab.atomic import atomic_write, directory_lock, read_json, remove_stale_temporaries, write_json
from gpt2lab.config import PrepareConfig, is_count
from gpt2lab.errors import UserError, quote
from gpt2lab.progress import Progress
from gpt2lab.sources import Corpus, ReplacementCounter, open_corpus
from gpt2lab.tokenizer import describe_spec

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
    """manifest.json of a prepared directory, its structure checked: the vocabulary size, and per split
    the shard files (plain names inside data_dir), token counts and, when recorded, largest ids."""
    path = Path(data_dir) / MANIFEST
    manifest = read_json(
        path, f"{data_dir} has no {MANIFEST}: prepare it first (gpt2lab prepare SOURCE --out DIR)"
    )
    kind = (manifest.get("format"), manifest.get("version")) if isinstance(manifest, dict) else None
    if kind != (FORMAT, VERSION):
        raise UserError(f"{path} is not a version-{VERSION} {FORMAT} manifest")
    vocab, splits = manifest.get("vocab_size"), manifest.get("splits")
    if not is_count(vocab) or vocab == 0:
        raise UserError(f"{path}: vocab_size must be a positive integer, got {quote(vocab)}")
    if not isinstance(manifest.get("tokenizer", {}), dict):
        raise UserError(f"{path}: 'tokenizer' must be a tokenizer spec object")
    if not isinstance(splits, dict) or not splits:
        raise UserError(f"{path}: 'splits' must map split names to their shards")
    for split, info in splits.items():
        where = f"{path}: split {split!r}"
        if not isinstance(info, dict) or not isinstance(info.get("shards"), list):
            raise UserError(f"{where} must list its 'shards'")
        for name in info["shards"]:
            if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name:
                raise UserError(f"{where}: shard {quote(name)} is not a file name in {data_dir}")
        max_ids = info.get("max_ids")
        if max_ids is not None and (
            not isinstance(max_ids, list)
            or len(max_ids) != len(info["shards"])
            or not all(is_count(m) or m == -1 for m in max_ids)
        ):
            raise UserError(f"{where}: 'max_ids' must give one largest token id per shard")
        for name, m in zip(info["shards"], max_ids or [], strict=False):
            if m >= vocab:
                raise UserError(
                    f"{Path(data_dir) / name} holds token id {m}, outside the manifest's vocab_size {vocab}"
                )
    return manifest


def check_vocab(manifest: dict[str, Any], data_dir: str | Path, vocab_size: int, whose: str) -> None:
    """UserError when the data holds (or, by its manifest, may hold) ids a model of vocab_size lacks."""
    if manifest["vocab_size"] > vocab_size:
        raise UserError(
            f"{data_dir} was tokenized with a vocabulary of {manifest['vocab_size']} ids but {whose} has "
            f"only {vocab_size}: they do not belong together"
        )
    for info in manifest["splits"].values():
        for name, m in zip(info["shards"], info.get("max_ids") or [], strict=True):
            if m >= vocab_size:
                raise UserError(
                    f"{Path(data_dir) / name} holds token id {m}, outside {whose} of {vocab_size}"
                )


def check_ids(tokens: np.ndarray, vocab_size: int, source: str) -> None:
    """UserError naming `source` when tokens hold an id >= vocab_size (a corrupt or foreign shard)."""
    if len(tokens) and int(tokens.max()) >= vocab_size:
        bad = int(np.argmax(tokens >= vocab_size))
        raise UserError(
            f"{source}: token id {int(tokens[bad])} is outside the vocabulary of {vocab_size} "
            "(a corrupt shard, or one from another tokenizer)"
        )


# --- splitting a corpus into train and val -----------------------------------------------------


def split_streams(corpus: Corpus, cfg: PrepareConfig) -> dict[str, Any]:
    """{split: () -> documents}, in the order the splits are written, and the val policy used.

    A corpus with its own validation split keeps it. Otherwise val is either the first
    `val_docs` documents, or the last `val_fraction` of the text by characters. A corpus of one
    document is cut there (as nanoGPT cuts tinyshakespeare at 90%); a corpus of several is split
    between documents, so none is cut in two: the document that crosses the boundary goes to the
    side that holds most of it (and each side keeps at least one document).
    """
    if "all" not in corpus.splits:
        if cfg.val_docs is not None or cfg.val_fraction is not None:
            raise UserError(f"{corpus.name} has its own validation split; drop --val-docs / --val-fraction")
        return {"splits": dict(corpus.splits), "val": "the dataset's own validation split"}
    stream = corpus.splits["all"]
    if cfg.split is not None:
        return _document_split(stream, cfg)
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
    lengths = [len(d) for d in stream()]  # one counting pass over the text
    cut = round(sum(lengths) * (1 - frac))
    if len(lengths) > 1:
        ends = np.cumsum(lengths)
        k = int(np.searchsorted(ends, cut, side="right"))  # the document that crosses (or starts at) the cut
        if k < len(lengths) and cut - (ends[k] - lengths[k]) > lengths[k] / 2:
            k += 1  # most of it lies before the cut: it stays in train
        k = min(max(k, 1), len(lengths) - 1)
        return {
            "splits": {"train": lambda: islice(stream(), k), "val": lambda: islice(stream(), k, None)},
            "val": f"the last {frac:g} of the text by characters, in whole documents",
        }

    def part(want_val: bool) -> Iterator[str]:
        for doc in stream():
            piece = doc[cut:] if want_val else doc[:cut]
            if piece.strip():
                yield piece

    return {
        "splits": {"train": lambda: part(False), "val": lambda: part(True)},
        "val": f"the last {frac:g} of the text by characters",
    }


def _document_split(stream: Any, cfg: PrepareConfig) -> dict[str, Any]:
    """--split: whole documents, shuffled by random.Random(split_seed), cut at int(fraction * n).

    With the defaults (80/10/10, seed 42) on names.txt these are the makemore lectures' exact splits
    (random.seed(42); random.shuffle(words); n1 = int(0.8 * n); n2 = int(0.9 * n)). The documents are
    held in memory to be shuffled: this is for corpora of many short documents. Each split is closed
    with an EOT, so every document's end is a target, the last one's included.
    """
    end_train, end_val = cfg.split_fractions()
    docs: list[str] = []

    def shuffled() -> list[str]:
        if not docs:
            docs.extend(stream())
            random.Random(cfg.split_seed).shuffle(docs)
        return docs

    def part(lo: float, hi: float) -> Any:
        return lambda: iter(shuffled()[int(lo * len(shuffled())) : int(hi * len(shuffled()))])

    splits = {"train": part(0.0, end_train), "val": part(end_train, end_val)}
    if end_val < 1:
        splits["test"] = part(end_val, 1.0)
    what = f"{cfg.split} train/val/test of the documents shuffled with seed {cfg.split_seed}"
    return {"splits": splits, "val": what, "close": True}


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
        **({"split": cfg.split, "split_seed": cfg.split_seed} if cfg.split is not None else {}),
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

    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a directory")
    if (out / MANIFEST).is_file():
        manifest = read_manifest(out)
        _check_same(manifest.get("settings", {}), settings, out)
        log(f"{out} is already prepared with these settings; nothing to do")
        return manifest
    with directory_lock(out, "gpt2lab prepare"):
        return _prepare_locked(cfg, tok, log, out, corpus, plan, settings, name)


def _prepare_locked(
    cfg: PrepareConfig,
    tok: Any,
    log: Any,
    out: Path,
    corpus: Corpus,
    plan: dict[str, Any],
    settings: dict[str, Any],
    name: str,
) -> dict[str, Any]:
    state: dict[str, Any] = {"settings": settings, "splits": {}}
    if (out / STATE).is_file():
        previous = read_json(out / STATE, "")
        if not isinstance(previous, dict) or not isinstance(previous.get("splits"), dict):
            raise UserError(f"{out / STATE} is not a prepare state; delete it to start this prepare over")
        _check_same(previous.get("settings", {}), settings, out)
        state = previous
        log(f"resuming the interrupted prepare in {out}")
    remove_stale_temporaries(out, [f"{name}_*.bin", STATE, MANIFEST])
    pool = worker_pool(tok, cfg.workers, cfg.gpt2_vocab)
    try:
        for split, stream in plan["splits"].items():
            _write_split(cfg, split, stream, state, tok, pool, out / name, log, plan.get("close", False))
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
            split: {
                "tokens": st["tokens"],
                "documents": st["documents"],
                "shards": st["shards"],
                "max_ids": _max_ids(out, st),
            }
            for split, st in state["splits"].items()
        },
    }
    write_json(out / MANIFEST, manifest)
    (out / STATE).unlink(missing_ok=True)
    if manifest["replaced_undecodable_bytes"]:
        n = manifest["replaced_undecodable_bytes"]
        log(f"warning: {n} undecodable byte sequences were replaced by U+FFFD")
    return manifest


def _max_ids(out: Path, st: dict[str, Any]) -> list[int]:
    """The largest token id of each shard of a split: recorded as they were written, or (for shards a
    prepare from before that record was written) read back from the shard."""
    known = st.get("max_ids", [])
    return [
        known[i] if i < len(known) else int(np.max(read_shard(out / shard), initial=-1))
        for i, shard in enumerate(st["shards"])
    ]


def _write_split(
    cfg: PrepareConfig,
    split: str,
    stream: Any,
    state: dict[str, Any],
    tok: Any,
    pool: Any,
    prefix: Path,
    log: Any,
    close: bool = False,
) -> None:
    """Tokenize one split into shards `<prefix>_<split>_NNNNNN.bin`, saving the state after each shard.

    The state says how many of the split's documents are wholly in shards (docs_done) and how many
    tokens of the next one are (skip), so a resumed run re-tokenizes only from that document on.
    close: end the split with an EOT, written as an empty last document (its tokens are [EOT]).
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
        st["max_ids"] = [*_max_ids(out, st), int(buffer[:n].max())]
        st["shards"].append(shard)
        st["tokens"] += n

    # Every pass reads the source from its start (skipping what is written), so the largest count
    # of replaced byte sequences seen in one pass is the source's.
    ReplacementCounter.count = 0
    base = st["docs_done"]
    docs = chain(stream(), [""]) if close else stream()
    for i, (chars, toks) in enumerate(tokenized(islice(docs, base, None), tok, pool)):
        n_docs, n_tokens, n_chars = n_docs + bool(chars), n_tokens + len(toks), n_chars + chars
        progress.update(n_docs, throughput())
        skip = st["skip"] if i == 0 else 0  # tokens of this document already in the last shard
        if skip == 0 and chars:  # documents are never empty: an empty one is the closing EOT
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
            if key == "tokenizer":  # by kind and name: a BPE spec's ranks run to megabytes
                what = f"{describe_spec(previous.get(key))}, not {describe_spec(value)}"
            else:
                what = f"{key} {quote(previous.get(key))}, not {quote(value)}"
            raise UserError(
                f"{out} was prepared with {what}; use another --out directory (nothing was changed)"
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
    source = Path(cfg.source)
    if source.exists() and not (source.is_file() or source.is_dir()):
        raise UserError(f"{cfg.source} is not a regular file or a folder (a device or pipe never ends)")
    if Path(cfg.out).exists() and not Path(cfg.out).is_dir():
        raise UserError(f"--out {cfg.out} is a file, not a directory")
    t0 = time.perf_counter()
    corpus = open_corpus(cfg.source, cfg.separator, cfg.text_field, cfg.revision)
    manifest = prepare(cfg, build_tokenizer(cfg, corpus))
    counts = ", ".join(
        f"{split} {s['tokens']:,} tokens / {s['documents']:,} docs in {len(s['shards'])} shard(s)"
        for split, s in manifest["splits"].items()
    )
    took = time.perf_counter() - t0
    print(f"{cfg.out}: {counts}; vocab {manifest['vocab_size']}, {manifest.get('dtype')} ({took:.1f}s)")
    return manifest
