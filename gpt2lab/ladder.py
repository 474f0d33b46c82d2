"""The model ladder below GPT-2, after Karpathy's makemore lectures: each rung shows why the next exists.

    bigram (counts, then one trained matrix) -> MLP (Bengio et al. 2003) -> WaveNet-style hierarchical
    MLP (van den Oord et al. 2016) -> GPT (model.py)

Every family has GPT's interface, so the same loop, checkpoints, evaluation and sampling serve all:
forward(idx (B, T), targets (B, T) | None) -> logits (B, T, V), or the mean cross-entropy over the
targets that are not IGNORE_INDEX. logits[:, t] predicts token t + 1 from the tokens up to t; the MLP
and the WaveNet see a fixed number of them (their context), read as EOT before the window's start:
the lectures' '.' padding before a name. Their configs are in config.py; `build_model` is the one
place a model is built from a config (or from config.json's "model" dict, whose "family" says which).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn
from torch.nn import functional as F

from gpt2lab.config import (
    BigramConfig,
    MLPConfig,
    ModelConfig,
    WaveNetConfig,
    model_config_from_dict,
    physical_memory,
)
from gpt2lab.errors import UserError
from gpt2lab.model import GPT, IGNORE_INDEX


def loss_or_logits(logits: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor:
    """logits (B, T, V) as they are, or with targets (B, T) the mean cross-entropy (fp32, as GPT's)."""
    if targets is None:
        return logits
    return F.cross_entropy(
        logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX
    )


class LadderModel(nn.Module):
    """What every rung below GPT shares: counting parameters and FLOPs the way GPT does. No KV cache:
    generation recomputes the window at every step (decoder.supports_kv_cache is False)."""

    supports_kv_cache = False

    def num_params(self, non_embedding: bool = False) -> int:
        """All parameters (nothing is tied; non_embedding is accepted for GPT's signature and changes nothing:
        these models have no position embeddings)."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int | None = None, training: bool = True) -> float:
        """Matmul FLOPs per predicted token: 2 per weight of every Linear (each runs once a position)
        forward, 6 to train (forward + backward). Embedding lookups and the bigram's row read count 0."""
        weights = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        return (6 if training else 2) * weights


class Bigram(LadderModel):
    """The next token's logits are a row of one (V, V) matrix: logits = W[current token] (makemore 1).

    Two ways to set W, as the lecture shows they meet: counting (fit_counts: W = log P, P the smoothed
    bigram frequencies of the train split; no gradient) or training W by gradient descent from zeros
    (uniform), which converges to the same loss.
    """

    def __init__(self, config: BigramConfig):
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.zeros(config.vocab_size, config.vocab_size))

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        return loss_or_logits(self.weight[idx], targets)  # (B, T, V)

    @torch.no_grad()
    def fit_counts(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> tuple[int, float]:
        """W = log((N + k) / row sums of N + k): N[a, b] counts target b after input a over the batches
        (every target of the train split once), k = config.smoothing. Returns the number of targets
        counted and the mean loss over them (the train loss: -sum(N * W) / sum(N)).

        A row never seen (a padding id) stays uniform; with k = 0 an unseen bigram has probability 0
        (logit -inf), and a loss over text that holds one is infinite: why the lecture smooths.
        """
        V = self.config.vocab_size
        counts = torch.zeros(V * V, dtype=torch.float64)
        for x, y in batches:
            keep = y != IGNORE_INDEX
            pairs = x[keep].cpu() * V + y[keep].cpu()
            counts += torch.bincount(pairs, minlength=V * V).double()
        n = counts.view(V, V) + self.config.smoothing
        rows = n.sum(dim=1, keepdim=True)
        probs = torch.where(rows > 0, n / rows.clamp(min=1e-300), torch.full_like(n, 1.0 / V))
        log_probs = probs.log()
        self.weight.copy_(log_probs)
        n_targets = int(counts.sum())
        seen = counts.view(V, V) > 0  # 0 * log 0 counts 0
        return n_targets, float(-(counts.view(V, V)[seen] * log_probs[seen]).sum() / max(n_targets, 1))


def left_context(idx: torch.Tensor, k: int, eot_id: int) -> torch.Tensor:
    """(B, T) -> (B, T, k): at every position t the tokens t - k + 1 .. t, those before the window read
    as EOT (the makemore lectures' context of '.' before a name's first character)."""
    padded = F.pad(idx, (k - 1, 0), value=eot_id)  # (B, T + k - 1)
    return padded.unfold(1, k, 1)  # (B, T, k)


class MLPModel(LadderModel):
    """Bengio et al. 2003 (makemore part 2): embed each of the last `context` tokens, concatenate,
    one tanh hidden layer, then the logits. The lecture's C, W1/b1, W2/b2 are wte, hidden, lm_head."""

    def __init__(self, config: MLPConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.hidden = nn.Linear(config.context * config.n_embd, config.n_hidden)
        self.lm_head = nn.Linear(config.n_hidden, config.vocab_size)
        with torch.no_grad():  # makemore part 3's initialisation
            nn.init.normal_(self.wte.weight)  # C = randn
            # Kaiming for tanh: std = gain 5/3 / sqrt(fan_in), so the pre-activations do not saturate
            nn.init.normal_(self.hidden.weight, std=(5 / 3) / (config.context * config.n_embd) ** 0.5)
            nn.init.zeros_(self.hidden.bias)
            # a near-zero output layer: first predictions near uniform (loss ln V), not confidently wrong
            nn.init.normal_(self.lm_head.weight, std=0.01)
            nn.init.zeros_(self.lm_head.bias)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        context = left_context(idx, self.config.context, self.config.eot_id)  # (B, T, k)
        x = self.wte(context).flatten(2)  # (B, T, k * C): the k embeddings side by side
        return loss_or_logits(self.lm_head(torch.tanh(self.hidden(x))), targets)  # (B, T, V)


class Fuse(nn.Module):
    """One WaveNet layer: each position joined with the one `dilation` before it, Linear, LayerNorm, tanh."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.linear = nn.Linear(2 * n_in, n_out, bias=False)  # the norm's bias follows (as the lecture's BN)
        self.norm = nn.LayerNorm(n_out)

    def forward(self, x: torch.Tensor, dilation: int) -> torch.Tensor:
        pairs = torch.cat([x[:, :-dilation], x[:, dilation:]], dim=-1)  # (B, L - dilation, 2C), older first
        return torch.tanh(self.norm(self.linear(pairs)))


class WaveNet(LadderModel):
    """makemore part 5's hierarchical MLP, computed for every position of a window at once.

    The lecture fuses a context of 8 in pairs: (1,2) (3,4) (5,6) (7,8), then pairs of those, then the
    last pair. Run at every position, that is a stack of dilated causal convolutions (van den Oord et
    al. 2016, WaveNet) with kernel 2 and dilations 1, 2, 4: layer i joins position t with t - 2^i, so
    the top layer at t has seen tokens t - 7 .. t, grouped exactly as the lecture's tree, and every
    intermediate result is shared by the positions that need it.

    LayerNorm stands where the lecture has BatchNorm (same parameter count: a gain and a bias per
    feature): it normalises each position by itself, so a batch's padding, its size, how it is split
    into micro-batches or processes, and train vs eval mode cannot change a prediction, and there are
    no running statistics to carry (the lecture's "fix bug in batchnorm" step is that hazard).
    """

    def __init__(self, config: WaveNetConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        widths = [config.n_embd] + [config.n_hidden] * config.n_layer
        self.fuse = nn.ModuleList(Fuse(widths[i], widths[i + 1]) for i in range(config.n_layer))
        self.lm_head = nn.Linear(config.n_hidden, config.vocab_size)
        with torch.no_grad():
            nn.init.normal_(self.wte.weight)
            for layer in self.fuse:  # Kaiming for tanh, as the lecture's Linear layers
                nn.init.normal_(layer.linear.weight, std=(5 / 3) / layer.linear.in_features**0.5)
            # the lecture's last layer: Kaiming x 0.1, so the first predictions are near uniform
            nn.init.normal_(self.lm_head.weight, std=0.1 / config.n_hidden**0.5)
            nn.init.zeros_(self.lm_head.bias)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        cfg = self.config
        x = self.wte(F.pad(idx, (cfg.context - 1, 0), value=cfg.eot_id))  # (B, T + 2^L - 1, C)
        for i, layer in enumerate(self.fuse):
            x = layer(x, 2**i)  # (B, T + 2^L - 2^(i+1), n_hidden)
        return loss_or_logits(self.lm_head(x), targets)  # (B, T, V)


MODELS: dict[type, type[nn.Module]] = {BigramConfig: Bigram, MLPConfig: MLPModel, WaveNetConfig: WaveNet}


def build_model(config: ModelConfig | dict[str, Any], source: str = "the model's config") -> Any:
    """The one place a model is built: from its config, or from a "model" dict (config.json, a recipe),
    whose "family" (absent: "gpt") chooses the class. Train, checkpoint loading, eval, sample and the
    Hugging Face loader use it.

    The model is built only after checking that its weights fit this machine's memory: a config can ask
    for terabytes, and allocating them would kill the process (or the machine) instead of saying why.
    The size is counted on the meta device, which allocates nothing. `source` names the config in the
    error (a file, or "this run's config").
    """
    if isinstance(config, dict):
        config = model_config_from_dict(config)
    cls = MODELS.get(type(config), GPT)
    with torch.device("meta"):
        shapes = cls(config)
    need = sum(t.numel() * t.element_size() for t in (*shapes.parameters(), *shapes.buffers()))
    have = physical_memory()
    if have is not None and need > have:
        shape = ", ".join(f"{k} {v}" for k, v in config.to_dict().items() if k in SIZE_FIELDS)
        raise UserError(
            f"{source}: a {type(shapes).__name__} model of {shape} needs {need / 1e9:,.1f} GB for its "
            f"weights alone, more than this machine's {have / 1e9:,.1f} GB of memory"
        )
    return cls(config)


SIZE_FIELDS = ("n_layer", "n_embd", "n_hidden", "context", "block_size", "vocab_size")  # named in that error
