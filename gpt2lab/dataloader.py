"""Batches of (x, y) token windows from memory-mapped shards, rank-aware, resumable to the exact batch.

A window is T + 1 consecutive tokens of one shard; x is its first T tokens and y the last T
(y = x shifted by one). Two modes:

Streams: an optimizer step of world_size processes with grad_accum micro-batches each reads
world_size * grad_accum micro-batches. Micro-batch m of rank r is stream v = m * world_size + r,
so one process accumulating 2 micro-batches reads exactly what 2 processes read with 1 each:
the data, and so the losses, do not depend on how a global batch is split across processes.

- "random": every micro-batch takes B windows at uniformly random offsets, as nanoGPT and the
  seed runs did. The offsets of stream v at step k come from a generator seeded with
  (seed, v, k): the data is a pure function of the position, and resuming needs only (step, micro).
- "sequential": the split is cut into non-overlapping windows (stride T); each epoch visits all
  of them once, in an order shuffled by (seed, epoch). The epochs form one stream of windows, and
  step k hands stream v the (k * streams + v)-th block of B: the ranks read disjoint windows, and
  every window is seen exactly once per epoch.

windows="document" (documents.py): instead of windows anywhere, rows that each stay inside one
document, right-padded (targets IGNORE_INDEX); random mode draws B rows uniformly (so every target
is equally likely, as the makemore lectures' minibatches of examples), sequential mode visits every
row once per epoch, with the same streams as above.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from gpt2lab.documents import LAYOUTS, TokenStream, read_rows, rows
from gpt2lab.errors import UserError
from gpt2lab.shards import read_manifest, read_shard


class ShardLoader:
    """next_batch() -> (x, y), both (B, T) int64 on `device`; state_dict() / load_state_dict() to resume."""

    def __init__(
        self,
        data_dir: str | Path,
        split: str,
        batch_size: int,
        seq_len: int,
        rank: int = 0,
        world_size: int = 1,
        mode: Literal["random", "sequential"] = "random",
        seed: int = 1337,
        device: str | torch.device = "cpu",
        grad_accum: int = 1,
        windows: str = "stream",
    ):
        if mode not in ("random", "sequential"):
            raise UserError(f"loader mode must be 'random' or 'sequential', got {mode!r}")
        if windows not in LAYOUTS:
            raise UserError(f"loader windows must be one of {LAYOUTS}, got {windows!r}")
        if not 0 <= rank < world_size:
            raise UserError(f"rank {rank} is not in [0, world_size {world_size})")
        self.manifest = read_manifest(data_dir)
        splits = self.manifest["splits"]
        if split not in splits:
            raise UserError(f"{data_dir} has no {split!r} split; it has {sorted(splits)}")
        self.B, self.T, self.rank, self.world_size = batch_size, seq_len, rank, world_size
        self.grad_accum, self.streams = grad_accum, world_size * grad_accum
        self.mode, self.seed, self.device = mode, seed, torch.device(device)
        shards = [read_shard(Path(data_dir) / name) for name in splits[split]["shards"]]
        self.shards = [s for s in shards if len(s) >= seq_len + 1]  # a shard shorter than a window is unused
        self.n_tokens = sum(len(s) for s in shards)
        self.layout = windows
        if windows == "document":  # rows of the split read as one stream (documents may cross shards)
            self.stream = TokenStream(shards)
            self.rows = rows(self.stream, seq_len, "document", self.manifest["eot_id"])
            self.n_windows = len(self.rows)
            if not self.n_windows:
                raise UserError(f"the {split} split has no document with a token to predict")
        elif mode == "random":
            if not self.shards:
                raise UserError(
                    f"the {split} split ({self.n_tokens} tokens) is too small for one window of "
                    f"seq_len + 1 = {seq_len + 1} tokens"
                )
            sizes = np.array([len(s) - seq_len for s in self.shards], dtype=np.float64)
            self.shard_p = sizes / sizes.sum()  # offsets uniform over all valid window starts
        else:
            counts = [(len(s) - 1) // seq_len for s in self.shards]
            self.window_starts = np.cumsum([0, *counts])  # window w lives in shard searchsorted(w)
            self.n_windows = int(self.window_starts[-1])
        if mode == "sequential":
            if self.n_windows < batch_size * self.streams:
                raise UserError(
                    f"the {split} split has {self.n_windows} windows of {seq_len + 1} tokens, fewer than one "
                    f"global batch of {batch_size} x {self.streams} micro-batches"
                )
            self._epoch, self._perm = -1, np.empty(0, dtype=np.int64)
        self.step, self.micro = 0, 0

    def _random_windows(self, step: int, stream: int) -> list[Any]:
        rng = np.random.default_rng([self.seed, stream, step])
        if self.layout == "document":
            return rng.integers(0, len(self.rows), size=self.B).tolist()
        shard_ids = rng.choice(len(self.shards), size=self.B, p=self.shard_p)
        return [(int(s), int(rng.integers(0, len(self.shards[s]) - self.T))) for s in shard_ids]

    def _sequential_windows(self, step: int, stream: int) -> list[Any]:
        first = (step * self.streams + stream) * self.B  # position in the endless stream of epochs
        windows = []
        for p in range(first, first + self.B):
            epoch, i = divmod(p, self.n_windows)
            if epoch != self._epoch:
                self._epoch = epoch
                self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)
            w = int(self._perm[i])
            if self.layout == "document":
                windows.append(w)
                continue
            shard = int(np.searchsorted(self.window_starts, w, side="right")) - 1
            windows.append((shard, (w - int(self.window_starts[shard])) * self.T))
        return windows

    def windows(self, step: int, micro: int = 0) -> list[Any]:
        """(shard index, start offset) of the B windows this rank reads at (step, micro-batch); with
        windows="document", the indices of its B rows in self.rows."""
        stream = micro * self.world_size + self.rank
        if self.mode == "random":
            return self._random_windows(step, stream)
        return self._sequential_windows(step, stream)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next micro-batch; after grad_accum of them the loader is at the next step."""
        windows = self.windows(self.step, self.micro)
        self.step, self.micro = divmod(self.step * self.grad_accum + self.micro + 1, self.grad_accum)
        if self.layout == "document":
            batch = torch.stack(read_rows(self.stream, self.rows[windows], self.T), dim=1)  # (B, 2, T)
        else:
            buf = np.stack([self.shards[s][o : o + self.T + 1] for s, o in windows])  # (B, T+1)
            batch = torch.from_numpy(buf.astype(np.int64))
        if self.device.type == "cuda":  # pinned host memory lets the copy overlap with compute
            batch = batch.pin_memory().to(self.device, non_blocking=True)
        if self.layout == "document":
            return batch[:, 0], batch[:, 1]  # x (B, T), y (B, T) with IGNORE_INDEX padding
        return batch[:, :-1], batch[:, 1:]  # x (B, T), y (B, T)

    def __iter__(self):
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        """The position (step, micro) and what defines the stream of global batches."""
        stream = {"mode": self.mode, "seed": self.seed, "batch_size": self.B, "seq_len": self.T}
        if self.layout != "stream":  # absent in stream mode, as in states saved before it existed
            stream["windows"] = self.layout
        return {"step": self.step, "micro": self.micro, "streams": self.streams, **stream}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where the saved loader was.

        The global batches depend on mode, seed, batch geometry and the number of streams
        (world_size x grad_accum), not on how the streams are spread over processes: a run saved on
        2 processes resumes on 1 accumulating 2 micro-batches (or the reverse) and reads the same data.
        """
        mine = self.state_dict()
        for key in ("mode", "seed", "batch_size", "seq_len", "streams", "windows"):
            if state.get(key) != mine.get(key):
                raise UserError(
                    f"loader state has {key} {state.get(key)!r}, this loader has {mine.get(key)!r}"
                )
        self.step, self.micro = int(state["step"]), int(state["micro"])

    @property
    def epoch(self) -> float:
        """Fraction of the split's tokens consumed across all ranks so far."""
        micro_batches = (self.step * self.grad_accum + self.micro) * self.world_size
        return micro_batches * self.B * self.T / max(self.n_tokens, 1)
