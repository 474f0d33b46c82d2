"""Evaluation: loss / perplexity / bits per byte over a prepared split, and HellaSwag accuracy.

Both evaluators take the raw model (not the DDP or compiled wrapper) and are called from the CLI
(`gpt2lab eval loss|hellaswag`) and from the training loop every N steps. Under DDP each rank
takes a strided share of the work and the sums are all-reduced, so every rank returns the same
numbers.

HellaSwag (Zellers et al. 2019) is scored in the two conventions published tables use:

- completion style (build-nanogpt / llm.c): the raw `ctx`, then " " + ending, encoded separately;
  cross-entropy over the ending tokens. acc picks the ending with the lowest summed loss, acc_norm
  the lowest mean loss per token. GPT-2 124M: acc_norm 0.2955.
- harness style (EleutherAI lm-evaluation-harness, task `hellaswag`): context
  preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize()), continuation
  " " + preprocess(ending), tokens of the continuation = tokens(context + continuation) minus the
  tokens of the context. acc picks the highest summed log-likelihood, acc_norm the highest
  log-likelihood divided by the ending's length in characters. GPT-2 124M: acc_norm 0.3114.

Inputs: the official jsonl (rowanz/hellaswag `hellaswag_val.jsonl`, downloaded into the cache when
no file is given), or llama.cpp's 6-lines-per-task text (`activity_label: ctx`, label, 4 endings).
The text layout is already preprocessed and has no ctx_a / ctx_b, so there both styles score the
same label-prefixed context. Checked on the 1000 records of ../shared/data/hellaswag: its context is
the harness's except that ctx_b's first letter is not capitalised (1000 of 1000), and its endings
equal the harness's in 941 of 1000 (the rest differ by a stripped leading space). The completion
style there is not build-nanogpt's (which has no label prefix and no preprocessing). Use the jsonl
for numbers that compare with published ones.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from gpt2lab import distributed
from gpt2lab.errors import UserError
from gpt2lab.model import GPT, IGNORE_INDEX
from gpt2lab.progress import Progress


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module):
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _check_vocab(tok: Any, model: GPT, what: str) -> None:
    if tok.vocab_size > model.config.vocab_size:
        raise UserError(
            f"{what} has {tok.vocab_size} token ids but the model's vocabulary has only "
            f"{model.config.vocab_size}: they do not belong together"
        )


# --- loss, perplexity and bits per byte over a prepared split ------------------------------------


def _special_ids(tok: Any) -> set[int]:
    specials = getattr(tok, "special_tokens", None)
    if specials is None:
        specials = getattr(getattr(tok, "bpe", None), "special_tokens", {})
    return set(specials.values())


@lru_cache(maxsize=8)
def _bytes_per_token_cached(spec_json: str, vocab_dir: str | None) -> np.ndarray:
    from gpt2lab.tokenizer import get_tokenizer

    tok = get_tokenizer(json.loads(spec_json), vocab_dir=vocab_dir)
    return bytes_per_token(tok)


def bytes_per_token(tok: Any) -> np.ndarray:
    """(vocab_size,) int64: UTF-8 bytes each token id stands for; special tokens (EOT) count 0.

    Byte-level tokenizers decode a sequence to the concatenation of its tokens' bytes, so summing
    this table over the evaluated targets gives exactly the byte length of the evaluated text.
    """
    table = np.array([len(tok.decode_bytes([i])) for i in range(tok.vocab_size)], dtype=np.int64)
    for i in _special_ids(tok):
        table[i] = 0  # a document boundary is not text
    return table


class _TokenStream:
    """The shards of a split read as one stream of tokens (documents run across shard boundaries)."""

    def __init__(self, shards: list[np.ndarray]):
        self.shards = [s for s in shards if len(s)]
        self.starts = np.cumsum([0] + [len(s) for s in self.shards])
        self.n = int(self.starts[-1])

    def read(self, a: int, b: int) -> np.ndarray:
        """tokens [a, b) as int64."""
        parts = []
        for k, s in enumerate(self.shards):
            lo, hi = max(a, int(self.starts[k])), min(b, int(self.starts[k + 1]))
            if lo < hi:
                parts.append(np.asarray(s[lo - self.starts[k] : hi - self.starts[k]], dtype=np.int64))
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def evaluate_loss(
    model: GPT,
    data_dir: str | Path,
    split: str = "val",
    batch_size: int = 8,
    seq_len: int | None = None,
    max_tokens: int | None = None,
    device: str | torch.device = "cpu",
    autocast: contextlib.AbstractContextManager | None = None,
    vocab_dir: str | Path | None = None,
) -> dict[str, float]:
    """Mean next-token loss over a split: {"loss", "perplexity", "bits_per_byte", "tokens"}.

    The split's tokens are cut into consecutive windows of seq_len + 1 tokens that overlap by one, so
    every token but the first is predicted exactly once, from the tokens before it in its window
    (seq_len defaults to the model's context). max_tokens caps the predicted tokens. Under DDP rank r
    takes windows r, r + W, ...; sums of nats, tokens and bytes are all-reduced.

    bits_per_byte = total nats / ln 2 / UTF-8 bytes of the predicted tokens, with the bytes counted
    per token id from the manifest's tokenizer (decode_bytes of that id; EOT counts 0), so models
    with different tokenizers are compared on the same text.
    """
    from gpt2lab.shards import read_manifest, read_shard

    manifest = read_manifest(data_dir)
    splits = manifest["splits"]
    if split not in splits:
        raise UserError(f"{data_dir} has no {split!r} split; it has {sorted(splits)}")
    if manifest["vocab_size"] > model.config.vocab_size:
        raise UserError(
            f"{data_dir} was tokenized with a vocabulary of {manifest['vocab_size']} ids but the model's "
            f"has only {model.config.vocab_size}: they do not belong together"
        )
    T = model.config.block_size if seq_len is None else seq_len
    if not 0 < T <= model.config.block_size:
        raise UserError(f"seq_len {T} must be in [1, the model's context {model.config.block_size}]")
    if batch_size <= 0:
        raise UserError(f"batch_size must be positive, got {batch_size}")
    if max_tokens is not None and max_tokens <= 0:
        raise UserError(f"max_tokens must be positive, got {max_tokens}")
    stream = _TokenStream([read_shard(Path(data_dir) / name) for name in splits[split]["shards"]])
    n_targets = max(stream.n - 1, 0) if max_tokens is None else min(max_tokens, max(stream.n - 1, 0))
    if n_targets == 0:
        raise UserError(f"the {split} split of {data_dir} has {stream.n} token(s): nothing to predict")
    spec = json.dumps(manifest["tokenizer"], sort_keys=True)
    byte_table = torch.from_numpy(
        _bytes_per_token_cached(spec, None if vocab_dir is None else str(vocab_dir))
    )

    device = torch.device(device)
    rank, world = distributed.rank_world()
    windows = list(range(rank, -(-n_targets // T), world))  # window w predicts tokens w*T+1 .. w*T+T
    nats = torch.zeros((), dtype=torch.float64, device=device)  # summed on the device: no sync per batch
    tokens = n_bytes = 0
    with _eval_mode(model):
        for b in range(0, len(windows), batch_size):
            rows = windows[b : b + batch_size]
            x = torch.zeros(len(rows), T, dtype=torch.long)
            y = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
            for i, w in enumerate(rows):
                a = w * T
                chunk = torch.from_numpy(stream.read(a, min(a + T, n_targets) + 1))  # inputs + 1
                n = len(chunk) - 1
                x[i, :n], y[i, :n] = chunk[:-1], chunk[1:]
            count = int((y != IGNORE_INDEX).sum())
            with autocast or contextlib.nullcontext():
                loss = model(x.to(device), y.to(device))
            nats += loss.detach().double() * count
            tokens += count
            n_bytes += int(byte_table[y[y != IGNORE_INDEX]].sum())
    # float64: token and byte counts stay exact in the sum over ranks
    sums = torch.tensor([float(nats), tokens, n_bytes], dtype=torch.float64, device=device)
    nats, tokens, n_bytes = distributed.all_reduce_sum(sums).tolist()
    loss = nats / tokens
    return {
        "loss": loss,
        "perplexity": math.exp(loss),
        "bits_per_byte": nats / math.log(2) / n_bytes if n_bytes else float("nan"),
        "tokens": int(tokens),
    }


def evaluate_batches(
    model: GPT,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: str | torch.device = "cpu",
    autocast: contextlib.AbstractContextManager | None = None,
) -> dict[str, float]:
    """Mean loss over the counted targets (not IGNORE_INDEX) of (x, y) batches: {"loss", "perplexity",
    "tokens"}. Each rank passes its share; the sums are all-reduced (fine-tuning's val split)."""
    device = torch.device(device)
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # nats, counted tokens
    with _eval_mode(model):
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            with autocast or contextlib.nullcontext():
                logits = model(x)  # (B, T, V)
            nats = F.cross_entropy(
                logits.float().view(-1, logits.size(-1)),
                y.view(-1),
                ignore_index=IGNORE_INDEX,
                reduction="sum",
            )
            sums += torch.stack([nats.double(), (y != IGNORE_INDEX).sum().double()])
    nats, tokens = distributed.all_reduce_sum(sums).tolist()
    if tokens == 0:
        raise UserError("no counted targets to evaluate")
    loss = nats / tokens
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": int(tokens)}


# --- HellaSwag: reading --------------------------------------------------------------------------


def harness_preprocess(text: str) -> str:
    """lm-evaluation-harness's HellaSwag text cleaning: WikiHow markup out, single spaces."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)  # [header], [step], [substeps] (non-greedy: one tag at a time)
    return text.replace("  ", " ")


@dataclass
class Example:
    """One HellaSwag task in both scoring styles' text."""

    index: int  # position in the file
    label: int
    context: str  # completion style: raw ctx
    endings: list[str]
    harness_context: str
    harness_endings: list[str]
    ind: int | None = None  # the dataset's own id


def _example_from_record(rec: Any, index: int, where: str) -> Example:
    if not isinstance(rec, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    try:
        ctx, ctx_a, ctx_b = rec["ctx"], rec["ctx_a"], rec["ctx_b"]
        activity, endings, label = rec["activity_label"], rec["endings"], rec["label"]
    except KeyError as e:
        raise UserError(f"{where}: missing field {e.args[0]!r}") from None
    texts = [ctx, ctx_a, ctx_b, activity]
    if not all(isinstance(t, str) for t in texts) or not (
        isinstance(endings, list) and len(endings) == 4 and all(isinstance(e, str) for e in endings)
    ):
        raise UserError(f"{where}: ctx, ctx_a, ctx_b, activity_label must be text and endings a list of 4")
    label = _parse_label(label, where)
    harness_ctx = harness_preprocess(activity + ": " + ctx_a + " " + ctx_b.capitalize())
    return Example(
        index,
        label,
        ctx,
        list(endings),
        harness_ctx,
        [harness_preprocess(e) for e in endings],
        rec.get("ind"),
    )


def _parse_label(label: Any, where: str) -> int:
    if isinstance(label, str) and label.strip().lstrip("-").isdigit():
        label = int(label)
    if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < 4:
        raise UserError(f"{where}: label {label!r} is not one of 0, 1, 2, 3")
    return label


def load_hellaswag(path: str | Path, limit: int | None = None) -> list[Example]:
    """Examples from the official jsonl, or from the 6-lines-per-task text layout (.txt)."""
    path = Path(path)
    if limit is not None and limit <= 0:
        raise UserError(f"limit must be positive, got {limit}")
    examples: list[Example] = []
    if path.suffix == ".txt":
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read HellaSwag file {str(path)!r} ({e})") from None
        if len(lines) % 6:
            raise UserError(f"{path}: {len(lines)} lines is not a multiple of 6 (context, label, 4 endings)")
        for k in range(0, len(lines), 6):
            if limit is not None and len(examples) == limit:
                break
            ctx, label, endings = lines[k], lines[k + 1], lines[k + 2 : k + 6]
            label = _parse_label(label, f"{path}:{k + 2}")
            examples.append(Example(len(examples), label, ctx, endings, ctx, endings))
    else:
        from gpt2lab.sources import jsonl_records

        for rec, where in jsonl_records(path):
            if limit is not None and len(examples) == limit:
                break
            examples.append(_example_from_record(rec, len(examples), where))
    if not examples:
        raise UserError(f"{path}: no HellaSwag examples")
    return examples


def hellaswag_file(data: str | Path | None = None) -> Path:
    """The file to read: `data` if given, else the official val jsonl from the cache (downloaded into it
    when missing, checked by SHA-256)."""
    if data is not None:
        path = Path(data).expanduser()
        if not path.is_file():
            raise UserError(f"HellaSwag file {str(path)!r} does not exist")
        return path
    from gpt2lab.download import HELLASWAG_VAL, fetch

    return fetch(HELLASWAG_VAL, "pass --data FILE (hellaswag_val.jsonl, or the 6-lines-per-task .txt)")


# --- HellaSwag: scoring --------------------------------------------------------------------------


def _rows(tok: Any, ex: Example) -> list[tuple[list[int], int]]:
    """(tokens, number of trailing tokens scored) for the 4 completion rows, then the 4 harness rows."""
    rows = []
    ctx = tok.encode(ex.context)
    for ending in ex.endings:
        end = tok.encode(" " + ending)
        rows.append((ctx + end, len(end)))
    # The harness moves trailing whitespace of the context into the continuation and takes the
    # continuation's tokens as those of the whole string past the tokens of the (stripped) context.
    context_ids = tok.encode(ex.harness_context.rstrip())
    for ending in ex.harness_endings:
        whole = tok.encode(ex.harness_context + " " + ending)
        rows.append((whole, len(whole) - len(context_ids)))
    return rows


def _score_rows(
    model: GPT, rows: Sequence[tuple[list[int], int]], device: torch.device, autocast: Any
) -> list[float]:
    """Summed cross-entropy (nats) of the scored tail of each row; one padded forward for all rows.

    A row longer than the context keeps its last block_size + 1 tokens (the context is cut on the left,
    as the harness does). Rows are right-padded: causal attention never lets padding reach real tokens.
    """
    limit = model.config.block_size + 1
    rows = [(ids[-limit:], min(n, len(ids[-limit:]) - 1)) for ids, n in rows]
    T = max(len(ids) for ids, _ in rows) - 1
    x = torch.zeros(len(rows), T, dtype=torch.long)
    y = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
    for i, (ids, n) in enumerate(rows):
        t = torch.tensor(ids)
        x[i, : len(ids) - 1] = t[:-1]
        y[i, len(ids) - 1 - n : len(ids) - 1] = t[len(ids) - n :]
    scored = y != IGNORE_INDEX
    row_of, col_of = scored.nonzero(as_tuple=True)
    # Only the scored positions go through the vocabulary projection: with ~20 of ~100 positions
    # scored, projecting all of them would be most of the work for a small model. The hook hands
    # lm_head the final hidden states (B, T, C) and gives it back those positions only (N, C).
    rows_d, cols_d = row_of.to(device), col_of.to(device)
    hook = model.lm_head.register_forward_pre_hook(lambda _m, args: (args[0][rows_d, cols_d],))
    try:
        with autocast or contextlib.nullcontext():
            logits = model(x.to(device))  # (N, V)
    finally:
        hook.remove()
    losses = F.cross_entropy(logits.float(), y[scored].to(device), reduction="none")  # (N,)
    sums = torch.zeros(len(rows), dtype=torch.float64, device=device)
    sums.index_add_(0, rows_d, losses.double())
    return sums.tolist()


def hellaswag(
    model: GPT,
    tok: Any,
    examples: Sequence[Example],
    batch_size: int = 4,
    device: str | torch.device = "cpu",
    autocast: contextlib.AbstractContextManager | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Accuracy in both styles: {"acc", "acc_norm", "harness_acc", "harness_acc_norm", "n", "predictions"}.

    batch_size examples (8 rows each: 4 endings x 2 styles, identical rows scored once) share one
    forward. Under DDP rank r scores examples r, r + W, ...; counts are all-reduced and the
    predictions gathered, so every rank returns the whole result.
    """
    _check_vocab(tok, model, f"tokenizer {tok.name!r}")
    if batch_size <= 0:
        raise UserError(f"batch_size must be positive, got {batch_size}")
    device = torch.device(device)
    rank, world = distributed.rank_world()
    mine = list(examples)[rank::world]
    items = [(ex, _rows(tok, ex)) for ex in mine]
    # Longest first, so that each batch holds rows of similar length: little padding is computed.
    items.sort(key=lambda item: -max(len(ids) for ids, _ in item[1]))
    bar = Progress("hellaswag", len(mine), progress and rank == 0)
    predictions = []
    with _eval_mode(model):
        for b in range(0, len(mine), batch_size):
            batch = items[b : b + batch_size]
            unique: dict[tuple[tuple[int, ...], int], int] = {}
            for _, rows in batch:
                for ids, n in rows:
                    unique.setdefault((tuple(ids), n), len(unique))
            sums = _score_rows(model, [(list(ids), n) for ids, n in unique], device, autocast)
            for ex, rows in batch:
                loss = [sums[unique[(tuple(ids), n)]] for ids, n in rows]
                predictions.append(_predict(ex, loss[:4], [n for _, n in rows[:4]], loss[4:]))
            bar.update(len(predictions))
    bar.close()
    if world > 1:
        gathered: list[Any] = [None] * world
        torch.distributed.all_gather_object(gathered, predictions)
        predictions = [p for part in gathered for p in part]
    predictions.sort(key=lambda p: p["index"])
    n = len(predictions)
    result: dict[str, Any] = {"n": n}
    for key, pred in (
        ("acc", "pred"),
        ("acc_norm", "pred_norm"),
        ("harness_acc", "harness_pred"),
        ("harness_acc_norm", "harness_pred_norm"),
    ):
        result[key] = sum(p[pred] == p["label"] for p in predictions) / n if n else float("nan")
    result["predictions"] = predictions
    return result


def _predict(ex: Example, loss: list[float], counts: list[int], harness_loss: list[float]) -> dict[str, Any]:
    chars = [len(e) for e in ex.harness_endings]
    per_char = [s / max(c, 1) for s, c in zip(harness_loss, chars, strict=True)]
    return {
        "index": ex.index,
        "ind": ex.ind,
        "label": ex.label,
        "pred": int(np.argmin(loss)),
        "pred_norm": int(np.argmin([s / c for s, c in zip(loss, counts, strict=True)])),
        "harness_pred": int(np.argmin(harness_loss)),
        "harness_pred_norm": int(np.argmin(per_char)),
        "losses": loss,  # completion style: summed cross-entropy of each ending (nats)
        "tokens": counts,
        "harness_losses": harness_loss,  # harness style: minus the log-likelihood of each continuation
        "harness_chars": chars,
    }


# --- what `gpt2lab eval` runs ---------------------------------------------------------------------


def _write_result(
    result: dict[str, Any], json_out: str | Path | None, ckpt: str | Path | None, kind: str
) -> str:
    from gpt2lab.atomic import write_json

    path = Path(json_out) if json_out is not None else None
    if path is None and ckpt is not None:
        path = Path(ckpt) / f"eval_{kind}.json"
    if path is None:
        return ""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, result)
    return f"\nwrote {path}"


def _table(rows: list[tuple[str, str]]) -> str:
    lines = ["| metric | value |", "|---|---:|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines)


def run_loss(
    data: str | Path,
    ckpt: str | Path | None = None,
    pretrained: str | Path | None = None,
    split: str = "val",
    max_tokens: int | None = None,
    batch_size: int = 8,
    seq_len: int | None = None,
    gpt2_vocab: str | Path | None = None,
    json_out: str | Path | None = None,
    device: str | None = None,
) -> str:
    """`gpt2lab eval loss`: the table to print; the JSON goes to json_out, else next to the checkpoint."""
    from gpt2lab.interop import load_any

    device = str(distributed.pick_device(device or "auto"))
    model, _ = load_any(ckpt, pretrained, device)
    result = evaluate_loss(
        model, data, split, batch_size, seq_len, max_tokens, device=device, vocab_dir=gpt2_vocab
    )
    result = {**result, "split": split, "data": str(data), "model": str(ckpt or pretrained)}
    table = _table(
        [
            ("loss", f"{result['loss']:.4f}"),
            ("perplexity", f"{result['perplexity']:.2f}"),
            ("bits per byte", f"{result['bits_per_byte']:.4f}"),
            ("tokens", str(result["tokens"])),
        ]
    )
    return table + _write_result(result, json_out, ckpt, "loss")


def run_hellaswag(
    ckpt: str | Path | None = None,
    pretrained: str | Path | None = None,
    data: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 4,
    gpt2_vocab: str | Path | None = None,
    json_out: str | Path | None = None,
    device: str | None = None,
    progress: bool = True,
) -> str:
    """`gpt2lab eval hellaswag`: the table to print; JSON to json_out, else next to the checkpoint."""
    from gpt2lab.interop import load_any
    from gpt2lab.tokenizer import model_tokenizer

    device = str(distributed.pick_device(device or "auto"))
    path = hellaswag_file(data)
    examples = load_hellaswag(path, limit)
    model, spec = load_any(ckpt, pretrained, device)
    tok = model_tokenizer(spec, gpt2_vocab, pretrained)
    t0 = time.perf_counter()
    result = hellaswag(model, tok, examples, batch_size, device, progress=progress)
    seconds = time.perf_counter() - t0
    result = {"data": str(path), "model": str(ckpt or pretrained), "seconds": seconds, **result}
    table = _table(
        [
            ("examples", str(result["n"])),
            ("acc (completion style, summed loss)", f"{result['acc']:.4f}"),
            ("acc_norm (completion style, loss per token)", f"{result['acc_norm']:.4f}"),
            ("harness acc", f"{result['harness_acc']:.4f}"),
            ("harness acc_norm (per character)", f"{result['harness_acc_norm']:.4f}"),
            ("examples/s", f"{result['n'] / seconds:.2f}"),
        ]
    )
    return table + _write_result(result, json_out, ckpt, "hellaswag")
