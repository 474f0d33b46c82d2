"""Where documents come from: named datasets (downloaded) and local text / jsonl / parquet files and folders.

A source is a `Corpus`: for each split it knows how to iterate its documents (plain strings),
afresh each time it is asked, so that prepare can count first and resume later.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpt2lab.errors import UserError

DocStream = Callable[[], Iterator[str]]


@dataclass
class Corpus:
    """Documents by split. `splits` has "all" (prepare makes the val split) or its own "train" and "val"."""

    name: str
    description: str
    splits: dict[str, DocStream]
    default_val: dict[str, Any] = field(default_factory=lambda: {"val_fraction": 0.1})


class ReplacementCounter:
    """Counts undecodable byte sequences replaced by U+FFFD while reading (see `decode_errors`)."""

    count = 0


def _count_and_replace(err: UnicodeDecodeError) -> tuple[str, int]:
    ReplacementCounter.count += 1
    return "\ufffd", err.end


codecs.register_error("gpt2lab-replace", _count_and_replace)
DECODE_ERRORS = "gpt2lab-replace"  # like errors="replace", and counted in ReplacementCounter.count


def split_text(chunks: Iterator[str], separator: str | None) -> Iterator[str]:
    """Documents from a stream of text chunks: cut at every separator, stripped, empty ones dropped.

    With no separator the whole stream is one document, kept exactly as it is.
    """
    if separator is None:
        text = "".join(chunks)
        if text.strip():
            yield text
        return
    buffer = ""
    for chunk in chunks:
        buffer += chunk
        *done, buffer = buffer.split(separator)
        for doc in done:
            if doc.strip():
                yield doc.strip()
    if buffer.strip():
        yield buffer.strip()


def _read_chunks(path: Path, size: int = 1 << 20) -> Iterator[str]:
    with open(path, encoding="utf-8", errors=DECODE_ERRORS, newline="") as f:
        while chunk := f.read(size):
            yield chunk


def text_file(path: Path, separator: str | None) -> DocStream:
    return lambda: split_text(_read_chunks(path), separator)


def text_folder(path: Path, separator: str | None) -> DocStream:
    files = sorted(p for p in path.rglob("*.txt") if p.is_file())
    if not files:
        raise UserError(f"folder {path} has no .txt files")

    def docs() -> Iterator[str]:
        for f in files:
            yield from split_text(_read_chunks(f), separator)

    return docs


def jsonl_records(path: str | Path, errors: str = "strict") -> Iterator[tuple[Any, str]]:
    """Each record of a jsonl file with its "file:line", streamed; blank lines skipped. UserError for a
    missing or unreadable file and for a line that is not JSON. errors: how undecodable bytes are read."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8", errors=errors) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield json.loads(line), f"{path}:{lineno}"
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
    except FileNotFoundError:
        raise UserError(f"{str(path)!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {str(path)!r} as UTF-8 text ({e})") from None


def jsonl_file(path: Path, text_field: str) -> DocStream:
    def docs() -> Iterator[str]:
        for record, where in jsonl_records(path, DECODE_ERRORS):
            if not isinstance(record, dict) or text_field not in record:
                raise UserError(f"{where}: record has no {text_field!r} field (--text-field)")
            text = record[text_field]
            if not isinstance(text, str):
                raise UserError(f"{where}: field {text_field!r} is {type(text).__name__}, not text")
            if text.strip():
                yield text

    return docs


def parquet_file(path: Path, text_field: str) -> DocStream:
    def docs() -> Iterator[str]:
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise UserError("reading .parquet needs pyarrow: pip install 'gpt2lab[data]'") from None
        pf = pq.ParquetFile(path)
        if text_field not in pf.schema_arrow.names:
            raise UserError(
                f"{path}: no column {text_field!r} (--text-field); columns: {pf.schema_arrow.names}"
            )
        for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
            for text in batch.column(0).to_pylist():
                if text and text.strip():
                    yield text

    return docs


def hf_dataset(
    path: str, split: str, config: str | None = None, text_field: str = "text", revision: str | None = None
) -> DocStream:
    """Documents of a Hugging Face dataset split at `revision` (default: the pinned commit, see
    download.DATASET_REVISIONS), streamed (nothing is held in memory)."""
    from gpt2lab.download import DATASET_REVISIONS

    revision = revision or DATASET_REVISIONS.get(path)

    def docs() -> Iterator[str]:
        try:
            from datasets import load_dataset
        except ImportError:
            raise UserError(
                "named datasets need Hugging Face datasets: pip install 'gpt2lab[data]'"
            ) from None
        try:
            ds = load_dataset(path, config, split=split, streaming=True, revision=revision)
            for row in ds:
                text = row[text_field]
                if text and text.strip():
                    yield text
        except UserError:
            raise
        except Exception as e:  # offline, missing dataset, proxy: the datasets library raises many types
            raise UserError(
                f"could not stream {path}@{revision} ({split}) from the Hugging Face hub "
                f"({type(e).__name__}: {e}); "
                "when offline, download it elsewhere and pass local .txt/.jsonl/.parquet files"
            ) from None

    return docs


def wikitext_articles(lines: DocStream) -> DocStream:
    """WikiText rows are lines; an article starts at a top-level heading line ' = Title = '."""

    def docs() -> Iterator[str]:
        article: list[str] = []
        for line in lines():
            s = line.strip()
            if s.startswith("= ") and s.endswith(" =") and not s.startswith("= ="):
                if "".join(article).strip():
                    yield "".join(article).strip("\n")
                article = []
            article.append(line if line.endswith("\n") else line + "\n")
        if "".join(article).strip():
            yield "".join(article).strip("\n")

    return docs


def shakespeare_file() -> Path:
    """tinyshakespeare (1.1 MB, char-rnn) from the cache, downloaded into it once; checked by SHA-256."""
    from gpt2lab.download import TINYSHAKESPEARE, fetch

    return fetch(
        TINYSHAKESPEARE, "offline, pass the file itself: gpt2lab prepare path/to/tinyshakespeare.txt ..."
    )


def named_corpus(name: str, revision: str | None = None) -> Corpus | None:
    """A named dataset, or None when `name` is not one. revision: the Hugging Face commit to stream
    (default: the pinned one); the description, which the manifest records, names it."""
    from gpt2lab.download import DATASET_REVISIONS

    def hub(repo: str) -> str:
        return revision or DATASET_REVISIONS[repo]

    if name == "tinystories":
        ts, rev = "roneneldan/TinyStories", hub("roneneldan/TinyStories")
        return Corpus(
            name,
            f"{ts}@{rev} (train, validation)",
            {"train": hf_dataset(ts, "train", revision=rev),
             "val": hf_dataset(ts, "validation", revision=rev)},
        )  # fmt: skip
    if name == "wikitext103":
        wt, cfg, rev = "Salesforce/wikitext", "wikitext-103-raw-v1", hub("Salesforce/wikitext")
        return Corpus(
            name,
            f"{wt}@{rev} {cfg} (train, validation), rows joined into articles",
            {"train": wikitext_articles(hf_dataset(wt, "train", cfg, revision=rev)),
             "val": wikitext_articles(hf_dataset(wt, "validation", cfg, revision=rev))},
        )  # fmt: skip
    if name == "fineweb-edu":
        # Streamed; its first documents become val, as build-nanogpt's first shard did.
        fw, rev = "HuggingFaceFW/fineweb-edu", hub("HuggingFaceFW/fineweb-edu")
        return Corpus(
            name,
            f"{fw}@{rev} sample-10BT",
            {"all": hf_dataset(fw, "train", "sample-10BT", revision=rev)},
            default_val={"val_docs": 10_000},
        )
    if name == "shakespeare":
        if revision is not None:
            raise UserError("--revision pins a Hugging Face dataset; shakespeare is pinned by SHA-256")
        return Corpus(
            name, "tinyshakespeare (char-rnn)", {"all": lambda: text_file(shakespeare_file(), None)()}
        )
    return None


NAMED = ("tinystories", "wikitext103", "fineweb-edu", "shakespeare")


def open_corpus(
    source: str, separator: str | None = None, text_field: str = "text", revision: str | None = None
) -> Corpus:
    """A named dataset (NAMED; revision: its Hugging Face commit) or a local path: .txt file, folder of
    .txt, .jsonl or .parquet."""
    corpus = named_corpus(source, revision)
    if corpus is not None:
        return corpus
    if revision is not None:
        raise UserError(f"--revision pins a named Hugging Face dataset, not the local path {source!r}")
    path = Path(source)
    if not path.exists():
        raise UserError(f"source {source!r} is neither an existing path nor a named dataset {list(NAMED)}")
    name = path.stem if path.is_file() else path.name
    if path.is_dir():
        return Corpus(name, f"folder {path}", {"all": text_folder(path, separator)})
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return Corpus(name, f"jsonl {path} field {text_field!r}", {"all": jsonl_file(path, text_field)})
    if suffix == ".parquet":
        return Corpus(name, f"parquet {path} column {text_field!r}", {"all": parquet_file(path, text_field)})
    sep = "none" if separator is None else repr(separator)
    return Corpus(name, f"text {path} separator {sep}", {"all": text_file(path, separator)})
