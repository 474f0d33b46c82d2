"""Generation for a fixed batch of prompts: `steps`, and `generate` / `stream` / `stream_text` on it.

`steps` runs on the inference core (decoder.Decoder: GPT.forward through a KVCache with per-row
lengths): prefill all prompts in one forward, then decode one token per step for every row.
`generate` collects its tokens, `stream` yields them as they come, and `stream_text` turns them into
text pieces that are always whole UTF-8 characters. The server's engine (engine.py) runs on the same
Decoder, sampling (sampling.py) and TextDecoder.

Policies (each one is tested in tests/test_generate.py):
- Empty prompt: generation starts from the end-of-text token (`eot_id`), as GPT-2 was trained
  with documents separated by it. Without an eot_id an empty prompt is an error.
- Prompt longer than the context: only its last block_size tokens are kept, with a warning.
- Past the context window (sliding window): GPT-2's positions are absolute and learned, so the
  cached keys cannot be shifted to new positions. When a row's cache is full, generation restarts
  its window at the last `window_keep` tokens (default block_size // 2): they are prefilled again at
  positions 0.. and decoding goes on through the cache. The logits at every step are exactly those
  of the uncached model run on the current window; re-prefilling costs one prefill of
  window_keep tokens every block_size - window_keep steps. Each row slides on its own, so a row of
  a batch gets exactly what its prompt alone gets.
- A model without a KV cache (decoder.supports_kv_cache) is run on the last block_size tokens of
  each row at every step: the same policy with window_keep = block_size - 1, nothing cached.
- EOT: a row stops after emitting eot_id (the EOT is part of its tokens, as in transformers).
- Stop strings: a row stops once its generated text contains one; `stream_text` never shows it.
- temperature 0 is greedy (argmax); top_k / top_p / penalties apply before it. A temperature or
  top_p too small to sample from is greedy too (sampling.py), never NaN.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch

from gpt2lab.config import GPTConfig, SampleConfig
from gpt2lab.decoder import Decoder, TextDecoder
from gpt2lab.errors import UserError
from gpt2lab.kvcache import KVCache
from gpt2lab.sampling import (
    Sampling,
    apply_penalties,
    ban,
    draw,
    filter_logits,
    sample_next,
    seeded_generator,
)

__all__ = [  # sampling and the text decoder live in their own modules; generate.py re-exports them
    "KVCache", "Sampling", "Step", "TextDecoder", "apply_penalties", "completion_text", "draw",
    "filter_logits", "generate", "load_for_sampling", "sample_next", "seeded_generator", "steps",
    "stream", "stream_text",
]  # fmt: skip

GPT2_EOT = 50256  # GPT-2's <|endoftext|>: the document separator it was trained with


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
    presence_penalty: float = 0.0,
    logit_bias: dict[int, float] | None = None,
    min_tokens: int = 0,
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
    """Yield one Step per generated position for a batch of prompts (lists of ids).

    Row p * num_samples + s is sample s of prompt p. All prompts are prefilled in one forward, each
    row at its own positions; the num_samples samples of a prompt share its one prefill. Stops when
    every row has finished (eot_id, one of stop_ids, a stop string) or after max_new_tokens steps.
    The ending token is emitted; nothing after it. min_tokens: no row ends (by an id) before it has
    generated that many. seed seeds a new torch.Generator; pass generator to continue one. The model
    runs in eval mode (restored after).
    compile: decode with a fixed-shape step (the cache's static mode), captured in a CUDA graph on
    a GPU so a token costs one graph launch; on CPU it runs eagerly (exact, not faster).
    vocab_size: sample only ids below it, e.g. the tokenizer's 50257 when the model's vocabulary is
    padded to 50304 (the padding rows are never trained and have no text).
    """
    cfg: GPTConfig = model.config
    bias = tuple(sorted((int(k), float(v)) for k, v in (logit_bias or {}).items()))
    sampling = Sampling(
        temperature, top_k, top_p, repetition_penalty, frequency_penalty, presence_penalty, bias
    )
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise UserError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise UserError(f"num_samples must be a positive integer, got {num_samples!r}")
    if isinstance(min_tokens, bool) or not isinstance(min_tokens, int) or min_tokens < 0:
        raise UserError(f"min_tokens must be a non-negative integer, got {min_tokens!r}")
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
        end_ids = frozenset(() if eot_id is None else (eot_id,)) | frozenset(stop_ids)
        yield from _decode(
            model, prompts, max_new_tokens, sampling, min_tokens, generator, num_samples, end_ids, texts,
            keep, compile, limit,
        )  # fmt: skip
    finally:
        model.train(was_training)


def _decode(
    model: Any,
    prompts: list[list[int]],
    max_new_tokens: int,
    sampling: Sampling,
    min_tokens: int,
    generator: torch.Generator,
    num_samples: int,
    end_ids: frozenset[int],
    texts: list[TextDecoder] | None,
    keep: int,
    compile: bool,
    limit: int,
) -> Iterator[Step]:
    block = model.config.block_size
    B = len(prompts) * num_samples
    # The newest token is never fed to the model, so len(prompt) + max_new_tokens - 1 slots suffice.
    longest = max(len(p) for p in prompts) + max_new_tokens - 1
    core = Decoder(model, B, max_len=min(block, max(longest, 1)), graphs=compile)
    device = core.device

    # --- prefill: all prompts in one forward, each prompt's row then copied for its samples
    logits = core.prefill(slice(0, len(prompts)), prompts).float()  # (P, V)
    for p in reversed(range(len(prompts))):  # backwards: a copy never overwrites a row not yet copied
        core.copy_row(p, slice(p * num_samples, (p + 1) * num_samples))
    logits = logits.repeat_interleave(num_samples, dim=0)  # (B, V)
    seqs = [list(p) for p in prompts for _ in range(num_samples)]  # every row's tokens, for re-prefills
    counts = None
    if sampling.penalised:
        counts = torch.zeros(B, logits.size(-1), device=device)
        for b, seq in enumerate(seqs):
            counts[b].index_add_(0, torch.tensor(seq, device=device), torch.ones(len(seq), device=device))
    active = [True] * B
    last = torch.zeros(B, dtype=torch.long, device=device)

    # --- decode: choose, emit, feed the new tokens back through the cache
    for i in range(max_new_tokens):
        usable = None if counts is None else counts[:, :limit]
        raw = logits[:, :limit]
        if i < min_tokens and end_ids:
            raw = ban(raw, torch.ones(B, dtype=torch.bool, device=device), sorted(end_ids))
        nxt = sampling.choose(raw, usable, generator)  # (B,): ids < limit only
        emitted = list(active)
        if not all(emitted):  # finished rows repeat their last token, which nobody reads
            nxt = torch.where(torch.tensor(emitted, device=device), nxt, last)
        last = nxt
        for b, t in enumerate(nxt.tolist()):
            seqs[b].append(t)
            if not active[b]:
                continue
            if texts is not None:
                texts[b].push(t)
            active[b] = t not in end_ids and not (texts is not None and texts[b].stopped)
        yield Step(tokens=nxt, logits=logits, active=emitted)
        if not any(active) or i + 1 == max_new_tokens:
            return
        if counts is not None:
            counts.scatter_add_(
                1, nxt[:, None], torch.tensor(emitted, device=device, dtype=counts.dtype)[:, None]
            )
        # a full row restarts its window at its last `keep` tokens (prefilled again at positions 0..);
        # a model without a cache has no window to restart: it always reads its last block_size tokens
        full = [b for b in range(B) if core.cached and core.length(b) == core.max_len]
        if not full:
            logits = core.decode(nxt).float()
            continue
        rest = [b for b in range(B) if b not in full]
        logits = logits.clone()
        logits[full] = core.prefill(full, [seqs[b][-keep:] for b in full]).float()
        if rest:
            logits[rest] = core.decode(nxt[rest], rows=rest).float()


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
    quantize: str = "none",
) -> tuple[Any, Any]:
    """(model in eval mode on device, tokenizer) for --ckpt or --pretrained, and --adapter put onto it.

    The inference loader of `gpt2lab sample`, `chat` and `serve` (on interop.load_any, as `eval`
    is); quantize "int8": decoder.quantize_int8 (CPU). A gpt2lab checkpoint whose config.json has
    a "tokenizer" spec uses that tokenizer; Hugging Face GPT-2 weights, and checkpoints converted from
    them, use GPT-2's own (tokenizer.model_tokenizer). A LoRA adapter (interop.peft.attach_adapter) is merged
    into the model and brings its chat template's tokens.
    """
    from gpt2lab.interop import load_any
    from gpt2lab.tokenizer import model_tokenizer

    model, spec = load_any(ckpt, pretrained, device, getattr(torch, dtype))
    tokenizer = model_tokenizer(spec, gpt2_vocab, pretrained)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise UserError(
            f"tokenizer {tokenizer.name!r} has {tokenizer.vocab_size} tokens, more than the model's "
            f"vocab_size {model.config.vocab_size}"
        )
    if adapter is not None:
        from gpt2lab.interop.peft import attach_adapter

        tokenizer = attach_adapter(model, tokenizer, adapter)
    if quantize == "int8":
        from gpt2lab.decoder import quantize_int8

        model = quantize_int8(model)
    elif quantize != "none":
        raise UserError(f"quantize must be none or int8, got {quantize!r}")
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
        cfg.ckpt,
        cfg.pretrained,
        gpt2_vocab=cfg.gpt2_vocab,
        device=cfg.device,
        dtype=cfg.dtype,
        quantize=cfg.quantize,
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
