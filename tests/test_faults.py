"""Fault injection: SIGKILL at random moments and inside every write of a checkpoint, a pointer, the log
and `prepare`; a full disk during a checkpoint and during a log write. After each fault the run is
resumed (`--resume`, or prepare run again) and must end bit-identical to an uninterrupted run.

Killed runs are children of a multiprocessing fork server that has torch and gpt2lab imported, so a
run starts in milliseconds instead of seconds; a fault is a patch the child installs on itself (a
write cut short, then SIGKILL). The counts below are the ones docs/reliability.md reports.
"""

from __future__ import annotations

import contextlib
import errno
import json
import multiprocessing
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import shakespeare_text

from gpt2lab.checkpoint import load_model, read_pointer, resolve
from gpt2lab.cli import main
from gpt2lab.config import PrepareConfig, TrainConfig
from gpt2lab.errors import WriteError
from gpt2lab.shards import run as prepare_run
from gpt2lab.train import run

TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, dropout=0.1)  # dropout: the RNG state matters
STEPS = 24  # checkpoints at 4, 8, ..., 24; evaluations at 8, 16, 24

# Kill points inside the writes of a training run, in the order one chain of runs meets them: (name,
# which call of that write in the attempt). Each attempt resumes what the one before left.
TRAIN_FAULTS = [
    ("weights-torn", 2),  # model.safetensors half written (2nd checkpoint of the first attempt: step 8)
    ("state-torn", 1),  # state.pt half written
    ("config-torn", 1),  # config.json half written
    ("before-best", 1),  # `latest` moved to the new best checkpoint, `best` not yet
    ("after-rename", 1),  # checkpoint renamed into place, `latest` not yet moved
    ("replace-aside", 1),  # re-saving that step: the old folder moved aside, the new one not in place
    ("pointer-torn", 1),  # `latest` written to its temporary, not yet renamed
    ("log-torn", 3),  # a metrics.jsonl line half written
    ("log-rewrite", 1),  # resume rewrites metrics.jsonl: killed before the rename
    ("prune-midway", 1),  # an old checkpoint half deleted
    ("plot", 1),  # loss.png written to its temporary, not yet renamed
    ("eval", 1),  # inside an evaluation
]
RANDOM_KILLS = 8  # SIGKILL after a random number of steps and a random delay
PREPARE_FAULTS = [("shard-torn", 3), ("before-state", 2), ("prepare-state-torn", 2)]  # then random kills,
PREPARE_LAST_FAULT = ("before-manifest", 1)  # and the end: every shard written, the manifest not yet
PREPARE_RANDOM_KILLS = 3


def train_cfg(data: Path, out: Path, **kw) -> TrainConfig:
    fields = dict(
        data=str(data), out_dir=str(out), preset="gpt2", model=TINY, batch_size=4, max_steps=STEPS,
        lr_decay_steps=STEPS, warmup_steps=3, learning_rate=3e-3, log_interval=1, eval_interval=8,
        eval_tokens=1024, checkpoint_interval=4, keep_last=2, pad_vocab_multiple=1, threads=1,
        resume="latest",  # as a preemption script runs it: the first attempt finds nothing and starts
    )  # fmt: skip
    return TrainConfig(**{**fields, **kw})


def corpus_text() -> str:
    return shakespeare_text(120_000, 25_000)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("faults")
    (root / "corpus.txt").write_text(corpus_text())
    with contextlib.redirect_stdout(None):
        prepare_run(
            PrepareConfig(source=str(root / "corpus.txt"), out=str(root / "bytes"), tokenizer="bytes")
        )
    return root / "bytes"


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> Path:
    """The uninterrupted run every faulted one must equal."""
    out = tmp_path_factory.mktemp("reference") / "run"
    with contextlib.redirect_stdout(None):
        run(train_cfg(data, out))
    return out


@pytest.fixture(scope="module")
def forkserver():
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(
        ["torch", "gpt2lab.train", "gpt2lab.shards", "matplotlib.pyplot", "test_faults"]
    )
    return ctx


def losses(out: Path) -> dict[int, float]:
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {e["step"]: e.get("train_loss", e.get("val_loss")) for e in events}


def events(out: Path) -> list[tuple]:
    """The log without its timings (which differ run to run): steps and losses, in order."""
    lines = (out / "metrics.jsonl").read_text().splitlines()
    keys = ("step", "train_loss", "lr", "grad_norm", "val_loss")
    return [tuple(json.loads(line).get(k) for k in keys) for line in lines]


def assert_same_run(out: Path, reference: Path) -> None:
    assert events(out) == events(reference)  # every loss bit-identical, no line lost or repeated
    a, b = load_model(resolve(out)).state_dict(), load_model(resolve(reference)).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert read_pointer(out, "best").name == read_pointer(reference, "best").name
    kept = sorted(p.name for p in out.iterdir() if p.name.startswith("step_"))
    assert kept == sorted(p.name for p in reference.iterdir() if p.name.startswith("step_"))
    debris = [p.name for p in out.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
    assert not debris, debris


# --- the faults a child installs on itself --------------------------------------------------------


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _truncate_and_kill(path: str | Path) -> None:
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) // 2])
    _kill()


class CutWrite:
    """A file whose write stops half way when due(), then fail() runs: as a kill or a full disk cut it."""

    def __init__(self, f, due, fail):
        self.f, self.due, self.fail = f, due, fail

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()

    def tell(self):
        return self.f.tell()

    def truncate(self, size):
        return self.f.truncate(size)

    def write(self, data):
        if self.due():
            self.f.write(data[: len(data) // 2])
            self.fail()
        return self.f.write(data)


def cut_open(due, fail):
    """An `open` for train.Logger whose files are CutWrite."""
    return lambda path, mode, **kw: CutWrite(open(path, mode, **kw), due, fail)  # noqa: SIM115


def _install(name: str, nth: int) -> None:
    """Patch this (child) process so that the nth write `name` names is cut by SIGKILL."""
    import shutil

    import safetensors.torch

    import gpt2lab.shards
    import gpt2lab.train
    from gpt2lab.dataloader import ShardData

    calls = {"n": 0}

    def due() -> bool:
        calls["n"] += 1
        return calls["n"] == nth

    real_rename, real_replace, real_rmtree = os.rename, os.replace, shutil.rmtree
    if name == "weights-torn":
        real = safetensors.torch.save_file

        def save_file(tensors, path, metadata=None):
            real(tensors, path, metadata=metadata)
            if due():
                _truncate_and_kill(path)

        safetensors.torch.save_file = save_file
    elif name == "state-torn":
        real_save = torch.save

        def save(obj, f, *a, **kw):
            real_save(obj, f, *a, **kw)
            if due():
                _truncate_and_kill(f)

        torch.save = save
    elif name == "config-torn":
        real_write = Path.write_text

        def write_text(self, text, *a, **kw):
            n = real_write(self, text, *a, **kw)
            if self.name == "config.json" and ".tmp-" in self.parent.name and due():
                _truncate_and_kill(self)
            return n

        Path.write_text = write_text
    elif name in ("after-rename", "replace-aside"):

        def rename(src, dst):
            real_rename(src, dst)
            moved_in = ".tmp-" in Path(src).name and Path(dst).name.startswith("step_")
            moved_aside = ".old-" in Path(dst).name
            if (moved_in if name == "after-rename" else moved_aside) and due():
                _kill()

        os.rename = rename
    elif name in ("before-best", "pointer-torn", "log-rewrite", "plot"):
        target = {"before-best": "best", "pointer-torn": "latest", "log-rewrite": "metrics.jsonl"}
        target = target.get(name, "loss.png")

        def replace(src, dst):
            if Path(dst).name == target and due():
                _kill()
            real_replace(src, dst)

        os.replace = replace
    elif name == "log-torn":
        gpt2lab.train.open = cut_open(due, _kill)
    elif name == "prune-midway":

        def rmtree(path, *a, **kw):
            if Path(path).name.startswith("step_") and due():
                (Path(path) / "model.safetensors").unlink()
                _kill()
            real_rmtree(path, *a, **kw)

        shutil.rmtree = rmtree
    elif name == "eval":
        real_eval = ShardData.evaluate

        def evaluate(self, *a, **kw):
            if due():
                _kill()
            return real_eval(self, *a, **kw)

        ShardData.evaluate = evaluate
    elif name == "shard-torn":
        real_atomic = gpt2lab.shards.atomic_write

        def atomic_write(path, write):
            if Path(path).suffix == ".bin" and due():
                tmp = Path(path).with_name(f".{Path(path).name}.tmp-{os.getpid()}")
                write(tmp)
                _truncate_and_kill(tmp)
            real_atomic(path, write)

        gpt2lab.shards.atomic_write = atomic_write
    elif name in ("before-state", "prepare-state-torn", "before-manifest"):
        real_json = gpt2lab.shards.write_json
        target = "manifest.json" if name == "before-manifest" else gpt2lab.shards.STATE

        def write_json(path, obj):
            if Path(path).name == target and due():
                if name == "prepare-state-torn":
                    tmp = Path(path).with_name(f".{Path(path).name}.tmp-{os.getpid()}")
                    tmp.write_text(json.dumps(obj))
                    _truncate_and_kill(tmp)
                _kill()
            real_json(path, obj)

        gpt2lab.shards.write_json = write_json
    else:
        raise ValueError(name)


def _child(job: str, cfg, fault: tuple[str, int] | None, log: str) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    if fault is not None:
        _install(*fault)
    if job == "train":
        run(cfg)
    else:
        prepare_run(cfg)


def attempt(ctx, job: str, cfg, fault, log: Path, kill_when=None) -> int:
    """One run in a child; kill_when() -> True makes the parent SIGKILL it. The child's exit code."""
    p = ctx.Process(target=_child, args=(job, cfg, fault, str(log)))
    p.start()
    deadline = time.time() + 300
    while p.is_alive() and time.time() < deadline:
        if kill_when is not None and kill_when():
            p.kill()
            break
        time.sleep(0.002)
    p.join(60)
    assert p.exitcode is not None, f"the run hung; its log:\n{log.read_text()[-3000:]}"
    return p.exitcode


def train_steps(out: Path) -> int:
    try:
        return (out / "metrics.jsonl").read_text().count('"train_loss"')
    except OSError:
        return 0


@pytest.mark.slow
def test_sigkill_inside_every_write_and_at_random_moments_then_resume_is_bit_exact(
    data, reference, forkserver, tmp_path
):
    out, log = tmp_path / "run", tmp_path / "attempts.log"
    killed = 0
    for fault in TRAIN_FAULTS:
        code = attempt(forkserver, "train", train_cfg(data, out), fault, log)
        assert code == -signal.SIGKILL, f"fault {fault} never fired (exit {code}):\n{log.read_text()[-3000:]}"
        killed += 1
        if fault[0] == "after-rename":  # the run after `before-best` moved `best` to the best checkpoint
            assert read_pointer(out, "best").name == "step_000008"
        if read_pointer(out, "latest") is not None:
            load_model(resolve(out))  # whatever `latest` names is a whole checkpoint
    rng = random.Random(15)
    for _ in range(RANDOM_KILLS):
        start = int(read_pointer(out, "latest").name.split("_")[1])  # where the resumed run starts
        target = min(start + rng.randint(1, 5), STEPS - 2)  # always before the run ends
        delay, log_before = rng.uniform(0, 0.02), (out / "metrics.jsonl").stat().st_ino
        fired: list[float] = []

        def due(target=target, delay=delay, fired=fired, log_before=log_before) -> bool:
            # The resumed run rewrites its log (a new file) before it trains: count only its own lines.
            with contextlib.suppress(OSError):
                if (
                    not fired
                    and (out / "metrics.jsonl").stat().st_ino != log_before
                    and train_steps(out) >= target
                ):
                    fired.append(time.time())
            return bool(fired) and time.time() - fired[0] >= delay

        code = attempt(forkserver, "train", train_cfg(data, out), None, log, kill_when=due)
        assert code == -signal.SIGKILL, f"the run ended before the kill:\n{log.read_text()[-3000:]}"
        killed += 1
        if read_pointer(out, "latest") is not None:
            load_model(resolve(out))
    assert killed == len(TRAIN_FAULTS) + RANDOM_KILLS
    assert attempt(forkserver, "train", train_cfg(data, out), None, log) == 0, log.read_text()[-3000:]
    assert "warning: " in log.read_text() and "dropped a torn last line" in log.read_text()
    assert_same_run(out, reference)


@pytest.mark.slow
def test_sigkill_inside_prepare_then_rerun_writes_identical_bytes(forkserver, tmp_path):
    (tmp_path / "corpus.txt").write_text(corpus_text())

    def cfg(out: Path) -> PrepareConfig:
        return PrepareConfig(
            source=str(tmp_path / "corpus.txt"), out=str(out), tokenizer="bytes", shard_tokens=9_000
        )

    with contextlib.redirect_stdout(None):
        prepare_run(cfg(tmp_path / "straight"))
    out, log = tmp_path / "killed", tmp_path / "attempts.log"
    out.mkdir()
    (out / ".notes.tmp-mine").write_text("a user's file that looks like a temporary")
    rng = random.Random(15)
    for fault in [*PREPARE_FAULTS, *[None] * PREPARE_RANDOM_KILLS, PREPARE_LAST_FAULT]:
        target = len(list(out.glob("*.bin"))) + rng.randint(1, 3)
        kill_when = (lambda t=target: len(list(out.glob("*.bin"))) >= t) if fault is None else None
        code = attempt(forkserver, "prepare", cfg(out), fault, log, kill_when)
        assert code == -signal.SIGKILL, f"fault {fault} never fired (exit {code}):\n{log.read_text()[-3000:]}"
        assert not (out / "manifest.json").exists()
    assert attempt(forkserver, "prepare", cfg(out), None, log) == 0, log.read_text()[-3000:]
    straight = sorted(p.name for p in (tmp_path / "straight").iterdir() if p.name != ".lock")
    assert sorted(p.name for p in out.iterdir() if p.name not in (".lock", ".notes.tmp-mine")) == straight
    for name in straight:
        if name.endswith(".bin"):
            assert (out / name).read_bytes() == (tmp_path / "straight" / name).read_bytes(), name
    a, b = (json.loads((d / "manifest.json").read_text()) for d in (out, tmp_path / "straight"))
    assert a == {**b, "settings": {**b["settings"], "source": a["settings"]["source"]}}
    assert (out / ".notes.tmp-mine").read_text().startswith("a user's file")  # never taken for debris


def test_the_fault_counts_are_the_documented_ones():
    doc = (Path(__file__).resolve().parents[1] / "docs" / "reliability.md").read_text()
    train, prepare = len(TRAIN_FAULTS) + RANDOM_KILLS, len(PREPARE_FAULTS) + PREPARE_RANDOM_KILLS + 1
    assert f"**{train} kills**" in doc and f"**{prepare} kills**" in doc
    assert f"**{train + prepare} SIGKILLs** injected ({train} into training, {prepare} into prepare)" in doc


# --- a full disk -------------------------------------------------------------------------------------


def _train_args(data: Path, out: Path) -> list[str]:
    c = train_cfg(data, out)
    flags = []
    for k, v in {**c.to_dict(), **c.model}.items():
        if k in ("model", "resume", "overwrite") or v is None:
            continue
        flag = "--" + k.replace("_", "-")
        flags += ([flag] if v else ["--no-" + k.replace("_", "-")]) if isinstance(v, bool) else [flag, str(v)]
    return ["train", *flags, "--resume"]


def assert_stopped_intact(out: Path, err: str, what: str, step: int) -> None:
    """One line naming what could not be written; the checkpoint before it whole; no debris, no torn log."""
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert what in err and "No space left on device" in err, err
    assert f"The last checkpoint, step_{step:06d}" in err and "is intact: free space, then --resume" in err, (
        err
    )
    assert read_pointer(out, "latest").name == f"step_{step:06d}"
    load_model(resolve(out))
    assert not [p.name for p in out.iterdir() if ".tmp-" in p.name]
    text = (out / "metrics.jsonl").read_text()
    assert text.endswith("\n") and all(json.loads(line) for line in text.splitlines())


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs, where the machine lets us mount one (root, no container policy against it)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    try:
        r = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True, text=True
        )
    except FileNotFoundError:
        pytest.skip("no `mount` command: the real full-disk test needs a tmpfs; the injected one still runs")
    if r.returncode != 0:
        reason = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}"
        pytest.skip(f"cannot mount a tmpfs here ({reason}); the injected full-disk tests still run")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def fill(directory: Path, leave: int) -> Path:
    """A file that takes all free space of directory's file system but `leave` bytes."""
    filler = directory / "filler"

    def free() -> int:
        return os.statvfs(directory).f_bavail * os.statvfs(directory).f_frsize

    with open(filler, "wb") as f, contextlib.suppress(OSError):
        for chunk in (1 << 16, 4096):
            while free() > leave + (chunk if chunk > 4096 else 0):
                f.write(b"\0" * chunk)
                f.flush()
    return filler


def checkpoint_bytes(reference: Path) -> int:
    return sum(f.stat().st_size for f in resolve(reference).iterdir())


@pytest.mark.slow
def test_full_disk_during_a_checkpoint_real_tmpfs(data, reference, small_disk, capsys):
    out = small_disk / "run"
    size = checkpoint_bytes(reference)
    filler = fill(small_disk, leave=int(1.5 * size) + (200 << 10))  # room for one checkpoint and the log
    assert main(_train_args(data, out)) == 2
    err = capsys.readouterr().err
    assert_stopped_intact(out, err, "cannot write", 4)
    filler.unlink()  # space freed: the same command resumes
    assert main(_train_args(data, out)) == 0
    assert_same_run(out, reference)


@pytest.mark.slow
def test_full_disk_during_a_log_write_real_tmpfs(data, reference, small_disk, capsys, monkeypatch):
    import gpt2lab.train

    out = small_disk / "run"
    real_log, page, failed = gpt2lab.train.Logger.log, os.statvfs(small_disk).f_bsize, []

    def log(self, event):
        # From step 10 on, the disk fills up just before the first line that needs a new page (a line
        # that fits the file's last page would still be written).
        slack = -(self.out_dir / "metrics.jsonl").stat().st_size % page
        if event["step"] >= 10 and len(json.dumps(event)) + 1 > slack and not failed:
            fill(small_disk, leave=0)
            failed.append(event["step"])
        real_log(self, event)

    monkeypatch.setattr(gpt2lab.train.Logger, "log", log)
    assert main(_train_args(data, out)) == 2
    assert_stopped_intact(out, capsys.readouterr().err, "metrics.jsonl", (failed[0] - 1) // 4 * 4)
    (small_disk / "filler").unlink()
    monkeypatch.undo()
    assert main(_train_args(data, out)) == 0
    assert_same_run(out, reference)


def test_full_disk_injected_during_a_checkpoint_and_a_log_write(
    data, reference, tmp_path, capsys, monkeypatch
):
    """The same faults on any machine: the writes fail as a full disk makes them fail (a partial file,
    then ENOSPC; safetensors' own error text), without needing a small file system."""
    import safetensors.torch
    from safetensors import SafetensorError

    import gpt2lab.train

    out = tmp_path / "run"
    real_save = safetensors.torch.save_file
    calls = {"n": 0}

    def save_file(tensors, path, metadata=None):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint (step 8)
            Path(path).write_bytes(b"\0" * 1000)
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    assert main(_train_args(data, out)) == 2
    assert_stopped_intact(out, capsys.readouterr().err, "step_000008", 4)
    monkeypatch.undo()

    calls["n"] = 0

    def full() -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def third() -> bool:  # the 3rd metrics.jsonl line after the resume
        calls["n"] += 1
        return calls["n"] == 3

    monkeypatch.setattr(gpt2lab.train, "open", cut_open(third, full), raising=False)
    assert main(_train_args(data, out)) == 2
    assert_stopped_intact(out, capsys.readouterr().err, "metrics.jsonl", 4)
    monkeypatch.undo()
    assert main(_train_args(data, out)) == 0
    assert_same_run(out, reference)
    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    calls["n"] = 1
    with pytest.raises(WriteError, match="No checkpoint was written yet: free space, then start over"):
        run(train_cfg(data, tmp_path / "again"))  # the library raises the type the CLI prints
