"""Supervised fine-tuning data: jsonl records -> token ids + loss mask, the chat template, a batch loader.

Records (one JSON object per line):
    {"prompt": "add 2 3 =", "completion": " 5"}            ids: EOT prompt completion EOT
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}

The chat template (render_chat) uses four special tokens added to the vocabulary:
    EOT <|system|> ... <|end|> <|user|> ... <|end|> <|assistant|> ... <|end|> ...
Only what the model should learn to write counts in the loss: the completion and its closing EOT, or
each assistant message's content and its <|end|>. The prompt, the user and system turns and the
role tokens are context (target = IGNORE_INDEX).

Batches: padding, not packing. Each row is one example, right-padded to the longest in its batch, pad
targets ignored; causal attention never lets a right pad reach the tokens before it, so documents
never see each other and need no block-diagonal mask. Examples longer than the context are cut
(keeping their start) with a warning that counts them; one left with no counted token is dropped.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gpt2lab.config import pad_vocab_size
from gpt2lab.errors import UserError
from gpt2lab.model import GPT, IGNORE_INDEX
from gpt2lab.tokenizer import AddedTokens, Tokenizer

SYSTEM, USER, ASSISTANT, END = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
TEMPLATE_TOKENS = (SYSTEM, USER, ASSISTANT, END)
ROLES = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}

Example = tuple[list[int], list[bool]]  # token ids, and whether each token is a counted target


# --- the vocabulary -----------------------------------------------------------------------------


def add_template_tokens(
    model: GPT, tok: Tokenizer, pad_multiple: int = 64
) -> tuple[Tokenizer, dict[str, int]]:
    """Give the tokenizer and the model the chat template's tokens; (tokenizer, {token: id} added now).

    New ids follow the tokenizer's vocabulary. They take the model's spare (padding) rows when it has
    enough (GPT-2's 50304 rows for 50257 tokens); otherwise wte (and the tied lm_head) grow to
    pad_vocab_size(needed, pad_multiple) rows, and model.config.vocab_size with them. A new token's
    row starts at the mean of the real tokens' rows (Hewitt 2021: an average word, not noise, so
    its logit starts near the others' instead of dominating or vanishing).
    """
    missing = [t for t in TEMPLATE_TOKENS if t not in tok.special_tokens]
    for t in TEMPLATE_TOKENS:
        if t in tok.special_tokens and tok.special_tokens[t] >= model.config.vocab_size:
            raise UserError(
                f"template token {t} has id {tok.special_tokens[t]}, outside the model's vocabulary "
                f"of {model.config.vocab_size}"
            )
    if not missing:
        return tok, {}
    added = {t: tok.vocab_size + k for k, t in enumerate(missing)}
    need = tok.vocab_size + len(added)
    old_rows, n_real = model.config.vocab_size, tok.vocab_size
    wte = model.transformer.wte.weight
    with torch.no_grad():
        if old_rows < need:
            rows = pad_vocab_size(need, pad_multiple)
            new = torch.nn.Embedding(rows, wte.shape[1], device=wte.device, dtype=wte.dtype)
            new.weight[:old_rows] = wte
            new.weight[old_rows:] = wte[:n_real].mean(0)
            model.transformer.wte = new
            if model.config.tie_weights:
                model.lm_head = torch.nn.Linear(wte.shape[1], rows, bias=False, device=wte.device)
                model.lm_head.weight = new.weight
            else:
                head = model.lm_head.weight
                model.lm_head = torch.nn.Linear(
                    head.shape[1], rows, bias=False, device=head.device, dtype=head.dtype
                )
                model.lm_head.weight[:old_rows] = head
                model.lm_head.weight[old_rows:] = head[:n_real].mean(0)
            model.config.vocab_size = rows
        else:  # the padding rows were never a token: start them like a new one
            ids = list(added.values())
            wte[ids] = wte[:n_real].mean(0)
            if not model.config.tie_weights:
                model.lm_head.weight[ids] = model.lm_head.weight[:n_real].mean(0)
    return AddedTokens(tok, added), added


def template_id(tok: Tokenizer, token: str) -> int:
    """The id of a template token; UserError when the tokenizer does not have it."""
    try:
        return tok.special_tokens[token]
    except KeyError:
        raise UserError(
            f"tokenizer {tok.name!r} has no {token} token: the model was not fine-tuned with the chat "
            f"template (gpt2lab finetune adds it)"
        ) from None


def chat_stop_ids(tok: Tokenizer) -> list[int]:
    """Token ids that end an assistant reply: <|end|> and <|endoftext|>."""
    return [template_id(tok, END), tok.eot_id]


# --- rendering ------------------------------------------------------------------------------------


def _check_messages(messages: Any, where: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
    for k, m in enumerate(messages, 1):
        if not isinstance(m, dict):
            raise UserError(f"{where}: message {k} is not an object with 'role' and 'content'")
        for field in ("role", "content"):
            if field not in m:
                raise UserError(f"{where}: message {k} has no {field!r} field")
        if m["role"] not in ROLES:
            raise UserError(f"{where}: message {k} has role {m['role']!r}, not one of {list(ROLES)}")
        if not isinstance(m["content"], str):
            raise UserError(f"{where}: message {k}: 'content' must be text")


def render_messages(tok: Tokenizer, messages: Sequence[dict[str, str]], where: str = "messages") -> Example:
    """(ids, mask) of a conversation; mask marks each assistant message's content and its <|end|>."""
    _check_messages(messages, where)
    end = template_id(tok, END)
    ids, mask = [tok.eot_id], [False]
    for m in messages:
        content = tok.encode(m["content"])  # no special tokens from text: a user cannot forge a turn
        counted = m["role"] == "assistant"
        ids += [template_id(tok, ROLES[m["role"]]), *content, end]
        mask += [False] + [counted] * (len(content) + 1)
    return ids, mask


def render_chat(
    tok: Tokenizer, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True
) -> list[int]:
    """Token ids of a conversation in the chat template, ending with <|assistant|> when
    add_generation_prompt (the model then writes the reply and closes it with <|end|>)."""
    ids, _ = render_messages(tok, messages)
    return ids + [template_id(tok, ASSISTANT)] if add_generation_prompt else ids


def render_prompt(tok: Tokenizer, prompt: str) -> list[int]:
    """The ids a prompt/completion model continues: EOT + prompt (it answers, then writes EOT)."""
    return [tok.eot_id, *tok.encode(prompt)]


def render_example(tok: Tokenizer, record: dict[str, Any], where: str) -> Example:
    """(ids, mask) of one jsonl record, {"prompt", "completion"} or {"messages"}; UserError names `where`."""
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        ids, mask = render_messages(tok, record["messages"], where)
        if not any(mask):
            raise UserError(f"{where}: no assistant message, so nothing to learn")
        return ids, mask
    for field in ("prompt", "completion"):
        if field not in record:
            raise UserError(
                f"{where}: missing field {field!r} (a record has 'prompt' and 'completion', or 'messages')"
            )
        if not isinstance(record[field], str):
            raise UserError(f"{where}: {field!r} must be text, got {type(record[field]).__name__}")
    prompt, completion = render_prompt(tok, record["prompt"]), tok.encode(record["completion"])
    return prompt + completion + [tok.eot_id], [False] * len(prompt) + [True] * (len(completion) + 1)


def read_jsonl(path: str | Path) -> list[tuple[dict[str, Any], str]]:
    """The records of a jsonl file with their "file:line" (blank lines skipped); UserError on bad JSON."""
    from gpt2lab.sources import jsonl_records

    records = list(jsonl_records(path))
    if not records:
        raise UserError(f"{path}: no records (expected one JSON object per line)")
    return records


def load_examples(path: str | Path, tok: Tokenizer, max_len: int, verbose: bool = True) -> list[Example]:
    """Every record of a jsonl file rendered, cut to max_len tokens (context + 1); warns with counts."""
    examples, cut, dropped = [], 0, 0
    for record, where in read_jsonl(path):
        try:
            ids, mask = render_example(tok, record, where)
        except UserError as e:  # e.g. a character the tokenizer cannot encode: say where it is
            raise UserError(str(e) if str(e).startswith(where) else f"{where}: {e}") from None
        if len(ids) > max_len:
            cut += 1
            ids, mask = ids[:max_len], mask[:max_len]
        if not any(mask[1:]):  # the first token is never a target
            dropped += 1
            continue
        examples.append((ids, mask))
    if verbose and cut:
        print(
            f"warning: {path}: {cut} of {len(examples) + dropped} examples are longer than the context "
            f"({max_len} tokens) and were cut; {dropped} had no response left and were dropped",
            file=sys.stderr,
        )
    if not examples:
        raise UserError(f"{path}: no example has a response within the context of {max_len} tokens")
    return examples


def split_examples(
    examples: list[Example], fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """(train, val): a seeded random `fraction` of the examples held out for validation."""
    if fraction <= 0:
        return examples, []
    order = np.random.default_rng([seed, 7]).permutation(len(examples))
    n_val = max(1, round(fraction * len(examples)))
    if n_val >= len(examples):
        raise UserError(f"val_fraction {fraction} leaves no training example out of {len(examples)}")
    return [examples[i] for i in order[n_val:]], [examples[i] for i in order[:n_val]]


def collate(examples: Sequence[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x, y (B, L-1) for examples of up to L tokens: y is x shifted by one, IGNORE_INDEX where not counted."""
    L = max(len(ids) for ids, _ in examples)
    x = torch.full((len(examples), L - 1), pad_id, dtype=torch.long)
    y = torch.full((len(examples), L - 1), IGNORE_INDEX, dtype=torch.long)
    for b, (ids, mask) in enumerate(examples):
        t = torch.tensor(ids, dtype=torch.long)
        x[b, : len(ids) - 1] = t[:-1]
        y[b, : len(ids) - 1] = torch.where(torch.tensor(mask[1:]), t[1:], IGNORE_INDEX)
    return x, y


class SFTLoader:
    """next_batch() -> (x, y) padded example batches; state_dict() / load_state_dict() for exact resume.

    The same stream layout as ShardLoader's sequential mode: epochs of a (seed, epoch)-shuffled order
    form one stream of examples; micro-batch m of rank r at step k is block (k * streams + v) of B,
    v = m * world_size + r. So the data does not depend on how a global batch is split over processes.
    """

    def __init__(
        self,
        examples: list[Example],
        batch_size: int,
        pad_id: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 1337,
        device: str | torch.device = "cpu",
        grad_accum: int = 1,
    ):
        if not examples:
            raise UserError("no training examples")
        self.examples, self.B, self.pad_id = examples, batch_size, pad_id
        self.rank, self.world_size, self.grad_accum = rank, world_size, grad_accum
        self.streams, self.seed, self.device = world_size * grad_accum, seed, torch.device(device)
        self._epoch, self._perm = -1, np.empty(0, dtype=np.int64)
        self.step, self.micro = 0, 0

    def indices(self, step: int, micro: int = 0) -> list[int]:
        """The examples this rank reads at (step, micro-batch)."""
        n = len(self.examples)
        first = (step * self.streams + micro * self.world_size + self.rank) * self.B
        out = []
        for p in range(first, first + self.B):
            epoch, i = divmod(p, n)
            if epoch != self._epoch:
                self._epoch = epoch
                self._perm = np.random.default_rng([self.seed, epoch]).permutation(n)
            out.append(int(self._perm[i]))
        return out

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.indices(self.step, self.micro)
        self.step, self.micro = divmod(self.step * self.grad_accum + self.micro + 1, self.grad_accum)
        x, y = collate([self.examples[i] for i in idx], self.pad_id)
        return x.to(self.device), y.to(self.device)

    def state_dict(self) -> dict[str, Any]:
        stream = {"mode": "sft", "seed": self.seed, "batch_size": self.B, "examples": len(self.examples)}
        return {"step": self.step, "micro": self.micro, "streams": self.streams, **stream}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = self.state_dict()
        for key in ("mode", "seed", "batch_size", "examples", "streams"):
            if state.get(key) != mine[key]:
                raise UserError(f"loader state has {key} {state.get(key)!r}, this loader has {mine[key]!r}")
        self.step, self.micro = int(state["step"]), int(state["micro"])


def eval_batches(
    examples: list[Example], batch_size: int, pad_id: int, rank: int = 0, world_size: int = 1
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Every example once, in order: rank r takes examples r, r + W, ...; batches of similar length."""
    mine = sorted(examples[rank::world_size], key=lambda e: len(e[0]))
    for b in range(0, len(mine), batch_size):
        yield collate(mine[b : b + batch_size], pad_id)
