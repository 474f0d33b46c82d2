"""Speedrun benchmark: a speedrun recipe against its baseline, run alternately on the same machine.

    python bench/speedrun.py shakespeare                # wall time to exact val <= 1.898, + ablations
    python bench/speedrun.py tinystories --budget 600   # equal budgets: val bits per byte, samples
    python bench/speedrun.py shakespeare --report       # print the tables of the results so far

Each run is `gpt2lab train --recipe NAME` in a fresh process, as a user would run it. shakespeare:
the time to target is the wall time from launching the process to the first printed exact val loss
(whole validation split) at or below the target: start-up, training, evaluations all count. Rounds
alternate the order of the runs, so a machine that gets busier or quieter favours none of them.
tinystories: each recipe trains for the same time budget (`--max-time`: its learning rate schedule
runs on the fraction of the budget spent, so each ends decayed, however fast its steps are here);
the final checkpoint is then scored with `gpt2lab eval loss` (bits per byte over the whole val
split) and sampled with a fixed seed.

Resumable: results go to WORK/results.jsonl, one line per finished run, and a rerun skips the runs
that are there (delete the file to start over). Every run records the load average before and
after it: on a shared machine, read absolute times with that in mind, and trust ratios more.
Every run also records the CPU seconds its process used (all its threads; at each val line from
/proc on Linux, and in total): with --threads 1, CPU time is about the wall time the run would take
on an idle core, whatever else the machine runs, so the CPU columns are the load-proof comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
VAL_LINE = re.compile(r"step\s+(\d+): val loss ([0-9.]+)")
DONE_LINE = re.compile(r"done: .* at step (\d+); .*median step time ([0-9.]+) ms")

# nanoGPT's shakespeare_char CPU run scored exactly over the whole val split (issue 16): 1.8982.
SHAKESPEARE_TARGET = 1.898

# Ablations of shakespeare-speedrun: each reverts one of its changes to shakespeare-char's choice
# (same steps, same everything else), or adds what a CPU user might try next.
SHAKESPEARE_ABLATIONS = [
    ("- Muon (AdamW for all)", ["--optimizer", "adamw"]),
    ("- RoPE (learned positions)", ["--pos-embedding", "learned"]),
    ("- QK-norm", ["--no-qk-norm"]),
    ("- ReLU² (GELU tanh)", ["--activation", "gelu_tanh"]),
    ("- zero-init projections", ["--no-zero-init"]),
    ("- untied head (tied)", ["--tie-weights"]),
    ("- no biases (biases)", ["--bias"]),
    (
        "- batch 48 (batch 12, 4x the steps)",
        ["--batch-size", "12", "--max-steps", "520", "--warmup-steps", "24"],
    ),
    ("- one evaluation (shakespeare-char's 8 + 1)", ["--eval-interval", "16"]),
    ("+ torch.compile", ["--compile"]),
]


def cpu_seconds(pid: int) -> float | None:
    """CPU time (user + system, all threads, and its finished children) of a running process; None
    where /proc does not exist."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    # after the ")" that ends the command name: utime, stime, cutime, cstime are fields 12-15 (man 5 proc)
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def run_train(
    recipe: str, flags: list[str], out: Path, env: dict[str, str], cap_s: float | None = None
) -> dict:
    # (cap_s: stop the run with SIGTERM after this many seconds; train.py then saves and exits)
    """One `gpt2lab train` process: the wall and CPU seconds since launch at each of its val-loss lines
    (vals: (wall_s, step, val, cpu_s)), and totals."""
    cmd = [sys.executable, "-m", "gpt2lab", "train", "--recipe", recipe, "--out-dir", str(out), *flags]
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    vals, median_ms, steps, lines, capped = [], None, None, [], False
    assert proc.stdout is not None
    for line in proc.stdout:
        now = time.perf_counter() - t0
        lines.append(line)
        if m := VAL_LINE.search(line):
            vals.append((now, int(m.group(1)), float(m.group(2)), cpu_seconds(proc.pid)))
        if m := DONE_LINE.search(line):
            steps, median_ms = int(m.group(1)), float(m.group(2))
        if cap_s is not None and now > cap_s and not capped:
            proc.send_signal(signal.SIGTERM)  # train.py finishes the step, saves and exits
            capped = True
    _, status, usage = os.wait4(proc.pid, 0)  # as proc.wait(), and the child's CPU time
    proc.returncode = rc = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if rc != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({rc}):\n{''.join(lines[-30:])}")
    return {
        "vals": vals,
        "wall_s": wall,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "median_step_ms": median_ms,
        "steps": steps,
        "capped": capped,
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
    }


def gpt2lab(*args: str, env: dict[str, str]) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "gpt2lab", *args], capture_output=True, text=True, env=env, check=False
    )
    if result.returncode != 0:
        raise SystemExit(f"gpt2lab {' '.join(args)} failed:\n{result.stdout}{result.stderr}")
    return result.stdout


# --- results file -----------------------------------------------------------------------------------


def load_results(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def append_result(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def machine() -> dict[str, Any]:
    import torch

    return {
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "threads": os.environ.get("OMP_NUM_THREADS", str(torch.get_num_threads())),
    }


# --- shakespeare: time to a target loss ---------------------------------------------------------


def shakespeare(args: argparse.Namespace, env: dict[str, str]) -> None:
    work, results_path = Path(args.work), Path(args.work) / "results.jsonl"
    data = work / "data" / "shakespeare-char"
    if not (data / "manifest.json").exists():
        gpt2lab("prepare", str(args.text), "--tokenizer", "char", "--out", str(data), env=env)
    entries = [("shakespeare-char (baseline)", "shakespeare-char", ["--sample-tokens", "0"], {})]
    entries.append(("shakespeare-speedrun", "shakespeare-speedrun", [], {}))
    if args.ablations:
        entries += [(label, "shakespeare-speedrun", flags, {}) for label, flags in SHAKESPEARE_ABLATIONS]
        # the other thread count: torch's default (one per core) against one thread
        one = env.get("OMP_NUM_THREADS") == "1"
        threads = str(os.cpu_count() or 2) if one else "1"
        entries.append((f"+ {threads} thread(s)", "shakespeare-speedrun", [], {"OMP_NUM_THREADS": threads}))
    done = {(r["round"], r["label"]) for r in load_results(results_path) if r["task"] == "shakespeare"}
    for rnd in range(args.rounds):
        order = entries if rnd % 2 == 0 else entries[::-1]  # alternate, so drift in load favours no one
        for label, recipe, flags, extra_env in order:
            if (rnd, label) in done:
                continue
            out = work / "runs" / f"shakespeare-r{rnd}-{re.sub(r'[^a-z0-9]+', '-', label.lower())}"
            flags = ["--data", str(data), *flags, *args.train_flags.split()]
            r = run_train(recipe, flags, out, {**env, **extra_env})
            hit = next(((t, cpu) for t, _, v, cpu in r["vals"] if v <= args.target), (None, None))
            record = {
                "task": "shakespeare",
                "round": rnd,
                "label": label,
                "recipe": recipe,
                "flags": flags,
                "target": args.target,
                "time_to_target_s": hit[0],
                "cpu_to_target_s": hit[1],
                "final_val": r["vals"][-1][2] if r["vals"] else None,
                "final_val_s": r["vals"][-1][0] if r["vals"] else None,
                "final_val_cpu_s": r["vals"][-1][3] if r["vals"] else None,
                **{
                    k: r[k]
                    for k in ("wall_s", "cpu_s", "median_step_ms", "steps", "load_before", "load_after")
                },
                **machine(),
                **({"threads": extra_env["OMP_NUM_THREADS"]} if extra_env else {}),
            }
            append_result(results_path, record)
            ttt = "not reached" if hit[0] is None else f"{hit[0]:.1f} s"
            print(
                f"round {rnd} {label}: {ttt}, final val {record['final_val']}, wall {r['wall_s']:.1f} s, "
                f"CPU {r['cpu_s']:.1f} s, load {r['load_before']:.1f}-{r['load_after']:.1f}"
            )
    print(shakespeare_report(load_results(results_path), args.target))


def shakespeare_report(results: list[dict], target: float) -> str:
    results = [r for r in results if r["task"] == "shakespeare"]
    if not results:
        return "no shakespeare results yet"
    labels = list(dict.fromkeys(r["label"] for r in results))
    base = "shakespeare-char (baseline)"
    by_round = {(r["round"], r["label"]): r for r in results}

    def to_target(r: dict, clock: str) -> float | None:
        # clock "time" (wall) or "cpu"; a run that never reaches the target counts at its final evaluation
        # (so a ratio against a baseline that stopped short is an upper bound: it needs at least that)
        hit = r.get(f"{clock}_to_target_s")
        return hit if hit is not None else r.get("final_val_s" if clock == "time" else "final_val_cpu_s")

    def ratio(label: str, clock: str) -> str:
        ratios = []
        for r in results:
            b = by_round.get((r["round"], base))
            if r["label"] != label or b is None or r.get(f"{clock}_to_target_s") is None:
                continue
            if (b_t := to_target(b, clock)) is not None:
                ratios.append(r[f"{clock}_to_target_s"] / b_t)
        return f"{statistics.median(ratios):.2f}x" if ratios and label != base else "-"

    def median(values: list) -> float | None:
        values = [v for v in values if v is not None]
        return statistics.median(values) if values else None

    def secs(x: float | None) -> str:
        return "-" if x is None else f"{x:.1f} s"

    rows = [
        f"Time to exact val <= {target} (whole val split), `gpt2lab train --recipe ...` as a user runs it; "
        "wall and CPU seconds from the launch of the process (medians over rounds; ratios: median of "
        "the per-round ratios to the baseline):",
        "",
        "| run | rounds | reached | wall to target | vs baseline (wall) | CPU to target | vs baseline (CPU) "
        "| final val (mean) | wall (median) | step ms (median) | load avg (min-max) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label in labels:
        rs = [r for r in results if r["label"] == label]
        reached = [r for r in rs if r["time_to_target_s"] is not None]
        loads = [x for r in rs for x in (r["load_before"], r["load_after"])]
        rows.append(
            f"| {label} | {len(rs)} | {len(reached)}/{len(rs)} | "
            f"{secs(median([r['time_to_target_s'] for r in reached])) if reached else 'not reached'} | "
            f"{ratio(label, 'time')} | "
            f"{secs(median([r.get('cpu_to_target_s') for r in reached])) if reached else 'not reached'} | "
            f"{ratio(label, 'cpu')} | "
            f"{statistics.mean(r['final_val'] for r in rs):.4f} | "
            f"{statistics.median(r['wall_s'] for r in rs):.1f} s | "
            f"{statistics.median(r['median_step_ms'] for r in rs):.1f} | {min(loads):.1f}-{max(loads):.1f} |"
        )
    missed = [r for r in results if r["label"] == base and r["time_to_target_s"] is None]
    if missed:
        rows += [
            "",
            f"The baseline ended above the target in {len(missed)} of its "
            f"{sum(r['label'] == base for r in results)} rounds (final val "
            + ", ".join(f"{r['final_val']:.4f}" for r in missed)
            + "); there the ratio is taken against the time of its final evaluation, when it stopped: "
            "the time it needs is at least that.",
        ]
    return "\n".join(rows)


# --- tinystories: equal time budgets ------------------------------------------------------------


def tinystories(args: argparse.Namespace, env: dict[str, str]) -> None:
    from concurrent.futures import ThreadPoolExecutor

    work, results_path = Path(args.work), Path(args.work) / "results.jsonl"
    tok, data = work / "tokenizers" / "ts4k", work / "data" / "tinystories-4k"
    if not (tok / "vocab.bpe").exists():
        gpt2lab(
            "tokenizer", "train", "--input", args.stories, "--vocab-size", "4096", "--out", str(tok), env=env
        )
    if not (data / "manifest.json").exists():
        prepare = ["prepare", args.stories, "--separator", "eot", "--tokenizer", str(tok), "--out", str(data)]
        gpt2lab(*prepare, env=env)
    entries = [
        ("tinystories-cpu (baseline)", "tinystories-cpu"),
        ("tinystories-speedrun", "tinystories-speedrun"),
    ]
    done = {(r["round"], r["label"]) for r in load_results(results_path) if r["task"] == "tinystories"}
    common = ["--data", str(data), "--sample-tokens", "0", "--eval-interval", "0"]
    common += ["--checkpoint-interval", "1000000", *args.train_flags.split()]
    # side by side: both recipes at once, one thread each, so that they share whatever load the machine
    # has; else one after the other (alternating the order by round), each with all threads
    workers = 2 if args.side_by_side else 1

    def train(recipe: str, rnd: int) -> dict:
        out = work / "runs" / f"tinystories-r{rnd}-{recipe}"
        flags = [*common, "--max-time", str(args.budget), "--max-steps", "1000000", "--overwrite"]
        return {**run_train(recipe, flags, out, env, cap_s=args.budget * 1.5), "out": out}

    for rnd in range(args.rounds):
        todo = [
            (lab, rec) for lab, rec in (entries if rnd % 2 == 0 else entries[::-1]) if (rnd, lab) not in done
        ]
        with ThreadPoolExecutor(workers) as pool:
            runs = list(pool.map(train, [rec for _, rec in todo], [rnd] * len(todo)))
        for (label, recipe), r in zip(todo, runs, strict=True):
            out = r["out"]
            gpt2lab(
                "eval",
                "loss",
                "--ckpt",
                str(out),
                "--data",
                str(data),
                "--json",
                str(out / "eval.json"),
                env=env,
            )
            result = json.loads((out / "eval.json").read_text())
            sampling = ["--prompt", "Once upon a time", "--max-new-tokens", "120", "--seed", "0"]
            sample = gpt2lab(
                "sample", "--ckpt", str(out), *sampling, "--temperature", "0.8", "--top-k", "50", env=env
            )
            record = {
                "task": "tinystories",
                "round": rnd,
                "label": label,
                "recipe": recipe,
                "budget_s": args.budget,
                "side_by_side": args.side_by_side,
                "bits_per_byte": result["bits_per_byte"],
                "val_loss": result["loss"],
                "sample": sample.strip(),
                **{
                    k: r[k]
                    for k in (
                        "wall_s",
                        "cpu_s",
                        "median_step_ms",
                        "steps",
                        "capped",
                        "load_before",
                        "load_after",
                    )
                },
                **machine(),
            }
            append_result(results_path, record)
            print(
                f"round {rnd} {label}: {r['steps']} steps, {r['wall_s']:.0f} s (CPU {r['cpu_s']:.0f} s), "
                f"bits/byte {record['bits_per_byte']:.4f}, load {r['load_before']:.1f}-{r['load_after']:.1f}"
            )
    print(tinystories_report(load_results(results_path)))


def tinystories_report(results: list[dict]) -> str:
    results = [r for r in results if r["task"] == "tinystories"]
    if not results:
        return "no tinystories results yet"
    base = "tinystories-cpu (baseline)"
    by_round = {(r["round"], r["label"]): r for r in results}
    rows = [
        f"Equal budget of {results[0]['budget_s']:.0f} s of training per run (`--max-time`"
        + ("; the two recipes side by side, one thread each" if results[0].get("side_by_side") else "")
        + "), bits per byte over the whole val split:",
        "",
        "| run | rounds | steps (median) | wall (median) | CPU (median) | val bits/byte (mean) | vs baseline "
        "| val loss (mean) | load avg (min-max) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label in dict.fromkeys(r["label"] for r in results):
        rs = [r for r in results if r["label"] == label]
        ratios = [
            r["bits_per_byte"] / by_round[(r["round"], base)]["bits_per_byte"]
            for r in rs
            if (r["round"], base) in by_round
        ]
        loads = [x for r in rs for x in (r["load_before"], r["load_after"])]
        rows.append(
            f"| {label} | {len(rs)} | {statistics.median(r['steps'] for r in rs):.0f} | "
            f"{statistics.median(r['wall_s'] for r in rs):.0f} s | "
            f"{statistics.median(r.get('cpu_s', float('nan')) for r in rs):.0f} s | "
            f"{statistics.mean(r['bits_per_byte'] for r in rs):.4f} | "
            f"{f'{statistics.mean(ratios) - 1:+.1%}' if label != base and ratios else '-'} | "
            f"{statistics.mean(r['val_loss'] for r in rs):.4f} | {min(loads):.1f}-{max(loads):.1f} |"
        )
    rows += ["", "Samples (round 0, prompt 'Once upon a time', seed 0, temperature 0.8, top-k 50):", ""]
    for r in results:
        if r["round"] == 0:
            rows += [f"{r['label']}:", "", "```", r["sample"], "```", ""]
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("task", choices=["shakespeare", "tinystories"])
    ap.add_argument("--work", default=str(ROOT / "runs" / "speedrun-bench"), help="data, runs and results")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (each runs every entry once)")
    ap.add_argument(
        "--threads", type=int, default=None, help="OMP_NUM_THREADS for every run (default: torch's)"
    )
    ap.add_argument("--report", action="store_true", help="only print the tables of the results so far")
    ap.add_argument(
        "--train-flags", default="", help="more flags for every run, e.g. a quick check: '--max-steps 20'"
    )
    ap.add_argument("--target", type=float, default=SHAKESPEARE_TARGET, help="shakespeare: target val loss")
    ap.add_argument("--ablations", action=argparse.BooleanOptionalAction, default=True, help="shakespeare")
    ap.add_argument("--text", default=str(SHARED / "tinyshakespeare.txt"), help="shakespeare: the corpus")
    ap.add_argument(
        "--budget", type=float, default=600.0, help="tinystories: seconds of training per run (--max-time)"
    )
    ap.add_argument(
        "--side-by-side",
        action="store_true",
        help="tinystories: run both recipes at the same time (give each 1 thread: --threads 1), so a busy "
        "machine's load hits both alike",
    )
    ap.add_argument(
        "--stories",
        default=str(SHARED / "tinystories" / "TinyStories-train_first2316stories.txt"),
        help="tinystories: the corpus (stories separated by <|endoftext|>)",
    )
    args = ap.parse_args()
    Path(args.work).mkdir(parents=True, exist_ok=True)
    if args.report:
        results = load_results(Path(args.work) / "results.jsonl")
        report = shakespeare_report if args.task == "shakespeare" else tinystories_report
        print(report(results, args.target) if args.task == "shakespeare" else report(results))
        return
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    (shakespeare if args.task == "shakespeare" else tinystories)(args, env)


if __name__ == "__main__":
    main()
