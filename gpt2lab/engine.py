"""The serving engine: continuous batching over the inference core, on one background thread. No HTTP.

The engine owns the model (through a decoder.Decoder with max_batch_size cache rows). Its loop:

1. Admit waiting jobs in arrival order while their rows fit (a job is one prompt with its n
   samples; a job needing more rows than are free waits, and is not overtaken).
2. Prefill all admitted jobs together, one forward (each prompt in its own row at its own positions);
   a job's prompt is computed once and its row copied into its n - 1 other rows. A scoring job
   (echo) gets the log-probabilities of its prompt's tokens from the same forward.
3. Choose every row's next token with its own request's settings (rows with the same Sampling are
   sampled together; each row draws from its own generator, so a request's randomness is its own).
4. Deliver each job's events (text that is whole characters, log-probabilities, finish reasons) to
   its `deliver` callback, once per step.
5. Drop finished, cancelled and timed-out rows (the last active row moves into each hole, so the
   active rows are always 0..n-1), then decode one token for all of them in one forward.

Events carry Python values only (ids, floats, strings): nothing above this module sees a tensor.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.nn import functional as F

from gpt2lab.decoder import Decoder, TextDecoder
from gpt2lab.sampling import Sampling, ban, seeded_generator

# (token id, its log-probability or None for a text's first token, the top alternatives [(id, logprob)])
TokenLogprob = tuple[int, float | None, list[tuple[int, float]] | None]


class QueueFull(Exception):
    """The engine's queue of waiting sequences is full (HTTP 503 + Retry-After)."""


@dataclass
class Event:
    """Something that happened to one choice: new text (and the log-probabilities of its tokens), and
    at its end finish ("stop", "length", "error": then text is the error message) with the number of
    tokens it generated. prompt_logprobs: the echoed prompt's tokens (once, before any text)."""

    choice: int
    text: str
    finish: str | None = None
    tokens: int = 0
    status: int = 500  # the HTTP status of an "error"
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] | None = None


@dataclass(eq=False)  # compared and hashed by identity: a job is one request's, never equal to another
class Job:
    """One prompt to complete n times. The engine calls deliver(events) from its thread.

    prompt: token ids (non-empty, len(prompt) + max_tokens <= block_size). max_tokens 0: only score
    the prompt (echo). stop_ids: tokens that end a sample (finish "stop", not shown), e.g. the
    tokenizer's EOT; stop: strings that end it likewise; min_tokens: stop_ids are banned until a
    sample has that many tokens. hidden_ids: tokens generated but not shown in the text (a chat
    model's template tokens on /v1/completions). logprobs: None, or k >= 0: each token's
    log-probability and its k most likely alternatives. echo: score the prompt too.
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
    min_tokens: int = 0
    hidden_ids: frozenset[int] = frozenset()
    logprobs: int | None = None
    echo: bool = False
    cancelled: bool = False


@dataclass(eq=False)
class EmbedJob:
    """Token id lists to embed; deliver(vectors, error) is called once with one vector per input."""

    inputs: list[list[int]]
    deliver: Callable[[list[list[float]] | None, str | None], None]
    cancelled: bool = False


@dataclass
class _Row:
    job: Job
    choice: int
    generator: torch.Generator
    text: TextDecoder
    counts: torch.Tensor | None  # (V,) occurrences of each token so far, for the penalties
    generated: int = 0
    last: int = 0  # the newest token: fed to the model at the next step
    finish: str | None = None


def choice_seed(seed: int, choice: int) -> int:
    """The seed of choice `choice` of a request seeded `seed`: independent streams per choice, and
    choice 0 of n samples is the same text as the request with n = 1."""
    digest = hashlib.blake2b(f"{seed}:{choice}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # torch seeds are below 2**64; keep one bit spare


def token_logprobs(logprobs: torch.Tensor, tokens: torch.Tensor, k: int) -> list[TokenLogprob]:
    """Per row of log-probabilities (n, V) and the token taken there (n,): (id, logprob, top k)."""
    chosen = logprobs.gather(1, tokens[:, None])[:, 0].tolist()
    top: list[Any] = [None] * len(chosen)
    if k > 0:
        values, ids = logprobs.topk(min(k, logprobs.size(-1)), dim=-1)
        top = [list(zip(i, v, strict=True)) for i, v in zip(ids.tolist(), values.tolist(), strict=True)]
    return [(t, lp, tp) for t, lp, tp in zip(tokens.tolist(), chosen, top, strict=True)]


def mean_pool(hidden: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """Mean of each row's first lengths[b] hidden states (B, T, C) -> (B, C), unit length (L2)."""
    n = torch.tensor(lengths, device=hidden.device)
    real = torch.arange(hidden.size(1), device=hidden.device)[None, :] < n[:, None]  # (B, T)
    summed = (hidden.float() * real[:, :, None]).sum(dim=1)  # (B, C)
    mean = summed / real.sum(dim=1, keepdim=True)
    return F.normalize(mean, dim=-1)


class Engine:
    """Continuous batching on one background thread; see the module docstring.

    vocab_size: sample only ids below it (the tokenizer's, when the model's vocab is padded).
    decode_bytes: the tokenizer's ids -> bytes, for whole-character text and stop strings.
    compile: decode through CUDA graphs (one per batch bucket) on a GPU.
    """

    def __init__(
        self,
        model: Any,
        decode_bytes: Callable[[list[int]], bytes],
        vocab_size: int,
        max_batch_size: int = 16,
        max_queue: int = 64,
        compile: bool = False,
    ):
        self.model = model.eval()
        self.decode_bytes = decode_bytes
        self.vocab_size = min(vocab_size, model.config.vocab_size)
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.core = Decoder(model, max_batch_size, graphs=compile)
        self.device = self.core.device
        self._cond = threading.Condition()
        self._waiting: deque[Job | EmbedJob] = deque()
        self._active = 0  # rows in the batch; written by the engine thread under _cond
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.steps = 0  # decode forwards run (for tests and logs)
        self.prefills = 0  # prefill forwards run

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
            return sum(getattr(job, "n", 1) for job in self._waiting)

    def submit(self, jobs: Sequence[Job | EmbedJob]) -> None:
        """Queue jobs (all or none); raises QueueFull when more than max_queue rows would wait."""
        with self._cond:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            free = self.max_batch_size - self._active
            rows = lambda js: sum(getattr(job, "n", 1) for job in js)  # noqa: E731
            if rows(self._waiting) + rows(jobs) - free > self.max_queue:
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
                    jobs = [job for job in admitted if isinstance(job, Job)]
                    for job in admitted:
                        if isinstance(job, EmbedJob):
                            self._embed(job)
                    if jobs:
                        logits = torch.cat([logits, self._prefill(jobs, rows)])
                    if rows:
                        logits = self._step(rows, logits)
            except Exception as e:
                # a failed forward (out of memory, ...) ends the requests in it, not the server
                msg = f"generation failed: {type(e).__name__}: {e}"
                for job in dict.fromkeys([r.job for r in rows] + admitted):
                    if isinstance(job, EmbedJob):
                        job.deliver(None, msg)
                    else:
                        job.deliver([Event(job.first_choice, msg, "error")])
                rows.clear()
                logits = logits[:0]
            with self._cond:
                self._active = len(rows)
        for job in dict.fromkeys([r.job for r in rows] + list(self._waiting)):
            if isinstance(job, EmbedJob):
                job.deliver(None, "the server is shutting down")
            else:
                job.deliver([Event(job.first_choice, "the server is shutting down", "error", status=503)])

    def _admit(self, used: int) -> list[Job | EmbedJob]:
        """Pop the waiting jobs (in order) that fit in the free rows; drop cancelled or expired ones."""
        admitted: list[Job | EmbedJob] = []
        now = time.monotonic()
        scoring = 0  # scoring-only jobs (max_tokens 0) borrow a free row for their prefill only
        while self._waiting:
            job = self._waiting[0]
            if job.cancelled:
                self._waiting.popleft()
                continue
            if isinstance(job, EmbedJob):  # no batch rows: it runs before the next step
                admitted.append(self._waiting.popleft())
                continue
            if now >= job.deadline:
                self._waiting.popleft()
                job.deliver(
                    [Event(job.first_choice, "timed out waiting for a free batch slot", "error", status=503)]
                )
                continue
            rows = job.n if job.max_tokens > 0 else 1
            if used + scoring + rows > self.max_batch_size:
                break  # first come, first served: a job needing n rows is not overtaken
            admitted.append(self._waiting.popleft())
            if job.max_tokens > 0:
                used += rows
            else:
                scoring += 1
        self._active = used
        return admitted

    def _embed(self, job: EmbedJob) -> None:
        """Mean-pooled final hidden states of each input, computed together (right-padded)."""
        block = self.model.config.block_size
        inputs = [ids[-block:] for ids in job.inputs]
        T = max(len(ids) for ids in inputs)
        idx = torch.zeros(len(inputs), T, dtype=torch.long)
        for i, ids in enumerate(inputs):
            idx[i, : len(ids)] = torch.tensor(ids)
        hidden = self.model(idx.to(self.device), hidden=True)  # (B, T, C); causal: padding never leaks
        job.deliver(mean_pool(hidden, [len(ids) for ids in inputs]).tolist(), None)

    def _prefill(self, jobs: list[Job], rows: list[_Row]) -> torch.Tensor:
        """Prefill the jobs' prompts in one forward into new rows (n per job) -> their logits (rows, V)."""
        V = self.vocab_size
        # generating jobs take the next rows in order (n each); scoring-only ones a free row after them
        jobs = [job for job in jobs if job.max_tokens > 0] + [job for job in jobs if job.max_tokens == 0]
        first = len(rows)
        placed, starts = [], []
        for job in jobs:
            starts.append(first)
            first += job.n if job.max_tokens > 0 else 1
        scoring = any(job.echo for job in jobs)
        out = self.core.prefill(starts, [job.prompt for job in jobs], all_logits=scoring)
        self.prefills += 1
        last = []
        for job, start, o in zip(jobs, starts, out, strict=True):
            prompt_lp = None
            if job.echo:
                lp = F.log_softmax(o[:, :V].float(), dim=-1)  # (L, V)
                ids = torch.tensor(job.prompt, device=self.device)
                k = job.logprobs or 0
                prompt_lp = [(job.prompt[0], None, None)] + token_logprobs(lp[:-1], ids[1:], k)
            if scoring:
                o = o[-1]  # (V,): the next-token logits
            if job.max_tokens == 0:  # scoring only: the prompt's log-probabilities are the answer
                job.deliver(
                    [
                        Event(job.first_choice + s, "", "length", 0, prompt_logprobs=prompt_lp)
                        for s in range(job.n)
                    ]
                )
                continue
            if job.n > 1:
                self.core.copy_row(start, slice(start + 1, start + job.n))
            counts = None
            if job.sampling.penalised:
                counts = torch.zeros(V, device=self.device)
                ids = torch.tensor(job.prompt, device=self.device)
                counts.index_add_(0, ids[ids < V], torch.ones(len(job.prompt), device=self.device)[ids < V])
            events = []
            for s in range(job.n):
                g = seeded_generator(self.device, job.seeds[s] if s < len(job.seeds) else None)
                text = TextDecoder(self.decode_bytes, job.stop)
                c = None if counts is None else counts.clone()
                row = _Row(job, job.first_choice + s, g, text, c)
                placed.append(row)
                last.append(o[:V].float())
                if prompt_lp is not None:
                    events.append(Event(row.choice, "", prompt_logprobs=prompt_lp))
            if events:
                job.deliver(events)
        rows.extend(placed)
        if not last:
            return torch.zeros(0, V, device=self.device)
        return torch.stack(last)  # (new rows, V)

    def _step(self, rows: list[_Row], logits: torch.Tensor) -> torch.Tensor:
        """Sample every row, deliver its text, drop the finished rows, decode the rest -> logits."""
        now = time.monotonic()
        events: dict[Job, list[Event]] = {}
        for row in rows:
            if row.job.cancelled:
                row.finish = "cancelled"
        chosen = self._choose(logits, rows)
        logprobs = self._logprobs(logits, rows, chosen)
        for i, (row, token) in enumerate(zip(rows, chosen, strict=True)):
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
                piece = "" if token in job.hidden_ids else row.text.push(token)
                if row.text.stopped:
                    row.finish = "stop"
                elif row.generated >= job.max_tokens or now >= job.deadline:
                    row.finish = "length"
            if row.finish is not None:
                piece += row.text.flush()
            row.last = token
            lp = [logprobs[i]] if i in logprobs else []
            if piece or lp or row.finish is not None:
                ev = Event(row.choice, piece, row.finish, row.generated if row.finish else 0, logprobs=lp)
                events.setdefault(job, []).append(ev)
        for job, evs in events.items():
            job.deliver(evs)
        # leave the batch: the last active row moves into each hole, so rows 0..n-1 stay the active ones
        for i in reversed(range(len(rows))):
            if rows[i].finish is None:
                continue
            last = len(rows) - 1
            if i != last:
                self.core.copy_row(last, i)
                rows[i] = rows[last]
            rows.pop()
        if not rows:
            return logits[:0]
        idx = torch.tensor([r.last for r in rows], dtype=torch.long, device=self.device)  # (n,)
        out = self.core.decode(idx)[:, : self.vocab_size].float()  # (n, V)
        self.steps += 1
        return out

    def _choose(self, logits: torch.Tensor, rows: Sequence[_Row]) -> list[int]:
        """The next token of every row from logits (n, V), each with its own request's Sampling.

        Rows with the same settings are sampled together (Sampling.choose over the group, one draw per
        row from its own generator). A row short of its min_tokens cannot take its stop ids yet.
        Rows already finished get a placeholder 0.
        """
        out = [0] * len(rows)
        groups: dict[Sampling, list[int]] = {}
        for i, row in enumerate(rows):
            if row.finish is None:
                groups.setdefault(row.job.sampling, []).append(i)
        for sampling, idx in groups.items():
            group = logits[idx]
            for k, i in enumerate(idx):
                row = rows[i]
                if row.generated < row.job.min_tokens and row.job.stop_ids:
                    one = torch.zeros(len(idx), dtype=torch.bool, device=group.device)
                    one[k] = True
                    group = ban(group, one, sorted(row.job.stop_ids))
            counts = torch.stack([rows[i].counts for i in idx]) if sampling.penalised else None  # type: ignore[misc]
            tokens = sampling.choose(group, counts, [rows[i].generator for i in idx])
            for i, t in zip(idx, tokens.tolist(), strict=True):
                out[i] = t
        return out

    def _logprobs(
        self, logits: torch.Tensor, rows: Sequence[_Row], chosen: list[int]
    ) -> dict[int, TokenLogprob]:
        """{row index: the chosen token's log-probability and top alternatives} for rows that asked.

        Log-probabilities are those of the model's distribution (log_softmax of its logits), before
        penalties, temperature and filtering, as vLLM reports them by default."""
        want = [i for i, r in enumerate(rows) if r.finish is None and r.job.logprobs is not None]
        if not want:
            return {}
        lp = F.log_softmax(logits[want].float(), dim=-1)
        k = max(rows[i].job.logprobs or 0 for i in want)
        got = token_logprobs(lp, torch.tensor([chosen[i] for i in want], device=lp.device), k)
        out = {}
        for i, (t, v, top) in zip(want, got, strict=True):
            kk = rows[i].job.logprobs or 0
            out[i] = (t, v, top[:kk] if top is not None and kk else None)
        return out
