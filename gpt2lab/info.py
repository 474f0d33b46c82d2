"""`gpt2lab info`: what an architecture costs: parameters, FLOPs per token, training memory."""

from __future__ import annotations

import torch

from gpt2lab.config import PRESETS, GPTConfig
from gpt2lab.model import GPT

GIB = 2**30


def meta_model(cfg: GPTConfig) -> GPT:
    """The model built on the meta device: every shape and count, no memory, no initialisation cost."""
    with torch.device("meta"):
        return GPT(cfg)


def describe(cfg: GPTConfig, name: str = "custom", seq_len: int | None = None) -> str:
    """A multi-line report: architecture, parameter counts, FLOPs/token, memory for weights/grads/AdamW."""
    model = meta_model(cfg)
    T = cfg.block_size if seq_len is None else seq_len
    n, n_ne = model.num_params(), model.num_params(non_embedding=True)
    parts = [
        f"{cfg.n_layer} layers",
        f"{cfg.n_head} heads",
        f"{cfg.n_embd} wide",
        f"MLP {cfg.mlp_size}",
        f"context {cfg.block_size}",
        f"vocab {cfg.vocab_size}",
        f"{cfg.pos_embedding} positions",
        f"{cfg.norm_position}-LN",
        "bias" if cfg.bias else "no bias",
        "tied head" if cfg.tie_weights else "untied head",
        f"dropout {cfg.dropout:g}",
    ]
    lines = [
        f"model        {name}: " + ", ".join(parts),
        f"parameters   {n:,} ({n / 1e6:.2f}M) all; {n_ne:,} ({n_ne / 1e6:.2f}M) without position embeddings",
        f"FLOPs/token  {model.flops_per_token(T):.4g} training (6N + 12·L·H·Q·T at T={T}),"
        f" {model.flops_per_token(T, training=False):.4g} forward",
        "memory       weights, gradients and AdamW's two moments (activations not included):",
        f"  {'':<12}{'fp32':>12}{'bf16':>12}",
    ]
    rows = [("weights", 1), ("gradients", 1), ("AdamW m, v", 2), ("total", 4)]
    for label, copies in rows:
        lines.append(f"  {label:<12}" + "".join(f"{copies * n * b / GIB:>8.2f} GiB" for b in (4, 2)))
    return "\n".join(lines)


def presets_table() -> str:
    """A markdown table of every preset and its parameter counts (the README's table)."""
    lines = [
        "| preset | layers | heads | width | context | vocab | parameters | without pos. emb. |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in PRESETS:
        cfg = GPTConfig.preset(name)
        m = meta_model(cfg)
        lines.append(
            f"| `{name}` | {cfg.n_layer} | {cfg.n_head} | {cfg.n_embd} | {cfg.block_size} | {cfg.vocab_size} "
            f"| {m.num_params():,} | {m.num_params(non_embedding=True) / 1e6:.2f}M |"
        )
    return "\n".join(lines)
