"""Generation: a preallocated KV cache, sampling, and streaming / batched generation.

One engine, `steps`, does the work: prefill the prompts once, then decode one token per step
through the KV cache. `generate` collects its tokens, `stream` yields them as they come, and
`stream_text` turns them into text pieces that are always whole UTF-8 characters.

Policies (each one is tested in tests/test_generate.py):
- Empty prompt: generation starts from the end-of-text token (`eot_id`), as GPT-2 was trained
  with documents separated by it. Without an eot_id an empty prompt is an error.
- Prompt longer than the context: only its last block_size tokens are kept, with a warning.
- Past the context window (sliding window): GPT-2's positions are absolute and learned, so the
  cached keys cannot be shifted to new positions. When the cache is full, generation restarts the
  window at the last `window_keep` tokens (default block_size // 2): they are prefilled again at
  positions 0.. and decoding goes on through the cache. The logits at every step are exactly those
  of the uncached model run on the current window; re-prefilling costs one prefill of
  window_keep tokens every block_size - window_keep steps. In a batch the window of all rows
  slides together, when the padded batch fills the context.
- EOT: a row stops after emitting eot_id (the EOT is part of its tokens, as in transformers).
- Stop strings: a row stops once its generated text contains one; `stream_text` never shows it.
- temperature 0 is greedy (argmax); top_k / top_p / penalties apply before it.
"""

from __future__ import annotations

import codecs
import sys
import warnings
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch
from torch.nn import functional as F

from gpt2lab.config import GPTConfig, SampleConfig
from gpt2lab.errors import UserError

GPT2_EOT = 50256  # GPT-2's <|endoftext|>: the document separator it was trained with


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
        shape = (config.n_layer, batch_size, config.n_head, max_len, config.head_size)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0
        self.pad: torch.Tensor | None = None
        self.set_pad(pad)

    @property
    def max_len(self) -> int:
        return self.k.size(3)

    @property
    def batch_size(self) -> int:
        return self.k.size(1)

    def set_pad(self, pad: torch.Tensor | None) -> None:
        """Left-padding lengths (B,), or None; all-zero padding is stored as None (the fast path)."""
        if pad is not None:
            if tuple(pad.shape) != (self.batch_size,):
                raise UserError(f"pad has shape {tuple(pad.shape)}, expected ({self.batch_size},)")
            pad = pad.to(device=self.k.device, dtype=torch.long)
            if not bool(pad.any()):
                pad = None
        self.pad = pad

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, nh, T, hs) at [pos, pos + T); return the keys and values so far (B, nh, S, hs)."""
        end = self.pos + k.size(2)
        if end > self.max_len:
            raise UserError(f"KV cache is full: {end} positions needed, max_len is {self.max_len}")
        self.k[layer, :, :, self.pos : end] = k
        self.v[layer, :, :, self.pos : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def reset(self, pad: torch.Tensor | None = None) -> None:
        """Empty the cache (the memory stays allocated), with new left padding."""
        self.pos = 0
        self.set_pad(pad)

    def repeat_interleave(self, n: int) -> KVCache:
        """A cache with each row repeated n times (rows b*n .. b*n+n-1 copy row b): n samples, one prefill."""
        new = object.__new__(KVCache)
        new.k = self.k.repeat_interleave(n, dim=1)  # (n_layer, B*n, nh, max_len, hs)
        new.v = self.v.repeat_interleave(n, dim=1)
        new.pos = self.pos
        new.pad = None if self.pad is None else self.pad.repeat_interleave(n)
        return new


class StaticKVCache(KVCache):
    """A KVCache whose decode step has fixed shapes, so it can be captured in a CUDA graph.

    Prefill (and re-prefill) goes through GPT.forward as usual. In a decode step (`decoding` True)
    the new token's keys and values are written at the device tensor `slot` and the whole buffer
    (B, nh, max_len, hs) is returned; slots not yet written are masked out by `static_decode`.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.decoding = False
        self.slot = torch.zeros(1, dtype=torch.long, device=self.k.device)  # == pos, on the device

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.decoding:
            return super().update(layer, k, v)
        self.k[layer].index_copy_(2, self.slot, k)  # (B, nh, max_len, hs) <- (B, nh, 1, hs) at slot
        self.v[layer].index_copy_(2, self.slot, v)
        return self.k[layer], self.v[layer]

    def repeat_interleave(self, n: int) -> StaticKVCache:
        new = object.__new__(StaticKVCache)
        new.__dict__.update(super().repeat_interleave(n).__dict__)
        new.decoding, new.slot = False, self.slot.clone()
        return new


def static_decode(model: Any, idx: torch.Tensor, cache: StaticKVCache, pad: torch.Tensor) -> torch.Tensor:
    """One decode step with shapes that never change: idx (B, 1) at cache.slot -> logits (B, V).

    The same computation as GPT.forward with a KVCache, except that attention runs over all max_len
    slots with a mask (written slots, minus each row's left padding), and the position is a device
    tensor, not a Python int; nothing here reads a Python value that changes between steps.
    pad (B,) is the left padding of each row within the cache. Advances cache.slot by one.
    """
    tr = model.transformer
    slots = torch.arange(cache.max_len, device=idx.device)  # (S,)
    pos = (cache.slot - pad).clamp(min=0)[:, None]  # (B, 1): positions count from each row's first token
    mask = (slots[None, :] <= cache.slot) & (slots[None, :] >= pad[:, None])  # (B, S)
    x = model.embed(idx, pos)  # (B, 1, C)
    cache.decoding = True
    try:
        for block in tr.h:
            x = block(x, mask[:, None, None, :], cache, pos)  # mask (B, 1, 1, S)
    finally:
        cache.decoding = False
    cache.slot += 1
    return model.logits(x)[:, -1]  # (B, V)


def _static_decoder(
    model: Any, cache: StaticKVCache, pad: torch.Tensor
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    cache.slot.fill_(cache.pos)
    if cache.k.device.type == "cuda":
        return GraphDecoder(model, cache, pad)
    return lambda idx, pad: static_decode(model, idx, cache, pad)


class GraphDecoder:
    """static_decode captured once in a CUDA graph and replayed per token (no per-op launch cost)."""

    def __init__(self, model: Any, cache: StaticKVCache, pad: torch.Tensor):
        self.idx = torch.zeros(cache.batch_size, 1, dtype=torch.long, device=cache.k.device)
        self.pad = pad.clone()
        saved = cache.slot.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the graph (lazy init, kernel selection)
            for _ in range(2):
                static_decode(model, self.idx, cache, self.pad)
                cache.slot.copy_(saved)  # the slot written here is rewritten by the real step
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = static_decode(model, self.idx, cache, self.pad)
        cache.slot.copy_(saved)

    def __call__(self, idx: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        self.idx.copy_(idx)
        self.pad.copy_(pad)
        self.graph.replay()
        return self.logits.clone()  # the graph's output buffer is overwritten by the next replay


# --- sampling -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen from the logits; checked on construction (UserError names the value).

    temperature 0 is greedy; top_k / top_p keep the k most likely tokens / the nucleus;
    repetition_penalty 1 and frequency_penalty 0 are off.
    """

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0

    def __post_init__(self) -> None:
        t, k, p = self.temperature, self.top_k, self.top_p
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not t >= 0:  # `not >=` catches NaN
            raise UserError(f"temperature must be >= 0 (0 = greedy), got {t!r}")
        if k is not None and (not isinstance(k, int) or isinstance(k, bool) or k < 1):
            raise UserError(f"top_k must be a positive integer or None, got {k!r}")
        if p is not None and (isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1):
            raise UserError(f"top_p must be in (0, 1], got {p!r}")
        r, f = self.repetition_penalty, self.frequency_penalty
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not r > 0:
            raise UserError(f"repetition_penalty must be > 0 (1 = off), got {r!r}")
        if isinstance(f, bool) or not isinstance(f, (int, float)) or f != f or abs(f) == float("inf"):
            raise UserError(f"frequency_penalty must be a finite number (0 = off), got {f!r}")

    @property
    def penalised(self) -> bool:
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0

    def choose(
        self,
        logits: torch.Tensor,
        counts: torch.Tensor | None,
        generator: torch.Generator | Sequence[torch.Generator] | None,
    ) -> torch.Tensor:
        """Next token per row (B,) from logits (B, V) and token counts so far (B, V) (None: no penalty)."""
        if counts is not None:
            logits = apply_penalties(logits, counts, self.repetition_penalty, self.frequency_penalty)
        return sample_next(logits, self.temperature, self.top_k, self.top_p, generator)


def apply_penalties(
    logits: torch.Tensor, counts: torch.Tensor, repetition_penalty: float, frequency_penalty: float
) -> torch.Tensor:
    """Penalise tokens already seen; logits, counts (B, V), counts = occurrences in prompt + output.

    Repetition penalty (Keskar et al. 2019, CTRL §4.1): a seen token's logit is divided by the penalty
    when positive, multiplied when negative. Frequency penalty (OpenAI's API): logit -= penalty * count.
    """
    if repetition_penalty != 1.0:
        seen = counts > 0
        penalised = torch.where(logits > 0, logits / repetition_penalty, logits * repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if frequency_penalty != 0.0:
        logits = logits - frequency_penalty * counts
    return logits


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set the logits (B, V) of tokens outside the top k and outside the nucleus top_p to -inf.

    The nucleus (Holtzman et al. 2019) is the smallest set of most likely tokens whose probability
    sums to at least top_p; the most likely token is always in it.
    """
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
        probs = F.softmax(sorted_logits, dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # probability of the more likely tokens
        drop_sorted = mass_before >= top_p
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

    generator: one for the whole batch, or one per row (`draw`: a row's token then depends on its own
    generator only, as the server needs for requests that share a batch).
    """
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits / temperature, top_k, top_p)
    probs = F.softmax(logits, dim=-1)
    if isinstance(generator, Sequence):
        return draw(probs, generator)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


# --- text: whole UTF-8 characters and stop strings ---------------------------------------------


class TextDecoder:
    """Token ids -> text pieces that are always whole characters; stops at the first stop string.

    GPT-2's byte-level BPE can split one character's UTF-8 bytes across tokens; the incremental
    decoder holds such bytes back until the character is complete (bytes that can never form one
    become U+FFFD). Text that might be the start of a stop string is held back too, until it is not.
    decode_bytes: ids -> bytes, e.g. a tokenizer's decode_bytes.
    """

    def __init__(self, decode_bytes: Callable[[list[int]], bytes], stop: Sequence[str] = ()):
        self.decode_bytes = decode_bytes
        self.stop = [s for s in stop if s]
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.pending = ""  # decoded, not yet shown: it may begin a stop string
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Feed one token; return the text now certain (maybe ''); sets .stopped at a stop string."""
        if self.stopped:
            return ""
        self.pending += self.utf8.decode(self.decode_bytes([token_id]))
        return self._release(final=False)

    def flush(self) -> str:
        """The rest of the text at the end of generation (an incomplete character becomes U+FFFD)."""
        if not self.stopped:
            self.pending += self.utf8.decode(b"", final=True)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        text = self.pending
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.stopped, self.pending = True, ""
            return text[: min(hits)]
        hold = 0 if final else self._stop_prefix_len(text)
        self.pending = text[len(text) - hold :]
        return text[: len(text) - hold]

    def _stop_prefix_len(self, text: str) -> int:
        """Length of the longest end of `text` that is the beginning of a stop string."""
        for n in range(min(len(text), max((len(s) for s in self.stop), default=0) - 1), 0, -1):
            if any(s.startswith(text[-n:]) for s in self.stop):
                return n
        return 0


# --- the engine ---------------------------------------------------------------------------------


@dataclass
class Step:
    """One decoding step of a batch of B rows.

    tokens (B,): the token each row emitted; finished rows repeat their last token and are marked
    in `active`. logits (B, V): the model's raw next-token logits the tokens were chosen from
    (before penalties, temperature and filtering). active (B,): which rows emitted a token now.
    """

    tokens: torch.Tensor
    logits: torch.Tensor
    active: list[bool]


def _prepare_prompt(prompt: Sequence[int], config: GPTConfig, eot_id: int | None) -> list[int]:
    ids = [int(t) for t in prompt]
    if not ids:
        if eot_id is None or not 0 <= eot_id < config.vocab_size:
            raise UserError(
                f"empty prompt: nothing to start from (eot_id {eot_id!r} is not in the vocab "
                f"of {config.vocab_size}); give a prompt or an eot_id"
            )
        return [eot_id]
    bad = [t for t in ids if not 0 <= t < config.vocab_size]
    if bad:
        raise UserError(f"prompt token id {bad[0]} is outside the model's vocab [0, {config.vocab_size})")
    if len(ids) > config.block_size:
        warnings.warn(
            f"prompt of {len(ids)} tokens exceeds the context block_size {config.block_size}; "
            f"keeping its last {config.block_size} tokens",
            stacklevel=4,
        )
        ids = ids[-config.block_size :]
    return ids


def _as_batch(prompt_ids: Sequence[int] | Sequence[Sequence[int]]) -> tuple[list[Sequence[int]], bool]:
    """(list of prompts, whether a single prompt was given)."""
    if isinstance(prompt_ids, torch.Tensor):
        prompt_ids = prompt_ids.tolist()
    if len(prompt_ids) == 0 or not isinstance(prompt_ids[0], (list, tuple, torch.Tensor)):
        return [prompt_ids], True
    return list(prompt_ids), False


@torch.inference_mode()
def steps(
    model: Any,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    frequency_penalty: float = 0.0,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    num_samples: int = 1,
    eot_id: int | None = GPT2_EOT,
    stop_ids: Collection[int] = (),
    stop: str | Sequence[str] = (),
    decode_bytes: Callable[[list[int]], bytes] | None = None,
    window_keep: int | None = None,
    compile: bool = False,
    vocab_size: int | None = None,
) -> Iterator[Step]:
    """The engine: yield one Step per generated position for a batch of prompts (lists of ids).

    Row p * num_samples + s is sample s of prompt p. Prompts of different lengths are left-padded
    and run in one batch; the num_samples samples of a prompt share its one prefill. Stops when
    every row has finished (eot_id, one of stop_ids, a stop string) or after max_new_tokens steps.
    The ending token is emitted; nothing after it. seed seeds a new
    torch.Generator; pass generator to continue one. The model runs in eval mode (restored after).
    compile: decode with a fixed-shape step over the whole cache (static_decode), captured in a CUDA
    graph on a GPU so a token costs one graph launch; on CPU it runs eagerly (exact, not faster).
    vocab_size: sample only ids below it, e.g. the tokenizer's 50257 when the model's vocabulary is
    padded to 50304 (the padding rows are never trained and have no text).
    """
    cfg: GPTConfig = model.config
    sampling = Sampling(temperature, top_k, top_p, repetition_penalty, frequency_penalty)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise UserError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise UserError(f"num_samples must be a positive integer, got {num_samples!r}")
    keep = cfg.block_size // 2 if window_keep is None else window_keep
    if not isinstance(keep, int) or not 1 <= keep <= cfg.block_size:
        raise UserError(f"window_keep must be in [1, block_size {cfg.block_size}], got {window_keep!r}")
    stop = [s for s in ([stop] if isinstance(stop, str) else stop) if s]
    if stop and decode_bytes is None:
        raise UserError("stop strings need decode_bytes (a tokenizer's ids -> bytes) to read the text")
    if len(prompts) == 0:
        raise UserError("no prompts given")
    prompts = [_prepare_prompt(p, cfg, eot_id) for p in prompts]
    if max_new_tokens == 0:
        return
    if generator is None:
        generator = seeded_generator(next(model.parameters()).device, seed)
    texts = None if not stop else [TextDecoder(decode_bytes, stop) for _ in range(len(prompts) * num_samples)]
    was_training = model.training
    model.eval()
    try:
        limit = cfg.vocab_size if vocab_size is None else min(vocab_size, cfg.vocab_size)
        yield from _decode(
            model,
            prompts,
            max_new_tokens,
            sampling,
            generator,
            num_samples,
            frozenset(() if eot_id is None else (eot_id,)) | frozenset(stop_ids),
            texts,
            keep,
            compile,
            limit,
        )
    finally:
        model.train(was_training)


def _decode(
    model: Any,
    prompts: list[list[int]],
    max_new_tokens: int,
    sampling: Sampling,
    generator: torch.Generator,
    num_samples: int,
    end_ids: frozenset[int],
    texts: list[TextDecoder] | None,
    keep: int,
    compile: bool,
    limit: int,
) -> Iterator[Step]:
    cfg: GPTConfig = model.config
    param = next(model.parameters())
    device = param.device
    # --- layout: the prompts right-aligned in one (B, P + max_new_tokens) token buffer
    lengths = [len(p) for p in prompts]
    P, B = max(lengths), len(prompts)
    total = P + max_new_tokens
    tokens = torch.zeros(B, total, dtype=torch.long)
    for b, p in enumerate(prompts):
        tokens[b, P - len(p) : P] = torch.tensor(p, dtype=torch.long)
    tokens = tokens.to(device)
    pad = torch.tensor([P - n for n in lengths], device=device)  # (B,) left padding of each row
    # The newest token is never fed to the model, so total - 1 positions suffice.
    cache_type = StaticKVCache if compile else KVCache
    cache = cache_type(cfg, B, min(cfg.block_size, total - 1), device=device, dtype=param.dtype, pad=pad)

    # --- prefill: all prompts at once, then each row's cache copied for its samples
    logits = model(tokens[:, :P], kv_cache=cache, last_only=True)[:, -1].float()  # (B, V)
    if num_samples > 1:
        cache = cache.repeat_interleave(num_samples)
        tokens = tokens.repeat_interleave(num_samples, dim=0)
        pad = pad.repeat_interleave(num_samples)
        logits = logits.repeat_interleave(num_samples, dim=0)
        B *= num_samples
    counts = None
    if sampling.penalised:
        real = torch.arange(P, device=device)[None, :] >= pad[:, None]  # (B, P): True where not padding
        counts = torch.zeros(B, logits.size(-1), device=device)
        counts.scatter_add_(1, tokens[:, :P], real.float())
    active = [True] * B
    window_pad = pad  # (B,) each row's left padding inside the model's window
    decoder = None  # compile: the static-shape decode step, captured in a CUDA graph on GPU

    # --- decode: choose, emit, feed the new token back through the cache
    for cur in range(P, total):
        usable = None if counts is None else counts[:, :limit]
        nxt = sampling.choose(logits[:, :limit], usable, generator)  # (B,): ids < limit only
        emitted = list(active)
        if not all(emitted):  # finished rows repeat their last token, which nobody reads
            nxt = torch.where(torch.tensor(emitted, device=device), nxt, tokens[:, cur - 1])
        tokens[:, cur] = nxt
        for b, t in enumerate(nxt.tolist()):
            if not active[b]:
                continue
            if texts is not None:
                texts[b].push(t)
            active[b] = t not in end_ids and not (texts is not None and texts[b].stopped)
        yield Step(tokens=nxt, logits=logits, active=emitted)
        if not any(active) or cur + 1 == total:
            return
        if counts is not None:
            counts.scatter_add_(
                1, nxt[:, None], torch.tensor(emitted, device=device, dtype=counts.dtype)[:, None]
            )
        if cache.pos == cache.max_len:  # the context is full: restart the window at the last `keep` tokens
            window = cur + 1 - keep  # column of `tokens` that becomes position 0
            window_pad = (pad - window).clamp(min=0)
            cache.reset(pad=window_pad)
            logits = model(tokens[:, window : cur + 1], kv_cache=cache, last_only=True)[:, -1].float()
        elif compile:
            if decoder is None:
                decoder = _static_decoder(model, cache, window_pad)
            cache.slot.fill_(cache.pos)  # a no-op on the device unless a prefill moved pos
            logits = decoder(tokens[:, cur : cur + 1], window_pad).float()
            cache.pos += 1
        else:
            logits = model(tokens[:, cur : cur + 1], kv_cache=cache)[:, -1].float()


# --- the public interface ----------------------------------------------------------------------


def stream(
    model: Any, prompt_ids: Sequence[int] | Sequence[Sequence[int]], max_new_tokens: int, **kwargs: Any
) -> Iterator[int] | Iterator[list[int | None]]:
    """Like generate, one step at a time: yields each new id (one prompt, one sample), or per step
    a list with one entry per row (None for rows that have finished)."""
    prompts, single = _as_batch(prompt_ids)
    single = single and kwargs.get("num_samples", 1) == 1
    for step in steps(model, prompts, max_new_tokens, **kwargs):
        ids = step.tokens.tolist()
        if single:
            yield ids[0]
        else:
            yield [t if a else None for t, a in zip(ids, step.active, strict=True)]


def generate(
    model: Any,
    prompt_ids: Sequence[int] | Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    **kwargs: Any,
) -> list[int] | list[list[int]]:
    """The new token ids for a prompt (list of ids -> list of ids), or for a batch of prompts
    (list of lists -> list of lists, sample s of prompt p at index p * num_samples + s).

    temperature 0 is greedy; top_k / top_p restrict sampling to the k most likely tokens / the
    nucleus; seed makes sampling repeatable. More keywords (see `steps`): repetition_penalty,
    frequency_penalty, generator, num_samples, eot_id (default GPT-2's 50256; None = never stop on
    it), stop (strings, with decode_bytes), window_keep. A single prompt with num_samples > 1 gives
    a list of lists. A row ends at max_new_tokens, after its eot_id, or at a stop string.
    """
    prompts, single = _as_batch(prompt_ids)
    kw = dict(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, **kwargs)
    out: list[list[int]] | None = None
    for step in steps(model, prompts, max_new_tokens, **kw):
        if out is None:
            out = [[] for _ in step.active]
        for row, (t, a) in enumerate(zip(step.tokens.tolist(), step.active, strict=True)):
            if a:
                out[row].append(t)
    if out is None:  # max_new_tokens == 0
        out = [[] for _ in range(len(prompts) * kwargs.get("num_samples", 1))]
    return out[0] if single and len(out) == 1 else out


def stream_text(
    model: Any,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    decode_bytes: Callable[[list[int]], bytes],
    *,
    stop: Sequence[str] = (),
    **kwargs: Any,
) -> Iterator[str]:
    """Text pieces of one sample as they are generated; each is whole UTF-8 characters.

    decode_bytes: a tokenizer's ids -> bytes (tokenizer.decode_bytes). The EOT token (or one of
    stop_ids) and anything from a stop string on are not shown. Other keywords as for generate.
    """
    text = TextDecoder(decode_bytes, [stop] if isinstance(stop, str) else stop)
    end_ids = {kwargs.get("eot_id", GPT2_EOT), *kwargs.get("stop_ids", ())}
    if kwargs.get("num_samples", 1) != 1:
        raise UserError("stream_text streams one sample; call it once per sample")
    for step in steps(model, [prompt_ids], max_new_tokens, **kwargs):
        token = int(step.tokens[0])
        if token in end_ids:
            break
        piece = text.push(token)
        if piece:
            yield piece
        if text.stopped:
            return
    rest = text.flush()
    if rest:
        yield rest


# --- `gpt2lab sample` ------------------------------------------------------------------------------


def load_for_sampling(
    ckpt: str | None = None,
    pretrained: str | None = None,
    *,
    gpt2_vocab: str | None = None,
    device: str = "auto",
    dtype: str = "float32",
    adapter: str | None = None,
) -> tuple[Any, Any]:
    """(model in eval mode on device, tokenizer) for --ckpt or --pretrained, and --adapter put onto it.

    The one loader of `gpt2lab sample`, `chat` and `serve`. A gpt2lab checkpoint whose config.json has
    a "tokenizer" spec uses that tokenizer; Hugging Face GPT-2 weights, and checkpoints converted from
    them, use GPT-2's own (tokenizer.model_tokenizer). A LoRA adapter (sft.attach_adapter) is merged
    into the model and brings its chat template's tokens.
    """
    from gpt2lab.checkpoint import load_any
    from gpt2lab.tokenizer import model_tokenizer

    model, spec = load_any(ckpt, pretrained, device, getattr(torch, dtype))
    tokenizer = model_tokenizer(spec, gpt2_vocab, pretrained)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise UserError(
            f"tokenizer {tokenizer.name!r} has {tokenizer.vocab_size} tokens, more than the model's "
            f"vocab_size {model.config.vocab_size}"
        )
    if adapter is not None:
        from gpt2lab import sft

        tokenizer = sft.attach_adapter(model, tokenizer, adapter)
    return model.eval(), tokenizer


def run(cfg: SampleConfig, inp: TextIO | None = None, out: TextIO | None = None) -> None:
    """`gpt2lab sample`: print samples for --prompt / --prompt-file, or for each line read interactively."""
    inp = sys.stdin if inp is None else inp
    out = sys.stdout if out is None else out
    sampling = Sampling(cfg.temperature, cfg.top_k, cfg.top_p, cfg.repetition_penalty, cfg.frequency_penalty)
    if cfg.prompt is not None and cfg.prompt_file is not None:
        raise UserError("give --prompt or --prompt-file, not both")
    if cfg.num_samples < 1:
        raise UserError(f"--num-samples must be a positive integer, got {cfg.num_samples}")
    if cfg.max_new_tokens < 0:
        raise UserError(f"--max-new-tokens must be a non-negative integer, got {cfg.max_new_tokens}")
    prompt = cfg.prompt
    if cfg.prompt_file is not None:
        try:
            prompt = Path(cfg.prompt_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read --prompt-file {cfg.prompt_file}: {e}") from None
    model, tokenizer = load_for_sampling(
        cfg.ckpt, cfg.pretrained, gpt2_vocab=cfg.gpt2_vocab, device=cfg.device, dtype=cfg.dtype
    )
    generator = seeded_generator(next(model.parameters()).device, cfg.seed)
    kwargs = dict(
        temperature=sampling.temperature,
        top_k=sampling.top_k,
        top_p=sampling.top_p,
        repetition_penalty=sampling.repetition_penalty,
        frequency_penalty=sampling.frequency_penalty,
        generator=generator,
        eot_id=tokenizer.eot_id,
        vocab_size=tokenizer.vocab_size,
        compile=cfg.compile,
    )
    stop = [] if not cfg.stop else [cfg.stop]

    def complete(text: str) -> None:
        ids = tokenizer.encode(text, allowed_special="all")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for i in range(cfg.num_samples):
                if i:
                    print("\n" + "-" * 40, file=out)
                out.write(text)
                if cfg.stream:  # the samples one after another, each printed as it comes
                    for piece in stream_text(
                        model, ids, cfg.max_new_tokens, tokenizer.decode_bytes, stop=stop, **kwargs
                    ):
                        out.write(piece)
                        out.flush()
                else:
                    if i == 0:  # all samples in one batch, sharing the prompt's prefill
                        rows = generate(
                            model,
                            [ids],
                            cfg.max_new_tokens,
                            num_samples=cfg.num_samples,
                            stop=stop,
                            decode_bytes=tokenizer.decode_bytes,
                            **kwargs,
                        )
                    out.write(completion_text(rows[i], tokenizer.decode_bytes, tokenizer.eot_id, stop))
                print(file=out, flush=True)
        for w in caught:
            print(f"gpt2lab sample: warning: {w.message}", file=sys.stderr)

    if prompt is not None:
        complete(prompt)
        return
    interactive = inp.isatty()
    while True:
        if interactive:
            print("prompt> ", end="", file=sys.stderr, flush=True)
        line = inp.readline()
        if not line:
            break
        complete(line.rstrip("\n"))


def completion_text(
    ids: list[int], decode_bytes: Callable[[list[int]], bytes], eot_id: int | None, stop: Sequence[str]
) -> str:
    """The text of generated ids, as stream_text shows it: up to the EOT or the stop string."""
    text = TextDecoder(decode_bytes, stop)
    parts = []
    for t in ids:
        if t == eot_id:
            break
        parts.append(text.push(t))
        if text.stopped:
            break
    parts.append(text.flush())
    return "".join(parts)
