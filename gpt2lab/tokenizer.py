"""One Tokenizer interface over GPT-2's vocabulary, our trained BPE, characters and raw bytes.

    tok = get_tokenizer("gpt2")                    # OpenAI's vocab; tiktoken fast path
    tok = get_tokenizer("gpt2", backend="python")  # the same ids from our reference encoder
    tok = get_tokenizer("out/tok")                 # a directory `gpt2lab tokenizer train` wrote
    tok = get_tokenizer("char", corpus="input.txt") / get_tokenizer("bytes")
    ids = tok.encode(text); text = tok.decode(ids); get_tokenizer(tok.to_spec()) restores it.

Special tokens: `encode(text)` treats "<|endoftext|>" in text as ordinary characters (the default,
allowed_special=set(), is safe for untrusted text); `encode(text, allowed_special="all")` maps every
special token written in the text to its id; a set allows just those.

GPT-2's vocabulary files are found, in order: `vocab_dir` (encoder.json + vocab.bpe, or Hugging
Face's vocab.json + merges.txt), the cache directory `$GPT2LAB_CACHE/gpt2` (default
~/.cache/gpt2lab/gpt2), or downloaded from OpenAI into the cache, checked against the SHA-256 that
tiktoken pins for them.
"""

from __future__ import annotations

import base64
import json
import os
import zlib
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from gpt2lab.bpe import (
    BPE,
    EOT,
    META,
    AllowedSpecial,
    id_list,
    load_gpt2_files,
    parse_tiktoken_ranks,
    pattern_from_name,
    pattern_name,
    read_meta,
    resolve_allowed,
    split_specials,
    write_tokenizer_dir,
)
from gpt2lab.download import GPT2_ENCODER, GPT2_MERGES, cache_dir, fetch, is_pinned, remember
from gpt2lab.errors import UserError

SPEC_VERSION = 1
BACKENDS = ("tiktoken", "python")
# OpenAI's GPT-2 vocabulary: name -> (URL, SHA-256), pinned in download.py (as tiktoken pins them).
GPT2_FILES = {p.name.split("/")[-1]: (p.url, p.sha256) for p in (GPT2_ENCODER, GPT2_MERGES)}
GPT2_VOCAB_SIZE, GPT2_EOT_ID = 50257, 50256  # GPT-2's encoder.json


class Tokenizer(ABC):
    """text <-> token ids. Every implementation has these members and nothing the others lack.

    Each also has `special_tokens`: {token text: id}, <|endoftext|> included.
    """

    special_tokens: dict[str, int]

    @property
    @abstractmethod
    def name(self) -> str: ...

    @property
    @abstractmethod
    def vocab_size(self) -> int: ...

    @property
    @abstractmethod
    def eot_id(self) -> int:
        """Id of <|endoftext|>, the document separator."""

    @abstractmethod
    def encode(self, text: str, allowed_special: AllowedSpecial = frozenset()) -> list[int]:
        """Ids for text; special tokens are recognised only when allowed ("all", or a set of them)."""

    def encode_batch(
        self, texts: Sequence[str], allowed_special: AllowedSpecial = frozenset()
    ) -> list[list[int]]:
        return [self.encode(t, allowed_special) for t in texts]

    @abstractmethod
    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The tokens' raw bytes (a streaming decoder can hold back an incomplete UTF-8 tail)."""

    def decode(self, ids: Iterable[int]) -> str:
        """Text of the tokens; invalid UTF-8 becomes U+FFFD only here, at the string boundary."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    @abstractmethod
    def to_spec(self) -> dict[str, Any]:
        """A JSON-serialisable description (stored in checkpoints); get_tokenizer(spec) restores it."""

    @abstractmethod
    def save(self, out_dir: str | Path) -> Path:
        """Write the tokenizer to a directory that get_tokenizer(out_dir) loads."""

    @staticmethod
    def from_spec(spec: dict[str, Any]) -> Tokenizer:
        return get_tokenizer(spec)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} vocab_size={self.vocab_size}>"


class BPETokenizer(Tokenizer):
    """A byte-level BPE vocabulary (GPT-2's or one we trained); backend tiktoken (fast) or python."""

    def __init__(self, bpe: BPE, name: str, backend: str = "tiktoken", kind: str = "bpe"):
        if backend not in BACKENDS:
            raise UserError(f"backend {backend!r} is not one of {BACKENDS}")
        self.bpe, self._name, self.backend, self.kind = bpe, name, backend, kind
        self._enc = bpe.tiktoken_encoding(name) if backend == "tiktoken" else None

    @property
    def name(self) -> str:
        return self._name

    @property
    def vocab_size(self) -> int:
        return self.bpe.vocab_size

    @property
    def special_tokens(self) -> dict[str, int]:
        return self.bpe.special_tokens

    @property
    def eot_id(self) -> int:
        if EOT not in self.bpe.special_tokens:
            raise UserError(
                f"tokenizer {self.name!r} has no {EOT} token (specials: {list(self.bpe.special_tokens)})"
            )
        return self.bpe.special_tokens[EOT]

    def _tiktoken_allowed(self, allowed_special: AllowedSpecial) -> Any:
        return (
            "all" if allowed_special == "all" else resolve_allowed(allowed_special, self.bpe.special_tokens)
        )

    def encode(self, text: str, allowed_special: AllowedSpecial = frozenset()) -> list[int]:
        if self._enc is None:
            return self.bpe.encode(text, allowed_special)
        return self._enc.encode(
            text, allowed_special=self._tiktoken_allowed(allowed_special), disallowed_special=()
        )

    def encode_batch(
        self, texts: Sequence[str], allowed_special: AllowedSpecial = frozenset()
    ) -> list[list[int]]:
        if self._enc is None:
            return self.bpe.encode_batch(texts, allowed_special)
        return self._enc.encode_batch(
            list(texts),
            num_threads=os.cpu_count() or 1,
            allowed_special=self._tiktoken_allowed(allowed_special),
            disallowed_special=(),
        )

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        if self._enc is None:
            return self.bpe.decode_bytes(ids)
        ids = id_list(ids, self.vocab_size)
        return self._enc.decode_bytes(ids)

    def to_spec(self) -> dict[str, Any]:
        if self.kind == "gpt2":
            return {"kind": "gpt2", "version": SPEC_VERSION, "backend": self.backend}
        ranks = "".join(
            f"{base64.b64encode(t).decode('ascii')} {i}\n"
            for t, i in sorted(self.bpe.ranks.items(), key=lambda x: x[1])
        )
        return {
            "kind": "bpe",
            "version": SPEC_VERSION,
            "name": self.name,
            "backend": self.backend,
            "pattern": pattern_name(self.bpe.pattern),
            "special_tokens": self.bpe.special_tokens,
            # the rank file (vocab.tiktoken), zlib-compressed and base64'd: one line in config.json
            "ranks_zlib_b64": base64.b64encode(zlib.compress(ranks.encode("ascii"), 9)).decode("ascii"),
        }

    def save(self, out_dir: str | Path) -> Path:
        return self.bpe.save(out_dir, self.name)

    def merges(self) -> list[tuple[bytes, bytes]]:
        """The merges in the order learned (the first ones joined the most frequent pairs)."""
        tb = self.bpe.token_bytes
        return [(tb(a), tb(b)) for a, b in self.bpe.merges()]


class CharTokenizer(Tokenizer):
    """One id per character of a fixed alphabet (as char-level tinyshakespeare models use), then specials."""

    def __init__(self, chars: Sequence[str], special_tokens: Sequence[str] = (EOT,), name: str = "char"):
        chars = list(chars)
        if len(set(chars)) != len(chars) or not all(isinstance(c, str) and len(c) == 1 for c in chars):
            raise UserError("char vocabulary must be distinct single characters")
        if not chars:
            raise UserError("char vocabulary is empty (the corpus has no text)")
        self.chars = chars
        self.stoi = {c: i for i, c in enumerate(chars)}
        self.special_tokens = {s: len(chars) + k for k, s in enumerate(dict.fromkeys(special_tokens))}
        self._itos = [*chars, *self.special_tokens]
        self._name = name

    @classmethod
    def from_corpus(cls, corpus: str | Path, special_tokens: Sequence[str] = (EOT,)) -> CharTokenizer:
        """The sorted set of characters of a text file."""
        path = Path(corpus)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"char corpus {str(path)!r}: cannot read as UTF-8 text ({e})") from None
        return cls(sorted(set(text)), special_tokens)

    @property
    def name(self) -> str:
        return self._name

    @property
    def vocab_size(self) -> int:
        return len(self._itos)

    @property
    def eot_id(self) -> int:
        if EOT not in self.special_tokens:
            raise UserError(f"tokenizer {self.name!r} has no {EOT} token")
        return self.special_tokens[EOT]

    def _encode_chars(self, text: str) -> list[int]:
        stoi = self.stoi
        try:
            return [stoi[c] for c in text]
        except KeyError as e:
            c = e.args[0]
            raise UserError(
                f"character {c!r} (U+{ord(c):04X}) is not among this char tokenizer's {len(self.chars)}"
            ) from None

    def encode(self, text: str, allowed_special: AllowedSpecial = frozenset()) -> list[int]:
        allowed = resolve_allowed(allowed_special, self.special_tokens)
        if not allowed:
            return self._encode_chars(text)
        return split_specials(text, allowed, self.special_tokens, self._encode_chars)

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return self.decode(ids).encode("utf-8")

    def decode(self, ids: Iterable[int]) -> str:
        ids = id_list(ids, self.vocab_size)
        itos = self._itos
        return "".join(itos[i] for i in ids)

    def to_spec(self) -> dict[str, Any]:
        return {
            "kind": "char",
            "version": SPEC_VERSION,
            "name": self.name,
            "chars": "".join(self.chars),
            "special_tokens": list(self.special_tokens),
        }

    def save(self, out_dir: str | Path) -> Path:
        return write_tokenizer_dir(out_dir, {META: json.dumps(self.to_spec(), indent=2) + "\n"})


class ByteTokenizer(Tokenizer):
    """Ids 0..255 are the bytes of the UTF-8 text; special tokens follow (256 = <|endoftext|>)."""

    def __init__(self, special_tokens: Sequence[str] = (EOT,)):
        self.special_tokens = {s: 256 + k for k, s in enumerate(dict.fromkeys(special_tokens))}
        self._id_to_bytes = [bytes([b]) for b in range(256)] + [
            s.encode("utf-8") for s in self.special_tokens
        ]

    @property
    def name(self) -> str:
        return "bytes"

    @property
    def vocab_size(self) -> int:
        return len(self._id_to_bytes)

    @property
    def eot_id(self) -> int:
        if EOT not in self.special_tokens:
            raise UserError(f"tokenizer 'bytes' has no {EOT} token")
        return self.special_tokens[EOT]

    @staticmethod
    def _encode_bytes(text: str) -> list[int]:
        return list(text.encode("utf-8", errors="replace"))

    def encode(self, text: str, allowed_special: AllowedSpecial = frozenset()) -> list[int]:
        allowed = resolve_allowed(allowed_special, self.special_tokens)
        if not allowed:
            return self._encode_bytes(text)
        return split_specials(text, allowed, self.special_tokens, self._encode_bytes)

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        ids = id_list(ids, self.vocab_size)
        table = self._id_to_bytes
        return b"".join(table[i] for i in ids)

    def to_spec(self) -> dict[str, Any]:
        return {"kind": "bytes", "version": SPEC_VERSION, "special_tokens": list(self.special_tokens)}

    def save(self, out_dir: str | Path) -> Path:
        return write_tokenizer_dir(out_dir, {META: json.dumps(self.to_spec(), indent=2) + "\n"})


class AddedTokens(Tokenizer):
    """A tokenizer plus special tokens appended after its vocabulary (fine-tuning's chat template).

    The spec is the base's spec with "added_tokens": {token: id}, so a checkpoint's tokenizer
    restores them. Text is never split on an added token unless it is allowed (allowed_special).
    """

    def __init__(self, base: Tokenizer, added: dict[str, int]):
        if isinstance(base, AddedTokens):
            base, added = base.base, {**base.added, **added}
        clash = [t for t in added if t in base.special_tokens]
        if clash:
            raise UserError(f"tokenizer {base.name!r} already has the special token {clash[0]!r}")
        ids = sorted(added.values())
        if ids != list(range(base.vocab_size, base.vocab_size + len(ids))):
            raise UserError(
                f"added token ids {ids} must follow the vocabulary of {base.vocab_size} contiguously"
            )
        self.base, self.added = base, dict(added)
        self.special_tokens = {**base.special_tokens, **self.added}
        self._bytes = {i: t.encode("utf-8") for t, i in self.added.items()}

    @property
    def name(self) -> str:
        return self.base.name

    @property
    def vocab_size(self) -> int:
        return self.base.vocab_size + len(self.added)

    @property
    def eot_id(self) -> int:
        return self.base.eot_id

    def _encode_base(self, text: str, allowed: set[str]) -> list[int]:
        return self.base.encode(text, allowed & set(self.base.special_tokens))

    def encode(self, text: str, allowed_special: AllowedSpecial = frozenset()) -> list[int]:
        allowed = resolve_allowed(allowed_special, self.special_tokens)
        mine = allowed & set(self.added)
        if not mine:
            return self._encode_base(text, allowed)
        return split_specials(text, mine, self.added, lambda t: self._encode_base(t, allowed))

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        ids = id_list(ids, self.vocab_size)
        out, run = [], []
        for i in ids:
            if i in self._bytes:
                out.append(self.base.decode_bytes(run))
                out.append(self._bytes[i])
                run = []
            else:
                run.append(i)
        out.append(self.base.decode_bytes(run))
        return b"".join(out)

    def to_spec(self) -> dict[str, Any]:
        return {**self.base.to_spec(), "added_tokens": dict(self.added)}

    def save(self, out_dir: str | Path) -> Path:
        raise UserError(
            "a tokenizer with added tokens lives in its checkpoint's config.json, not a directory"
        )


# --- GPT-2's vocabulary files


def _gpt2_pair(d: Path) -> tuple[Path, Path] | None:
    for enc, merges in (("encoder.json", "vocab.bpe"), ("vocab.json", "merges.txt")):
        if (d / enc).is_file() and (d / merges).is_file():
            return d / enc, d / merges
    return None


def find_gpt2_vocab(vocab_dir: str | Path | None = None) -> tuple[Path, Path]:
    """(encoder.json, vocab.bpe) paths: vocab_dir, else the cache (checked by SHA-256), else downloaded
    into the cache. OpenAI's own files given in vocab_dir are remembered in the cache for later."""
    if vocab_dir is not None:
        d = Path(vocab_dir).expanduser()
        pair = _gpt2_pair(d) if d.is_dir() else None
        if pair is None:
            raise UserError(
                f"GPT-2 vocab dir {str(d)!r} has no encoder.json + vocab.bpe (or vocab.json + merges.txt)"
            )
        # Only OpenAI's two files byte for byte become the default; others are used here, not kept.
        if is_pinned(pair[0], GPT2_ENCODER) and is_pinned(pair[1], GPT2_MERGES):
            remember(pair[0], GPT2_ENCODER)
            remember(pair[1], GPT2_MERGES)
        return pair
    hint = (
        "pass --gpt2-vocab DIR / vocab_dir=DIR (a folder with encoder.json and vocab.bpe), or copy those two "
        f"files into {cache_dir() / 'gpt2'}"
    )
    return fetch(GPT2_ENCODER, hint), fetch(GPT2_MERGES, hint)


def model_tokenizer(
    spec: dict[str, Any] | None, gpt2_vocab: str | Path | None = None, model_dir: str | Path | None = None
) -> Tokenizer:
    """The tokenizer of a loaded model: its spec (a checkpoint's, or a Hugging Face folder's), else GPT-2's
    own vocabulary. GPT-2's files are read from gpt2_vocab, else from the vocab.json + merges.txt a
    Hugging Face directory (model_dir) carries beside its weights, else from the cache (or downloaded)."""
    if (
        gpt2_vocab is None
        and model_dir is not None
        and Path(model_dir).is_dir()
        and _gpt2_pair(Path(model_dir))
    ):
        gpt2_vocab = model_dir
    if spec is not None:
        return get_tokenizer(spec, vocab_dir=gpt2_vocab)
    return get_tokenizer("gpt2", vocab_dir=gpt2_vocab)


@lru_cache(maxsize=4)
def _load_gpt2_bpe(encoder: Path, merges: Path) -> BPE:
    bpe = load_gpt2_files(encoder, merges)
    if bpe.vocab_size != GPT2_VOCAB_SIZE or bpe.special_tokens != {EOT: GPT2_EOT_ID}:
        raise UserError(
            f"{encoder.parent}: not GPT-2's vocabulary (vocab_size {bpe.vocab_size}, specials "
            f"{bpe.special_tokens}; expected {GPT2_VOCAB_SIZE} and {{{EOT!r}: {GPT2_EOT_ID}}})"
        )
    return bpe


def gpt2_tokenizer(vocab_dir: str | Path | None = None, backend: str = "tiktoken") -> BPETokenizer:
    encoder, merges = find_gpt2_vocab(vocab_dir)
    return BPETokenizer(_load_gpt2_bpe(encoder.resolve(), merges.resolve()), "gpt2", backend, kind="gpt2")


# --- the factory


def get_tokenizer(
    spec: str | Path | dict[str, Any],
    *,
    vocab_dir: str | Path | None = None,
    backend: str | None = None,
    corpus: str | Path | None = None,
) -> Tokenizer:
    """A tokenizer from a name ("gpt2", "bytes", "char" with corpus=PATH), a directory, or a to_spec() dict.

    A directory is one `save` or `gpt2lab tokenizer train` wrote, or bare encoder.json + vocab.bpe.

    backend ("tiktoken" default, or "python") applies to BPE vocabularies; it overrides a spec's.
    """
    if isinstance(spec, dict):
        return _from_spec(spec, backend, vocab_dir)
    name = str(spec)
    if name == "gpt2":
        return gpt2_tokenizer(vocab_dir, backend or "tiktoken")
    if name == "bytes":
        return ByteTokenizer()
    if name == "char":
        if corpus is None:
            raise UserError("the char tokenizer needs corpus=PATH (--corpus), or a directory it was saved to")
        return CharTokenizer.from_corpus(corpus)
    d = Path(name).expanduser()
    if d.is_dir() and not (d / META).exists() and _gpt2_pair(d):
        # bare GPT-2-format files (OpenAI's or Hugging Face's names): GPT-2 itself, or another vocabulary
        encoder, merges = _gpt2_pair(d)
        bpe = load_gpt2_files(encoder, merges)
        if bpe.vocab_size == GPT2_VOCAB_SIZE and bpe.special_tokens == {EOT: GPT2_EOT_ID}:
            return gpt2_tokenizer(d, backend or "tiktoken")
        return BPETokenizer(bpe, d.resolve().name, backend or "tiktoken")
    if d.is_dir():
        meta = read_meta(d)
        if meta.get("kind") == "bpe":
            bpe, meta = BPE.load(d)
            return BPETokenizer(bpe, str(meta.get("name") or d.name), backend or "tiktoken")
        return _from_spec(meta, backend)
    raise UserError(
        f"unknown tokenizer {name!r}: expected 'gpt2', 'bytes', 'char' or a directory written by "
        f"`gpt2lab tokenizer train`"
    )


def _from_spec(spec: dict[str, Any], backend: str | None, vocab_dir: str | Path | None = None) -> Tokenizer:
    if spec.get("added_tokens"):
        base = _from_spec({k: v for k, v in spec.items() if k != "added_tokens"}, backend, vocab_dir)
        return AddedTokens(base, dict(spec["added_tokens"]))
    kind = spec.get("kind")
    if spec.get("version") != SPEC_VERSION:
        raise UserError(f"tokenizer spec version {spec.get('version')!r}, this gpt2lab reads {SPEC_VERSION}")
    try:
        if kind == "gpt2":
            return gpt2_tokenizer(vocab_dir, backend or spec.get("backend", "tiktoken"))
        if kind == "bytes":
            return ByteTokenizer(spec["special_tokens"])
        if kind == "char":
            return CharTokenizer(list(spec["chars"]), spec["special_tokens"], spec.get("name", "char"))
        if kind == "bpe":
            text = zlib.decompress(base64.b64decode(spec["ranks_zlib_b64"])).decode("ascii")
            ranks = parse_tiktoken_ranks(text, "tokenizer spec")
            pattern = pattern_from_name(spec.get("pattern", "gpt2"), "tokenizer spec")
            bpe = BPE(ranks, dict(spec["special_tokens"]), pattern)
            return BPETokenizer(bpe, spec["name"], backend or spec.get("backend", "tiktoken"))
    except KeyError as e:
        raise UserError(f"tokenizer spec of kind {kind!r} lacks {e.args[0]!r}") from None
    except (ValueError, zlib.error) as e:
        if isinstance(e, UserError):
            raise
        raise UserError(f"tokenizer spec of kind {kind!r} does not parse ({e})") from None
    raise UserError(f"tokenizer spec kind {kind!r} is not one of 'gpt2', 'bpe', 'char', 'bytes'")


# --- what the CLI prints


def parse_ids(text: str) -> list[int]:
    """Token ids from text like "15496 995" or "[15496, 995]"."""
    parts = text.replace(",", " ").replace("[", " ").replace("]", " ").split()
    try:
        return [int(p) for p in parts]
    except ValueError:
        bad = next(p for p in parts if not p.lstrip("-").isdigit())
        raise UserError(f"token id {bad!r} is not an integer") from None


def stats(tok: Tokenizer, path: str | Path, top: int = 20) -> str:
    """Bytes per token of a UTF-8 file (special tokens in it allowed) and the tokenizer's first merges."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {str(p)!r} as UTF-8 text ({e})") from None
    n_bytes = len(text.encode("utf-8"))
    ids = tok.encode(text, allowed_special="all")
    lines = [
        f"tokenizer      {tok.name} (vocab_size {tok.vocab_size})",
        f"file           {p} ({n_bytes:,} bytes)",
        f"tokens         {len(ids):,}",
        f"bytes/token    {n_bytes / max(1, len(ids)):.3f}",
        f"distinct ids   {len(set(ids)):,}",
    ]
    if isinstance(tok, BPETokenizer) and top > 0:
        lines.append(f"first {top} merges (id: left + right):")
        for k, (a, b) in enumerate(tok.merges()[:top]):
            lines.append(f"  {256 + k:>6}: {a!r} + {b!r}")
    return "\n".join(lines)


def train_tokenizer(
    inputs: Sequence[str | Path],
    vocab_size: int,
    out_dir: str | Path,
    special_tokens: Sequence[str] = (),
    name: str | None = None,
    progress: bool = True,
) -> str:
    """Train a BPE on files/folders, save it to out_dir (loadable by get_tokenizer(out_dir)); a summary."""
    import itertools
    import time

    from gpt2lab.bpe import iter_corpus, train

    specials = list(dict.fromkeys([EOT, *special_tokens]))
    for p in inputs:
        if not Path(p).exists():
            raise UserError(f"--input {str(p)!r} does not exist")
    corpus = itertools.chain.from_iterable(iter_corpus(p) for p in inputs)
    t0 = time.perf_counter()
    bpe = train(corpus, vocab_size, specials, progress=progress)
    seconds = time.perf_counter() - t0
    out = Path(out_dir)
    tok = BPETokenizer(bpe, name or out.resolve().name, backend="python")
    tok.save(out)
    n_merges = bpe.vocab_size - 256 - len(specials)
    short = f" (asked {vocab_size}: no pairs left to merge)" if bpe.vocab_size < vocab_size else ""
    return (
        f"wrote {out}: vocab_size {bpe.vocab_size}{short} = 256 bytes + {n_merges} merges + {len(specials)} "
        f"special {specials} in {seconds:.1f}s; load it with get_tokenizer({str(out)!r})"
    )
