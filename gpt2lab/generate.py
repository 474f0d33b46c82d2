"""Generation: the preallocated KV cache that GPT.forward reads and writes."""

from __future__ import annotations

import torch

from gpt2lab.config import GPTConfig
from gpt2lab.errors import UserError


class KVCache:
    """Keys and values of every layer, preallocated once: k, v (n_layer, B, nh, max_len, hs).

    forward() writes the new tokens' keys and values at [pos, pos + T) and advances pos, so decoding
    costs one token's work per step and never reallocates (no torch.cat growth). pad (B,) holds the
    left-padding length of each row when prompts of different lengths share one batch.
    """

    def __init__(
        self,
        config: GPTConfig,
        batch_size: int,
        max_len: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        pad: torch.Tensor | None = None,
    ):
        max_len = config.block_size if max_len is None else max_len
        if not 0 < max_len <= config.block_size:
            raise UserError(f"KV cache max_len {max_len} must be in [1, block_size {config.block_size}]")
        if pad is not None and pad.shape != (batch_size,):
            raise UserError(f"pad has shape {tuple(pad.shape)}, expected ({batch_size},)")
        shape = (config.n_layer, batch_size, config.n_head, max_len, config.head_size)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0
        self.pad = None if pad is None else pad.to(device=self.k.device, dtype=torch.long)

    @property
    def max_len(self) -> int:
        return self.k.size(3)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, nh, T, hs) at [pos, pos + T); return the keys and values so far (B, nh, S, hs)."""
        end = self.pos + k.size(2)
        if end > self.max_len:
            raise UserError(f"KV cache is full: {end} positions needed, max_len is {self.max_len}")
        self.k[layer, :, :, self.pos : end] = k
        self.v[layer, :, :, self.pos : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def reset(self) -> None:
        self.pos = 0
