"""Bad input, tried as a new user and as an adversary would: corrupt files of every kind gpt2lab reads,
hostile configs, bad settings and flags. Each must be one line on stderr naming the problem, exit
status 2, no traceback, and leave everything on disk exactly as it was. CASES is the corpus that
docs/reliability.md counts.

Also here: a run directory belongs to one run (a second `train` is refused and changes nothing, a
concurrent one is locked out, --overwrite starts over), --resume before the first checkpoint, the
resume of a finished run, and the progress line's figures.
"""

# ruff: noqa: E501  (the corpus reads as a table, one case per line)
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import shakespeare_text
from safetensors.torch import load_file, save_file

from gpt2lab.atomic import directory_lock
from gpt2lab.checkpoint import load_model, resolve
from gpt2lab.cli import main
from gpt2lab.config import PrepareConfig, TrainConfig, usable_cpus
from gpt2lab.errors import UserError
from gpt2lab.shards import read_manifest, write_shard
from gpt2lab.shards import run as prepare_run

TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, dropout=0.0)


def train_cfg(data: Path, out: Path, **kw) -> TrainConfig:
    fields = dict(
        data=str(data), out_dir=str(out), preset="gpt2", model=TINY, batch_size=4, max_steps=4,
        lr_decay_steps=4, warmup_steps=1, learning_rate=3e-3, log_interval=1, eval_interval=2,
        eval_tokens=512, checkpoint_interval=2, pad_vocab_multiple=1, threads=1,
    )  # fmt: skip
    return TrainConfig(**{**fields, **kw})


def train_args(c: TrainConfig) -> list[str]:
    flags = []
    for k, v in {**c.to_dict(), **c.model}.items():
        if k in ("model", "resume", "overwrite") or v is None:
            continue
        flag = "--" + k.replace("_", "-")
        flags += ([flag] if v else ["--no-" + k.replace("_", "-")]) if isinstance(v, bool) else [flag, str(v)]
    return ["train", *flags]


def text() -> str:
    return shakespeare_text(60_000, 12_000)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """Good files of every kind: shards (bytes and char), a finished run, a Hugging Face directory."""
    from gpt2lab.interop import save_pretrained
    from gpt2lab.train import run

    root = tmp_path_factory.mktemp("good")
    (root / "corpus.txt").write_text(text())
    shifted = "".join(chr(ord(c) + 1) for c in text())  # as many distinct characters, other ones
    (root / "other.txt").write_text(shifted)
    with contextlib.redirect_stdout(None):
        for name, source, tok in (
            ("data", "corpus", "bytes"),
            ("chars", "corpus", "char"),
            ("chars2", "other", "char"),
        ):
            prepare_run(
                PrepareConfig(source=str(root / f"{source}.txt"), out=str(root / name), tokenizer=tok)
            )
        run(train_cfg(root / "data", root / "run"))
        run(train_cfg(root / "chars", root / "charrun"))
    save_pretrained(load_model(resolve(root / "run")), root / "hf")
    return root


@dataclass
class Case:
    id: str
    corrupt: object  # (root: Path, monkeypatch) -> argv
    expect: str  # in the one line


def _edit_json(path: Path, edit) -> None:
    obj = json.loads(path.read_text())
    edit(obj)
    path.write_text(json.dumps(obj))


def ckpt_config(root: Path, edit) -> Path:
    ck = resolve(root / "run")
    _edit_json(ck / "config.json", edit)
    return ck


def sample(ck: Path) -> list[str]:
    return ["sample", "--ckpt", str(ck), "--prompt", "a", "--max-new-tokens", "2", "--device", "cpu"]


def resume(root: Path) -> list[str]:
    return [*train_args(train_cfg(root / "data", root / "run", max_steps=8)), "--resume"]


def edit_state(root: Path, edit) -> list[str]:
    path = resolve(root / "run") / "state.pt"
    state = torch.load(path, weights_only=True)
    edit(state)
    torch.save(state, path)
    return resume(root)


def edit_weights(root: Path, edit) -> Path:
    path = resolve(root / "run") / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)
    return path.parent


class Payload:
    """A pickle that, loaded without weights_only, would create MARKER: it must never run."""

    def __reduce__(self):
        return (os.system, (f"touch {Payload.marker}",))


def garbage_pickle(root: Path) -> list[str]:
    Payload.marker = root / "MARKER"
    (resolve(root / "run") / "state.pt").write_bytes(pickle.dumps({"step": Payload()}, protocol=2))
    return resume(root)


def eval_loss(root: Path, run: str = "run", data: str = "data") -> list[str]:
    return ["eval", "loss", "--ckpt", str(root / run), "--data", str(root / data), "--device", "cpu"]


def bad_ids(root: Path, split: str, keep_manifest_max: bool) -> None:
    """Every token of the split's first shard set to 300, beyond the bytes vocabulary of 257."""
    manifest = read_manifest(root / "data")
    name = manifest["splits"][split]["shards"][0]
    tokens = np.full(manifest["splits"][split]["tokens"], 300, dtype=np.uint16)
    write_shard(root / "data" / name, tokens)
    if not keep_manifest_max:
        _edit_json(
            root / "data" / "manifest.json", lambda m: m["splits"][split]["max_ids"].__setitem__(0, 300)
        )


def serve(root: Path, *flags: str) -> list[str]:
    return ["serve", "--ckpt", str(root / "run"), "--host", "0.0.0.0", *flags]


def bpe_prepared(root: Path) -> list[str]:
    """A folder prepared with a trained BPE (its spec holds kilobytes of ranks), asked for another one."""
    assert main(["tokenizer", "train", "--input", str(root / "corpus.txt"), "--vocab-size", "300",
                 "--out", str(root / "tok"), "--quiet"]) == 0  # fmt: skip
    with contextlib.redirect_stdout(None):
        prepare_run(
            PrepareConfig(source=str(root / "corpus.txt"), out=str(root / "bpe"), tokenizer=str(root / "tok"))
        )
    return ["prepare", str(root / "corpus.txt"), "--out", str(root / "bpe"), "--tokenizer", "bytes"]


def recipe(root: Path, body: str) -> list[str]:
    (root / "r.toml").write_text(body)
    return [
        "train",
        "--recipe",
        str(root / "r.toml"),
        "--data",
        str(root / "data"),
        "--out-dir",
        str(root / "o"),
    ]


def flags(root: Path, *extra: str) -> list[str]:
    return [*train_args(train_cfg(root / "data", root / "new")), *extra]


CASES = [
    # checkpoints: config.json
    Case(
        "config without model",
        lambda r, m: sample(ckpt_config(r, lambda c: c.pop("model"))),
        "'model' must be",
    ),
    Case(
        "config model a list",
        lambda r, m: sample(ckpt_config(r, lambda c: c.update(model=[1, 2]))),
        "'model' must be",
    ),
    Case("config not JSON", lambda r, m: sample(_in_ckpt(r, "config.json", b"{nope")), "is not valid JSON"),
    Case(
        "config nested 100k deep",
        lambda r, m: sample(_in_ckpt(r, "config.json", b"[" * 100_000)),
        "cannot be read",
    ),
    Case(
        "block_size 1e8 (a float)",
        lambda r, m: sample(ckpt_config(r, lambda c: c["model"].update(block_size=1e8))),
        "block_size must be a positive integer",
    ),
    Case(
        "block_size 100000000",
        lambda r, m: sample(ckpt_config(r, lambda c: c["model"].update(block_size=100_000_000))),
        "beyond gpt2lab's limit",
    ),
    Case(
        "n_embd asking for terabytes",
        lambda r, m: sample(ckpt_config(r, lambda c: c["model"].update(n_embd=65536, n_head=1))),
        "more than this machine's",
    ),
    Case(
        "char tokenizer chars an int",
        lambda r, m: sample(
            ckpt_config(
                r,
                lambda c: c.update(
                    tokenizer={"kind": "char", "version": 1, "chars": 5, "special_tokens": ["<|endoftext|>"]}
                ),
            )
        ),
        "chars and name must be text",
    ),
    Case(
        "tokenizer of unknown kind",
        lambda r, m: sample(ckpt_config(r, lambda c: c["tokenizer"].update(kind="sentencepiece"))),
        "is not one of",
    ),
    Case(
        "tokenizer spec a string",
        lambda r, m: sample(ckpt_config(r, lambda c: c.update(tokenizer="bytes"))),
        "'tokenizer' must be",
    ),
    Case(
        "lora settings incomplete",
        lambda r, m: sample(ckpt_config(r, lambda c: c.update(lora={"rank": 2}))),
        "'lora' settings",
    ),
    Case(
        "checkpoint version 99",
        lambda r, m: sample(ckpt_config(r, lambda c: c.update(version=99))),
        "checkpoint version 99",
    ),
    # checkpoints: weights
    Case(
        "NaN weights: sample",
        lambda r, m: sample(edit_weights(r, lambda t: t["transformer.wte.weight"].fill_(math.nan))),
        "NaN or infinite",
    ),
    Case(
        "NaN weights: convert",
        lambda r, m: [
            "convert",
            "--ckpt",
            str(
                edit_weights(
                    r,
                    lambda t: t[
                        "lm_head.weight" if "lm_head.weight" in t else "transformer.ln_f.weight"
                    ].fill_(math.inf),
                )
            ),
            "--out",
            str(r / "hf-out"),
        ],
        "NaN or infinite",
    ),
    Case(
        "weights truncated",
        lambda r, m: sample(_truncate(resolve(r / "run") / "model.safetensors")),
        "cannot be read",
    ),
    Case(
        "a tensor missing",
        lambda r, m: sample(edit_weights(r, lambda t: t.pop("transformer.ln_f.bias"))),
        "missing tensor 'transformer.ln_f.bias'",
    ),
    Case(
        "a tensor mis-shaped",
        lambda r, m: sample(edit_weights(r, lambda t: t.update({"transformer.ln_f.bias": torch.zeros(3)}))),
        "has shape (3,)",
    ),
    Case(
        "HF index weight_map a list",
        lambda r, m: ["convert", "--pretrained", str(_hf_index(r)), "--out", str(r / "ck-out")],
        "'weight_map' must map",
    ),
    Case(
        "HF pytorch_model.bin a code-running pickle",
        lambda r, m: ["convert", "--pretrained", str(_hf_bin(r, None)), "--out", str(r / "ck-out")],
        "refused without running any of it",
    ),
    Case(
        "HF pytorch_model.bin a list",
        lambda r, m: [
            "convert",
            "--pretrained",
            str(_hf_bin(r, [torch.zeros(2)])),
            "--out",
            str(r / "ck-out"),
        ],
        "is not a state dict",
    ),
    # run directories: pointers
    Case(
        "latest binary: sample",
        lambda r, m: sample(_write(r / "run" / "latest", b"\xff\xfe\x00\x81") and r / "run"),
        "is not a checkpoint pointer",
    ),
    Case(
        "latest binary: resume",
        lambda r, m: _write(r / "run" / "latest", b"\xff\xfe\x00\x81") and resume(r),
        "is not a checkpoint pointer",
    ),
    Case(
        "latest escapes the run",
        lambda r, m: sample(_write(r / "run" / "latest", b"../../etc\n") and r / "run"),
        "is not a checkpoint pointer",
    ),
    Case(
        "latest names nothing",
        lambda r, m: sample(_write(r / "run" / "latest", b"step_999999\n") and r / "run"),
        "which is not a complete checkpoint",
    ),
    # run directories: state.pt
    Case(
        "state step a string",
        lambda r, m: edit_state(r, lambda s: s.update(step="ten")),
        "'step' must be a non-negative integer",
    ),
    Case(
        "state without optimizer",
        lambda r, m: edit_state(r, lambda s: s.pop("optimizer")),
        "has no 'optimizer'",
    ),
    Case(
        "state junk RNG",
        lambda r, m: edit_state(r, lambda s: s["rng"].update(cpu=torch.zeros(10, dtype=torch.uint8))),
        "'rng' must be RNG states",
    ),
    Case(
        "state loader of another run",
        lambda r, m: edit_state(r, lambda s: s["loader"].update(seed=7)),
        "loader state has seed 7",
    ),
    Case("state a code-running pickle", lambda r, m: garbage_pickle(r), "refused without running any of it"),
    Case(
        "state random bytes",
        lambda r, m: _write(resolve(r / "run") / "state.pt", os.urandom(3000)) and resume(r),
        "cannot be read",
    ),
    Case(
        "metrics.jsonl bad middle line",
        lambda r, m: (
            _write(r / "run" / "metrics.jsonl", b'{"step": 1}\ngarbage\n{"step": 2}\n') and resume(r)
        ),
        "metrics.jsonl:2 is not a metrics event",
    ),
    # data
    Case(
        "shard ids beyond the vocabulary: train",
        lambda r, m: bad_ids(r, "train", False) or flags(r),
        "holds token id 300, outside the manifest's vocab_size 257",
    ),
    Case(
        "shard ids beyond a loaded model's vocabulary",
        lambda r, m: _bigger_vocab(r) or flags(r, "--init-from", str(r / "run")),
        "vocabulary of 301 ids but the model's has only 257",
    ),
    Case(
        "shard ids beyond the vocabulary: eval",
        lambda r, m: bad_ids(r, "val", True) or eval_loss(r),
        "token id 300 is outside the vocabulary of 257",
    ),
    Case(
        "manifest vocab_size edited",
        lambda r, m: _edit_json(r / "data" / "manifest.json", lambda d: d.update(vocab_size=100)) or flags(r),
        "outside the manifest's vocab_size 100",
    ),
    Case(
        "manifest vocab_size edited: eval",
        lambda r, m: (
            _edit_json(r / "data" / "manifest.json", lambda d: d.update(vocab_size=100)) or eval_loss(r)
        ),
        "outside the manifest's vocab_size 100",
    ),
    Case(
        "manifest shard escapes",
        lambda r, m: (
            _edit_json(
                r / "data" / "manifest.json",
                lambda d: d["splits"]["train"]["shards"].__setitem__(0, "../../etc/passwd"),
            )
            or flags(r)
        ),
        "is not a file name",
    ),
    Case(
        "manifest splits a list",
        lambda r, m: _edit_json(r / "data" / "manifest.json", lambda d: d.update(splits=[])) or flags(r),
        "'splits' must map",
    ),
    Case(
        "manifest not JSON",
        lambda r, m: _write(r / "data" / "manifest.json", b"\x00\x01") and flags(r),
        "is not valid JSON",
    ),
    Case(
        "shard truncated",
        lambda r, m: (
            _truncate(r / "data" / read_manifest(r / "data")["splits"]["train"]["shards"][0]) and flags(r)
        ),
        "is truncated or corrupt",
    ),
    Case(
        "eval data of another tokenizer, same size",
        lambda r, m: eval_loss(r, "charrun", "chars2"),
        "was tokenized with a char tokenizer",
    ),
    Case(
        "eval data of another tokenizer kind",
        lambda r, m: eval_loss(r, "charrun", "data"),
        "was tokenized with",
    ),
    # prepare
    Case(
        "prepare --out a file",
        lambda r, m: [
            "prepare",
            str(r / "corpus.txt"),
            "--out",
            str(r / "corpus.txt"),
            "--tokenizer",
            "bytes",
        ],
        "is a file, not a directory",
    ),
    Case(
        "prepare /dev/zero",
        lambda r, m: ["prepare", "/dev/zero", "--out", str(r / "z"), "--tokenizer", "bytes"],
        "not a regular file",
    ),
    Case(
        "prepare --workers beyond the CPUs",
        lambda r, m: [
            "prepare",
            str(r / "corpus.txt"),
            "--out",
            str(r / "w"),
            "--workers",
            str(usable_cpus() + 1),
        ],
        "exceeds the",
    ),
    Case(
        "prepare into a BPE folder, another tokenizer",
        lambda r, m: bpe_prepared(r),
        "was prepared with the bpe tokenizer 'tok', not the bytes tokenizer",
    ),
    # tokenizer folders
    Case(
        "tokenizer: vocab.tiktoken not text",
        lambda r, m: _tokenizer(r, "vocab.tiktoken", lambda b: os.urandom(500)),
        "vocab.tiktoken: cannot read tiktoken rank file",
    ),
    Case(
        "tokenizer: a rank beyond the vocabulary",
        lambda r, m: _tokenizer(r, "vocab.tiktoken", lambda b: b + b"YWJj 999999999999\n"),
        "vocab.tiktoken and the special tokens of",
    ),
    Case(
        "tokenizer: gpt2lab_tokenizer.json a list",
        lambda r, m: _tokenizer(r, "gpt2lab_tokenizer.json", lambda b: b"[1]"),
        "expected a JSON object",
    ),
    # settings and flags
    *[
        Case(
            f"--{flag}={value}",
            lambda r, m, f=flag, v=value: flags(r, f"--{f}={v}"),
            "must be a finite number",
        )
        for flag, value in (
            ("learning-rate", "nan"),
            ("min-lr", "nan"),
            ("beta1", "nan"),
            ("eps", "nan"),
            ("learning-rate", "1e39"),
            ("grad-clip", "inf"),
            ("weight-decay", "-inf"),
        )
    ],
    Case("--dropout nan", lambda r, m: flags(r, "--dropout", "nan"), "dropout must be in [0, 1), got nan"),
    Case(
        "recipe max_steps a string",
        lambda r, m: recipe(r, '[train]\nmax_steps = "10"\n'),
        "max_steps must be an integer",
    ),
    Case(
        "recipe block_size 1e8",
        lambda r, m: recipe(r, "[model]\nblock_size = 1e8\n"),
        "block_size must be a positive integer",
    ),
    Case(
        "an abbreviated flag",
        lambda r, m: flags(r, "--learning-rat", "1e-3"),
        "unknown flag --learning-rat (did you mean --learning-rate?)",
    ),
    Case(
        "a character the char tokenizer lacks",
        lambda r, m: [
            "tokenizer",
            "encode",
            "--tokenizer",
            "char",
            "--corpus",
            str(r / "corpus.txt"),
            "--text",
            "\u00e9",
        ],
        "characters of this char tokenizer",
    ),
    Case("--resume with --overwrite", lambda r, m: [*resume(r), "--overwrite"], "give one"),
    # secrets
    Case(
        "serve --api-key empty on 0.0.0.0",
        lambda r, m: serve(r, "--api-key", ""),
        "--api-key must not be empty",
    ),
    Case(
        "serve GPT2LAB_API_KEY empty",
        lambda r, m: m.setenv("GPT2LAB_API_KEY", "") or serve(r),
        "GPT2LAB_API_KEY is set but empty",
    ),
    Case(
        "serve --api-key-file missing",
        lambda r, m: serve(r, "--api-key-file", str(r / "nokey")),
        "cannot read the API key file",
    ),
    Case(
        "serve --api-key-file empty",
        lambda r, m: _write(r / "key", b"\n") and serve(r, "--api-key-file", str(r / "key")),
        "is empty",
    ),
]


def _in_ckpt(root: Path, name: str, data: bytes) -> Path:
    ck = resolve(root / "run")
    (ck / name).write_bytes(data)
    return ck


def _bigger_vocab(root: Path) -> None:
    """A consistent manifest of a 301-id tokenizer (its ids up to 300), for a model of 257."""
    bad_ids(root, "train", True)
    _edit_json(
        root / "data" / "manifest.json",
        lambda d: (d.update(vocab_size=301), d["splits"]["train"]["max_ids"].__setitem__(0, 300)),
    )


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _truncate(path: Path) -> Path:
    path.write_bytes(path.read_bytes()[:-7])
    return path.parent if path.name == "model.safetensors" else path


def _hf_index(root: Path) -> Path:
    (root / "hf" / "model.safetensors").unlink()
    (root / "hf" / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": ["model.safetensors"]})
    )
    return root / "hf"


def _tokenizer(root: Path, name: str, edit) -> list[str]:
    """A trained BPE folder whose file `name` is replaced by edit(its bytes); prepare asked to use it."""
    assert main(["tokenizer", "train", "--input", str(root / "corpus.txt"), "--vocab-size", "300",
                 "--out", str(root / "tok"), "--quiet"]) == 0  # fmt: skip
    _write(root / "tok" / name, edit((root / "tok" / name).read_bytes()))
    return ["prepare", str(root / "corpus.txt"), "--out", str(root / "p"), "--tokenizer", str(root / "tok")]


def _hf_bin(root: Path, obj: object) -> Path:
    """The Hugging Face folder with its weights as pytorch_model.bin holding obj (None: a pickle that
    would run code)."""
    (root / "hf" / "model.safetensors").unlink()
    if obj is None:
        Payload.marker = root / "MARKER"
        (root / "hf" / "pytorch_model.bin").write_bytes(pickle.dumps({"wte": Payload()}, protocol=2))
    else:
        torch.save(obj, root / "hf" / "pytorch_model.bin")
    return root / "hf"


def snapshot(root: Path) -> dict[str, str]:
    """Every file under root (hidden ones too) and its bytes' hash; the lock file records only a pid."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(case, base, tmp_path, capfd, monkeypatch):
    root = tmp_path / "files"
    shutil.copytree(base, root, symlinks=True)
    monkeypatch.delenv("GPT2LAB_API_KEY", raising=False)
    argv = case.corrupt(root, monkeypatch)
    before = snapshot(root)
    capfd.readouterr()
    code = main([str(a) for a in argv])
    out, err = capfd.readouterr()
    assert code == 2, (out, err)
    assert err.count("\n") == 1 and err.startswith(f"gpt2lab {argv[0]}") and "Traceback" not in err, err
    assert case.expect in err, err
    assert len(err) < 600, err  # one readable line, not a file's contents
    assert snapshot(root) == before
    assert not (root / "MARKER").exists()  # no pickle payload ever ran


def test_the_corpus_count_is_the_documented_one():
    doc = (Path(__file__).resolve().parents[1] / "docs" / "reliability.md").read_text()
    assert f"{len(CASES)} bad inputs" in doc


# --- a run directory belongs to one run --------------------------------------------------------------


def test_train_again_into_a_finished_run_changes_no_byte(base, tmp_path, capfd):
    shutil.copytree(base / "run", tmp_path / "run")
    before = {
        p: (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted((tmp_path / "run").rglob("*"))
        if p.is_file()
    }
    args = train_args(train_cfg(base / "data", tmp_path / "run", learning_rate=1e-3))
    assert main(args) == 2
    err = capfd.readouterr().err
    assert "already holds a run (its latest checkpoint is step_000004): --resume continues it" in err
    after = {
        p: (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted((tmp_path / "run").rglob("*"))
        if p.is_file()
    }
    assert after == before  # bytes and modification times: not even rewritten


def test_a_concurrent_run_is_locked_out(base, tmp_path, capfd):
    with directory_lock(tmp_path / "run", "training run"):
        assert main(train_args(train_cfg(base / "data", tmp_path / "run"))) == 2
    assert f"is in use by another training run (pid {os.getpid()})" in capfd.readouterr().err
    assert main(train_args(train_cfg(base / "data", tmp_path / "run"))) == 0  # released: it runs


def test_overwrite_starts_over_and_keeps_what_is_not_the_run(base, tmp_path, capfd):
    shutil.copytree(base / "run", tmp_path / "run")
    (tmp_path / "run" / "notes.txt").write_text("mine")
    assert main([*train_args(train_cfg(base / "data", tmp_path / "run", max_steps=2)), "--overwrite"]) == 0
    out = capfd.readouterr().out
    assert "--overwrite: deleted the previous run" in out and "step_000004" in out
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if not p.name.startswith(".")) == [
        "best", "latest", "loss.png", "metrics.jsonl", "notes.txt", "step_000002",
    ]  # fmt: skip
    assert (
        max(
            json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
        )
        == 2
    )


def test_resume_before_the_first_checkpoint_starts_and_says_so(base, tmp_path, capfd):
    c = train_cfg(base / "data", tmp_path / "run", resume="latest")
    summary = __import__("gpt2lab.train", fromlist=["run"]).run(c)
    assert summary["step"] == 4
    assert (
        "--resume: " + str(tmp_path / "run") + " has no checkpoint yet; starting a new run"
        in capfd.readouterr().out
    )


def test_resume_of_a_finished_run_changes_nothing(base, tmp_path, capfd):
    shutil.copytree(base / "run", tmp_path / "run")
    before = snapshot(tmp_path / "run")
    assert main([*train_args(train_cfg(base / "data", tmp_path / "run")), "--resume"]) == 0
    out = capfd.readouterr().out
    assert "the run is finished (max_steps 4); raise --max-steps to train on" in out and "nan" not in out
    assert snapshot(tmp_path / "run") == before  # no second val line, no rewritten log


def test_the_loader_checks_every_batch_against_the_vocabulary(base, tmp_path):
    from gpt2lab.dataloader import ShardLoader

    shutil.copytree(base / "data", tmp_path / "data")
    manifest = read_manifest(tmp_path / "data")
    name = manifest["splits"]["train"]["shards"][0]
    tokens = np.full(manifest["splits"]["train"]["tokens"], 300, dtype=np.uint16)  # max_ids still says 256
    write_shard(tmp_path / "data" / name, tokens)
    loader = ShardLoader(tmp_path / "data", "train", 2, 8, vocab_size=257)
    with pytest.raises(
        UserError, match=f"{name} \\(tokens \\d+..\\d+\\): token id 300 is outside the vocabulary"
    ):
        loader.next_batch()


def test_every_output_gets_the_modes_of_the_umask(base, tmp_path):
    """Checkpoints, pointers, logs, a LoRA adapter and merged model, a tokenizer, shards, eval results
    and exports: every file and folder gpt2lab writes gets what the umask gives (here 027: 0640, 0750),
    as any other program's would. Writers that chose their own (safetensors 0600, mkdtemp 0700) hid a
    shared run's checkpoints from the team."""
    out = tmp_path / "out"
    run_dir, data = out / "run", out / "data"
    old = os.umask(0o027)
    try:
        with contextlib.redirect_stdout(None):
            assert main(["tokenizer", "train", "--input", str(base / "corpus.txt"), "--vocab-size", "260",
                         "--out", str(out / "tok"), "--quiet"]) == 0  # fmt: skip
            prepare_run(
                PrepareConfig(source=str(base / "corpus.txt"), out=str(data), tokenizer=str(out / "tok"))
            )
            assert main(train_args(train_cfg(data, run_dir, max_steps=2))) == 0
            lora = train_cfg(
                data, out / "lora", max_steps=2, init_from=str(run_dir), method="lora", merge=True
            )
            assert main(train_args(lora)) == 0
            assert main(eval_loss(out, "run", "data")) == 0
            assert main(["convert", "--ckpt", str(run_dir), "--out", str(out / "hf")]) == 0
            assert (
                main(["convert", "--ckpt", str(run_dir), "--format", "gguf", "--out", str(out / "m.gguf")])
                == 0
            )
    finally:
        os.umask(old)
    written = sorted(out.rglob("*"))
    names = {p.name for p in written}
    for name in ("latest", "model.safetensors", "state.pt", "metrics.jsonl", "adapter_model.safetensors",
                 "merged", "vocab.tiktoken", "manifest.json", "eval_loss_data_val.json", "m.gguf", ".lock"):  # fmt: skip
        assert name in names, name  # each kind of output was written
    modes = {str(p.relative_to(out)): oct(p.stat().st_mode & 0o777) for p in written}
    assert {k: v for k, v in modes.items() if v != ("0o750" if (out / k).is_dir() else "0o640")} == {}


def test_api_key_from_a_file_or_the_environment(tmp_path, monkeypatch):
    from gpt2lab.config import ServeConfig

    (tmp_path / "key").write_text("s3cret\n")
    monkeypatch.delenv("GPT2LAB_API_KEY", raising=False)
    cfg = ServeConfig(ckpt="x", api_key_file=str(tmp_path / "key"))
    assert cfg.api_key == "s3cret" and "s3cret" not in repr(cfg)
    monkeypatch.setenv("GPT2LAB_API_KEY", "from-env")
    assert ServeConfig(ckpt="x").api_key == "from-env"
    assert ServeConfig(ckpt="x", api_key="flag").api_key == "flag"


def test_progress_lines_average_the_interval_and_the_eta_skips_the_warm_up(
    base, tmp_path, capsys, monkeypatch
):
    """A fake clock: the first step takes 20 s (a warm-up), every other 1 s. tok/s and ms/step are over
    the log interval; the ETA is the pace since the first line, so from the second line on it is exact."""
    import types

    import gpt2lab.train
    from gpt2lab.model import GPT

    clock = {"t": 0.0, "steps": 0}
    monkeypatch.setattr(gpt2lab.train, "time", types.SimpleNamespace(perf_counter=lambda: clock["t"]))
    forward = GPT.forward

    def timed(self, idx, targets=None, **kw):
        if self.training:
            clock["steps"] += 1
            clock["t"] += 20.0 if clock["steps"] == 1 else 1.0
        return forward(self, idx, targets, **kw)

    monkeypatch.setattr(GPT, "forward", timed)
    gpt2lab.train.run(train_cfg(base / "data", tmp_path / "run", max_steps=12, log_interval=2, eval_interval=0,
                                checkpoint_interval=100))  # fmt: skip
    lines = [line for line in capsys.readouterr().out.splitlines() if "ETA" in line]
    assert "0.0K tok/s | 10500 ms/step" in lines[0]  # (20 + 1) s over 2 steps of 128 tokens
    for line, remaining in zip(lines[1:], (8, 6, 4, 2, 0), strict=True):
        assert "0.1K tok/s | 1000 ms/step" in line and line.endswith(f"ETA 0m{remaining:02d}s"), line
    events = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [round(e["tokens_per_sec"], 3) for e in events if "train_loss" in e][1:] == [128.0] * 5


# --- the non-finite guard: truthful about which checkpoint is good ----------------------------------


def test_a_diverging_run_is_told_which_checkpoint_is_good(base, tmp_path):
    from gpt2lab.train import run

    with contextlib.redirect_stdout(None):
        # 1e30: the weights blow up at once; no checkpoint is claimed that was not written.
        with pytest.raises(
            UserError, match="No checkpoint was written yet: lower the learning rate, then start over"
        ):
            run(train_cfg(base / "data", tmp_path / "a", learning_rate=1e30, checkpoint_interval=100))
        # 1e3: a checkpoint is written while the loss explodes; it is not called good.
        with pytest.raises(
            UserError, match=r"was saved at train loss [\d.e+]+, worse than guessing \(ln 257 = 5.55\)"
        ):
            run(
                train_cfg(
                    base / "data",
                    tmp_path / "b",
                    learning_rate=1e3,
                    warmup_steps=0,
                    max_steps=40,
                    eval_interval=0,
                )
            )


def test_non_finite_weights_are_never_written(base, tmp_path, monkeypatch):
    from gpt2lab.train import run

    real_step = torch.optim.AdamW.step
    calls = {"n": 0}

    def step(self, *a, **kw):
        out = real_step(self, *a, **kw)
        calls["n"] += 1
        if calls["n"] == 3:  # after step 3: wte's row of byte 0, which the text never holds, is inf
            with torch.no_grad():
                self.param_groups[0]["params"][0][0, 0] = math.inf
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    untied = {**TINY, "tie_weights": False}  # so the loss stays finite: only the weights are bad
    expected = "step 4: the weights hold NaN or inf values; stopped without saving them"
    with pytest.raises(UserError, match=expected), contextlib.redirect_stdout(None):
        run(train_cfg(base / "data", tmp_path / "run", max_steps=6, eval_interval=0, model=untied))
    assert resolve(tmp_path / "run").name == "step_000002"  # the last checkpoint written, still whole
    load_model(resolve(tmp_path / "run"))


def test_toml_spellings_of_flags_are_accepted(capsys):
    assert main(["info", "--preset", "gpt2", "--n_layer", "3", "--n_inner=none"]) == 0
    assert "gpt2: 3 layers" in capsys.readouterr().out
