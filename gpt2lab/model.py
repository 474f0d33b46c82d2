"""GPT-2 (Radford et al. 2019): a decoder-only Transformer, written to be read top to bottom.

Shapes: B batch, T new tokens, S = past + T keys, C = n_embd, nh = n_head, hs = C // nh, V vocab.
Parameter names are GPT-2's own (wte, wpe, h.N.ln_1, attn.c_attn, ...), so OpenAI's weights load
as a plain copy (gpt2lab/interop/hf.py). Single device, no parallelism, no autocast: train.py adds those.

Architecture options (GPTConfig; each off by default, so the model is GPT-2 unless asked), the ones
the NanoGPT speedrun (modded-nanogpt, Jordan et al. 2024) uses to reach GPT-2's loss on far fewer
tokens: rotary positions (pos_embedding="rope"), QK-norm (qk_norm), ReLU² (activation="relu2"),
zero-initialised output projections (zero_init), an untied head (tie_weights=False), no biases
(bias=False) and a tanh soft cap on the logits (logit_softcap).
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn as nn
from torch.nn import functional as F

from gpt2lab.config import GPTConfig
from gpt2lab.errors import UserError

IGNORE_INDEX = -100  # targets with this value do not count in the loss (F.cross_entropy's default)


class Cache(Protocol):
    """What forward() needs from a KV cache (kvcache.KVCache is the implementation).

    The cache knows which rows the new tokens belong to and how long each row already is, so it
    supplies the positions of the new tokens and the attention mask; each layer then stores its new
    keys and values in it and gets back all of them so far.
    """

    def plan(self, T: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Positions (B, T) of T new tokens per row, and the mask (None: plain causal attention)."""
        ...

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, nh, T, hs); return all keys and values so far (B, nh, S, hs)."""
        ...

    def advance(self) -> None:
        """After the forward: the new tokens are now part of each row."""
        ...

    def last_index(self) -> torch.Tensor:
        """(B,) index in the input of each row's last real token (rows may be right-padded)."""
        ...


def sinusoidal_positions(n_pos: int, dim: int, base: float = 10000.0) -> torch.Tensor:
    """Vaswani et al. 2017 §3.5: PE[p, 2i] = sin(p / base^(2i/d)), PE[p, 2i+1] = cos(...). (n_pos, dim)"""
    pos = torch.arange(n_pos, dtype=torch.float64)[:, None]  # (n_pos, 1)
    inv_freq = base ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)  # (dim/2,)
    table = torch.zeros(n_pos, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(pos * inv_freq)
    table[:, 1::2] = torch.cos(pos * inv_freq)
    return table.float()


def apply_rotary(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding (Su et al. 2021, RoFormer): rotate each pair of channels by its angle.

    x (B, nh, T, hs); table (T, hs) or (B, 1, T, hs): the sinusoids of each token's position (from
    sinusoidal_positions: sin at even, cos at odd columns; the same wavelengths as Vaswani's). Channel
    i is paired with i + hs/2 (the GPT-NeoX / Llama layout: two contiguous halves, no interleaving).
    A query at position m and a key at position n then score q·R(n - m)·k: only the distance
    counts, so a cache, a sliding window or rows at different lengths change nothing but which
    positions are used.
    """
    sin, cos = table[..., 0::2], table[..., 1::2]  # (..., T, hs/2) each
    x1, x2 = x.chunk(2, dim=-1)  # (B, nh, T, hs/2) each
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)  # (B, nh, T, hs)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.n_head = config.n_head
        self.layer_idx = layer_idx  # which slot of a KV cache belongs to this layer
        self.explicit = config.attn_impl == "explicit"
        self.qk_norm = config.qk_norm
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        if config.pos_embedding == "rope":  # a fixed table, not a parameter and not saved
            table = sinusoidal_positions(config.block_size, config.head_size, config.rope_base)
            self.register_buffer("rope", table, persistent=False)  # (block_size, hs)

    def forward(
        self, x: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor | None, kv_cache: Cache | None
    ) -> torch.Tensor:
        """x (B, T, C) at positions pos ((T,) or (B, T)) -> (B, T, C).

        mask: None for plain causal attention, else bool (B, 1, T, S), True = may attend.
        pos: GPT-2's positions are absolute and added once in GPT.embed; with pos_embedding="rope"
        q and k are rotated by pos here, before k goes into the cache.
        """
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if self.qk_norm:
            # QK-norm (Henry et al. 2020; Dehghani et al. 2023): unit-RMS queries and keys bound the
            # attention logits, so a large learning rate cannot blow them up (softmax saturation).
            q, k = F.rms_norm(q, (q.size(-1),)), F.rms_norm(k, (k.size(-1),))
        if hasattr(self, "rope"):
            table = self.rope[pos]  # (T, hs) or (B, T, hs)
            table = table if table.dim() == 2 else table[:, None]  # (T, hs) or (B, 1, T, hs)
            q, k = apply_rotary(q, table), apply_rotary(k, table)  # keys are cached already rotated
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)  # (B, nh, S, hs)
        # With no mask, queries and keys line up (S == T, causal) or one new query sees all keys (T == 1).
        causal = mask is None and T > 1
        if self.explicit:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))  # (B, nh, T, S)
            if causal:
                mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()  # (T, S)
            if mask is not None:
                att = att.masked_fill(~mask, float("-inf"))
            att = self.attn_dropout(F.softmax(att, dim=-1))
            y = att @ v  # (B, nh, T, hs)
        else:
            # FlashAttention (or memory-efficient attention) kernels on GPU; the same math on CPU.
            p = self.attn_dropout.p if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): heads side by side again
        return self.resid_dropout(self.c_proj(y))


class ReLUSquared(nn.Module):
    """relu(x)²: the Primer activation (So et al. 2021), cheaper than GELU and better per step."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x).square()


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.mlp_size, bias=config.bias)
        # GPT-2 used the tanh approximation of GELU; exact GELU (erf) is what nanoGPT-style models use.
        if config.activation == "relu2":
            self.gelu: nn.Module = ReLUSquared()  # the name stays `gelu`: it has no weights either way
        else:
            self.gelu = nn.GELU(approximate="tanh" if config.activation == "gelu_tanh" else "none")
        self.c_proj = nn.Linear(config.mlp_size, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))  # (B, T, C)


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.post_norm = config.norm_position == "post"
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.mlp = MLP(config)

    def forward(
        self, x: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor | None, kv_cache: Cache | None
    ) -> torch.Tensor:
        if self.post_norm:  # Vaswani et al. 2017: normalise after each residual addition
            x = self.ln_1(x + self.attn(x, pos, mask, kv_cache))
            return self.ln_2(x + self.mlp(x))
        # GPT-2: normalise each branch's input and leave the residual stream itself untouched
        x = x + self.attn(self.ln_1(x), pos, mask, kv_cache)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    supports_kv_cache = True  # generation feeds only new tokens through a KV cache (see kvcache.py)

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList(Block(config, i) for i in range(config.n_layer)),
                ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias),
            )
        )
        if config.pos_embedding == "learned":
            self.transformer.wpe = nn.Embedding(config.block_size, config.n_embd)
        elif config.pos_embedding == "sinusoidal":  # a fixed table, not saved: recomputed from the config
            self.register_buffer("pos_table", sinusoidal_positions(config.block_size, config.n_embd), False)
        # "rope": no position embedding here; every attention layer rotates its queries and keys.
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_weights:
            # GPT-2 (after Press & Wolf 2017): the output projection is the token embedding matrix.
            self.lm_head.weight = self.transformer.wte.weight
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """GPT-2's initialisation: N(0, 0.02) weights, zero biases, unit LayerNorms, scaled residuals."""
        std = self.config.init_std
        for module in self.modules():
            if module is self.lm_head and self.config.tie_weights:
                continue  # the same tensor as wte, initialised there
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            if isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for block in self.transformer.h:
            # GPT-2 paper §2.3: scale the weights of residual layers by 1/sqrt(N), N = 2 per block
            # (attention and MLP each add into the residual stream), so its variance stays bounded.
            for proj in (block.attn.c_proj, block.mlp.c_proj):
                nn.init.normal_(proj.weight, mean=0.0, std=std / math.sqrt(2 * self.config.n_layer))
                if self.config.zero_init:
                    # modded-nanogpt (after muP, Yang et al. 2021): each block starts as the identity
                    # and the residual stream is the embeddings alone; gradients still reach c_proj.
                    nn.init.zeros_(proj.weight)
        if self.config.zero_init and not self.config.tie_weights:
            nn.init.zeros_(self.lm_head.weight)  # uniform predictions at step 0 (loss exactly ln V)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        kv_cache: Cache | None = None,
        last_only: bool = False,
        hidden: bool = False,
    ) -> torch.Tensor:
        """idx (B, T) token ids -> logits (B, T, V); or, given targets (B, T), the mean cross-entropy.

        The one forward, for training, scoring, prefill and decode, batched or not. Targets equal to
        IGNORE_INDEX (-100) are left out of the mean. With kv_cache, idx holds only the new tokens of
        the cache's selected rows (right-padded when rows have fewer); each row continues at its own
        length, and the cache supplies the positions and the attention mask.
        last_only: logits (B, 1, V) of each row's last token only, all that generation needs after a
        prefill; it skips T - 1 rows of the vocab projection, ~1/3 of the prefill's FLOPs at GPT-2 124M.
        hidden: the final hidden states (B, T, C) (after ln_f) instead of logits, e.g. for embeddings.
        """
        if last_only and targets is not None:
            raise UserError("last_only gives logits for one position; the loss needs them all (targets)")
        B, T = idx.shape
        if kv_cache is None:
            if idx.size(1) > self.config.block_size:
                raise UserError(
                    f"sequence length {T} exceeds the model's context block_size {self.config.block_size}"
                )
            pos, mask = torch.arange(T, device=idx.device), None  # (T,), causal
        else:
            pos, mask = kv_cache.plan(T)  # (B, T), (B, 1, T, S) or None
        x = self.embed(idx, pos)  # (B, T, C)
        for block in self.transformer.h:
            x = block(x, pos, mask, kv_cache)
        if kv_cache is not None:
            kv_cache.advance()
        if last_only:
            last = T - 1 if kv_cache is None else kv_cache.last_index()  # int, or (B,) per row
            x = x[torch.arange(B, device=x.device), last][:, None]  # (B, 1, C)
        x = self.transformer.ln_f(x)
        if hidden:
            return x
        logits = self.lm_head(x)  # (B, T, V)
        if self.config.logit_softcap:
            # Gemma 2 (Team et al. 2024), modded-nanogpt: cap * tanh(logits / cap) bounds the logits
            # smoothly, so the model cannot win by growing them without limit (overconfidence).
            logits = self.config.logit_softcap * torch.tanh(logits / self.config.logit_softcap)
        if targets is None:
            return logits
        # Cross-entropy in fp32 even under bf16 autocast: log-softmax over 50K classes needs the range.
        return F.cross_entropy(
            logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX
        )

    def embed(self, idx: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) at positions pos ((T,) or (B, T)) -> the first residual stream (B, T, C)."""
        x = self.transformer.wte(idx)  # (B, T, C)
        if self.config.pos_embedding == "learned":
            x = x + self.transformer.wpe(pos)  # (T, C) or (B, T, C) broadcast over the batch
        elif self.config.pos_embedding == "sinusoidal":
            # Vaswani et al. 2017 §3.4: embeddings are multiplied by sqrt(d) before the sinusoids are
            # added, so that tokens (init std 0.02) are not drowned by positions (amplitude 1).
            x = x * math.sqrt(self.config.n_embd) + self.pos_table[pos]
        return self.transformer.drop(x)

    # --- counting -------------------------------------------------------------------------------

    def num_params(self, non_embedding: bool = False) -> int:
        """All parameters (a tied matrix counted once); non_embedding=True leaves out the lookup tables.

        The "non-embedding" convention (nanoGPT's) keeps a tied wte because it is also the output
        layer (a matmul); an untied wte is a lookup only, as wpe is, so it is left out too.
        """
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and "wpe" in self.transformer:
            n -= self.transformer.wpe.weight.numel()
        if non_embedding and not self.config.tie_weights:
            n -= self.transformer.wte.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None, training: bool = True) -> float:
        """Matmul FLOPs per token: 6N + 12·L·H·Q·T to train (PaLM paper, App. B); a third of that forward."""
        cfg = self.config
        T = cfg.block_size if seq_len is None else seq_len
        flops = 6 * self.num_params(non_embedding=True) + 12 * cfg.n_layer * cfg.n_head * cfg.head_size * T
        return flops if training else flops / 3

    def mfu(self, tokens_per_second: float, peak_flops: float, seq_len: int | None = None) -> float:
        """Model FLOPs utilisation: achieved training FLOP/s over the peak (e.g. 989e12: H100 dense bf16)."""
        return tokens_per_second * self.flops_per_token(seq_len) / peak_flops
