"""Throughput of `gpt2lab prepare` and of the ShardLoader.

    python bench/prepare.py [--data ../shared/data] [--repeat 8]

Prepares the shared TinyStories slice (2.1 MB, 2,316 stories) with the GPT-2 tokenizer with 1 and
2 worker processes, next to tiktoken's own single-thread encode rate on the same documents in the
same run; then the same corpus repeated --repeat times, where worker start-up no longer dominates.
Then the loader: (16, 1024) batches per second from the prepared shards, random and sequential.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import tiktoken_gpt2  # noqa: E402

from gpt2lab.config import PrepareConfig  # noqa: E402
from gpt2lab.dataloader import ShardLoader  # noqa: E402
from gpt2lab.shards import prepare  # noqa: E402
from gpt2lab.tokenizer import get_tokenizer  # noqa: E402

EOT = "<|endoftext|>"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--repeat", type=int, default=8)
    args = ap.parse_args()
    data = Path(args.data)
    slice_path = data / "tinystories" / "TinyStories-train_first2316stories.txt"
    text = slice_path.read_text(encoding="utf-8")
    docs = [d.strip() for d in text.split(EOT) if d.strip()]
    tok = get_tokenizer("gpt2", vocab_dir=data / "gpt2")
    enc = tiktoken_gpt2(data / "gpt2")  # tiktoken's own reader of the files: an independent reference

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        big = tmp / "repeated.txt"
        big.write_text((text + EOT + "\n") * args.repeat, encoding="utf-8")
        size = len(text.encode()) / 1e6
        for label, path, mb in [
            ("slice", slice_path, size),
            (f"slice x{args.repeat}", big, args.repeat * size),
        ]:
            t0 = time.perf_counter()
            n = sum(len(enc.encode_ordinary(d)) + 1 for d in docs * (1 if label == "slice" else args.repeat))
            dt = time.perf_counter() - t0
            rows.append((label, "tiktoken encode_ordinary, 1 thread (reference)", n, dt, mb))
            for workers in (1, 2):
                cfg = PrepareConfig(source=str(path), out=str(tmp / f"{label}-{workers}"), separator="eot",
                                    gpt2_vocab=str(data / "gpt2"), workers=workers)  # fmt: skip
                t0 = time.perf_counter()
                m = prepare(cfg, tok, log=lambda *a: None)
                dt = time.perf_counter() - t0
                n = sum(s["tokens"] for s in m["splits"].values())
                rows.append((label, f"gpt2lab prepare, {workers} worker(s), end to end", n, dt, mb))

        print("| corpus | what | tokens | seconds | tokens/s | MB/s |")
        print("|---|---|---:|---:|---:|---:|")
        for label, what, n, dt, mb in rows:
            print(f"| {label} | {what} | {n:,} | {dt:.2f} | {n / dt / 1e3:,.0f}K | {mb / dt:.1f} |")

        print("\n| loader mode | batch | batches/s | tokens/s |")
        print("|---|---|---:|---:|")
        for mode in ("random", "sequential"):
            loader = ShardLoader(tmp / f"slice x{args.repeat}-1", "train", 16, 1024, mode=mode)
            loader.next_batch()
            t0, n = time.perf_counter(), 0
            while time.perf_counter() - t0 < 2.0:
                loader.next_batch()
                n += 1
            rate = n / (time.perf_counter() - t0)
            print(f"| {mode} | 16 x 1024 | {rate:,.0f} | {rate * 16 * 1024 / 1e6:,.1f}M |")


if __name__ == "__main__":
    main()
