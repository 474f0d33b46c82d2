"""HellaSwag scoring throughput (examples/s) for the GPT-2 124M architecture.

    python bench/hellaswag.py [--limit 24] [--batch-sizes 1 4 8] [--chunk 4] [--data FILE]

Random weights (the work does not depend on them). Each example is 8 rows (4 endings x the two
scoring styles). Compared in the same run, round-robin over chunks of examples so that machine
load hits every variant alike:
- `hellaswag()` at several batch sizes (examples per forward; rows padded, longest first, only the
  ending positions projected onto the vocabulary);
- a naive reference: one forward per row, logits for every position.
fp32; CUDA when present (then also bf16 autocast), else CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import SHARED_DATA, randomized  # noqa: E402

from gpt2lab import GPT, GPTConfig  # noqa: E402
from gpt2lab.evaluate import _rows, hellaswag, load_hellaswag  # noqa: E402
from gpt2lab.tokenizer import get_tokenizer  # noqa: E402


def naive(model: GPT, tok, examples, device) -> list[list[float]]:
    """One forward per row over all positions; the same losses hellaswag() computes."""
    out = []
    with torch.no_grad():
        for ex in examples:
            losses = []
            for ids, n in _rows(tok, ex):
                x = torch.tensor([ids[:-1]], device=device)
                logits = model(x)[0, -n:]  # (n, V)
                losses.append(float(F.cross_entropy(logits.float(), x.new_tensor(ids[-n:]), reduction="sum")))
            out.append(losses)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(SHARED_DATA / "hellaswag" / "hellaswag_val_subset1000.jsonl"))
    ap.add_argument("--limit", type=int, default=24)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--chunk", type=int, default=8, help="examples per timed round")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tok = get_tokenizer("gpt2", vocab_dir=SHARED_DATA / "gpt2")
    model = randomized(GPT(GPTConfig.preset("gpt2"))).to(device)
    examples = load_hellaswag(args.data, limit=args.limit)

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    variants = {
        f"hellaswag(), batch {b}": (lambda exs, b=b: hellaswag(model, tok, exs, b, device))
        for b in args.batch_sizes
    }
    if device == "cuda":
        bf16 = lambda: torch.autocast("cuda", dtype=torch.bfloat16)  # noqa: E731
        for b in args.batch_sizes:
            variants[f"hellaswag(), batch {b}, bf16"] = lambda exs, b=b: hellaswag(
                model, tok, exs, b, device, autocast=bf16()
            )
    variants["naive: one row per forward, all positions"] = lambda exs: naive(model, tok, exs, device)

    hellaswag(model, tok, examples[:2], 2, device)  # warm-up
    seconds = dict.fromkeys(variants, 0.0)
    check = {}
    for c in range(0, len(examples), args.chunk):
        chunk = examples[c : c + args.chunk]
        for name, fn in variants.items():
            sync()
            t0 = time.perf_counter()
            result = fn(chunk)
            sync()
            seconds[name] += time.perf_counter() - t0
            if c == 0:
                check[name] = result
    # the variants compute the same losses (fp32 ones to 1e-3 nats over a whole ending)
    ref = check["naive: one row per forward, all positions"]
    for name, result in check.items():
        if isinstance(result, dict) and "bf16" not in name:
            for p, losses in zip(result["predictions"], ref, strict=False):
                got = p["losses"] + p["harness_losses"]
                assert max(abs(a - b) for a, b in zip(got, losses, strict=True)) < 1e-3, name

    base = seconds["naive: one row per forward, all positions"]
    print(
        f"GPT-2 124M (random weights), {len(examples)} HellaSwag examples, {device}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}\n"
    )
    print("| scorer | examples/s | s/example | speed vs naive |")
    print("|---|---:|---:|---:|")
    for name, s in seconds.items():
        n = len(examples)
        print(f"| {name} | {n / s:.2f} | {s / n:.2f} | {base / s:.2f}x |")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
