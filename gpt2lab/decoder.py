"""The inference core: a model and the rows of its KV cache, with the two operations generation is
built from, prefill and decode; and TextDecoder, token ids -> whole-character text with stop strings.

`generate.steps` (a fixed batch: `gpt2lab sample`, `chat`) and `engine.Engine` (the server's
continuous batching) both run on a Decoder, and through it on GPT.forward, the model's one forward.

- prefill(rows, prompts): empty the rows and feed each its prompt; prompts of different lengths run
  in one forward (right-padded, each row at its own positions). Joining requests share it.
- decode(tokens): one new token for each of rows 0..n-1, one forward. With graphs=True the step has
  fixed shapes (the cache's static mode) and, on CUDA, is captured once per batch bucket (1, 2, 4,
  ...) in a CUDA graph and replayed, so a token costs one graph launch instead of ~100 kernel launches.
- A model without KV-cache support (`supports_kv_cache` False, e.g. the ladder's bigram / MLP /
  WaveNet) keeps each row's tokens and recomputes over the last block_size of them every step.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable, Sequence
from typing import Any

import torch

from gpt2lab.errors import UserError
from gpt2lab.kvcache import KVCache, Rows


def supports_kv_cache(model: Any) -> bool:
    """The one capability check: can the model feed only new tokens through a KVCache?"""
    return bool(getattr(model, "supports_kv_cache", False))


class Decoder:
    """A model with `rows` cache rows of up to max_len tokens (default: the model's block_size)."""

    def __init__(self, model: Any, rows: int, max_len: int | None = None, graphs: bool = False):
        self.model = model
        self.block_size = model.config.block_size
        self.max_len = self.block_size if max_len is None else max_len
        self.rows = rows
        param = next(model.parameters())
        self.device = param.device
        self.cached = supports_kv_cache(model)
        self.graphs = graphs and self.cached
        self._graphs: dict[int, _Graph] = {}
        if self.cached:
            self.cache = KVCache(model.config, rows, self.max_len, device=self.device, dtype=param.dtype)
        else:
            self.history: list[list[int]] = [[] for _ in range(rows)]  # each row's tokens

    def length(self, row: int) -> int:
        """Tokens in row `row` now."""
        return self.cache.host_lengths[row] if self.cached else len(self.history[row])

    @torch.inference_mode()
    def prefill(self, rows: Rows, prompts: Sequence[Sequence[int]], all_logits: bool = False) -> Any:
        """Empty `rows` and feed row rows[i] the tokens prompts[i] (non-empty) -> the logits (n, V) after
        each prompt's last token; all_logits: a list of (len(prompt), V), the logits after every token."""
        ids = list(range(*rows.indices(self.rows))) if isinstance(rows, slice) else list(rows)
        if len(ids) != len(prompts) or not all(len(p) for p in prompts):
            raise UserError(f"prefill needs one non-empty prompt per row, got {len(prompts)} for {len(ids)}")
        if not self.cached:
            for r, p in zip(ids, prompts, strict=True):
                self.history[r] = [int(t) for t in p]
            return self._recompute(ids, all_logits)
        lengths = [len(p) for p in prompts]
        T = max(lengths)
        idx = torch.zeros(len(prompts), T, dtype=torch.long)
        for i, p in enumerate(prompts):
            idx[i, : len(p)] = torch.as_tensor(list(p), dtype=torch.long)
        self.cache.reset(rows)
        self.cache.select(rows, lengths)
        logits = self.model(idx.to(self.device), kv_cache=self.cache, last_only=not all_logits)
        if all_logits:
            return [logits[i, :n] for i, n in enumerate(lengths)]
        return logits[:, -1]  # (n, V)

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, rows: list[int] | None = None) -> torch.Tensor:
        """Feed tokens (n,) to rows 0..n-1 (or to `rows`), one each -> the next logits (n, V)."""
        n = tokens.size(0)
        ids = list(range(n)) if rows is None else rows
        if not self.cached:
            for r, t in zip(ids, tokens.tolist(), strict=True):
                self.history[r].append(int(t))
            return self._recompute(ids, False)
        full = [r for r in ids if self.cache.host_lengths[r] >= self.max_len]
        if full:
            raise UserError(f"KV cache row {full[0]} is full ({self.max_len} tokens); prefill a window first")
        if not self.graphs or rows is not None:
            self.cache.select(slice(0, n) if rows is None else rows)
            return self.model(tokens[:, None].to(self.device), kv_cache=self.cache)[:, -1]
        bucket = min(1 << (n - 1).bit_length(), self.rows)  # 1, 2, 4, ... rows: few graphs, little waste
        step = self._graphs.get(bucket)
        if step is None:
            step = self._graphs[bucket] = _Graph(self.model, self.cache, bucket)
        padded = torch.zeros(bucket, dtype=torch.long, device=self.device)
        padded[:n] = tokens.to(self.device)
        logits = step(padded)
        for r in range(bucket):  # the step advanced the device lengths of all bucket rows
            self.cache.host_lengths[r] += 1
        return logits[:n]

    def copy_row(self, src: int, dst: int | slice) -> None:
        """Row src's tokens into row dst (or each row of a slice): n samples share one prefill."""
        if self.cached:
            self.cache.copy_row(src, dst)
            return
        for r in range(*dst.indices(self.rows)) if isinstance(dst, slice) else [dst]:
            self.history[r] = list(self.history[src])

    def _recompute(self, rows: list[int], all_logits: bool) -> Any:
        """No KV cache: the model on each row's last block_size tokens (rows of one length together)."""
        out: dict[int, torch.Tensor] = {}
        groups: dict[int, list[int]] = {}
        for r in rows:
            groups.setdefault(min(len(self.history[r]), self.block_size), []).append(r)
        for n, group in groups.items():
            idx = torch.tensor([self.history[r][-n:] for r in group], dtype=torch.long, device=self.device)
            logits = self.model(idx)  # (g, n, V)
            for i, r in enumerate(group):
                out[r] = logits[i] if all_logits else logits[i, -1]
        if all_logits:
            return [out[r] for r in rows]
        return torch.stack([out[r] for r in rows])


def quantize_int8(model: Any) -> Any:
    """The model with every nn.Linear replaced by an int8 one (weights int8 per output channel,
    activations quantized per batch as they come: PyTorch's dynamic quantization, fbgemm kernels).

    Batch-1 decode on a CPU is bound by reading the weights; int8 reads a quarter of fp32's bytes.
    The embeddings stay fp32 (a lookup reads one row). CPU only; docs/benchmarks.md has the speed and
    the perplexity it costs. Rows of a batch share an activation scale, so a row's logits can differ
    slightly with what else is in the batch (fp32 rows never do beyond rounding).
    """
    import warnings

    if next(model.parameters()).device.type != "cpu":
        raise UserError("--quantize int8 runs on the CPU only (use --dtype bfloat16 on a GPU)")
    if next(model.parameters()).dtype != torch.float32:
        raise UserError("--quantize int8 needs the float32 weights (--dtype float32)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notice (torchao replaces it)
        from torch.ao.quantization import quantize_dynamic

        return quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)


class _Graph:
    """The static decode step of rows 0..n-1 (on CPU: run eagerly; on CUDA: a captured CUDA graph)."""

    def __init__(self, model: Any, cache: KVCache, n: int):
        self.model, self.cache, self.n = model, cache, n
        self.idx = torch.zeros(n, 1, dtype=torch.long, device=cache.k.device)
        self.graph = None
        if cache.k.device.type != "cuda":
            return
        saved, host = cache.lengths.clone(), list(cache.host_lengths)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the graph (lazy init, kernel selection)
            for _ in range(2):
                self._step()
                cache.lengths.copy_(saved)  # the slots written here are rewritten by the real steps
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._step()
        self.index = cache._index  # the graph reads this tensor: keep it alive
        cache.lengths.copy_(saved)
        cache.host_lengths = host

    def _step(self) -> torch.Tensor:
        self.cache.select(slice(0, self.n), static=True)
        return self.model(self.idx, kv_cache=self.cache)[:, -1]  # (n, V)

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        self.idx.copy_(tokens[:, None])
        if self.graph is None:
            return self._step()
        self.graph.replay()
        return self.logits.clone()  # the graph's output buffer is overwritten by the next replay


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
