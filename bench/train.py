"""Training throughput of one process: tokens/s, MFU and peak memory of the training step.

    python bench/train.py                         # GPU: GPT-2 124M, T=1024, bf16, compile, fused AdamW
    python bench/train.py --recipe fineweb-edu-speedrun   # the recipe's model and optimizer (Muon)
    python bench/train.py --preset char-tiny --batch-size 12 --seq-len 64 --no-compile   # CPU sanity run
    python bench/train.py --set n_layer=2 --set n_embd=64 --device cpu --steps 4 --no-compile  # smoke

The step is train.py's: forward under autocast, backward, clip, fused AdamW (on CUDA), on random
tokens (the loader is benchmarked separately in bench/prepare.py and is >100x faster than needed).
MFU uses the model's 6N + 12·L·H·Q·T FLOPs per token against the bf16 matmul peak measured in the
same run (a large bf16 matmul), and against the data-sheet peak when --peak-flops is given.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from gpt2lab import GPT, GPTConfig
from gpt2lab.config import TrainConfig, load_recipe, pad_vocab_size
from gpt2lab.train import make_optimizer


def measured_matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 8192, reps: int = 20) -> float:
    """FLOP/s of a large square matmul: what the hardware actually delivers for dense GEMMs."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default=None, help="model preset (default: the recipe's, else gpt2)")
    ap.add_argument("--recipe", default=None, help="take the model fields and the optimizer from this recipe")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="a GPTConfig field")
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    ap.add_argument("--peak-flops", type=float, default=None, help="data-sheet peak, e.g. 989e12 (H100/H200)")
    args = ap.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    torch.backends.cuda.matmul.allow_tf32 = True
    fields = load_recipe(args.recipe) if args.recipe else {"model": {}}
    train_cfg = TrainConfig(**{k: v for k, v in fields.items() if k not in ("data", "out_dir")})
    args.preset = args.preset or (train_cfg.preset if args.recipe else "gpt2")
    model_fields = {**fields["model"], **dict(_parse_field(s) for s in args.set)}
    model_fields.setdefault("vocab_size", pad_vocab_size(GPTConfig.preset(args.preset).vocab_size))
    cfg = GPTConfig.preset(args.preset, **model_fields)
    model = GPT(cfg).to(device).train()
    optimizer = make_optimizer(model, train_cfg, device)
    step_model = torch.compile(model) if args.compile else model
    amp = getattr(torch, args.dtype)
    use_amp = cuda and amp != torch.float32
    V, B, T = cfg.vocab_size, args.batch_size, args.seq_len
    x = torch.randint(0, V, (B, T), device=device)
    y = torch.randint(0, V, (B, T), device=device)

    times = []
    for i in range(args.steps):
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=amp, enabled=use_amp):
            loss = step_model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if i >= min(5, args.steps // 2):  # warm-up (and compilation) excluded
            times.append(time.perf_counter() - t0)
    step = statistics.median(times)
    tok_s = B * T / step
    flops = model.flops_per_token(T)
    print(
        f"{args.recipe or args.preset}: {model.num_params():,} parameters, batch {B} x {T}, {args.dtype}, "
        f"optimizer {train_cfg.optimizer}, "
        f"compile {args.compile}, {device}{' ' + torch.cuda.get_device_name() if cuda else ''}, "
        f"torch {torch.__version__}\n"
    )
    print(
        "| step ms | tokens/s | model TFLOP/s | MFU vs measured bf16 matmul | MFU vs data sheet | peak mem |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    achieved = tok_s * flops
    measured = measured_matmul_peak(device, torch.bfloat16) if cuda else None
    mfu_m = f"{achieved / measured:.1%} of {measured / 1e12:.0f} T" if measured else "-"
    mfu_d = f"{achieved / args.peak_flops:.1%}" if args.peak_flops else "-"
    mem = f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if cuda else "-"
    print(f"| {step * 1e3:.1f} | {tok_s:,.0f} | {achieved / 1e12:.1f} | {mfu_m} | {mfu_d} | {mem} |")


def _parse_field(text: str) -> tuple[str, object]:
    """'n_layer=2' -> ('n_layer', 2): the value as JSON when it parses (numbers, true/false), else text."""
    import json

    name, _, value = text.partition("=")
    try:
        return name, json.loads(value)
    except json.JSONDecodeError:
        return name, value


if __name__ == "__main__":
    main()
