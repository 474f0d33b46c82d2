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

Shards are not trusted: given the model's vocab_size, the loader checks the largest ids the manifest
records for each shard when it opens them, and the ids of every batch it reads (an id beyond the
vocabulary would otherwise crash training at a random step, or assert on the GPU).

windows="document" (documents.py): instead of windows anywhere, rows that each stay inside one
document, right-padded (targets IGNORE_INDEX); random mode draws B rows uniformly (so every target
is equally likely, as the makemore lectures' minibatches of examples), sequential mode visits every
row once per epoch, with the same streams as above.

ShardData is the data source `train` uses for shards (sft.SFTData the one for .jsonl examples): the
loader, the validation loss, the tokenizer and a description, behind one interface.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from gpt2lab.documents import LAYOUTS, TokenStream, read_rows, rows
from gpt2lab.errors import UserError
from gpt2lab.evaluate import evaluate_loss
from gpt2lab.shards import check_ids, check_vocab, read_manifest, read_shard
from gpt2lab.tokenizer import check_same_tokenizer, get_tokenizer


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
        vocab_size: int | None = None,
        windows: str = "stream",
    ):
        if mode not in ("random", "sequential"):
            raise UserError(f"loader mode must be 'random' or 'sequential', got {mode!r}")
        if windows not in LAYOUTS:
            raise UserError(f"loader windows must be one of {LAYOUTS}, got {windows!r}")
        if not 0 <= rank < world_size:
            raise UserError(f"rank {rank} is not in [0, world_size {world_size})")
        self.manifest, self.data_dir, self.split_name = read_manifest(data_dir), Path(data_dir), split
        splits = self.manifest["splits"]
        if split not in splits:
            raise UserError(f"{data_dir} has no {split!r} split; it has {sorted(splits)}")
        self.B, self.T, self.rank, self.world_size = batch_size, seq_len, rank, world_size
        self.grad_accum, self.streams = grad_accum, world_size * grad_accum
        self.mode, self.seed, self.device = mode, seed, torch.device(device)
        if vocab_size is not None:
            check_vocab(self.manifest, data_dir, vocab_size, "the model's vocabulary")
        self.vocab_size = vocab_size
        paths = [Path(data_dir) / name for name in splits[split]["shards"]]
        shards = [read_shard(p) for p in paths]
        usable = [i for i, s in enumerate(shards) if len(s) >= seq_len + 1]  # shorter than a window: unused
        self.shards, self.paths = [shards[i] for i in usable], [paths[i] for i in usable]
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
            if self.vocab_size is not None and int(batch.max()) >= self.vocab_size:  # (padding is < 0)
                row = int((batch >= self.vocab_size).flatten(1).any(1).int().argmax())
                offset, n = (int(v) for v in self.rows[windows][row])
                where = f"{self.split_name} split of {self.data_dir} (tokens {offset}..{offset + n})"
                check_ids(batch[row].flatten().numpy(), self.vocab_size, where)
        else:
            buf = np.stack([self.shards[s][o : o + self.T + 1] for s, o in windows])  # (B, T+1)
            if self.vocab_size is not None and int(buf.max()) >= self.vocab_size:
                row = int(np.argmax((buf >= self.vocab_size).any(axis=1)))
                shard, offset = windows[row]
                where = f"{self.paths[shard]} (tokens {offset}..{offset + self.T})"
                check_ids(buf[row], self.vocab_size, where)
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


class ShardData:
    """Token shards (`gpt2lab prepare`) as `train`'s data source: the pretraining counterpart of
    sft.SFTData. vocab_size and tokenizer_spec come from the manifest; fit() checks that a model can
    read the data; loader() and evaluate() give the training batches and the validation loss."""

    padded = False  # rows are whole windows of seq_len tokens (SFT rows are padded examples)
    template_tokens: dict[str, int] = {}  # fine-tuning's chat-template tokens: none here

    def __init__(self, data_dir: str | Path, windows: str = "stream"):
        self.dir, self.windows = Path(data_dir), windows
        self.manifest = read_manifest(data_dir)
        self.vocab_size, self.eot_id = self.manifest["vocab_size"], self.manifest.get("eot_id")
        self.tokenizer_spec = self.manifest.get("tokenizer")
        self.has_val = "val" in self.manifest["splits"]
        self.model_vocab: int | None = None
        self._tokenizer: Any = None
        tokens = {k: v.get("tokens", 0) for k, v in self.manifest["splits"].items()}
        self.description = f"{self.dir}: " + ", ".join(f"{k} {n:,} tokens" for k, n in tokens.items())

    def fit(self, model: Any, model_spec: dict[str, Any] | None, source: str | None, seq_len: int) -> Any:
        """Check that `model` (new, or loaded from `source` with tokenizer spec model_spec) can train on
        this data: every id inside its vocabulary and, for a loaded model, the same tokenizer.
        Returns the tokenizer spec the checkpoints record."""
        check_vocab(self.manifest, self.dir, model.config.vocab_size, "the model's")
        if source is not None:
            check_same_tokenizer(self.tokenizer_spec, model_spec, str(self.dir), source)
        self.model_vocab = model.config.vocab_size
        return self.tokenizer_spec

    def loader(
        self, batch_size: int, seq_len: int, rank: int, world_size: int, seed: int, device: Any,
        grad_accum: int, mode: Literal["random", "sequential"] = "random",
    ) -> ShardLoader:  # fmt: skip
        """The training batches of this process (after fit: their ids checked against the model's vocab)."""
        args = (self.dir, "train", batch_size, seq_len, rank, world_size, mode, seed, device, grad_accum)
        return ShardLoader(*args, vocab_size=self.model_vocab, windows=self.windows)

    def evaluate(
        self, model: Any, batch_size: int, seq_len: int, max_tokens: int | None, device: Any, autocast: Any
    ) -> dict[str, float]:
        """Loss and perplexity over the val split (its first max_tokens; None: all of it)."""
        return evaluate_loss(
            model, self.dir, "val", batch_size, seq_len, max_tokens, device, autocast, windows=self.windows
        )

    def tokenizer(self) -> Any:
        """The data's tokenizer (for HellaSwag and samples), built on first use."""
        if self._tokenizer is None:
            if self.tokenizer_spec is None:
                raise UserError(f"{self.dir / 'manifest.json'} records no tokenizer")
            self._tokenizer = get_tokenizer(self.tokenizer_spec)
        return self._tokenizer
