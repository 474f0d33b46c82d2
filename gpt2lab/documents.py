"""Documents inside a prepared split, and the rows (windows) a model is trained and scored on.

A split is one stream of tokens in which every document is EOT followed by its tokens (shards.py);
a `--split` prepare also closes the last document with EOT. Document d spans [starts[d],
starts[d+1]): the targets it owns, the tokens predicted from it, are positions starts[d] + 1 ..
starts[d+1], its own tokens and the EOT that ends it. Every token of a split but the first is the
target of exactly one document, so the mean over documents' tokens is the mean over the split.

A row is (offset, n): inputs tokens[offset : offset + n], targets tokens[offset + 1 : offset + n + 1].
Two layouts, and in both every target of the split lies in exactly one row:

- "stream": rows of T consecutive targets, back to back; a row may span documents (GPT-2's way).
- "document": each document's targets in rows of at most T, so a row never reaches back into the
  previous document. A row starts at its document's own EOT (a document longer than T continues in
  further rows), and a model that looks before the row's first token (the MLP's context) reads EOT
  there: the makemore lectures' '.' padding, which is why the ladder trains and scores this way.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from gpt2lab.model import IGNORE_INDEX

Layout = Literal["stream", "document"]
LAYOUTS = ("stream", "document")


class TokenStream:
    """The shards of a split read as one stream of tokens (documents run across shard boundaries)."""

    def __init__(self, shards: list[np.ndarray]):
        self.shards = [s for s in shards if len(s)]
        self.starts = np.cumsum([0] + [len(s) for s in self.shards])
        self.n = int(self.starts[-1])

    @classmethod
    def of_split(cls, data_dir: str | Path, manifest: dict, split: str) -> TokenStream:
        from gpt2lab.shards import read_shard

        return cls([read_shard(Path(data_dir) / name) for name in manifest["splits"][split]["shards"]])

    def read(self, a: int, b: int) -> np.ndarray:
        """tokens [a, b) as int64."""
        parts = []
        for k, s in enumerate(self.shards):
            lo, hi = max(a, int(self.starts[k])), min(b, int(self.starts[k + 1]))
            if lo < hi:
                parts.append(np.asarray(s[lo - self.starts[k] : hi - self.starts[k]], dtype=np.int64))
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def take(self, positions: np.ndarray) -> np.ndarray:
        """The tokens at an array of positions, as int64 of the same shape."""
        out = np.empty(positions.shape, dtype=np.int64)
        shard = np.searchsorted(self.starts, positions, side="right") - 1
        for k, s in enumerate(self.shards):
            mask = shard == k
            out[mask] = s[positions[mask] - self.starts[k]]
        return out

    def document_starts(self, eot_id: int) -> np.ndarray:
        """(D,) int64: where each document starts, its EOT (and position 0, which always starts one)."""
        found = [np.flatnonzero(np.asarray(s) == eot_id) + self.starts[k] for k, s in enumerate(self.shards)]
        starts = np.concatenate([np.zeros(1, dtype=np.int64), *found]) if self.n else np.zeros(0, np.int64)
        return np.unique(starts)  # sorted; 0 counted once


def document_spans(stream: TokenStream, eot_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(first, last) target position of every document that owns at least one target, both (D,).

    The last document of a split ends at the split's last token (with `--split` data: the closing EOT,
    which owns no targets itself and so is no document here).
    """
    starts = stream.document_starts(eot_id)
    ends = np.append(starts[1:], stream.n - 1)  # the last target of document d
    keep = ends > starts
    return starts[keep] + 1, ends[keep]


def rows(
    stream: TokenStream, T: int, layout: Layout, eot_id: int, max_targets: int | None = None
) -> np.ndarray:
    """(R, 2) int64 rows (offset, n), in stream order, covering targets 1 .. min(max_targets, n - 1)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    n_targets = max(stream.n - 1, 0)
    if layout == "stream":
        offsets = np.arange(0, n_targets, T, dtype=np.int64)
        counts = np.minimum(T, n_targets - offsets)
    else:
        first, last = document_spans(stream, eot_id)
        count = last - first + 1  # targets of each document
        pieces = -(-count // T)  # rows of each document
        doc = np.repeat(np.arange(len(count)), pieces)
        j = np.arange(len(doc)) - np.repeat(np.cumsum(pieces) - pieces, pieces)  # row j of its document
        offsets = first[doc] - 1 + j * T
        counts = np.minimum(T, count[doc] - j * T)
    out = np.stack([offsets, counts], axis=1).astype(np.int64).reshape(-1, 2)
    if max_targets is not None:  # targets at positions <= max_targets only
        out[:, 1] = np.minimum(out[:, 1], max_targets - out[:, 0])
        out = out[out[:, 1] > 0]
    return out


def read_rows(stream: TokenStream, batch: np.ndarray, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x, y (len(batch), T) int64 for rows (offset, n): x is right-padded with 0 (after its last input,
    so no causal model reads it), y with IGNORE_INDEX (left out of every loss)."""
    batch = np.asarray(batch, dtype=np.int64).reshape(-1, 2)
    offsets, n = batch[:, :1], batch[:, 1:]
    real = np.arange(T + 1) <= n  # (R, T + 1): the row's n inputs and the token after them
    tokens = stream.take(np.where(real, offsets + np.arange(T + 1), offsets))  # padding reads any token
    inside = real[:, 1:]  # (R, T): position i holds input i and target i + 1
    x = np.where(inside, tokens[:, :-1], 0)
    y = np.where(inside, tokens[:, 1:], IGNORE_INDEX)
    return torch.from_numpy(x), torch.from_numpy(y)


def split_batches(
    data_dir: str | Path, split: str, batch_size: int, T: int, layout: Layout
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Every target of a split exactly once, as (x, y) batches of `batch_size` rows (the counting bigram
    is fitted on these)."""
    from gpt2lab.shards import read_manifest

    manifest = read_manifest(data_dir)
    stream = TokenStream.of_split(data_dir, manifest, split)
    table = rows(stream, T, layout, manifest["eot_id"])
    for b in range(0, len(table), batch_size):
        yield read_rows(stream, table[b : b + batch_size], T)
