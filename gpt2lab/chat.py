"""`gpt2lab chat`: a multi-turn conversation in the terminal with a fine-tuned model (sft.py's template).

Each user line is added to the conversation, the whole conversation is rendered with the chat
template (sft.render_chat) and the reply streams until <|end|> or <|endoftext|>. When the
conversation no longer fits the context (with room for a reply), the oldest turns are dropped; a
system message stays. Commands: /reset starts over, /quit (or end of input) leaves.
"""

from __future__ import annotations

import sys
import warnings
from typing import Any, TextIO

from gpt2lab.config import ChatConfig
from gpt2lab.errors import UserError


def load_chat_model(cfg: ChatConfig) -> tuple[Any, Any]:
    """(model in eval mode, tokenizer with the template's tokens) for --ckpt / --pretrained [--adapter]."""
    from gpt2lab import sft
    from gpt2lab.generate import load_for_sampling

    model, tok = load_for_sampling(
        cfg.ckpt,
        cfg.pretrained,
        gpt2_vocab=cfg.gpt2_vocab,
        device=cfg.device,
        dtype=cfg.dtype,
        adapter=cfg.adapter,
    )
    sft.chat_stop_ids(tok)  # a model without the template's tokens fails here, before any input is read
    return model, tok


def fit_context(
    tok: Any, messages: list[dict[str, str]], budget: int
) -> tuple[list[dict[str, str]], list[int]]:
    """Drop the oldest turns (never a leading system message, never the last message) until the rendered
    conversation plus its generation prompt is at most `budget` tokens; (messages kept, their ids)."""
    from gpt2lab.sft import render_chat

    messages = list(messages)
    first = 1 if messages and messages[0]["role"] == "system" else 0
    ids = render_chat(tok, messages)
    while len(ids) > budget and len(messages) - first > 1:
        del messages[first]
        ids = render_chat(tok, messages)
    return messages, ids


def run(cfg: ChatConfig, inp: TextIO | None = None, out: TextIO | None = None) -> None:
    """Read user lines from `inp`, write each streamed reply (one line) to `out`."""
    from gpt2lab.generate import Sampling, seeded_generator, stream_text
    from gpt2lab.sft import chat_stop_ids

    inp = sys.stdin if inp is None else inp
    out = sys.stdout if out is None else out
    sampling = Sampling(cfg.temperature, cfg.top_k, cfg.top_p, cfg.repetition_penalty)
    if cfg.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be positive, got {cfg.max_new_tokens}")
    model, tok = load_chat_model(cfg)
    block = model.config.block_size
    budget = max(block - min(cfg.max_new_tokens, block // 2), 1)  # room for a reply of up to half the context
    generator = seeded_generator(next(model.parameters()).device, cfg.seed)
    start = [{"role": "system", "content": cfg.system}] if cfg.system else []
    messages = list(start)
    interactive = inp.isatty()
    while True:
        if interactive:
            print("you> ", end="", file=sys.stderr, flush=True)
        line = inp.readline()
        if not line or line.strip() == "/quit":
            break
        text = line.rstrip("\n")
        if text.strip() == "/reset":
            messages = list(start)
            print("(new conversation)", file=sys.stderr, flush=True)
            continue
        if not text.strip():
            continue
        messages, ids = fit_context(tok, [*messages, {"role": "user", "content": text}], budget)
        pieces = []
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for piece in stream_text(
                model,
                ids,
                cfg.max_new_tokens,
                tok.decode_bytes,
                temperature=sampling.temperature,
                top_k=sampling.top_k,
                top_p=sampling.top_p,
                repetition_penalty=sampling.repetition_penalty,
                generator=generator,
                eot_id=tok.eot_id,
                stop_ids=chat_stop_ids(tok),  # <|end|> closes a reply; <|endoftext|> too
                vocab_size=tok.vocab_size,
            ):
                pieces.append(piece)
                out.write(piece)
                out.flush()
        out.write("\n")
        out.flush()
        for w in caught:
            print(f"gpt2lab chat: warning: {w.message}", file=sys.stderr)
        messages.append({"role": "assistant", "content": "".join(pieces)})
