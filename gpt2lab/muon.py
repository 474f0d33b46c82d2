"""Muon (Jordan et al. 2024): momentum, then orthogonalise each hidden matrix's update; AdamW for the rest.

For a weight matrix W (m x n), SGD-momentum's update M is dominated by a few directions (its top
singular vectors). Muon replaces M = U S V^T by its nearest semi-orthogonal matrix U V^T, so every
direction moves by the same amount; five Newton-Schulz iterations compute it with matmuls only
(no SVD), fast in bf16 on a GPU. It is defined for 2-D hidden matrices: the embeddings, the head and
the gains and biases train with AdamW, as in the NanoGPT speedrun (modded-nanogpt), where Muon took
GPT-2 124M to its loss on ~1/3 fewer tokens than AdamW. Sources: Keller Jordan, "Muon: An optimizer
for hidden layers in neural networks" (2024, kellerjordan.github.io/posts/muon); Bernstein & Newhouse,
"Old Optimizer, New Norm" (2024) for why; modded-nanogpt for the coefficients and the scaling.

One torch.optim.Optimizer holds both kinds of parameter group ({"muon": True} or not), so train.py's
one optimizer (GradScaler, zero_grad, the DCP state-dict helpers of checkpoints) works unchanged.
Every group's step uses lr x lr_scale: the schedule sets `lr` (AdamW's rate) on every group, and Muon's
groups carry lr_scale = muon_lr / learning_rate, so one schedule drives both.

Distributed: under DDP every process holds the whole (all-reduced) gradient; matrix i is
orthogonalised by process i % world_size alone and broadcast to the others, which splits the
Newton-Schulz work across processes (modded-nanogpt's "distributed the overhead of Muon"). Under
FSDP2 a parameter is a DTensor shard, and Newton-Schulz needs the whole matrix: each process gathers
the momentum-corrected gradient (full_tensor), orthogonalises it and keeps its own rows.
"""

from __future__ import annotations

import math
from typing import Any

import torch

# Newton-Schulz quintic coefficients (modded-nanogpt, tuned by Keller Jordan): the iteration maps each
# singular value s in (0, 1] to roughly 0.7..1.2 in 5 steps, which orthogonalises well enough.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def orthogonalize(G: torch.Tensor, steps: int = 5, dtype: torch.dtype | None = None) -> torch.Tensor:
    """G (..., m, n) -> approximately U V^T where G = U S V^T (each matrix of a batch on its own).

    Newton-Schulz: X <- a X + (b A + c A^2) X with A = X X^T, after scaling G to spectral norm <= 1
    (its Frobenius norm bounds the spectral one). dtype: where the iteration runs (bf16 on GPUs).
    """
    a, b, c = NS_COEFFICIENTS
    X = G.to(dtype or G.dtype)
    wide = X.size(-2) <= X.size(-1)
    if not wide:
        X = X.mT  # iterate on the smaller Gram matrix X X^T (m <= n)
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        A = X @ X.mT  # (..., m, m)
        X = a * X + (b * A + c * A @ A) @ X
    return (X if wide else X.mT).to(G.dtype)


class Muon(torch.optim.Optimizer):
    """Muon for groups with "muon": True (2-D hidden matrices), AdamW for the others.

    Muon groups: momentum (Nesterov by default), orthogonalised update scaled by sqrt(max(1, m/n))
    (so tall matrices move as much per element as square ones; modded-nanogpt), `chunks` > 1 splits a
    fused matrix by rows and orthogonalises each part on its own (GPT-2's c_attn holds q, k and v).
    AdamW groups: betas, eps, as torch.optim.AdamW. Weight decay is decoupled, W <- W (1 - lr wd), with
    the schedule's lr (not lr x lr_scale) in every group, so changing the optimizer does not change
    how strongly weights are pulled towards zero.
    """

    def __init__(
        self,
        params: Any,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
    ):
        defaults = dict(
            lr=lr,
            lr_scale=1.0,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            momentum=momentum,
            nesterov=nesterov,
            ns_steps=ns_steps,
            muon=False,
            chunks=1,
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            if group["muon"] and any(p.dim() != 2 for p in group["params"]):
                raise ValueError("Muon groups hold 2-D matrices only; vectors and scalars go to AdamW groups")

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["muon"]:
                self._muon_step(group)
            else:
                self._adamw_step(group)
        return loss

    def _adamw_step(self, group: dict[str, Any]) -> None:
        lr = group["lr"] * group["lr_scale"]
        beta1, beta2 = group["betas"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
            step = state["step"].item()
            m, v = state["exp_avg"], state["exp_avg_sq"]
            m.lerp_(p.grad, 1 - beta1)
            v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            if group["weight_decay"]:
                p.mul_(1 - group["lr"] * group["weight_decay"])
            denom = (v.sqrt() / math.sqrt(1 - beta2**step)).add_(group["eps"])
            p.addcdiv_(m, denom, value=-lr / (1 - beta1**step))

    def _muon_step(self, group: dict[str, Any]) -> None:
        import torch.distributed as dist

        lr = group["lr"] * group["lr_scale"]
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        rank = dist.get_rank() if world > 1 else 0
        params = [p for p in group["params"] if p.grad is not None]
        updates, pending = [], []
        for i, p in enumerate(params):
            state = self.state[p]
            if not state:
                state["momentum_buffer"] = torch.zeros_like(p)
            buf = state["momentum_buffer"]
            buf.lerp_(p.grad, 1 - group["momentum"])  # every process keeps the same buffer
            g = p.grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf
            if _is_dtensor(p):  # FSDP2: gather the whole matrix, orthogonalise, keep our rows
                update = _shard_like(self._orthogonal_update(g.full_tensor(), group), p)
            elif world > 1:  # DDP: process i % world computes this one, then everyone receives it
                update = self._orthogonal_update(g, group) if i % world == rank else torch.empty_like(g)
                pending.append(dist.broadcast(update, src=i % world, async_op=True))
            else:
                update = self._orthogonal_update(g, group)
            updates.append(update)
        for work in pending:
            work.wait()
        for p, update in zip(params, updates, strict=True):
            if group["weight_decay"]:
                p.mul_(1 - group["lr"] * group["weight_decay"])
            p.add_(update, alpha=-lr)

    @staticmethod
    def _orthogonal_update(g: torch.Tensor, group: dict[str, Any]) -> torch.Tensor:
        """Momentum-corrected gradient (m, n) -> its orthogonalised update, scaled by sqrt(max(1, m/n))."""
        m, n = g.shape
        parts = g.reshape(group["chunks"], m // group["chunks"], n)  # (chunks, m/chunks, n)
        dtype = torch.bfloat16 if g.device.type == "cuda" else None  # fp32 on CPU: bf16 matmul is slow
        update = orthogonalize(parts, group["ns_steps"], dtype).reshape(m, n)
        return update * math.sqrt(max(1.0, parts.size(1) / n))


def _is_dtensor(t: torch.Tensor) -> bool:
    return type(t).__name__ == "DTensor"  # no import of torch.distributed.tensor unless it is one


def _shard_like(full: torch.Tensor, param: Any) -> Any:
    """A full (replicated) tensor -> a DTensor laid out as `param` (each process keeps its own part)."""
    from torch.distributed.tensor import DTensor, Replicate

    replicated = DTensor.from_local(full, param.device_mesh, [Replicate()] * param.device_mesh.ndim)
    return replicated.redistribute(param.device_mesh, param.placements)


def muon_param_groups(model: torch.nn.Module, weight_decay: float, lr_scale: float) -> list[dict[str, Any]]:
    """The model's trainable parameters in Muon's groups: the blocks' 2-D matrices (c_attn split into q,
    k, v) with Muon; embeddings, head, gains and biases, and LoRA's low-rank factors, with AdamW (weight
    decay on matrices only, as make_optimizer's AdamW)."""
    groups: dict[str, dict[str, Any]] = {
        "qkv": {"params": [], "muon": True, "chunks": 3, "lr_scale": lr_scale, "weight_decay": weight_decay},
        "hidden": {"params": [], "muon": True, "lr_scale": lr_scale, "weight_decay": weight_decay},
        "decay": {"params": [], "weight_decay": weight_decay},
        "no_decay": {"params": [], "weight_decay": 0.0},
    }
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        partial = hasattr(p, "trainable_rows")  # lora.train_token_rows: only some rows train
        if p.dim() == 2 and ".h." in f".{name}" and "lora_" not in name and not partial:
            groups["qkv" if name.endswith("attn.c_attn.weight") else "hidden"]["params"].append(p)
        elif p.dim() >= 2 and not partial:
            groups["decay"]["params"].append(p)
        else:
            groups["no_decay"]["params"].append(p)
    return [g for g in groups.values() if g["params"]]
