"""Choosing the next token from the logits: penalties, logit bias, temperature, top-k / top-p, draws.

One rule for every caller (`gpt2lab sample`, `chat`, the server): a temperature so small that
logits / temperature overflows float32, or a top_p so small that it rounds to 0, is greedy decoding
(its limit), never NaN probabilities; the most likely token is always in the nucleus.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from gpt2lab.errors import UserError


def _finite(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen from the logits; checked on construction (UserError names the value).

    temperature 0 is greedy; top_k / top_p keep the k most likely tokens / the nucleus.
    repetition_penalty (CTRL's, 1 = off), frequency_penalty and presence_penalty (OpenAI's, 0 = off)
    count the tokens of the prompt and of the text generated so far. logit_bias: (token id, bias)
    pairs added to the logits first (OpenAI's logit_bias; -100 bans a token in practice).
    """

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()

    def __post_init__(self) -> None:
        t, k, p = self.temperature, self.top_k, self.top_p
        if not _finite(t) or not t >= 0:
            raise UserError(f"temperature must be >= 0 (0 = greedy), got {t!r}")
        if k is not None and (not isinstance(k, int) or isinstance(k, bool) or k < 1):
            raise UserError(f"top_k must be a positive integer or None, got {k!r}")
        if p is not None and (not _finite(p) or not 0 < p <= 1):
            raise UserError(f"top_p must be in (0, 1], got {p!r}")
        r = self.repetition_penalty
        if not _finite(r) or not r > 0:
            raise UserError(f"repetition_penalty must be > 0 (1 = off), got {r!r}")
        for name in ("frequency_penalty", "presence_penalty"):
            if not _finite(getattr(self, name)):
                raise UserError(f"{name} must be a finite number (0 = off), got {getattr(self, name)!r}")
        for pair in self.logit_bias:
            if len(pair) != 2 or not isinstance(pair[0], int) or pair[0] < 0 or not _finite(pair[1]):
                raise UserError(f"logit_bias entries must be (token id >= 0, finite bias), got {pair!r}")

    @property
    def penalised(self) -> bool:
        """Whether choosing needs the counts of the tokens seen so far."""
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0

    def adjust(self, logits: torch.Tensor, counts: torch.Tensor | None) -> torch.Tensor:
        """The logits (B, V) after logit_bias and the penalties (counts (B, V), None: no penalty)."""
        logits = logits.float()
        if self.logit_bias:
            ids = torch.tensor([i for i, _ in self.logit_bias], device=logits.device)
            bias = torch.tensor([b for _, b in self.logit_bias], device=logits.device)
            keep = ids < logits.size(-1)
            logits = logits.index_add(1, ids[keep], bias[keep].expand(logits.size(0), -1))
        if counts is not None:
            logits = apply_penalties(
                logits, counts, self.repetition_penalty, self.frequency_penalty, self.presence_penalty
            )
        return logits

    def choose(
        self,
        logits: torch.Tensor,
        counts: torch.Tensor | None,
        generator: torch.Generator | Sequence[torch.Generator] | None,
    ) -> torch.Tensor:
        """Next token per row (B,) from logits (B, V) and token counts so far (B, V) (None: no penalty)."""
        logits = self.adjust(logits, counts)
        return sample_next(logits, self.temperature, self.top_k, self.top_p, generator)


def apply_penalties(
    logits: torch.Tensor,
    counts: torch.Tensor,
    repetition_penalty: float,
    frequency_penalty: float,
    presence_penalty: float = 0.0,
) -> torch.Tensor:
    """Penalise tokens already seen; logits, counts (B, V), counts = occurrences in prompt + output.

    Repetition penalty (Keskar et al. 2019, CTRL §4.1): a seen token's logit is divided by the penalty
    when positive, multiplied when negative. Frequency and presence penalties (OpenAI's API):
    logit -= frequency_penalty * count + presence_penalty * (count > 0).
    """
    if repetition_penalty != 1.0:
        seen = counts > 0
        penalised = torch.where(logits > 0, logits / repetition_penalty, logits * repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if frequency_penalty != 0.0:
        logits = logits - frequency_penalty * counts
    if presence_penalty != 0.0:
        logits = logits - presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set the logits (B, V) of tokens outside the top k and outside the nucleus top_p to -inf.

    The nucleus (Holtzman et al. 2019) is the smallest set of most likely tokens whose probability
    sums to at least top_p; the most likely token is always in it (also when top_p rounds to 0).
    """
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
        probs = F.softmax(sorted_logits, dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # probability of the more likely tokens
        drop_sorted = mass_before >= top_p
        drop_sorted[:, 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def seeded_generator(device: torch.device | str, seed: int | None) -> torch.Generator:
    """A generator on device, seeded with seed (None: a fresh random seed)."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def draw(probs: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """One token per row of probs (n, V), row i drawn with generators[i] -> (n,) long.

    Inverse-CDF sampling: u ~ U[0, total mass of row i), the token is the first whose cumulative
    probability exceeds u, so tokens of probability 0 (filtered out) are never drawn. One small
    draw per row keeps each row's randomness its own whatever else is in the batch.
    """
    cdf = probs.cumsum(dim=-1)  # (n, V)
    u = torch.stack([torch.rand((), generator=g, device=probs.device) for g in generators])  # (n,)
    u = u * cdf[:, -1]
    return torch.searchsorted(cdf, u[:, None], right=True)[:, 0].clamp(max=probs.size(1) - 1)


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
) -> torch.Tensor:
    """One token per row from logits (B, V): argmax when temperature is 0, else a draw. -> (B,) long.

    A row whose logits / temperature overflow float32 (a temperature like 1e-39) is greedy: that is
    the limit of sampling as the temperature goes to 0, where softmax would give NaN.
    generator: one for the whole batch, or one per row (`draw`: a row's token then depends on its own
    generator only, as the server needs for requests that share a batch).
    """
    logits = logits.float()
    greedy = logits.argmax(dim=-1)
    if temperature == 0:
        return greedy
    scaled = logits / temperature
    overflow = (torch.isinf(scaled) & torch.isfinite(logits)).any(dim=-1)  # (B,)
    scaled = torch.where(overflow[:, None], logits, scaled)  # any finite values; those rows are greedy
    probs = F.softmax(filter_logits(scaled, top_k, top_p), dim=-1)
    if isinstance(generator, Sequence):
        drawn = draw(probs, generator)
    else:
        drawn = torch.multinomial(probs, 1, generator=generator)[:, 0]
    return torch.where(overflow, greedy, drawn)


def ban(logits: torch.Tensor, rows: torch.Tensor, ids: Sequence[int]) -> torch.Tensor:
    """logits (B, V) with tokens `ids` set to -inf in the rows where rows (B,) bool is True
    (min_tokens: a row may not end before it has generated that many tokens)."""
    ids = [i for i in ids if 0 <= i < logits.size(-1)]
    if not ids or not bool(rows.any()):
        return logits
    logits = logits.clone()
    cols = torch.tensor(ids, device=logits.device)
    sub = logits[:, cols]  # (B, k)
    logits[:, cols] = torch.where(rows[:, None], float("-inf"), sub)
    return logits
