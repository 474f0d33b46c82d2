"""Decode speed of the inference core (decoder.Decoder: what `generate` and the server's engine run),
and what weight-only int8 costs in perplexity. Prints markdown tables.

Speed: GPT-2 124M's shapes with random weights (speed does not depend on their values); B rows are
prefilled with 16-token prompts, then N decode steps are timed (one token per row per step). Every
variant runs in the same process, rounds alternating, best round counts (the machine drifts).

    python bench/decode.py                                   # CPU: fp32 vs int8 vs bf16, batch 1 and 8
    python bench/decode.py --device cuda --batches 1,32      # GPU: eager vs CUDA graphs, bf16
    python bench/decode.py --ckpt out/shakespeare-char --text ../shared/data/tinyshakespeare.txt \\
        --speed none                                          # perplexity: fp32 vs int8 on a trained model
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gpt2lab import GPT, GPTConfig  # noqa: E402
from gpt2lab.decoder import Decoder, quantize_int8  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def decode_rate(model: GPT, batch: int, steps: int, graphs: bool, device: torch.device) -> float:
    """Tokens per second of `steps` decode steps of `batch` rows after a 16-token prefill."""
    core = Decoder(model, batch, max_len=16 + steps + 8, graphs=graphs)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 50257, (16,), generator=g).tolist() for _ in range(batch)]
    with torch.inference_mode():
        logits = core.prefill(slice(0, batch), prompts)
        tokens = logits.argmax(-1)
        for _ in range(3):  # warm-up (and, with graphs, the capture)
            tokens = core.decode(tokens).argmax(-1)
        core.prefill(slice(0, batch), prompts)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            tokens = core.decode(tokens).argmax(-1)
        sync(device)
    return batch * steps / (time.perf_counter() - t0)


def perplexity(model: torch.nn.Module, ids: list[int], block: int, max_tokens: int) -> float:
    """exp(mean cross-entropy) over the first max_tokens + 1 ids in non-overlapping block windows."""
    ids = ids[: max_tokens + 1]
    total, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(ids) - 1, block):
            chunk = torch.tensor(ids[start : start + block + 1])
            if len(chunk) < 2:
                break
            logits = model(chunk[None, :-1])
            loss = torch.nn.functional.cross_entropy(logits[0].float(), chunk[1:], reduction="sum")
            total, count = total + loss.item(), count + len(chunk) - 1
    return math.exp(total / count)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batches", default=None, help="comma-separated rows (default 1,8; cuda 1,32)")
    ap.add_argument("--steps", type=int, default=64, help="decode steps timed per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--speed", default="all", choices=["all", "none"], help="none: perplexity only")
    ap.add_argument("--ckpt", default=None, help="a trained checkpoint: fp32 vs int8 perplexity")
    ap.add_argument("--text", default=None, help="text scored for the perplexity (its last 10 percent)")
    ap.add_argument("--ppl-tokens", type=int, default=20_000)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    batches = [int(b) for b in (args.batches or ("1,32" if cuda else "1,8")).split(",")]
    stamp = (
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, "
        f"{torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}"
    )

    if args.speed == "all":
        torch.manual_seed(0)
        base = GPT(GPTConfig()).eval()  # GPT-2 124M
        if cuda:  # the GPU path: eager decode vs the CUDA-graph decode step, bf16 weights
            variants = {"bf16 eager": (base.to(device, torch.bfloat16), False)}
            variants["bf16 CUDA graphs"] = (variants["bf16 eager"][0], True)
        else:
            variants = {
                "fp32": (base, False),
                "int8 (--quantize int8)": (quantize_int8(copy.deepcopy(base)), False),
                "bf16 (--dtype bfloat16)": (copy.deepcopy(base).to(torch.bfloat16), False),
            }
        best = {(name, b): 0.0 for name in variants for b in batches}
        for _ in range(args.rounds):
            for b in batches:
                for name, (model, graphs) in variants.items():
                    best[name, b] = max(best[name, b], decode_rate(model, b, args.steps, graphs, device))
        ref = next(iter(variants))
        print(f"Decode, GPT-2 124M shapes (random weights), {args.steps} steps after a 16-token prefill")
        print(f"{stamp}\n")
        print(
            "| variant | "
            + " | ".join(f"batch {b} tok/s" for b in batches)
            + " | "
            + " | ".join(f"batch {b} vs {ref}" for b in batches)
            + " |"
        )
        print("|---|" + "---:|" * (2 * len(batches)))
        for name in variants:
            rates = " | ".join(f"{best[name, b]:,.1f}" for b in batches)
            ratios = " | ".join(f"{best[name, b] / best[ref, b]:.2f}x" for b in batches)
            print(f"| {name} | {rates} | {ratios} |")

    if args.ckpt and args.text:
        from gpt2lab.checkpoint import load_model, read_config
        from gpt2lab.tokenizer import model_tokenizer

        tok = model_tokenizer(read_config(args.ckpt).get("tokenizer"))
        text = Path(args.text).read_text(encoding="utf-8")
        ids = tok.encode(text[int(len(text) * 0.9) :])
        fp32 = load_model(args.ckpt).eval()
        int8 = quantize_int8(load_model(args.ckpt).eval())
        block = fp32.config.block_size
        p32 = perplexity(fp32, ids, block, args.ppl_tokens)
        p8 = perplexity(int8, ids, block, args.ppl_tokens)
        n = min(len(ids) - 1, args.ppl_tokens)
        print(f"\nPerplexity, {args.ckpt} on the last 10% of {args.text} ({n} tokens); {stamp}\n")
        print("| weights | perplexity | loss (nats) |\n|---|---:|---:|")
        print(f"| fp32 | {p32:.4f} | {math.log(p32):.4f} |")
        print(f"| int8 | {p8:.4f} | {math.log(p8):.4f} |")
        print(f"\nint8 costs {100 * (p8 / p32 - 1):+.2f}% perplexity")


if __name__ == "__main__":
    main()
