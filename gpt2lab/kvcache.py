"""The KV cache: keys and values of up to B independent sequences, each row with its own length.

One design serves everything that generates: `generate` / `sample` / `chat` (a fixed batch of rows)
and the server's engine (rows that join and leave). Row b holds its sequence at slots
[0, lengths[b]) of its own row: there is no left padding, a row's positions are its own (0, 1, ...),
and rows of different lengths share one forward.

A forward through the cache works on a selection of rows (`select`: a contiguous range, a view, or
any list of rows) and n_new[b] new tokens per row (the rest of the (n, T) input is right padding).
The cache supplies what GPT.forward needs to run that: the positions (n, T) of the new tokens, the
attention mask, and, per layer, the keys and values so far (`update`). `advance` then moves each
row's length on by its n_new.

Static mode (`select(..., static=True)`) is the variant for CUDA graphs: attention runs over all
max_len slots with a mask, positions and write slots are device tensors, and nothing reads a Python
value that changes between steps, so one captured decode step can be replayed for every token.

Padding tokens (beyond a row's n_new) write their keys into one spare slot, max_len, that no real
query ever attends to; a padding query attends to real slots only (never an empty softmax row).
"""

from __future__ import annotations

import torch

from gpt2lab.config import GPTConfig
from gpt2lab.errors import UserError

Rows = slice | list[int]


class KVCache:
    """k, v (n_layer, B, nh, max_len + 1, hs) allocated once; lengths (B,) cached tokens per row."""

    def __init__(
        self,
        config: GPTConfig,
        batch_size: int,
        max_len: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        max_len = config.block_size if max_len is None else max_len
        if not 0 < max_len <= config.block_size:
            raise UserError(f"KV cache max_len {max_len} must be in [1, block_size {config.block_size}]")
        # max_len + 1 slots: the last one is the spare slot that padding tokens write into
        shape = (config.n_layer, batch_size, config.n_head, max_len + 1, config.head_size)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=self.k.device)  # (B,) on the device
        self.host_lengths = [0] * batch_size  # the same numbers on the host: no device sync to read them
        self.select(slice(0, batch_size))

    @property
    def batch_size(self) -> int:
        return self.k.size(1)

    @property
    def pos(self) -> int:
        """The length of row 0 (for a batch whose rows all have the same length)."""
        return self.host_lengths[0]

    # --- which rows the next forward runs on -------------------------------------------------------

    def select(self, rows: Rows, n_new: list[int] | None = None, static: bool = False) -> None:
        """The next forward feeds rows `rows` (a slice or a list of row indices), n_new[i] real tokens
        each (None: all T of the input). static: the CUDA-graph variant (see the module docstring)."""
        if isinstance(rows, slice):
            rows = slice(*rows.indices(self.batch_size))
            self._index = torch.arange(rows.start, rows.stop, device=self.k.device)  # (n,)
            ids = list(range(rows.start, rows.stop))
        else:
            ids = [int(r) for r in rows]
            self._index = torch.tensor(ids, dtype=torch.long, device=self.k.device)
        self._rows, self._ids = rows, ids
        self._n_new = n_new
        self._static = static

    def plan(self, T: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """For a forward of T new tokens on the selected rows: positions (n, T) and the attention mask
        (bool (n, 1, T, S), True = may attend; None when plain causal attention is right)."""
        n = len(self._ids)
        if self._n_new is None:  # every token is real; a device fill, so that a CUDA graph can capture it
            n_new, new = [T] * n, torch.full((n,), T, dtype=torch.long, device=self.k.device)
        else:
            n_new = self._n_new
            if len(n_new) != n or not all(0 < m <= T for m in n_new):
                raise UserError(f"n_new {n_new} must have one count in [1, {T}] per selected row")
            new = torch.tensor(n_new, dtype=torch.long, device=self.k.device)  # (n,)
        self._new = new
        past = self.lengths[self._index]  # (n,)
        steps = torch.arange(T, device=self.k.device)  # (T,)
        pos = past[:, None] + steps[None, :]  # (n, T): row b's tokens continue at its own length
        real = steps[None, :] < new[:, None]  # (n, T): False for right padding
        # where each new token's key is written: its own slot, or the spare slot for padding
        self._slots = torch.where(real, pos, self.max_len).clamp(max=self.max_len)  # (n, T)
        if self._static:
            self._span = self.max_len
        else:
            lengths = [self.host_lengths[r] for r in self._ids]
            end = max(n + m for n, m in zip(lengths, n_new, strict=True))
            if end > self.max_len:
                raise UserError(f"KV cache is full: {end} positions needed, max_len is {self.max_len}")
            self._span = max(n + T for n in lengths)
            self._span = min(self._span, self.max_len)
            self._end = [n + m for n, m in zip(lengths, n_new, strict=True)]
            if all(n == 0 for n in lengths) and all(m == T for m in n_new):
                return pos, None  # a fresh prefill without padding: ordinary causal attention
            if T == 1 and len(set(lengths)) == 1:
                return pos, None  # one new token per row at the same position: it sees every key
        keys = torch.arange(self._span, device=self.k.device)  # (S,)
        q = pos.clamp(max=self.max_len - 1)  # padding queries past the end still see real keys
        mask = keys[None, None, :] <= q[:, :, None]  # (n, T, S): causal within each row
        return pos.clamp(max=self.max_len - 1), mask[:, None]  # (n, T), (n, 1, T, S)

    # --- what attention calls ----------------------------------------------------------------------

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (n, nh, T, hs) of the selected rows at their slots; return their keys and values
        so far (n, nh, S, hs) (S = max_len in static mode)."""
        rows = self._index[:, None]  # (n, 1)
        self.k[layer][rows, :, self._slots] = k.transpose(1, 2)  # (n, T, nh, hs) into each row's slots
        self.v[layer][rows, :, self._slots] = v.transpose(1, 2)
        S = self._span
        if isinstance(self._rows, slice):  # a view, no copy
            return self.k[layer, self._rows, :, :S], self.v[layer, self._rows, :, :S]
        return self.k[layer][self._index, :, :S], self.v[layer][self._index, :, :S]

    def advance(self) -> None:
        """After the forward: each selected row's length grows by its number of real new tokens."""
        self.lengths[self._index] += self._new
        if not self._static:
            for r, end in zip(self._ids, self._end, strict=True):
                self.host_lengths[r] = end
        self._n_new = None  # the next forward feeds whole inputs unless select says otherwise

    def last_index(self) -> torch.Tensor:
        """(n,) the index in the input of each selected row's last real token."""
        return self._new - 1

    # --- managing rows -----------------------------------------------------------------------------

    def reset(self, rows: Rows | None = None) -> None:
        """Empty rows (all by default); the memory stays allocated."""
        ids = range(self.batch_size) if rows is None else self._row_ids(rows)
        for r in ids:
            self.host_lengths[r] = 0
        self.lengths[list(ids)] = 0

    def copy_row(self, src: int, dst: int | slice) -> None:
        """Row src's keys, values and length into row dst (or every row of a slice)."""
        n = self.host_lengths[src]
        source = slice(src, src + 1) if isinstance(dst, slice) else src  # broadcast one row over a slice
        self.k[:, dst, :, :n] = self.k[:, source, :, :n].clone()  # clone: dst may include src
        self.v[:, dst, :, :n] = self.v[:, source, :, :n].clone()
        for r in self._row_ids(dst if isinstance(dst, slice) else [dst]):
            self.host_lengths[r] = n
        self.lengths[dst] = n

    def sync_lengths(self) -> None:
        """Read the device lengths back into host_lengths (after steps run in a CUDA graph)."""
        self.host_lengths = self.lengths.tolist()

    def _row_ids(self, rows: Rows) -> list[int]:
        return list(range(*rows.indices(self.batch_size))) if isinstance(rows, slice) else list(rows)
