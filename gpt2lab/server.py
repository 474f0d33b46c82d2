"""Serving: an OpenAI-compatible completions API with continuous batching, and the web playground.

Two halves, one thread each:
- The engine (`Engine`, no HTTP) owns the model on one background thread. Its loop admits waiting
  jobs (a prompt and its n samples: one prefill, copied into n rows of the batch cache), then runs
  one batched decode forward for every active row, samples each row with its own generator, hands
  the text to each job's consumer, and drops finished or cancelled rows. A finished row leaves the
  batch and a waiting job joins it at the next step (continuous batching).
- The HTTP layer (`create_app`, FastAPI under uvicorn) checks requests, tokenizes, submits jobs,
  and turns the engine's events into OpenAI `text_completion` objects or server-sent events.

The batch cache (`RowCache`) keeps every row's sequence at slots [0, length) of its own row, so a
row's positions are its own and rows never move except to keep the active ones at the front when
one leaves. fastapi and uvicorn are imported inside functions: `import gpt2lab` stays light.
"""

import asyncio
import contextlib
import hashlib
import hmac
import ipaddress
import json
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from gpt2lab.config import GPTConfig, ServeConfig
from gpt2lab.errors import UserError
from gpt2lab.generate import KVCache, Sampling, TextDecoder, seeded_generator

INSTALL_HINT = 'gpt2lab serve needs FastAPI and uvicorn: pip install -e ".[serve]"'

# --- the batch cache and one decode step --------------------------------------------------------


class RowCache:
    """Keys and values of up to `rows` independent sequences: k, v (n_layer, rows, nh, max_len, hs).

    Row b holds its sequence at slots [0, lengths[b]). A decode step (`bind`, then the model's blocks
    call `update`) writes each row's new token at its own slot lengths[b] and returns the keys and
    values of slots [0, span) with span = max(lengths) + 1; the step's mask hides each row's slots
    beyond its own length (left over from an earlier occupant of the row).
    """

    def __init__(self, config: GPTConfig, rows: int, device: torch.device, dtype: torch.dtype):
        shape = (config.n_layer, rows, config.n_head, config.block_size, config.head_size)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self._rows = self._lengths = torch.zeros(0, dtype=torch.long)
        self._span = 0

    def bind(self, lengths: torch.Tensor) -> None:
        """Prepare a decode step of rows 0..n-1 whose cached lengths are lengths (n,)."""
        self._rows = torch.arange(lengths.numel(), device=lengths.device)
        self._lengths = lengths
        self._span = int(lengths.max()) + 1

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (n, nh, 1, hs) at each row's own slot; return slots [0, span) (n, nh, span, hs)."""
        n = k.size(0)
        self.k[layer][self._rows, :, self._lengths] = k[:, :, 0]  # (n, nh, hs) into each row's own slot
        self.v[layer][self._rows, :, self._lengths] = v[:, :, 0]
        return self.k[layer, :n, :, : self._span], self.v[layer, :n, :, : self._span]

    def load(self, row: int, count: int, prefill: KVCache, length: int) -> None:
        """Copy the first `length` slots of a one-row prefill cache into rows [row, row + count)."""
        self.k[:, row : row + count, :, :length] = prefill.k[:, :1, :, :length]
        self.v[:, row : row + count, :, :length] = prefill.v[:, :1, :, :length]

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy row src's first `length` slots into row dst."""
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]


def decode_rows(model: Any, idx: torch.Tensor, cache: RowCache, lengths: torch.Tensor) -> torch.Tensor:
    """One decode step of independent rows: idx (n, 1), row b at position lengths[b] -> logits (n, V).

    GPT.forward's computation with per-row positions (as generate.static_decode): the embeddings, the
    blocks with a (n, 1, 1, span) mask over each row's own cached slots, the final norm and head.
    """
    tr = model.transformer
    cache.bind(lengths)
    pos = lengths[:, None]  # (n, 1)
    mask = torch.arange(cache._span, device=idx.device)[None, :] <= pos  # (n, span)
    x = model.embed(idx, pos)  # (n, 1, C)
    for block in tr.h:
        x = block(x, mask[:, None, None, :], cache, pos)  # mask (n, 1, 1, span)
    return model.logits(x)[:, -1]  # (n, V)


# --- the engine ---------------------------------------------------------------------------------


class QueueFull(Exception):
    """The engine's queue of waiting sequences is full (HTTP 503 + Retry-After)."""


@dataclass
class Event:
    """Something that happened to one choice: new text, and at its end finish ("stop", "length",
    "error": then text is the error message) with the number of tokens it generated."""

    choice: int
    text: str
    finish: str | None = None
    tokens: int = 0
    status: int = 500  # the HTTP status of an "error"


@dataclass(eq=False)  # compared and hashed by identity: a job is one request's, never equal to another
class Job:
    """One prompt to complete n times. The engine calls deliver(events) from its thread.

    prompt: token ids (non-empty, len(prompt) + max_tokens <= block_size). stop_ids: tokens that end a
    sample (finish "stop", not shown), e.g. the tokenizer's EOT; stop: strings that end it likewise.
    seeds: one per sample (None: a random seed). first_choice: the index of sample 0 in the response.
    Setting `cancelled` (any thread) frees the job's rows at the engine's next step.
    """

    prompt: list[int]
    max_tokens: int
    sampling: Sampling
    deliver: Callable[[list[Event]], None]
    n: int = 1
    seeds: Sequence[int | None] = (None,)
    stop_ids: frozenset[int] = frozenset()
    stop: Sequence[str] = ()
    first_choice: int = 0
    deadline: float = float("inf")  # time.monotonic() at which it ends (finish "length")
    cancelled: bool = False


@dataclass
class _Row:
    job: Job
    choice: int
    length: int  # tokens in the cache
    generator: torch.Generator
    text: TextDecoder
    counts: torch.Tensor | None  # (V,) occurrences of each token so far, for the frequency penalty
    generated: int = 0
    last: int = 0  # the newest token: fed to the model at the next step
    finish: str | None = None


def choose_rows(logits: torch.Tensor, rows: Sequence[_Row]) -> list[int]:
    """The next token of every row from logits (n, V), each with its own request's Sampling.

    Rows with the same settings are sampled together (Sampling.choose over the group, one draw per
    row from its own generator). Rows already finished get a placeholder 0.
    """
    out = [0] * len(rows)
    groups: dict[Sampling, list[int]] = {}
    for i, row in enumerate(rows):
        if row.finish is None:
            groups.setdefault(row.job.sampling, []).append(i)
    for sampling, idx in groups.items():
        counts = torch.stack([rows[i].counts for i in idx]) if sampling.penalised else None  # type: ignore[misc]
        tokens = sampling.choose(logits[idx].float(), counts, [rows[i].generator for i in idx])
        for i, t in zip(idx, tokens.tolist(), strict=True):
            out[i] = t
    return out


def choice_seed(seed: int, choice: int) -> int:
    """The seed of choice `choice` of a request seeded `seed`: independent streams per choice, and
    choice 0 of n samples is the same text as the request with n = 1."""
    digest = hashlib.blake2b(f"{seed}:{choice}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # torch seeds are below 2**64; keep one bit spare


class Engine:
    """Continuous batching on one background thread; see the module docstring.

    vocab_size: sample only ids below it (the tokenizer's, when the model's vocab is padded).
    decode_bytes: the tokenizer's ids -> bytes, for whole-character text and stop strings.
    """

    def __init__(
        self,
        model: Any,
        decode_bytes: Callable[[list[int]], bytes],
        vocab_size: int,
        max_batch_size: int = 16,
        max_queue: int = 64,
    ):
        self.model = model.eval()
        self.decode_bytes = decode_bytes
        self.vocab_size = min(vocab_size, model.config.vocab_size)
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.cache = RowCache(model.config, max_batch_size, self.device, self.dtype)
        self._cond = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._active = 0  # rows in the batch; written by the engine thread under _cond
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.steps = 0  # decode forwards run (for tests and logs)

    # --- any thread

    @property
    def active(self) -> int:
        """Rows (sequences) in the batch now."""
        with self._cond:
            return self._active

    @property
    def waiting(self) -> int:
        """Rows waiting for a batch slot."""
        with self._cond:
            return sum(job.n for job in self._waiting)

    def submit(self, jobs: Sequence[Job]) -> None:
        """Queue jobs (all or none); raises QueueFull when more than max_queue rows would wait."""
        with self._cond:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            free = self.max_batch_size - self._active
            waiting = sum(job.n for job in self._waiting) + sum(job.n for job in jobs)
            if waiting - free > self.max_queue:
                raise QueueFull(
                    f"the queue is full ({self.max_queue} sequences waiting for {self.max_batch_size} slots)"
                )
            self._waiting.extend(jobs)
            self._cond.notify()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="gpt2lab-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()

    def wake(self) -> None:
        """Let an idle engine notice a cancelled waiting job now."""
        with self._cond:
            self._cond.notify()

    # --- the engine thread

    def _loop(self) -> None:
        rows: list[_Row] = []
        logits = torch.zeros(0, self.vocab_size, device=self.device)  # (len(rows), V): next-token logits
        while True:
            with self._cond:
                while not rows and not self._waiting and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    break
                admitted = self._admit(len(rows))
            try:
                with torch.inference_mode():
                    for job in admitted:
                        logits = torch.cat([logits, self._prefill(job, rows)])
                    if rows:
                        logits = self._step(rows, logits)
            except Exception as e:
                # a failed forward (out of memory, ...) ends the requests in it, not the server
                msg = f"generation failed: {type(e).__name__}: {e}"
                for job in dict.fromkeys([r.job for r in rows] + admitted):
                    job.deliver([Event(job.first_choice, msg, "error")])
                rows.clear()
                logits = logits[:0]
            with self._cond:
                self._active = len(rows)
        for job in dict.fromkeys([r.job for r in rows] + list(self._waiting)):
            job.deliver([Event(job.first_choice, "the server is shutting down", "error", status=503)])

    def _admit(self, used: int) -> list[Job]:
        """Pop the waiting jobs (in order) that fit in the free rows; drop cancelled or expired ones."""
        admitted, now = [], time.monotonic()
        while self._waiting:
            job = self._waiting[0]
            if job.cancelled:
                self._waiting.popleft()
                continue
            if now >= job.deadline:
                self._waiting.popleft()
                job.deliver(
                    [Event(job.first_choice, "timed out waiting for a free batch slot", "error", status=503)]
                )
                continue
            if used + job.n > self.max_batch_size:
                break  # first come, first served: a job needing n rows is not overtaken
            admitted.append(self._waiting.popleft())
            used += job.n
        self._active = used
        return admitted

    def _prefill(self, job: Job, rows: list[_Row]) -> torch.Tensor:
        """Run the job's prompt once, copy its keys and values into n new rows -> their logits (n, V)."""
        cfg = self.model.config
        L = len(job.prompt)
        one = KVCache(cfg, 1, L, device=self.device, dtype=self.dtype)
        ids = torch.tensor([job.prompt], dtype=torch.long, device=self.device)
        out = self.model(ids, kv_cache=one, last_only=True)[:, -1, : self.vocab_size].float()  # (1, V)
        self.cache.load(len(rows), job.n, one, L)
        counts = None
        if job.sampling.penalised:
            counts = torch.zeros(self.vocab_size, device=self.device)
            counts.scatter_add_(0, ids[0], torch.ones(L, device=self.device))
        for s in range(job.n):
            g = seeded_generator(self.device, job.seeds[s] if s < len(job.seeds) else None)
            text = TextDecoder(self.decode_bytes, job.stop)
            c = None if counts is None else counts.clone()
            rows.append(_Row(job, job.first_choice + s, L, g, text, c))
        return out.expand(job.n, -1)

    def _step(self, rows: list[_Row], logits: torch.Tensor) -> torch.Tensor:
        """Sample every row, deliver its text, drop the finished rows, decode the rest -> logits."""
        now = time.monotonic()
        events: dict[Job, list[Event]] = {}
        for row in rows:
            if row.job.cancelled:
                row.finish = "cancelled"
        chosen = choose_rows(logits, rows)
        for row, token in zip(rows, chosen, strict=True):
            job = row.job
            if row.finish is not None:
                continue
            row.generated += 1
            if row.counts is not None:
                row.counts[token] += 1
            piece = ""
            if token in job.stop_ids:
                row.finish = "stop"
            else:
                piece = row.text.push(token)
                if row.text.stopped:
                    row.finish = "stop"
                elif row.generated >= job.max_tokens or now >= job.deadline:
                    row.finish = "length"
            if row.finish is not None:
                piece += row.text.flush()
            row.last = token
            if piece or row.finish is not None:
                ev = Event(row.choice, piece, row.finish, row.generated if row.finish else 0)
                events.setdefault(job, []).append(ev)
        for job, evs in events.items():
            job.deliver(evs)
        # leave the batch: the last active row moves into each hole, so rows 0..n-1 stay the active ones
        for i in reversed(range(len(rows))):
            if rows[i].finish is None:
                continue
            last = len(rows) - 1
            if i != last:
                self.cache.move(last, i, rows[last].length)
                rows[i] = rows[last]
            rows.pop()
        if not rows:
            return logits[:0]
        idx = torch.tensor([[r.last] for r in rows], dtype=torch.long, device=self.device)  # (n, 1)
        lengths = torch.tensor([r.length for r in rows], dtype=torch.long, device=self.device)  # (n,)
        out = decode_rows(self.model, idx, self.cache, lengths)[:, : self.vocab_size].float()  # (n, V)
        for r in rows:
            r.length += 1
        self.steps += 1
        return out


# --- OpenAI-style errors ------------------------------------------------------------------------


class APIError(Exception):
    """An error answered as OpenAI does: HTTP status + {"error": {message, type, param, code}}."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


# --- request parsing ----------------------------------------------------------------------------


@dataclass
class Completion:
    """A checked /v1/completions request."""

    prompts: list[list[int]]
    max_tokens: int
    sampling: Sampling
    n: int
    stop: list[str]
    seed: int | None
    stream: bool
    include_usage: bool


KNOWN_FIELDS = {
    "model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "n", "stop", "seed", "stream",
    "stream_options", "frequency_penalty", "presence_penalty", "echo", "logprobs", "best_of", "suffix",
    "user", "logit_bias",
}  # fmt: skip
MAX_STOP = 4  # OpenAI's limit on stop sequences
DISCONNECT_POLL_S = 0.5  # how often a waiting non-streamed request checks that its client is still there


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x and abs(x) != float("inf")


def _number(body: dict[str, Any], name: str, default: float, lo: float, hi: float) -> float:
    x = body.get(name)
    if x is None:
        return default
    if not _is_num(x):
        raise _bad(f"{name} must be a number, got {json.dumps(x)}", name)
    if not lo <= x <= hi:
        raise _bad(f"{name} must be between {lo:g} and {hi:g}, got {x:g}", name)
    return float(x)


def _integer(body: dict[str, Any], name: str, default: int, lo: int, hi: int) -> int:
    x = body.get(name)
    if x is None:
        return default
    if not _is_int(x):
        raise _bad(f"{name} must be an integer, got {json.dumps(x)}", name)
    if not lo <= x <= hi:
        raise _bad(f"{name} must be between {lo} and {hi}, got {x}", name)
    return x


def parse_completion(
    body: Any, cfg: ServeConfig, model_name: str, tokenizer: Any, block_size: int
) -> Completion:
    """Check a /v1/completions body (parsed JSON) against the server's limits; APIError names the field."""
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    unknown = sorted(set(body) - KNOWN_FIELDS)
    if unknown:
        raise _bad(f"Unrecognized request argument supplied: {unknown[0]}", unknown[0])
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _bad(f"model must be a string, got {json.dumps(model)}", "model")
    if model is not None and model != model_name:
        raise APIError(
            404,
            f"The model `{model}` does not exist; this server has `{model_name}`",
            param="model",
            code="model_not_found",
        )
    for name, allowed in (("echo", (None, False)), ("logprobs", (None,)), ("suffix", (None,))):
        if body.get(name) not in allowed:
            raise _bad(f"{name} is not supported by this server", name, "unsupported_parameter")
    if body.get("best_of") not in (None, 1):
        raise _bad("best_of is not supported by this server (only 1)", "best_of", "unsupported_parameter")
    if body.get("logit_bias") not in (None, {}):
        raise _bad("logit_bias is not supported by this server", "logit_bias", "unsupported_parameter")
    if _number(body, "presence_penalty", 0.0, -2.0, 2.0) != 0.0:
        raise _bad(
            "presence_penalty is not supported by this server (only 0)",
            "presence_penalty",
            "unsupported_parameter",
        )
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise _bad("user must be a string", "user")

    prompts = _parse_prompts(body, cfg, tokenizer)
    max_tokens = _integer(body, "max_tokens", 16, 1, cfg.max_tokens)  # 16: OpenAI's default for completions
    longest = max(len(p) for p in prompts)
    if longest + max_tokens > block_size:
        raise _bad(
            f"This model's maximum context length is {block_size} tokens, however you requested "
            f"{longest + max_tokens} tokens ({longest} in your prompt; {max_tokens} for the completion). "
            f"Please reduce your prompt; or completion length.",
            "prompt" if longest >= block_size else "max_tokens",
            "context_length_exceeded",
        )
    n = _integer(body, "n", 1, 1, cfg.max_n)
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)  # OpenAI's range
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0:
        raise _bad("top_p must be greater than 0", "top_p")
    top_k = body.get("top_k")
    if top_k is not None and not _is_int(top_k):
        raise _bad(f"top_k must be an integer, got {json.dumps(top_k)}", "top_k")
    if top_k is not None and top_k < -1:
        raise _bad(f"top_k must be >= 1, or 0 / -1 for no limit, got {top_k}", "top_k")
    top_k = top_k if top_k is not None and top_k > 0 else None  # 0 and -1 (vLLM's) mean no limit
    frequency_penalty = _number(body, "frequency_penalty", 0.0, -2.0, 2.0)
    sampling = Sampling(temperature, top_k, top_p if top_p < 1 else None, 1.0, frequency_penalty)
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise _bad("stop must be a string or a list of strings", "stop")
    if len(stop) > MAX_STOP:
        raise _bad(f"stop may have at most {MAX_STOP} sequences, got {len(stop)}", "stop")
    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        raise _bad(f"seed must be an integer, got {json.dumps(seed)}", "seed")
    if seed is not None and not -(2**63) <= seed < 2**63:
        raise _bad("seed must fit in 64 bits", "seed")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _bad(f"stream must be a boolean, got {json.dumps(stream)}", "stream")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise _bad("stream_options is only allowed when stream is true", "stream_options")
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise _bad("stream_options must be an object with include_usage", "stream_options")
        include_usage = options.get("include_usage", False)
        if not isinstance(include_usage, bool):
            raise _bad("stream_options.include_usage must be a boolean", "stream_options")
    return Completion(prompts, max_tokens, sampling, n, stop, seed, stream, include_usage)


def _parse_prompts(body: dict[str, Any], cfg: ServeConfig, tokenizer: Any) -> list[list[int]]:
    """prompt: a string, a list of strings, a list of token ids, or a list of lists of ids."""
    if "prompt" not in body or body["prompt"] is None:
        raise _bad("you must provide a prompt", "prompt")
    p = body["prompt"]
    if isinstance(p, str) or (isinstance(p, list) and p and all(_is_int(t) for t in p)):
        items = [p]
    elif isinstance(p, list) and p and all(isinstance(x, (str, list)) for x in p):
        items = p
    else:
        raise _bad(
            "prompt must be a string, a list of strings, a list of token ids or a list of such lists",
            "prompt",
        )
    if len(items) > cfg.max_prompts:
        raise _bad(f"at most {cfg.max_prompts} prompts per request, got {len(items)}", "prompt")
    prompts = []
    for item in items:
        if isinstance(item, str):
            ids = tokenizer.encode(item)  # special-token text stays plain text, as OpenAI's API does
        elif all(_is_int(t) for t in item):
            bad = [t for t in item if not 0 <= t < tokenizer.vocab_size]
            if bad:
                raise _bad(
                    f"prompt token id {bad[0]} is outside the vocabulary [0, {tokenizer.vocab_size})",
                    "prompt",
                )
            ids = list(item)
        else:
            raise _bad("a prompt list must hold only strings or only lists of token ids", "prompt")
        if not ids:  # as generate.py: an empty prompt starts a new document
            ids = [tokenizer.eot_id]
        limit = cfg.max_prompt_tokens
        if limit is not None and len(ids) > limit:
            raise _bad(
                f"the prompt has {len(ids)} tokens; this server allows at most {limit}",
                "prompt",
                "context_length_exceeded",
            )
        prompts.append(ids)
    return prompts


CHAT_ONLY_FIELDS = {"messages", "max_completion_tokens", "top_logprobs", "response_format"}
CHAT_FIELDS = (KNOWN_FIELDS - {"prompt", "echo", "best_of", "suffix"}) | CHAT_ONLY_FIELDS


def chat_messages(body: dict[str, Any]) -> list[dict[str, str]]:
    """OpenAI's messages, normalised for sft.render_chat: content given as a list of text parts is
    joined, and the "developer" role (OpenAI's newer name for system) is the system role."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages must be a non-empty list of {role, content} objects", "messages")
    out = []
    for k, m in enumerate(messages):
        if not isinstance(m, dict):
            raise _bad(f"messages[{k}] must be an object with role and content", f"messages[{k}]")
        content = m.get("content")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise _bad(f"messages[{k}].content: only text parts are supported", f"messages[{k}]")
            content = "".join(str(p.get("text", "")) for p in content)
        role = "system" if m.get("role") == "developer" else m.get("role")
        out.append({**m, "role": role, "content": content})
    return out


def parse_chat(body: Any, cfg: ServeConfig, model_name: str, tokenizer: Any, block_size: int) -> Completion:
    """Check a /v1/chat/completions body: the messages rendered in the chat template (sft.py) become
    the prompt, then the fields it shares with /v1/completions are checked as there."""
    from gpt2lab import sft

    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    unknown = sorted(set(body) - CHAT_FIELDS)
    if unknown:
        raise _bad(f"Unrecognized request argument supplied: {unknown[0]}", unknown[0])
    if body.get("logprobs") not in (None, False) or body.get("top_logprobs") is not None:
        raise _bad("logprobs are not supported by this server", "logprobs", "unsupported_parameter")
    if body.get("response_format") not in (None, {"type": "text"}):
        raise _bad("only text responses are supported", "response_format", "unsupported_parameter")
    try:
        ids = sft.render_chat(tokenizer, chat_messages(body))
    except UserError as e:  # a malformed message, or a model without the chat template's tokens
        raise _bad(str(e), "messages") from None
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is None:  # OpenAI's chat default: as much as the context leaves (within our limit)
        max_tokens = max(1, min(cfg.max_tokens, block_size - len(ids)))
    rest = {k: v for k, v in body.items() if k not in CHAT_ONLY_FIELDS and k != "logprobs"}
    return parse_completion(
        {**rest, "prompt": ids, "max_tokens": max_tokens}, cfg, model_name, tokenizer, block_size
    )


# --- the app ------------------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def model_name_for(cfg: ServeConfig) -> str:
    if cfg.model_name:
        return cfg.model_name
    source = cfg.ckpt if cfg.ckpt is not None else cfg.pretrained
    return Path(source).resolve().name if Path(source).exists() else str(source)


def load(cfg: ServeConfig) -> tuple[Any, Any]:
    """(model in eval mode, tokenizer) for --ckpt or --pretrained, with --adapter put onto it."""
    from gpt2lab.generate import load_for_sampling

    return load_for_sampling(
        cfg.ckpt,
        cfg.pretrained,
        gpt2_vocab=cfg.gpt2_vocab,
        device=cfg.device,
        dtype=cfg.dtype,
        adapter=cfg.adapter,
    )


def _static_page() -> str:
    return resources.files("gpt2lab").joinpath("static/playground.html").read_text(encoding="utf-8")


def create_app(cfg: ServeConfig, model: Any = None, tokenizer: Any = None, api_key: str | None = None) -> Any:
    """The FastAPI app; loads the model unless given. app.state.engine is the running Engine."""
    try:
        from fastapi import FastAPI, Request
        from fastapi.exceptions import RequestValidationError
        from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
        from starlette.exceptions import HTTPException
    except ImportError:
        raise UserError(INSTALL_HINT) from None

    if model is None:
        model, tokenizer = load(cfg)
    name = model_name_for(cfg)
    block_size = model.config.block_size
    engine = Engine(model, tokenizer.decode_bytes, tokenizer.vocab_size, cfg.max_batch_size, cfg.max_queue)
    key = api_key if api_key is not None else cfg.api_key
    card = _model_card(name, int(time.time()), block_size, min(cfg.max_tokens, block_size - 1))
    page = _static_page()
    streams = {"open": 0}  # concurrent streaming responses (touched only on the event loop)

    @contextlib.asynccontextmanager
    async def lifespan(app: Any):  # type: ignore[no-untyped-def]
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="gpt2lab", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine

    def error_response(e: APIError) -> Any:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> Any:
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError) -> Any:  # FastAPI's 422 -> 400
        first = e.errors()[0] if e.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return error_response(_bad(f"invalid request: {first.get('msg', 'bad input')}", param))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, e: HTTPException) -> Any:
        kinds = {
            404: ("not_found_error", "unknown_url"),
            405: ("invalid_request_error", "method_not_allowed"),
        }
        kind, code = kinds.get(e.status_code, ("invalid_request_error", None))
        msg = (
            f"Unknown request URL: {request.method} {request.url.path}" if e.status_code == 404 else e.detail
        )
        return error_response(APIError(e.status_code, str(msg), kind, code=code))

    def authorize(request: Request) -> None:
        if key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise APIError(
                401, "You didn't provide an API key (Authorization: Bearer KEY)", code="invalid_api_key"
            )
        if not hmac.compare_digest(given.strip().encode(), key.encode()):
            raise APIError(401, "Incorrect API key provided", code="invalid_api_key")

    async def read_json(request: Request) -> Any:
        too_big = APIError(
            413, f"the request body exceeds {cfg.max_body_bytes} bytes", code="request_too_large"
        )
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > cfg.max_body_bytes:
            raise too_big
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > cfg.max_body_bytes:
                raise too_big
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise _bad(f"We could not parse the JSON body of your request: {e}") from None

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": name, "active": engine.active, "waiting": engine.waiting}

    @app.get("/", response_class=HTMLResponse)
    async def playground() -> Any:
        return HTMLResponse(page)

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        authorize(request)
        return {
            "object": "list",
            "data": [card],
        }

    @app.get("/v1/models/{model_id}")
    async def model_card(model_id: str, request: Request) -> dict[str, Any]:
        authorize(request)
        if model_id != name:
            raise APIError(
                404, f"The model `{model_id}` does not exist", param="model", code="model_not_found"
            )
        return card

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        authorize(request)
        req = parse_completion(await read_json(request), cfg, name, tokenizer, block_size)
        return await respond(request, req, frozenset([tokenizer.eot_id]), chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        authorize(request)
        req = parse_chat(await read_json(request), cfg, name, tokenizer, block_size)
        from gpt2lab.sft import chat_stop_ids

        return await respond(request, req, frozenset(chat_stop_ids(tokenizer)), chat=True)

    async def respond(request: Request, req: Completion, stop_ids: frozenset[int], chat: bool) -> Any:
        """Run a checked request through the engine; answer in /v1/completions' or the chat format."""
        if req.stream and streams["open"] >= cfg.max_streams:
            raise APIError(
                429,
                f"too many concurrent streams (limit {cfg.max_streams})",
                "rate_limit_error",
                code="rate_limit_exceeded",
                headers={"Retry-After": "1"},
            )
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[list[Event]] = asyncio.Queue()

        def deliver(events: list[Event]) -> None:  # engine thread -> event loop
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody is listening any more
                loop.call_soon_threadsafe(queue.put_nowait, events)

        total = len(req.prompts) * req.n  # sequences (choices) this request decodes
        if total > cfg.max_batch_size + cfg.max_queue:  # would be refused however long the client waits
            raise _bad(
                f"this request needs {total} sequences ({len(req.prompts)} prompts x n {req.n}); the server "
                f"holds at most {cfg.max_batch_size + cfg.max_queue} (batch + queue)",
                "n",
            )
        deadline = time.monotonic() + cfg.request_timeout_s
        jobs = []
        for p, ids in enumerate(req.prompts):
            first = p * req.n
            seeds = [None if req.seed is None else choice_seed(req.seed, first + s) for s in range(req.n)]
            jobs.append(
                Job(
                    ids,
                    req.max_tokens,
                    req.sampling,
                    deliver,
                    req.n,
                    seeds,
                    stop_ids,
                    req.stop,
                    first,
                    deadline,
                )
            )
        try:
            engine.submit(jobs)
        except QueueFull as e:
            raise APIError(
                503,
                f"The server is overloaded: {e}; retry shortly",
                "server_error",
                code="overloaded",
                headers={"Retry-After": "1"},
            ) from None
        rid, now = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", int(time.time())
        kind = "chat.completion" if chat else "text_completion"
        prompt_tokens = sum(len(p) for p in req.prompts)

        def cancel() -> None:
            for job in jobs:
                job.cancelled = True
            engine.wake()

        def chunk(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> str:
            obj: dict[str, Any] = {
                "id": rid,
                "object": kind + ".chunk" if chat else kind,
                "created": now,
                "model": name,
                "choices": choices,
            }
            if usage is not None:
                obj["usage"] = usage
            return f"data: {json.dumps(obj)}\n\n"

        def usage(completion: int) -> dict[str, int]:
            return {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion,
                "total_tokens": prompt_tokens + completion,
            }

        if req.stream:

            async def sse() -> Any:
                streams["open"] += 1
                done, completion, started = 0, 0, set()
                try:
                    while done < total:
                        for ev in await queue.get():
                            if ev.finish == "error":
                                err = APIError(ev.status, ev.text, "server_error")
                                yield f"data: {json.dumps(err.body())}\n\n"
                                return
                            choice: dict[str, Any] = {"index": ev.choice, "logprobs": None}
                            if chat:  # OpenAI's deltas: the role comes once, in a choice's first chunk
                                delta = {"content": ev.text} if ev.text or ev.choice not in started else {}
                                if ev.choice not in started:
                                    delta, started = {"role": "assistant", **delta}, started | {ev.choice}
                                choice["delta"] = delta
                            else:
                                choice["text"] = ev.text
                            yield chunk([{**choice, "finish_reason": ev.finish}])
                            if ev.finish is not None:
                                done += 1
                                completion += ev.tokens
                    if req.include_usage:
                        yield chunk([], usage(completion))
                    yield "data: [DONE]\n\n"
                finally:  # also when the client disconnects: the engine frees the rows at its next step
                    streams["open"] -= 1
                    cancel()

            return StreamingResponse(
                sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )

        texts, finishes, tokens = [""] * total, [None] * total, [0] * total
        done, check = 0, time.monotonic() + DISCONNECT_POLL_S
        try:
            while done < total:
                try:
                    wait = max(0.01, check - time.monotonic())
                    events = await asyncio.wait_for(queue.get(), timeout=wait)
                except asyncio.TimeoutError:
                    events = []
                if time.monotonic() >= check:  # on a clock, not when idle: text arrives every step
                    if await request.is_disconnected():
                        return None
                    check = time.monotonic() + DISCONNECT_POLL_S
                for ev in events:
                    if ev.finish == "error":
                        retry = {"Retry-After": "1"} if ev.status == 503 else None
                        raise APIError(ev.status, ev.text, "server_error", headers=retry)
                    texts[ev.choice] += ev.text
                    if ev.finish is not None:
                        finishes[ev.choice], tokens[ev.choice] = ev.finish, ev.tokens
                        done += 1
        finally:
            cancel()  # a no-op when every row has finished
        choices = [
            {
                "index": i,
                **({"message": {"role": "assistant", "content": t}} if chat else {"text": t}),
                "logprobs": None,
                "finish_reason": f,
            }
            for i, (t, f) in enumerate(zip(texts, finishes, strict=True))
        ]
        return {
            "id": rid,
            "object": kind,
            "created": now,
            "model": name,
            "choices": choices,
            "usage": usage(sum(tokens)),
        }

    return app


def _model_card(name: str, created: int, context: int, max_tokens: int) -> dict[str, Any]:
    """OpenAI's model object, plus the context length and the max_tokens limit (for the playground)."""
    return {
        "id": name,
        "object": "model",
        "created": created,
        "owned_by": "gpt2lab",
        "context_length": context,
        "max_tokens": max_tokens,
    }


def check_bind(host: str, api_key: str | None) -> None:
    """Refuse to listen beyond this machine without an API key."""
    if not is_loopback(host) and api_key is None:
        raise UserError(
            f"--host {host} is reachable from other machines: give --api-key KEY (or set GPT2LAB_API_KEY)"
        )


def run(cfg: ServeConfig) -> None:
    """`gpt2lab serve`: load the model and serve it until interrupted."""
    key = cfg.api_key if cfg.api_key is not None else (os.environ.get("GPT2LAB_API_KEY") or None)
    check_bind(cfg.host, key)
    try:
        import uvicorn
    except ImportError:
        raise UserError(INSTALL_HINT) from None
    app = create_app(cfg, api_key=key)
    model = app.state.engine.model
    print(
        f"gpt2lab serve: {model_name_for(cfg)} ({model.num_params() / 1e6:.2f}M parameters, context "
        f"{model.config.block_size}) on {app.state.engine.device}; http://{cfg.host}:{cfg.port}/ "
        f"(API at /v1{', API key required' if key else ''})",
        flush=True,
    )
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning")
