"""Muon: Newton-Schulz orthogonalises; its AdamW groups are AdamW; parameters land in the right groups.

Exact resume and 2 processes (DDP, FSDP2) == 1 process with accumulation: tests/test_train.py.
"""

from __future__ import annotations

import pytest
import torch
from conftest import small_config

from gpt2lab import GPT
from gpt2lab.muon import Muon, muon_param_groups, orthogonalize


@pytest.mark.parametrize("shape", [(32, 96), (96, 32), (3, 16, 48)])
def test_newton_schulz_approximates_the_polar_factor(shape):
    torch.manual_seed(0)
    # columns scaled over 30x: the gradient's directions differ in size, as real gradients' do
    G = torch.randn(shape, dtype=torch.float64) * torch.logspace(-1, 0.5, shape[-1], dtype=torch.float64)
    X = orthogonalize(G)
    s = torch.linalg.svdvals(X)
    # The quintic iteration is tuned for speed, not exactness: singular values land near 1, not on it
    # (a direction far smaller than the largest needs more than 5 steps; Jordan 2024 accepts that).
    assert s.min() > 0.6 and s.max() < 1.25, (s.min(), s.max())
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    polar = U @ Vh
    cos = (X * polar).sum(dim=(-2, -1)) / (X.norm(dim=(-2, -1)) * polar.norm(dim=(-2, -1)))
    assert torch.all(cos > 0.95), cos  # the same directions as U V^T, whatever G's singular values


def test_chunked_matrix_is_orthogonalised_part_by_part():
    """c_attn's (3C, C) weight holds q, k and v: Muon treats it as three (C, C) matrices."""
    torch.manual_seed(0)
    fused = torch.nn.Parameter(torch.randn(24, 8))
    parts = [torch.nn.Parameter(p.clone()) for p in fused.detach().split(8)]
    opt_fused = Muon([{"params": [fused], "muon": True, "chunks": 3}], lr=0.1)
    opt_parts = Muon([{"params": parts, "muon": True}], lr=0.1)
    for _ in range(3):
        grad = torch.randn(24, 8)
        fused.grad = grad.clone()
        for p, g in zip(parts, grad.split(8), strict=True):
            p.grad = g.clone()
        opt_fused.step()
        opt_parts.step()
    torch.testing.assert_close(fused.detach(), torch.cat([p.detach() for p in parts]))


def test_one_muon_step_moves_every_direction_alike():
    """From zero momentum a step is -lr x sqrt(max(1, m/n)) x orth(g): singular values all ~lr x scale."""
    torch.manual_seed(0)
    W = torch.nn.Parameter(torch.zeros(64, 16))
    W.grad = torch.randn(64, 16) @ torch.diag(torch.logspace(-1.5, 0, 16))  # directions of unequal size
    g = torch.linalg.svdvals(W.grad)
    Muon([{"params": [W], "muon": True}], lr=0.01, momentum=0.9).step()
    s = torch.linalg.svdvals(W.detach())
    assert g.max() / g.min() > 20 and s.max() / s.min() < 2
    assert torch.all((s > 0.6 * 0.02) & (s < 1.25 * 0.02)), s  # scale sqrt(64 / 16) = 2


def test_adamw_groups_are_adamw():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in params]
    ours = Muon([{"params": params, "weight_decay": 0.1}], lr=1e-2, betas=(0.8, 0.9), eps=1e-6)
    torch_adamw = torch.optim.AdamW(ref, lr=1e-2, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.1)
    for _ in range(5):
        for a, b in zip(params, ref, strict=True):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        ours.step()
        torch_adamw.step()
    for a, b in zip(params, ref, strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), atol=1e-6, rtol=1e-6)


def test_lr_scale_and_weight_decay_use_the_schedules_rate():
    """A group's step is lr x lr_scale; weight decay shrinks by lr x wd (the schedule's lr) in every group."""
    W = torch.nn.Parameter(torch.ones(4, 4))
    W.grad = torch.zeros(4, 4)  # no gradient: only the decay moves W
    Muon([{"params": [W], "muon": True, "lr_scale": 50.0, "weight_decay": 0.5}], lr=0.1).step()
    torch.testing.assert_close(W.detach(), torch.full((4, 4), 1 - 0.1 * 0.5))


def test_parameters_go_to_muon_or_adamw_by_role():
    model = GPT(small_config(tie_weights=False))
    groups = muon_param_groups(model, weight_decay=0.1, lr_scale=20.0)
    names = {id(p): n for n, p in model.named_parameters()}
    by_group = [sorted(names[id(p)] for p in g["params"]) for g in groups]
    qkv, hidden, decay, no_decay = by_group
    assert qkv == ["transformer.h.0.attn.c_attn.weight", "transformer.h.1.attn.c_attn.weight"]
    assert len(hidden) == 6 and all(n.endswith(("c_proj.weight", "c_fc.weight")) for n in hidden)
    assert decay == ["lm_head.weight", "transformer.wpe.weight", "transformer.wte.weight"]
    assert all(n.endswith(("bias", "ln_1.weight", "ln_2.weight", "ln_f.weight")) for n in no_decay)
    assert [g.get("muon", False) for g in groups] == [True, True, False, False]
    assert [g.get("lr_scale", 1.0) for g in groups] == [20.0, 20.0, 1.0, 1.0]
    assert sum(len(g) for g in by_group) == len(list(model.parameters()))
    with pytest.raises(ValueError, match="2-D matrices only"):
        Muon([{"params": [model.transformer.ln_f.weight], "muon": True}], lr=0.1)
