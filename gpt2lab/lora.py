"""LoRA (Hu et al. 2021): low-rank adapters on chosen linear layers of a frozen GPT.

    apply_lora(model, targets=("c_attn",), rank=8, alpha=16)   # in place; returns the model
    y = W x + b + (alpha / rank) * B A dropout(x)               # A (r, in) random, B (out, r) zeros

A wrapped layer keeps its base weight and bias under the same names (`...attn.c_attn.weight`), frozen,
and adds `lora_A` / `lora_B` next to them, so checkpoints and Hugging Face names stay recognisable.
B starts at zero: the adapted model starts as exactly the base model. merge_lora folds B A (scaled)
into the base weight (inference costs nothing extra); unmerge_lora takes it out again.

Adapter files (peft's format, so adapters move between gpt2lab, peft and vLLM) are written and read
by gpt2lab/interop/peft.py; this module is the math only and imports nothing but the model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
from torch.nn import functional as F

from gpt2lab.config import closest
from gpt2lab.errors import UserError
from gpt2lab.model import GPT

TARGETABLE = ("c_attn", "c_proj", "c_fc")  # the Linear layers inside blocks; lm_head is wte (tied)


class LoRALinear(nn.Module):
    """A frozen nn.Linear's weight and bias plus a trainable low-rank update scaled by alpha / rank."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # the same Parameter objects: names and values as before
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, dtype=base.weight.dtype))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, dtype=base.weight.dtype))  # (out, r)
        # As the LoRA paper's reference code (and peft): A Kaiming-uniform like nn.Linear, B zero.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_dropout = nn.Dropout(dropout)
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.merged:
            return y
        return y + F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B) * self.scale

    def delta(self) -> torch.Tensor:
        """scale * B A: what the adapter adds to the weight, (out, in)."""
        return (self.lora_B @ self.lora_A) * self.scale

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, rank={self.rank}, alpha={self.alpha}"


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def apply_lora(
    model: GPT,
    targets: Sequence[str] = ("c_attn",),
    rank: int = 8,
    alpha: float = 16,
    dropout: float = 0.0,
) -> GPT:
    """Freeze every parameter and wrap each block Linear whose name ends with a target in a LoRALinear.

    targets: layer names ("c_attn", "c_proj", "c_fc", or qualified: "attn.c_proj", "h.0.mlp.c_fc").
    The wrappers' A matrices are drawn from torch's global RNG: seed it for the same adapter everywhere.
    """
    if isinstance(targets, str):
        targets = [t for t in targets.replace(",", " ").split() if t]
    if not targets:
        raise UserError("LoRA needs at least one target layer (e.g. c_attn)")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise UserError(f"lora rank must be a positive integer, got {rank!r}")
    if not alpha > 0:
        raise UserError(f"lora alpha must be positive, got {alpha!r}")
    if not 0 <= dropout < 1:
        raise UserError(f"lora dropout must be in [0, 1), got {dropout!r}")
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise UserError("the model already has LoRA adapters")
    linears = {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and name.startswith("transformer.h.")
    }
    for target in targets:
        if not any(_matches(name, target) for name in linears):
            known = sorted(
                {n.split(".")[-1] for n in linears} | {".".join(n.split(".")[-2:]) for n in linears}
            )
            raise UserError(
                f"LoRA target {target!r} matches no linear layer{closest(target, known)}; known: "
                f"{list(TARGETABLE)} (or qualified, e.g. 'attn.c_proj')"
            )
    for p in model.parameters():
        p.requires_grad_(False)
    for name, layer in linears.items():
        if any(_matches(name, t) for t in targets):
            parent_name, _, child = name.rpartition(".")
            wrapped = LoRALinear(layer, rank, alpha, dropout).to(layer.weight.device)
            setattr(model.get_submodule(parent_name), child, wrapped)
    return model


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_settings(model: nn.Module) -> dict[str, Any]:
    """{"rank", "alpha", "dropout", "targets"} of an adapted model (targets: the wrapped layers' names)."""
    layers = lora_layers(model)
    if not layers:
        raise UserError("the model has no LoRA adapters")
    first = next(iter(layers.values()))
    targets = sorted({".".join(name.split(".")[-2:]) for name in layers})
    return {"rank": first.rank, "alpha": first.alpha, "dropout": first.lora_dropout.p, "targets": targets}


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold scale * B A into every adapted layer's base weight: the same function, no adapter cost."""
    for layer in lora_layers(model).values():
        if not layer.merged:
            layer.weight += layer.delta().to(layer.weight.dtype)
            layer.merged = True
    return model


@torch.no_grad()
def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo merge_lora (the base weights come back up to float rounding)."""
    for layer in lora_layers(model).values():
        if layer.merged:
            layer.weight -= layer.delta().to(layer.weight.dtype)
            layer.merged = False
    return model


def trainable_fraction(model: nn.Module) -> tuple[int, int]:
    """(trainable parameters, all parameters); a tied matrix counts once."""
    params = list(model.parameters())  # nn.Module.parameters() yields a shared tensor once
    trainable = 0
    for p in params:
        rows = getattr(p, "trainable_rows", None)
        if rows is not None:
            trainable += (rows[1] - rows[0]) * p.shape[1]
        elif p.requires_grad:
            trainable += p.numel()
    return trainable, sum(p.numel() for p in params)


def train_token_rows(model: GPT, start: int, end: int) -> None:
    """Let wte rows [start, end) train while the rest of the frozen embedding stays exactly as it was.

    Tokens that fine-tuning added (the chat template's) have no trained embedding in the base model;
    with the base frozen they would stay at their initial value. The gradient of the other rows is
    zeroed, so with no weight decay on this matrix (make_optimizer honours `trainable_rows`) AdamW's
    update of those rows is exactly 0 (zero moments give 0 / (0 + eps)).
    """
    if end <= start:
        return
    weight = model.transformer.wte.weight

    def keep_rows(grad: torch.Tensor) -> torch.Tensor:  # on whatever device the model has moved to
        kept = torch.zeros_like(grad)
        kept[start:end] = grad[start:end]
        return kept

    weight.requires_grad_(True)
    weight.register_hook(keep_rows)
    weight.trainable_rows = (start, end)


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors by parameter name (lora_A, lora_B), on CPU, contiguous."""
    return {
        k: v.detach().cpu().contiguous()
        for k, v in model.state_dict().items()
        if k.endswith((".lora_A", ".lora_B"))
    }


def merged_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """The model's weights with every adapter folded in and the lora tensors left out: a plain GPT's."""
    layers = lora_layers(model)
    out = {}
    for k, v in model.state_dict().items():
        if k.endswith((".lora_A", ".lora_B")):
            continue
        owner = k.rpartition(".")[0]
        if k.endswith(".weight") and owner in layers and not layers[owner].merged:
            v = v + layers[owner].delta().detach().to(v.dtype)
        out[k] = v.detach().cpu().contiguous()
    return out


def merged_copy(model: GPT) -> GPT:
    """A plain GPT (no LoRA modules) computing what the adapted model computes, in eval mode."""
    plain = GPT(model.config)
    plain.load_state_dict(merged_state_dict(model))  # the same names, by construction
    return plain.eval()


def apply_lora_settings(model: nn.Module, settings: dict[str, Any]) -> nn.Module:
    """apply_lora with saved settings (lora_settings' dict), to load weights into: A's random init is
    overwritten by the load, so the global RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        return apply_lora(
            model, settings["targets"], settings["rank"], settings["alpha"], settings["dropout"]
        )
