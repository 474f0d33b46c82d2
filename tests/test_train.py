"""Training: exact resume (stop, SIGTERM, SIGKILL mid-checkpoint), DDP == accumulation, bad input."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import SPEEDRUN_OPTIONS

from gpt2lab.checkpoint import load_model, load_state, resolve
from gpt2lab.cli import main
from gpt2lab.config import PrepareConfig, TrainConfig, load_recipe
from gpt2lab.errors import UserError
from gpt2lab.shards import run as prepare
from gpt2lab.train import lr_at, run

TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=32)
# Every speedrun option of GPTConfig at once (zero_init: the blocks start as the identity).
SPEEDRUN_MODEL = {**SPEEDRUN_OPTIONS, "zero_init": True}


def setup_fields(setup: str, dropout: float) -> dict:
    """cfg() keywords: the GPT-2 model with AdamW, or the speedrun options with Muon."""
    if setup == "speedrun":
        return dict(optimizer="muon", muon_lr=0.02, model={**TINY, **SPEEDRUN_MODEL, "dropout": dropout})
    return dict(model={**TINY, "dropout": dropout})


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """tinyshakespeare (or, without ../shared, a generated text) as bytes-level shards."""
    root = tmp_path_factory.mktemp("data")
    shared = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tinyshakespeare.txt"
    text = (
        shared.read_text()[:200_000] if shared.exists() else " ".join(f"word{i % 97}" for i in range(40_000))
    )
    (root / "corpus.txt").write_text(text)
    prepare(PrepareConfig(source=str(root / "corpus.txt"), out=str(root / "bytes"), tokenizer="bytes"))
    return root / "bytes"


def cfg(data: Path, out: Path, **kw) -> TrainConfig:
    fields = dict(
        data=str(data),
        out_dir=str(out),
        preset="gpt2",
        model={**TINY, "dropout": 0.1},
        batch_size=4,
        max_steps=40,
        lr_decay_steps=40,
        warmup_steps=5,
        learning_rate=3e-3,
        log_interval=1,
        eval_interval=10,
        eval_tokens=2048,
        checkpoint_interval=10,
        pad_vocab_multiple=1,
    )
    return TrainConfig(**{**fields, **kw})


def losses(out: Path) -> dict[int, float]:
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {e["step"]: e["train_loss"] for e in events if "train_loss" in e}


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_model(resolve(out)).state_dict()


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_lr_schedules():
    c = TrainConfig(learning_rate=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    assert [lr_at(s, c) for s in (0, 4, 9)] == [0.1, 0.5, 1.0]  # linear warmup
    assert lr_at(60, c) == pytest.approx(0.55) and lr_at(110, c) == pytest.approx(0.1)  # cosine midpoint, end
    wsd = TrainConfig(learning_rate=1.0, min_lr=0.0, lr_schedule="wsd", max_steps=100, wsd_decay_fraction=0.2)
    assert lr_at(50, wsd) == 1.0 and lr_at(79, wsd) == 1.0 and lr_at(90, wsd) == pytest.approx(0.5)
    assert lr_at(99, TrainConfig(lr_schedule="constant", learning_rate=0.3)) == 0.3
    # Under a time budget the schedule is as far along as the steps or the fraction of max_time spent say
    timed = dataclasses.replace(wsd, max_steps=10_000, max_time=100.0)
    assert lr_at(50, timed, elapsed=70.0) == 1.0 and lr_at(50, timed, elapsed=90.0) == pytest.approx(0.5)
    assert lr_at(9_000, timed, elapsed=10.0) == pytest.approx(0.5)  # max_steps nearer: its fraction rules
    assert lr_at(50, timed, elapsed=100.0) == 0.0
    cosine = dataclasses.replace(c, max_steps=10_000, max_time=60.0)
    assert lr_at(5, cosine, elapsed=30.0) == 0.6  # still warming up: warmup counts steps
    assert lr_at(20, cosine, elapsed=30.0) == pytest.approx(0.55) and lr_at(20, cosine, elapsed=61.0) == 0.1
    # A budget that does not bind leaves the step schedule as it is (warmup's end, lr_decay_steps)
    for sched in (c, wsd, dataclasses.replace(c, lr_decay_steps=60, max_steps=200)):
        roomy = dataclasses.replace(sched, max_time=1e6)
        timed = [lr_at(s, roomy, elapsed=1.0) for s in range(sched.max_steps + 1)]
        assert timed == pytest.approx([lr_at(s, sched) for s in range(sched.max_steps + 1)], rel=1e-9)


def test_time_budget_ends_the_run_and_resumes(data, tmp_path):
    """--max-time: the run stops at the budget however many steps that is, its schedule decayed to
    min_lr; the seconds trained are checkpointed, so a resume continues the budget, not a new one."""
    out = tmp_path / "timed"
    kw = dict(max_steps=1_000_000, max_time=3.0, lr_schedule="wsd", min_lr=0.0, eval_interval=0)
    summary = run(cfg(data, out, **{**kw, "checkpoint_interval": 1_000_000}))
    assert summary["stopped"] == "max_time reached" and 5 < summary["step"] < 1_000_000
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    lrs = [e["lr"] for e in events if "lr" in e]
    assert events[-2]["step"] == summary["step"]  # the last step is logged (then the final val loss)
    assert max(lrs) == pytest.approx(3e-3) and lrs[-1] < 0.25 * 3e-3  # decayed by the time it ended
    state = load_state(resolve(out))
    assert 3.0 <= state["train_s"] < 30 and state["step"] == summary["step"]
    again = run(cfg(data, out, **kw, resume="latest"))  # the budget is spent: nothing more to do
    assert again["stopped"] == "already finished" and again["step"] == summary["step"]
    more = run(cfg(data, out, **{**kw, "max_time": 5.0}, resume="latest"))  # 2 more seconds
    assert more["stopped"] == "max_time reached" and more["step"] > summary["step"]


@pytest.mark.parametrize("setup", ["adamw", "speedrun"])
def test_stop_and_resume_is_exact(data, tmp_path, setup):
    kw = setup_fields(setup, dropout=0.1)
    straight = run(cfg(data, tmp_path / "straight", **kw))
    run(cfg(data, tmp_path / "split", **{**kw, "max_steps": 20}))  # stops at 20 with a checkpoint
    run(cfg(data, tmp_path / "split", **kw, resume="latest"))  # 20 more
    a, b = losses(tmp_path / "straight"), losses(tmp_path / "split")
    assert sorted(a) == sorted(b) == list(range(1, 41))
    assert a == b  # bit-identical losses, dropout included (RNG state restored)
    assert_same_weights(tmp_path / "straight", tmp_path / "split")
    assert straight["train_loss"] < math.log(256) - 1  # and it learned something
    assert (tmp_path / "straight" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    kept = sorted(p.name for p in (tmp_path / "straight").glob("step_*"))
    best = (tmp_path / "straight" / "best").read_text().strip()
    assert (
        kept[-2:] == ["step_000030", "step_000040"] and best in kept and len(kept) <= 3
    )  # keep_last 2 + best


def _run_cli(args: list[str], **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "gpt2lab", "train", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kw,
    )


def _flags(c: TrainConfig) -> list[str]:
    flags = []
    for k, v in {**c.to_dict(), **c.model}.items():
        if k in ("model", "resume") or v is None:
            continue
        flag = "--" + k.replace("_", "-")
        flags += ([flag] if v else ["--no-" + k.replace("_", "-")]) if isinstance(v, bool) else [flag, str(v)]
    return flags


@pytest.mark.slow
def test_sigterm_saves_and_resume_is_exact(data, tmp_path):
    steps = 150
    run(cfg(data, tmp_path / "straight", max_steps=steps, lr_decay_steps=steps, checkpoint_interval=1000))
    args = _flags(
        cfg(data, tmp_path / "killed", max_steps=steps, lr_decay_steps=steps, checkpoint_interval=1000)
    )
    proc = _run_cli(args)
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and metrics.read_text().count('"train_loss"') >= 20:  # 20 steps done
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.01)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    stopped_at = int(resolve(tmp_path / "killed").name.split("_")[1])
    assert 20 <= stopped_at < steps and "stopped by signal 15" in out
    done = _run_cli([*args, "--resume"])
    assert done.wait(timeout=300) == 0, done.stdout.read()
    assert losses(tmp_path / "killed") == losses(tmp_path / "straight")
    assert_same_weights(tmp_path / "killed", tmp_path / "straight")


@pytest.mark.slow
def test_sigkill_while_checkpointing_leaves_a_loadable_checkpoint(data, tmp_path):
    """Checkpoint every step of a model big enough that writing dominates; kill until a write was cut."""
    big = {**TINY, "n_embd": 512, "n_head": 8, "dropout": 0.0}  # 6.4M parameters: ~75 MB per checkpoint
    c = cfg(
        data,
        tmp_path / "run",
        model=big,
        max_steps=100_000,  # never reached: every attempt is killed
        lr_decay_steps=100_000,
        checkpoint_interval=1,
        eval_interval=0,
        keep_last=1,
    )
    args = _flags(c)
    latest = tmp_path / "run" / "latest"
    cut_mid_write = False
    for _attempt in range(5):
        before = latest.read_text() if latest.exists() else None
        proc = _run_cli(args + (["--resume"] if before else []))
        # Kill the moment a checkpoint's temporary directory appears (a ~75 MB write takes tens of ms,
        # the poll 1 ms), after the first save of this attempt so the run is past its warm-up.
        deadline, pending = time.time() + 120, False
        while time.time() < deadline and proc.poll() is None:
            pending = bool(list((tmp_path / "run").glob(".step_*.tmp-*")))
            if pending and latest.exists() and latest.read_text() != before:
                break
            time.sleep(0.001)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        load_model(resolve(tmp_path / "run"))  # whatever `latest` names is whole
        if list((tmp_path / "run").glob(".step_*.tmp-*")):
            cut_mid_write = True
            break
    assert cut_mid_write, "no kill landed during a checkpoint write"
    before = int(resolve(tmp_path / "run").name.split("_")[1])
    proc = _run_cli([*args, "--resume", "--max-steps", str(before + 3)])
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert f"resumed from {tmp_path / 'run' / f'step_{before:06d}'} at step {before}" in out
    assert not list((tmp_path / "run").glob(".step_*.tmp-*"))  # the debris was cleaned up


@pytest.mark.slow
@pytest.mark.parametrize("setup", ["adamw", "speedrun"])
def test_ddp_and_fsdp_two_processes_equal_one_process_with_accumulation(data, tmp_path, setup):
    common = dict(
        **setup_fields(setup, dropout=0.0),
        max_steps=12,
        lr_decay_steps=12,
        eval_interval=0,
        total_batch_size=4 * 32 * 2,
        loader_mode="random",
    )
    run(cfg(data, tmp_path / "one", **common))  # one process: 2 micro-batches of 4 x 32 per step
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--standalone",  # a free port: a fixed one collides with another test run on the same machine
        "-m",
        "gpt2lab",
        "train",
        *_flags(cfg(data, tmp_path / "two", **common)),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 process(es)" in result.stdout and "x 1 accumulation" in result.stdout
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(one) == sorted(two) == list(range(1, 13))
    for step in one:
        assert abs(one[step] - two[step]) < 1e-5, (step, one[step], two[step])
    # FSDP2 (sharded parameters, gradients, optimizer state) computes the same steps...
    cmd[cmd.index(str(tmp_path / "two"))] = str(tmp_path / "fsdp")
    result = subprocess.run([*cmd, "--fsdp"], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    fsdp = losses(tmp_path / "fsdp")
    assert all(abs(one[s] - fsdp[s]) < 1e-5 for s in one), (one, fsdp)
    # ...and its checkpoint (gathered to full tensors, optimizer state included) resumes in a single
    # process to the same steps as the single-process run resumed from its own checkpoint.
    more = {**common, "max_steps": 14, "lr_decay_steps": 12}
    run(cfg(data, tmp_path / "fsdp", **more, resume="latest"))
    run(cfg(data, tmp_path / "one", **more, resume="latest"))
    one, fsdp = losses(tmp_path / "one"), losses(tmp_path / "fsdp")
    assert sorted(fsdp) == list(range(1, 15))
    assert all(abs(one[s] - fsdp[s]) < 1e-5 for s in (13, 14)), (one, fsdp)


@pytest.mark.slow
def test_time_budget_under_ddp_every_rank_stops_at_the_same_step(data, tmp_path):
    """Each rank reads its own clock; a rank that stopped a step before the other would leave it
    waiting in an all-reduce forever. They share one clock (the mean), so the run ends, on time."""
    c = cfg(data, tmp_path / "two", max_steps=1_000_000, max_time=4.0, eval_interval=0, lr_schedule="wsd")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone"]
    cmd += ["-m", "gpt2lab", "train", *_flags(c)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "done: max_time reached" in result.stdout
    assert "2 process(es)" in result.stdout and load_state(resolve(tmp_path / "two"))["train_s"] >= 4.0


def test_nonfinite_loss_stops_or_skips_and_keeps_the_checkpoint(data, tmp_path, monkeypatch):
    from gpt2lab.model import GPT

    forward = GPT.forward
    calls = {"n": 0}

    def poisoned(self, idx, targets=None, kv_cache=None):
        out = forward(self, idx, targets, kv_cache)
        if targets is not None and self.training:
            calls["n"] += 1
            if calls["n"] in (15, 16):  # the 15th and 16th training micro-batches
                return out * float("nan")
        return out

    monkeypatch.setattr(GPT, "forward", poisoned)
    expected = r"step 14: non-finite loss or gradient .* step_000010 \(train loss [\d.]+\), is intact"
    with pytest.raises(UserError, match=expected):
        run(cfg(data, tmp_path / "stop", max_steps=30))
    assert resolve(tmp_path / "stop").name == "step_000010"  # intact, loadable
    load_model(resolve(tmp_path / "stop"))
    calls["n"] = 0
    summary = run(cfg(data, tmp_path / "skip", max_steps=30, on_nonfinite="skip", max_skips=2))
    assert summary["step"] == 30 and math.isfinite(summary["train_loss"])
    assert 15 not in losses(tmp_path / "skip") and 16 not in losses(tmp_path / "skip")


def test_early_stopping_and_best_checkpoint(data, tmp_path, capsys):
    # A learning rate this high makes val loss worse after the first evals; patience 2 stops the run.
    summary = run(
        cfg(
            data,
            tmp_path,
            max_steps=400,
            learning_rate=0.5,
            grad_clip=0,
            warmup_steps=0,
            early_stopping_patience=2,
            eval_interval=5,
            sample_tokens=8,
        )
    )
    assert summary["stopped"].startswith("early stopping") and summary["step"] < 400
    best = json.loads((resolve(tmp_path, "best") / "config.json").read_text())["best_val"]
    assert best == summary["best_val_loss"]
    out = capsys.readouterr().out
    assert f"step {summary['step']:>6}: sample: " in out  # a sample at the end


def test_bad_inputs(data, tmp_path, capsys):
    with pytest.raises(
        UserError, match=r"unknown \[train\] key 'learning_rat' \(did you mean 'learning_rate'\?\)"
    ):
        (tmp_path / "r.toml").write_text("[train]\nlearning_rat = 1e-3\n")
        load_recipe(str(tmp_path / "r.toml"))
    with pytest.raises(
        UserError, match=r"unknown recipe 'shakespeare-chr' \(did you mean 'shakespeare-char'\?\)"
    ):
        load_recipe("shakespeare-chr")
    with pytest.raises(
        UserError, match="total_batch_size 1000 is not divisible by batch_size 4 x seq_len 32"
    ):
        run(cfg(data, tmp_path / "a", total_batch_size=1000))
    with pytest.raises(
        UserError, match=r"data's vocabulary \(257 tokens\) does not fit the model's vocab_size 100"
    ):
        run(cfg(data, tmp_path / "b", model={**TINY, "vocab_size": 100}))
    run(cfg(data, tmp_path / "c", max_steps=10))
    with pytest.raises(UserError, match="cannot resume .* another architecture \\(n_layer 2 vs 3\\)"):
        run(cfg(data, tmp_path / "c", model={**TINY, "dropout": 0.1, "n_layer": 3}, resume="latest"))
    assert main(["train", "--data", str(data), "--out-dir", str(tmp_path / "d"), "--n-head", "5"]) == 2
    assert "n_embd 768 is not divisible by n_head 5" in capsys.readouterr().err


def test_every_recipe_parses():
    recipes = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.toml"))
    assert {p.stem for p in recipes} >= {
        "shakespeare-char",
        "tinystories-124m",
        "wikitext103-tinytiny",
        "tinystories-6l512",
        "fineweb-edu-124m",
        "tinystories-cpu",
        "shakespeare-speedrun",
        "tinystories-speedrun",
        "fineweb-edu-speedrun",
    }
    for path in recipes:
        fields = load_recipe(str(path))
        TrainConfig(**fields)  # validates every field, the preset and the model overrides
        assert path.read_text().startswith("#")  # each states its source, hardware and expected result


def test_speedrun_recipe_trains(data, tmp_path):
    """shakespeare-speedrun runs as written (a few steps, on the test's bytes data)."""
    fields = load_recipe("shakespeare-speedrun")
    fields.update(data=str(data), out_dir=str(tmp_path), max_steps=3, batch_size=2, eval_tokens=256)
    fields.update(sample_tokens=0, warmup_steps=1)
    summary = run(TrainConfig(**fields))
    assert summary["step"] == 3 and math.isfinite(summary["best_val_loss"])
    assert json.loads((resolve(tmp_path) / "config.json").read_text())["train"]["optimizer"] == "muon"
