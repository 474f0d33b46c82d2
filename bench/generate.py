"""Generation throughput: gpt2lab's generate vs transformers' generate, same weights, same run.

GPT-2 124M architecture with random weights (the speed does not depend on their values), greedy
decoding so both do exactly the same work; their outputs are checked to be identical. Rounds
alternate ours / transformers and the best round of each counts, because absolute times on a
shared machine drift. Prints a markdown table.

    python bench/generate.py                     # CPU: batch 1 and batch 8, 128 new tokens
    python bench/generate.py --device cuda       # GPU: batch 1 (vs the memory-bandwidth limit) and 64
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from datetime import date

import torch

from gpt2lab import GPT, GPTConfig
from gpt2lab.generate import generate
from gpt2lab.interop import save_pretrained

HBM_BYTES_PER_S = 4.3e12  # H100/H200-class HBM3 bandwidth, the reference for the batch-1 limit


def best_time(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,8; cuda 1,64)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--compile", action="store_true", help="ours: CUDA-graph decode (GPU only)")
    ap.add_argument("--no-hf", action="store_true", help="skip transformers (ours only)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    batches = [int(b) for b in (args.batches or ("1,64" if device.type == "cuda" else "1,8")).split(",")]

    torch.manual_seed(0)
    model = GPT(GPTConfig()).eval()  # GPT-2 124M
    hf = None
    if not args.no_hf:
        from transformers import GPT2LMHeadModel

        with tempfile.TemporaryDirectory() as tmp:
            save_pretrained(model, tmp)
            hf = GPT2LMHeadModel.from_pretrained(tmp).eval().to(device=device, dtype=dtype)
    model = model.to(device=device, dtype=dtype)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    g = torch.Generator().manual_seed(1)
    n = args.new_tokens
    rows = []
    for B in batches:
        # prompts of different lengths (prompt_len // 2 .. prompt_len): left padding is exercised
        lens = [args.prompt_len - (i * args.prompt_len // 2) // max(B - 1, 1) for i in range(B)]
        prompts = [torch.randint(0, 50257, (n_,), generator=g).tolist() for n_ in lens]

        def ours(prompts=prompts):
            one = prompts if len(prompts) > 1 else prompts[0]
            return generate(model, one, n, temperature=0, eot_id=None, compile=args.compile)

        def theirs(prompts=prompts):
            P = max(len(p) for p in prompts)
            ids = torch.tensor([[0] * (P - len(p)) + p for p in prompts], device=device)
            mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts], device=device)
            with torch.inference_mode():
                out = hf.generate(
                    ids,
                    attention_mask=mask,
                    max_new_tokens=n,
                    min_new_tokens=n,
                    do_sample=False,
                    pad_token_id=0,
                    eos_token_id=None,
                )
            return out[:, P:].tolist()

        t_ours = t_hf = float("inf")
        same = "-"
        first_ours = ours()  # warm-up (and the outputs to compare)
        if hf is not None:
            first_hf = theirs()
            got = [first_ours] if B == 1 else first_ours
            equal = sum(a == b for a, b in zip(got, first_hf, strict=True))
            same = "yes" if equal == B else f"no ({equal}/{B} rows)"
        for _ in range(args.rounds):  # alternate, so both see the same machine
            t_ours = min(t_ours, best_time(ours, 1))
            if hf is not None:
                t_hf = min(t_hf, best_time(theirs, 1))
        tok_ours, tok_hf = B * n / t_ours, B * n / t_hf
        row = f"| {B} | {tok_ours:,.1f} | " + (f"{tok_hf:,.1f} | {tok_ours / tok_hf:.2f}x" if hf else "- | -")
        if device.type == "cuda":
            limit = HBM_BYTES_PER_S / weight_bytes  # each token reads every weight once
            row += f" | {tok_ours / limit:.0%} of {limit:,.0f}" if B == 1 else " | -"
        rows.append(row + f" | {same} |")

    threads = torch.get_num_threads()
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"{platform.processor() or 'CPU'}"
    print(
        f"Generation, GPT-2 124M (random weights), {args.dtype}, greedy, {n} new tokens, prompts of "
        f"{args.prompt_len // 2}..{args.prompt_len} tokens; {date.today()}, {where}, {threads} threads, "
        f"torch {torch.__version__}, best of {args.rounds} alternating rounds\n"
    )
    extra = " batch-1 vs bandwidth limit (tok/s) |" if device.type == "cuda" else ""
    print(f"| batch | gpt2lab tok/s | transformers tok/s | speed-up |{extra} same tokens |")
    print("|---|---|---|---|" + ("---|" if extra else "") + "---|")
    for row in rows:
        print(row)


if __name__ == "__main__":
    main()
