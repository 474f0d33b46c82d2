"""Training step time against torch's CPU thread count (--threads), on the machine as it is.

    python bench/threads.py [--data ../shared/data] [--steps 60] [--threads 1 2] [--rounds 2]

Runs the shakespeare-char recipe's model (4 x 128, context 64, batch 12) for --steps steps once per
thread count, the counts alternated for --rounds rounds so that a change in the machine's load hits
all of them alike, each run a fresh process (`gpt2lab train --threads N`). Prints the median step
time of each run and, per round, its ratio to the first count's, with the load average beside it:
on a shared or busy CPU, more threads than free cores make every step wait for the slowest thread.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    gpt2lab = [sys.executable, "-m", "gpt2lab"]
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "chars"
        text = Path(args.data) / "tinyshakespeare.txt"
        subprocess.run([*gpt2lab, "prepare", str(text), "--tokenizer", "char", "--out", str(data)],
                       check=True, capture_output=True)  # fmt: skip
        print("| round | threads | median step (ms) | x first | load average (1 min) |")
        print("|---:|---:|---:|---:|---:|")
        for r in range(args.rounds):
            first = None
            for t in args.threads:
                load = os.getloadavg()[0]
                steps = ["--max-steps", str(args.steps), "--log-interval", str(args.steps)]
                quiet = ["--eval-interval", "0", "--eval-tokens", "2048", "--sample-tokens", "0"]
                cmd = [*gpt2lab, "train", "--recipe", "shakespeare-char", "--data", str(data),
                       "--out-dir", f"{tmp}/run-{r}-{t}", *steps, *quiet, "--threads", str(t)]  # fmt: skip
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                ms = float(re.search(r"median step time ([\d.]+) ms", out).group(1))
                first = first or ms
                print(f"| {r + 1} | {t} | {ms:.1f} | {ms / first:.2f} | {load:.1f} |", flush=True)


if __name__ == "__main__":
    main()
