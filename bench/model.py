"""Our GPT-2 forward against transformers' GPT2LMHeadModel on the same weights: exactness and speed.

    python bench/model.py [--preset gpt2] [--batch 4] [--seq-len 256] [--repeats 5]

Prints a markdown table: max |logit difference| to transformers and forward time (median of
repeats, in the same run, so the ratio holds on a noisy shared machine). Random weights in every
tensor; fp32; CPU unless CUDA is present.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import randomized  # noqa: E402

from gpt2lab import GPT, GPTConfig  # noqa: E402
from gpt2lab.interop import save_pretrained


def interleaved_medians(fns: dict, repeats: int) -> dict:
    """Median seconds per call of each function, timed round-robin so machine load hits all alike."""
    times = {name: [] for name in fns}
    for r in range(repeats + 1):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            if r > 0:  # round 0 is the warm-up
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    import transformers

    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="gpt2")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"

    ours = randomized(GPT(GPTConfig.preset(args.preset)))
    with tempfile.TemporaryDirectory() as d:
        save_pretrained(ours, d)
        hf = transformers.GPT2LMHeadModel.from_pretrained(d).eval().to(device)
    explicit = GPT(GPTConfig.preset(args.preset, attn_impl="explicit")).eval()
    explicit.load_state_dict(ours.state_dict())
    ours, explicit = ours.to(device), explicit.to(device)
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, ours.config.vocab_size, (args.batch, args.seq_len), generator=g).to(device)

    models = {f"transformers {transformers.__version__}": hf, "gpt2lab (sdpa)": ours}
    models["gpt2lab (explicit)"] = explicit
    with torch.no_grad():
        reference = hf(idx).logits
        diffs = {
            name: (model(idx) - reference).abs().max().item()
            for name, model in models.items()
            if model is not hf
        }
        seconds = interleaved_medians({name: lambda m=m: m(idx) for name, m in models.items()}, args.repeats)
    setup = f"batch {args.batch} x {args.seq_len} tokens, fp32, {device}, torch {torch.__version__}"
    print(f"{args.preset}, {setup}\n")
    print("| model | max abs logit diff vs transformers | forward ms | speed vs transformers |")
    print("|---|---:|---:|---:|")
    t_hf = seconds[f"transformers {transformers.__version__}"]
    for name, t in seconds.items():
        print(f"| {name} | {diffs.get(name, 0.0):.2e} | {t * 1e3:.0f} | {t_hf / t:.2f}x |")


if __name__ == "__main__":
    main()
