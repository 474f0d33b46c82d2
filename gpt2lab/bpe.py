"""Byte-level BPE (Radford et al. 2019, after Sennrich et al. 2016): train, encode, decode, save, load.

A vocabulary is a rank table: token bytes -> id, where the 256 single bytes and every merge result
are ranked in the order they were learned, plus special tokens (strings that are never split or
merged and are matched in text only when allowed). Encoding a pre-token (a piece of text cut by
GPT-2's regex) starts from its bytes and repeatedly merges the adjacent pair whose concatenation
has the lowest rank, leftmost first, until no adjacent pair is a token. This is tiktoken's rule; for
a vocabulary learned by `train` or GPT-2's own it gives the merges-list result, and it is what makes
a saved vocabulary encode identically when loaded into tiktoken.

Files (a directory, see `BPE.save` / `BPE.load`):
  encoder.json + vocab.bpe   GPT-2's formats: token (as GPT-2's byte->unicode string) -> id; merges
  vocab.tiktoken             tiktoken's rank format: base64(token bytes) SP rank, one per line
  gpt2lab_tokenizer.json     {"kind": "bpe", name, pattern, special_tokens}: what the two lack
"""

from __future__ import annotations

import base64
import heapq
import json
import operator
import os
import sys
from collections import Counter
from collections.abc import Iterable, Iterator
from functools import lru_cache
from itertools import pairwise
from pathlib import Path
from typing import Any, Literal

from gpt2lab.errors import UserError
from gpt2lab.progress import Progress

# GPT-2's pre-tokenization regex (openai/gpt-2 src/encoder.py), with the contractions grouped as
# tiktoken writes it; the two spellings match the same strings.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
PATTERNS = {"gpt2": GPT2_PATTERN}
EOT = "<|endoftext|>"
META = "gpt2lab_tokenizer.json"
ENCODER_JSON, VOCAB_BPE, TIKTOKEN_FILE = "encoder.json", "vocab.bpe", "vocab.tiktoken"
FORMAT_VERSION = 1

AllowedSpecial = Literal["all"] | set[str] | frozenset[str]


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used in encoder.json and vocab.bpe.

    Printable Latin-1 bytes map to themselves; the other 68 (control, space, ...) map to
    chr(256 + k) in byte order, so no token string contains whitespace or control characters.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, k = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + k)
            k += 1
    return table


def _to_gpt2_str(token: bytes) -> str:
    table = bytes_to_unicode()
    return "".join(table[b] for b in token)


def _from_gpt2_str(text: str, source: str) -> bytes:
    inverse = _unicode_to_bytes()
    try:
        return bytes(inverse[c] for c in text)
    except KeyError as e:
        raise UserError(
            f"{source}: token {text!r} has character {e.args[0]!r} outside GPT-2's byte map"
        ) from None


@lru_cache(maxsize=1)
def _unicode_to_bytes() -> dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}


def _compile(pattern: str) -> Any:
    import regex

    return regex.compile(pattern)


def _special_regex(specials: Iterable[str]) -> Any:
    import regex

    # Longest first, so a special that is a prefix of another never wins the alternation.
    alternatives = sorted(specials, key=len, reverse=True)
    return regex.compile("|".join(regex.escape(s) for s in alternatives))


def _clean(text: str) -> str:
    """Lone surrogates (not encodable as UTF-8) become U+FFFD, as tiktoken does; other text is unchanged."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _bpe(piece: bytes, ranks: dict[bytes, int]) -> list[int]:
    """Ids of one pre-token: merge the lowest-ranked adjacent pair (leftmost first) until none is a token."""
    return _bpe_heap(piece, ranks) if len(piece) > 64 else _bpe_scan(piece, ranks)


def _bpe_scan(piece: bytes, ranks: dict[bytes, int]) -> list[int]:
    """_bpe by rescanning all pairs after each merge: O(n^2), fastest for the short pieces of real text."""
    parts = [piece[i : i + 1] for i in range(len(piece))]
    while len(parts) > 1:
        best, best_i = None, -1
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and (best is None or rank < best):
                best, best_i = rank, i
        if best is None:
            break
        parts[best_i : best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    return [ranks[p] for p in parts]


def _bpe_heap(piece: bytes, ranks: dict[bytes, int]) -> list[int]:
    """_bpe in O(n log n) for long pieces (whitespace runs, long words): a heap of (rank, start) over a
    linked list of parts, where _bpe's rescan of every pair per merge would be O(n^2)."""
    n = len(piece)
    parts: list[bytes] = [piece[i : i + 1] for i in range(n)]
    nxt, prv = list(range(1, n + 1)), list(range(-1, n - 1))  # nxt[i] == n: no right neighbour
    heap = []
    for i in range(n - 1):
        rank = ranks.get(parts[i] + parts[i + 1])
        if rank is not None:
            heap.append((rank, i))
    heapq.heapify(heap)
    while heap:
        rank, i = heapq.heappop(heap)
        j = nxt[i]
        # stale if i was merged away (parts[i] == b""), has no neighbour, or its pair changed
        if not parts[i] or j >= n or ranks.get(parts[i] + parts[j]) != rank:
            continue
        parts[i] += parts[j]
        parts[j] = b""
        nxt[i] = nxt[j]
        if nxt[i] < n:
            prv[nxt[i]] = i
            r = ranks.get(parts[i] + parts[nxt[i]])
            if r is not None:
                heapq.heappush(heap, (r, i))
        if prv[i] >= 0:
            r = ranks.get(parts[prv[i]] + parts[i])
            if r is not None:
                heapq.heappush(heap, (r, prv[i]))
    return [ranks[p] for p in parts if p]


class BPE:
    """A byte-level BPE vocabulary and its pure-Python encoder (the reference path).

    ranks: token bytes -> id for the mergeable tokens (all 256 single bytes + every merge result);
    special_tokens: text -> id; pattern: the pre-tokenization regex.
    """

    def __init__(
        self,
        ranks: dict[bytes, int],
        special_tokens: dict[str, int],
        pattern: str = GPT2_PATTERN,
        merges: list[tuple[int, int]] | None = None,
    ):
        n = len(ranks) + len(special_tokens)
        ids = sorted([*ranks.values(), *special_tokens.values()])
        if ids != list(range(n)):
            raise UserError(f"token ids are not exactly 0..{n - 1} (got {len(set(ids))} distinct ids)")
        missing = [b for b in range(256) if bytes([b]) not in ranks]
        if missing:
            raise UserError(f"vocabulary lacks {len(missing)} single-byte tokens, e.g. byte {missing[0]}")
        self.ranks = ranks
        self.special_tokens = dict(special_tokens)
        self.pattern = pattern
        self._id_to_bytes: list[bytes] = [b""] * n
        for token, i in ranks.items():
            self._id_to_bytes[i] = token
        for text, i in special_tokens.items():
            self._id_to_bytes[i] = text.encode("utf-8")
        self._regex = _compile(pattern)
        self._special_re = _special_regex(special_tokens) if special_tokens else None
        self._cache: dict[bytes, list[int]] = {}
        self._merges = merges

    # --- encode / decode

    @property
    def vocab_size(self) -> int:
        return len(self._id_to_bytes)

    def token_bytes(self, i: int) -> bytes:
        return self._id_to_bytes[i]

    def encode_ordinary(self, text: str) -> list[int]:
        """Ids for text with no special-token handling: every character is ordinary text."""
        out: list[int] = []
        cache, ranks = self._cache, self.ranks
        for piece in self._regex.findall(_clean(text)):
            b = piece.encode("utf-8")
            ids = cache.get(b)
            if ids is None:
                ids = [ranks[b]] if b in ranks else _bpe(b, ranks)
                if len(cache) >= 200_000:  # bound memory on huge corpora; it refills with frequent words
                    cache.clear()
                cache[b] = ids
            out.extend(ids)
        return out

    def encode(self, text: str, allowed_special: AllowedSpecial = frozenset()) -> list[int]:
        """Ids for text; special tokens in `allowed_special` ("all" = every one) become their single id.

        Special tokens not allowed are encoded as the ordinary text they are (tiktoken's
        disallowed_special=() behaviour), so untrusted text can never inject a control token.
        """
        allowed = resolve_allowed(allowed_special, self.special_tokens)
        if not allowed:
            return self.encode_ordinary(text)
        pattern = self._special_re if allowed == set(self.special_tokens) else None
        return split_specials(_clean(text), allowed, self.special_tokens, self.encode_ordinary, pattern)

    def encode_batch(
        self, texts: Iterable[str], allowed_special: AllowedSpecial = frozenset()
    ) -> list[list[int]]:
        return [self.encode(t, allowed_special) for t in texts]

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The exact bytes of the tokens (may end inside a UTF-8 character)."""
        ids = id_list(ids, self.vocab_size)
        table = self._id_to_bytes
        return b"".join(table[i] for i in ids)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of the tokens; invalid UTF-8 becomes U+FFFD here, at the string boundary only."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    # --- merges and formats

    def merges(self) -> list[tuple[int, int]]:
        """The merge list in rank order: for each multi-byte token, the two tokens it is made of.

        A token's pair is found by encoding its bytes with only lower-ranked tokens, which must give
        exactly two parts; otherwise the rank table was not made by BPE merges.
        """
        if self._merges is not None:
            return list(self._merges)
        out = []
        for token, rank in sorted(((t, r) for t, r in self.ranks.items() if len(t) > 1), key=lambda x: x[1]):
            lower = {t: r for t, r in _prefix_ranks(token, self.ranks).items() if r < rank}
            parts = _bpe(token, lower)
            if len(parts) != 2:
                raise UserError(f"token {token!r} (rank {rank}) is not a merge of two lower-ranked tokens")
            out.append((parts[0], parts[1]))
        return out

    def tiktoken_encoding(self, name: str) -> Any:
        """The same vocabulary as a tiktoken.Encoding (fast, Rust, multi-threaded batches)."""
        import tiktoken

        return tiktoken.Encoding(
            name,
            pat_str=self.pattern,
            mergeable_ranks=self.ranks,
            special_tokens=self.special_tokens,
            explicit_n_vocab=self.vocab_size,
        )

    def gpt2_encoder(self) -> dict[str, int]:
        """encoder.json's content (Hugging Face's vocab.json): GPT-2's byte->unicode token string -> id."""
        encoder = {_to_gpt2_str(t): i for t, i in sorted(self.ranks.items(), key=lambda x: x[1])}
        encoder.update(self.special_tokens)
        return encoder

    def gpt2_merges(self) -> list[tuple[str, str]]:
        """The merges as pairs of GPT-2 token strings, in rank order (vocab.bpe / merges.txt lines)."""
        gpt2 = [_to_gpt2_str(t) for t in self._id_to_bytes]
        return [(gpt2[a], gpt2[b]) for a, b in self.merges()]

    def save(self, out_dir: str | Path, name: str) -> Path:
        """Write encoder.json, vocab.bpe, vocab.tiktoken and gpt2lab_tokenizer.json into out_dir."""
        by_rank = sorted(self.ranks.items(), key=lambda x: x[1])
        meta = {
            "kind": "bpe",
            "version": FORMAT_VERSION,
            "name": name,
            "pattern": pattern_name(self.pattern),
            "special_tokens": self.special_tokens,
            "vocab_size": self.vocab_size,
        }
        return write_tokenizer_dir(
            out_dir,
            {
                ENCODER_JSON: json.dumps(self.gpt2_encoder(), ensure_ascii=False),
                VOCAB_BPE: "".join(["#version: 0.2\n", *(f"{a} {b}\n" for a, b in self.gpt2_merges())]),
                TIKTOKEN_FILE: "".join(f"{base64.b64encode(t).decode('ascii')} {i}\n" for t, i in by_rank),
                META: json.dumps(meta, indent=2) + "\n",
            },
        )

    @classmethod
    def load(cls, directory: str | Path) -> tuple[BPE, dict[str, Any]]:
        """(BPE, meta) from a directory `save` wrote (vocab.tiktoken, else encoder.json + vocab.bpe)."""
        d = Path(directory)
        meta = read_meta(d)
        if meta.get("kind") != "bpe":
            raise UserError(f"{d / META}: kind is {meta.get('kind')!r}, not 'bpe'")
        specials = meta.get("special_tokens", {})
        if not isinstance(specials, dict) or not all(isinstance(v, int) for v in specials.values()):
            raise UserError(f"{d / META}: special_tokens must map strings to ids, got {specials!r}")
        pattern = pattern_from_name(meta.get("pattern", "gpt2"), d / META)
        if (d / TIKTOKEN_FILE).exists():
            bpe = cls(read_tiktoken_ranks(d / TIKTOKEN_FILE), specials, pattern)
        else:
            bpe = load_gpt2_files(d / ENCODER_JSON, d / VOCAB_BPE, pattern)
            bpe = cls(bpe.ranks, specials, pattern)
        return bpe, meta


def write_tokenizer_dir(out_dir: str | Path, files: dict[str, str]) -> Path:
    """Write files (name -> UTF-8 text) as the directory out_dir, all or nothing.

    They are written to a temporary sibling that then replaces out_dir, so a crash leaves the old
    tokenizer or the new one. An existing out_dir is replaced only if it is a gpt2lab tokenizer
    directory (or empty), never an unrelated folder.
    """
    import shutil
    import tempfile

    out = Path(out_dir)
    if out.exists():
        if not out.is_dir():
            raise UserError(f"output {str(out)!r} exists and is not a directory")
        if any(out.iterdir()) and not (out / META).is_file():
            raise UserError(
                f"output {str(out)!r} is a non-empty folder that is not a gpt2lab tokenizer; not replaced"
            )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    try:
        for name, text in files.items():
            (tmp / name).write_text(text, encoding="utf-8")
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return out


def resolve_allowed(allowed_special: AllowedSpecial, specials: dict[str, int]) -> set[str]:
    """The set of special tokens to recognise: "all", or a subset of specials (else UserError)."""
    if allowed_special == "all":
        return set(specials)
    if isinstance(allowed_special, str):
        raise UserError(f"allowed_special must be 'all' or a set of strings, got {allowed_special!r}")
    unknown = set(allowed_special) - set(specials)
    if unknown:
        raise UserError(f"allowed_special {sorted(unknown)} not among the special tokens {sorted(specials)}")
    return set(allowed_special)


def split_specials(
    text: str, allowed: set[str], specials: dict[str, int], encode: Any, pattern: Any = None
) -> list[int]:
    """encode() the text between allowed special tokens; each special token becomes its one id."""
    out: list[int] = []
    start = 0
    for m in (pattern or _special_regex(allowed)).finditer(text):
        out.extend(encode(text[start : m.start()]))
        out.append(specials[m.group()])
        start = m.end()
    out.extend(encode(text[start:]))
    return out


def id_list(ids: Iterable[int], vocab_size: int) -> list[int]:
    """Token ids (a list, tensor or array of integers) as Python ints, each checked against vocab_size."""
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
        ids = ids if isinstance(ids, list) else [ids]  # a 0-d tensor or array is one id
    try:
        out = [operator.index(i) for i in ids]
    except TypeError:
        bad = next(i for i in ids if not hasattr(i, "__index__"))
        raise UserError(f"token ids must be integers, got {bad!r}") from None
    check_ids(out, vocab_size)
    return out


def check_ids(ids: list[int], vocab_size: int) -> None:
    """UserError when an id is outside [0, vocab_size)."""
    if ids:
        lo, hi = min(ids), max(ids)
        if lo < 0 or hi >= vocab_size:
            bad = lo if lo < 0 else hi
            raise UserError(
                f"token id {bad} out of range for vocab_size {vocab_size} (valid: 0..{vocab_size - 1})"
            )


def _prefix_ranks(token: bytes, ranks: dict[bytes, int]) -> dict[bytes, int]:
    """The ranks of all substrings of token that are tokens (what _bpe can use on it)."""
    n = len(token)
    return {
        token[i:j]: ranks[token[i:j]] for i in range(n) for j in range(i + 1, n + 1) if token[i:j] in ranks
    }


def pattern_name(pattern: str) -> str:
    for name, p in PATTERNS.items():
        if p == pattern:
            return name
    return pattern


def pattern_from_name(name: str, source: Any) -> str:
    if not isinstance(name, str) or not name:
        raise UserError(f"{source}: pattern must be a name {list(PATTERNS)} or a regex, got {name!r}")
    return PATTERNS.get(name, name)


def read_meta(d: Path) -> dict[str, Any]:
    path = d / META
    if not path.is_file():
        raise UserError(f"{d}: no {META}; not a tokenizer directory written by gpt2lab")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    if meta.get("version") != FORMAT_VERSION:
        raise UserError(
            f"{path}: format version {meta.get('version')!r}, this gpt2lab reads {FORMAT_VERSION}"
        )
    return meta


def read_tiktoken_ranks(path: str | Path) -> dict[bytes, int]:
    """tiktoken's rank file: `base64(token) rank` per line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read tiktoken rank file ({e})") from None
    return parse_tiktoken_ranks(text, str(path))


def parse_tiktoken_ranks(text: str, source: str) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line:
            continue
        try:
            token_b64, rank = line.split()
            ranks[base64.b64decode(token_b64, validate=True)] = int(rank)
        except ValueError:
            raise UserError(f"{source}:{n}: expected 'base64token rank', got {line[:60]!r}") from None
    if not ranks:
        raise UserError(f"{source}: no tokens")
    return ranks


def load_gpt2_files(encoder_path: str | Path, vocab_bpe_path: str | Path, pattern: str = GPT2_PATTERN) -> BPE:
    """A BPE from GPT-2's encoder.json (token -> id) and vocab.bpe (merges in rank order).

    Tokens that are neither a single byte nor a merge result (GPT-2: `<|endoftext|>`) are special.
    Each merge's result must have a higher id than its parts and ids must follow merge order, since
    rank = id is what encoding uses.
    """
    encoder_path, vocab_bpe_path = Path(encoder_path), Path(vocab_bpe_path)
    try:
        encoder = json.loads(encoder_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{encoder_path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{encoder_path}: not valid JSON ({e})") from None
    try:
        lines = vocab_bpe_path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UserError(f"{vocab_bpe_path}: file not found") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{vocab_bpe_path}: not UTF-8 ({e})") from None
    merges = []
    for n, line in enumerate(lines, 1):
        if (n == 1 and line.startswith("#version")) or not line.strip():
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise UserError(f"{vocab_bpe_path}:{n}: expected two space-separated tokens, got {line[:60]!r}")
        merges.append((parts[0], parts[1]))
    return gpt2_format_bpe(encoder, merges, str(encoder_path), str(vocab_bpe_path), pattern)


def gpt2_format_bpe(
    encoder: Any,
    merges: list[tuple[str, str]],
    source: str,
    merges_source: str | None = None,
    pattern: str = GPT2_PATTERN,
) -> BPE:
    """A BPE from GPT-2's format in memory: token string -> id (encoder.json, vocab.json) and the merges
    as pairs of token strings in rank order (vocab.bpe, merges.txt, tokenizer.json's model.merges)."""
    merges_source = merges_source or source
    if not isinstance(encoder, dict) or not all(isinstance(v, int) for v in encoder.values()):
        raise UserError(f"{source}: expected a JSON object mapping token strings to integer ids")
    inverse = _unicode_to_bytes()
    mergeable = {c for c in inverse} | {a + b for a, b in merges}
    ranks: dict[bytes, int] = {}
    specials: dict[str, int] = {}
    for token, i in encoder.items():
        if token in mergeable:
            ranks[_from_gpt2_str(token, source)] = i
        else:
            specials[token] = i
    for n, (a, b) in enumerate(merges, 1):
        for part in (a, b, a + b):
            if part not in encoder:
                raise UserError(
                    f"{merges_source}: merge {n} ({a} {b}): {part!r} is not in {Path(source).name}"
                )
        if not encoder[a + b] > max(encoder[a], encoder[b]):
            raise UserError(
                f"{merges_source}: merge {n} ({a} {b}) has id {encoder[a + b]} not above its parts"
            )
    merged_ids = [encoder[a + b] for a, b in merges]
    if merged_ids != sorted(merged_ids):
        raise UserError(
            f"{merges_source}: merge ids do not increase with merge order, so ranks are ambiguous"
        )
    return BPE(ranks, specials, pattern, [(encoder[a], encoder[b]) for a, b in merges])


# --- training


def iter_corpus(corpus: str | Path | Iterable[str], block_chars: int = 1 << 22) -> Iterator[str]:
    """Texts of a corpus: a file, a folder (its files, recursively, sorted), or an iterable of strings.

    Files are read in blocks of about block_chars, cut only at a newline between two non-space
    characters, where GPT-2's regex also has a token boundary, so pre-tokens are the same as for
    the whole file.
    """
    if isinstance(corpus, (str, Path)):
        path = Path(corpus)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
            if not files:
                raise UserError(f"corpus folder {path} has no files")
        elif path.is_file():
            files = [path]
        else:
            raise UserError(f"corpus {str(path)!r} is not a file or folder")
        for f in files:
            yield from _read_blocks(f, block_chars)
    else:
        for text in corpus:
            if not isinstance(text, str):
                raise UserError(f"corpus iterable must yield str, got {type(text).__name__}")
            yield text


def _read_blocks(path: Path, block_chars: int) -> Iterator[str]:
    import regex

    cut = regex.compile(r"(?<=\S\n)(?=\S)")
    try:
        with open(path, encoding="utf-8", errors="replace", newline="") as f:
            rest = ""
            while True:
                chunk = f.read(block_chars)
                if not chunk:
                    break
                text = rest + chunk
                last = None
                for m in cut.finditer(text, max(0, len(text) - block_chars // 4)):
                    last = m.start()
                if last is None:
                    rest = text
                    continue
                yield text[:last]
                rest = text[last:]
            if rest:
                yield rest
    except OSError as e:
        raise UserError(f"cannot read corpus file {path}: {e}") from None


def count_pretokens(
    corpus: str | Path | Iterable[str], special_tokens: Iterable[str] = (EOT,), pattern: str = GPT2_PATTERN
) -> Counter[bytes]:
    """Frequency of every distinct pre-token (as UTF-8 bytes); special tokens are cut out first."""
    regex_ = _compile(pattern)
    specials = list(special_tokens)
    split = _special_regex(specials) if specials else None
    counts: Counter[str] = Counter()
    for text in iter_corpus(corpus):
        for part in split.split(text) if split else (text,):
            counts.update(regex_.findall(_clean(part)))
    out: Counter[bytes] = Counter()
    for piece, c in counts.items():
        out[piece.encode("utf-8")] += c
    return out


def train(
    corpus: str | Path | Iterable[str],
    vocab_size: int,
    special_tokens: Iterable[str] = (EOT,),
    pattern: str = GPT2_PATTERN,
    progress: bool = True,
) -> BPE:
    """Learn vocab_size - 256 - len(special_tokens) merges from a corpus (file, folder or iterable of str).

    Incremental: pair counts are kept over the distinct pre-tokens, weighted by their frequency, and
    after each merge only the words that contain the merged pair are re-counted. The best pair comes
    from a max-heap with lazy invalidation (a popped entry whose count is stale is re-pushed with the
    current count; counts of existing pairs only ever go down, so a stale entry is never too low).

    Tie-breaking (deterministic): the highest count wins; among equal counts, the pair with the
    smaller (left id, right id) wins, i.e. the pair of earlier-learned tokens (bytes by value).
    Ids: 0..255 are the bytes, 256.. the merges in order, then the special tokens in the order given.

    A corpus runs out of pairs once every distinct pre-token is a single token. Then the vocabulary
    stays smaller than asked, with a one-line warning on stderr saying how many tokens the corpus
    supports (Hugging Face tokenizers stops there silently); a corpus with fewer bytes than the
    requested vocabulary is a UserError, since it cannot be what the user meant.
    """
    specials = list(dict.fromkeys(special_tokens))
    for s in specials:
        if not isinstance(s, str) or not s:
            raise UserError(f"special token must be a non-empty string, got {s!r}")
    if not isinstance(vocab_size, int) or vocab_size < 256 + len(specials):
        raise UserError(
            f"vocab_size {vocab_size!r} must be at least 256 bytes + {len(specials)} special tokens "
            f"= {256 + len(specials)}"
        )
    n_merges = vocab_size - 256 - len(specials)
    counts = count_pretokens(corpus, specials, pattern)

    words: list[list[int]] = []
    freqs: list[int] = []
    for piece, c in counts.items():
        if len(piece) > 1:
            words.append(list(piece))
            freqs.append(c)
    pair_counts: dict[tuple[int, int], int] = {}
    where: dict[tuple[int, int], set[int]] = {}
    for w, (word, f) in enumerate(zip(words, freqs, strict=True)):
        for pair in pairwise(word):
            pair_counts[pair] = pair_counts.get(pair, 0) + f
            where.setdefault(pair, set()).add(w)
    heap = [(-c, a, b) for (a, b), c in pair_counts.items()]
    heapq.heapify(heap)

    token_bytes = [bytes([b]) for b in range(256)]
    bar = Progress("bpe train", n_merges, progress)
    merges = 0
    merge_list: list[tuple[int, int]] = []
    while merges < n_merges:
        if not heap:
            bar.close()
            supported = 256 + merges + len(specials)
            corpus_bytes = sum(len(piece) * c for piece, c in counts.items())
            if corpus_bytes < vocab_size:
                raise UserError(
                    f"corpus too small for vocab_size {vocab_size}: {corpus_bytes} bytes of text, enough for "
                    f"{supported} tokens; use a larger corpus or a smaller vocab size"
                )
            print(
                f"warning: the corpus supports only {supported} tokens (every distinct pre-token is a single "
                f"token after {merges} merges); the vocabulary has {supported}, not {vocab_size}",
                file=sys.stderr,
            )
            break
        neg, a, b = heapq.heappop(heap)
        pair = (a, b)
        current = pair_counts.get(pair, 0)
        if current <= 0:
            continue
        if current != -neg:
            heapq.heappush(heap, (-current, a, b))
            continue
        new = 256 + merges
        merge_list.append(pair)
        token_bytes.append(token_bytes[a] + token_bytes[b])
        merges += 1
        new_pairs: dict[tuple[int, int], int] = {}
        for w in where.pop(pair):
            word, f = words[w], freqs[w]
            merged: list[int] = []
            i, n, hit = 0, len(word), False
            while i < n:
                if i + 1 < n and word[i] == a and word[i + 1] == b:
                    merged.append(new)
                    i += 2
                    hit = True
                else:
                    merged.append(word[i])
                    i += 1
            if not hit:
                continue  # a stale entry in `where`: the pair left this word in an earlier merge
            for p in pairwise(word):
                pair_counts[p] -= f
            for p in pairwise(merged):
                if p[0] == new or p[1] == new:  # a pair made by this merge: counted once, after the loop
                    new_pairs[p] = new_pairs.get(p, 0) + f
                    where.setdefault(p, set()).add(w)
                else:  # it was in the old word, so it is counted and `where` has w already
                    pair_counts[p] += f
            words[w] = merged
        pair_counts.pop(pair, None)
        for p, c in new_pairs.items():
            pair_counts[p] = c
            heapq.heappush(heap, (-c, p[0], p[1]))
        bar.update(merges)
    bar.close()

    ranks = {t: i for i, t in enumerate(token_bytes)}
    if len(ranks) != len(token_bytes):
        raise AssertionError("a merge produced a token that already exists")  # BPE invariant; a bug if hit
    first_special = len(token_bytes)
    return BPE(ranks, {s: first_special + k for k, s in enumerate(specials)}, pattern, merge_list)
