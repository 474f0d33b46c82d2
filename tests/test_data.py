"""Data pipeline: sources -> prepare -> shards -> ShardLoader."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from gpt2lab.config import PrepareConfig
from gpt2lab.dataloader import ShardLoader
from gpt2lab.errors import UserError
from gpt2lab.shards import read_manifest, read_shard, run, write_shard
from gpt2lab.sources import open_corpus
from gpt2lab.tokenizer import get_tokenizer

EOT = "<|endoftext|>"


def prepare(source, out, **kw) -> dict:
    return run(PrepareConfig(source=str(source), out=str(out), **kw))


def shard_tokens(out: Path, split: str) -> np.ndarray:
    manifest = read_manifest(out)
    return np.concatenate([np.asarray(read_shard(out / s)) for s in manifest["splits"][split]["shards"]])


def stories(shared_data) -> tuple[Path, list[str]]:
    path = shared_data / "tinystories" / "TinyStories-train_first2316stories.txt"
    docs = [d.strip() for d in path.read_text(encoding="utf-8").split(EOT) if d.strip()]
    return path, docs


def test_tinystories_token_count_equals_tiktoken_plus_one_eot_per_document(
    shared_data, tiktoken_reference, tmp_path
):
    path, docs = stories(shared_data)
    assert len(docs) == 2316
    gpt2 = str(shared_data / "gpt2")
    m = prepare(path, tmp_path, separator="eot", gpt2_vocab=gpt2, val_docs=100, shard_tokens=100_000)
    expected = [len(tiktoken_reference.encode_ordinary(d)) + 1 for d in docs]
    assert m["splits"]["val"] == {**m["splits"]["val"], "tokens": sum(expected[:100]), "documents": 100}
    assert m["splits"]["train"]["tokens"] == sum(expected[100:])
    assert m["splits"]["train"]["documents"] == 2216 and len(m["splits"]["train"]["shards"]) == 5
    assert (m["vocab_size"], m["eot_id"], m["dtype"]) == (50257, 50256, "uint16")
    # Decoding the shards gives back the documents, in order, each after one EOT.
    tokens = shard_tokens(tmp_path, "train")
    starts = np.flatnonzero(tokens == 50256)
    assert len(starts) == 2216 and starts[0] == 0
    pieces = np.split(tokens, starts[1:])
    for i in (0, 1, 777, 2215):
        assert tiktoken_reference.decode(pieces[i][1:].tolist()) == docs[100 + i]


@pytest.mark.slow
def test_one_and_two_workers_write_identical_bytes(shared_data, tmp_path):
    path, _ = stories(shared_data)
    gpt2 = str(shared_data / "gpt2")
    for workers in (1, 2):
        prepare(path, tmp_path / f"w{workers}", separator="eot", gpt2_vocab=gpt2, workers=workers,
                shard_tokens=150_000)  # fmt: skip
    names = sorted(p.name for p in (tmp_path / "w1").glob("*.bin"))
    assert len(names) == 5  # 4 train shards (3 full), 1 val
    for name in names:
        assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / "w2" / name).read_bytes()


@pytest.mark.slow
def test_prepare_killed_midway_resumes_to_the_same_shards(shared_data, tmp_path):
    path, _ = stories(shared_data)
    args = [sys.executable, "-m", "gpt2lab", "prepare", str(path), "--separator", "eot", "--gpt2-vocab",
            str(shared_data / "gpt2"), "--shard-tokens", "4000"]  # fmt: skip
    subprocess.run([*args, "--out", str(tmp_path / "straight")], check=True, capture_output=True)
    out = tmp_path / "killed"
    proc = subprocess.Popen([*args, "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while len(list(out.glob("*_train_*.bin"))) < 10 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = len(list(out.glob("*_train_*.bin")))
    assert 10 <= written < 100, "the kill did not land midway"
    assert not (out / "manifest.json").exists()
    with pytest.raises(UserError, match="has no manifest.json"):
        ShardLoader(out, "train", 2, 8)  # an unfinished prepare is never read
    subprocess.run([*args, "--out", str(out)], check=True, capture_output=True)
    straight = sorted(p.name for p in (tmp_path / "straight").iterdir())
    assert sorted(p.name for p in out.iterdir()) == straight  # no leftovers either
    for name in straight:
        if name.endswith(".bin"):
            assert (out / name).read_bytes() == (tmp_path / "straight" / name).read_bytes(), name
    a, b = (json.loads((d / "manifest.json").read_text()) for d in (out, tmp_path / "straight"))
    assert a == {**b, "settings": {**b["settings"], "source": a["settings"]["source"]}}


def test_val_fraction_cuts_the_text_at_the_boundary_like_nanogpt(shared_data, tmp_path):
    text = (shared_data / "tinyshakespeare.txt").read_text(encoding="utf-8")
    m = prepare(shared_data / "tinyshakespeare.txt", tmp_path, tokenizer="char", val_fraction=0.1)
    tok = get_tokenizer(m["tokenizer"])
    assert tok.vocab_size == 66 and m["vocab_size"] == 66  # 65 characters + <|endoftext|>
    cut = round(len(text) * 0.9)
    for split, part in (("train", text[:cut]), ("val", text[cut:])):
        tokens = shard_tokens(tmp_path, split)
        assert tokens[0] == tok.eot_id and tok.decode(tokens[1:].tolist()) == part
        assert m["splits"][split] == {**m["splits"][split], "tokens": len(part) + 1, "documents": 1}


def test_local_formats_and_separators(tmp_path):
    (tmp_path / "a.txt").write_text("first doc\n\nsecond doc\n\n\n\nthird\n")
    (tmp_path / "folder" / "sub").mkdir(parents=True)
    (tmp_path / "folder" / "x.txt").write_text("one")
    (tmp_path / "folder" / "sub" / "y.txt").write_text("two")
    (tmp_path / "d.jsonl").write_text('{"text": "alpha"}\n\n{"text": "beta", "id": 2}\n')
    assert list(open_corpus(str(tmp_path / "a.txt"), "\n\n").splits["all"]()) == [
        "first doc",
        "second doc",
        "third",
    ]
    assert list(open_corpus(str(tmp_path / "a.txt")).splits["all"]()) == [
        "first doc\n\nsecond doc\n\n\n\nthird\n"
    ]
    assert list(open_corpus(str(tmp_path / "folder")).splits["all"]()) == [
        "two",
        "one",
    ]  # sorted paths: sub/ < x
    assert list(open_corpus(str(tmp_path / "d.jsonl")).splits["all"]()) == ["alpha", "beta"]
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    pq.write_table(pa.table({"body": ["p1", "p2", None, "p3"]}), tmp_path / "e.parquet")
    assert list(open_corpus(str(tmp_path / "e.parquet"), text_field="body").splits["all"]()) == [
        "p1",
        "p2",
        "p3",
    ]
    m = prepare(tmp_path / "e.parquet", tmp_path / "out", tokenizer="bytes", text_field="body", val_docs=1)
    assert m["splits"]["val"]["tokens"] == 3 and m["splits"]["train"]["tokens"] == 6


def test_named_datasets_stream_through_hugging_face_datasets(monkeypatch, tmp_path):
    """The named sources' real code path, with `datasets.load_dataset` answering from memory (no network)."""
    rows = {
        ("roneneldan/TinyStories", None, "train"): [{"text": "Once upon a time."}, {"text": "The end."}],
        ("roneneldan/TinyStories", None, "validation"): [{"text": "A val story."}],
        ("Salesforce/wikitext", "wikitext-103-raw-v1", "train"): [
            {"text": ""}, {"text": " = Alpha = \n"}, {"text": " Alpha text .\n"}, {"text": " = = Sub = = \n"},
            {"text": " more .\n"}, {"text": " = Beta = \n"}, {"text": " Beta text .\n"},
        ],
        ("Salesforce/wikitext", "wikitext-103-raw-v1", "validation"): [{"text": " = Gamma = \n"}],
    }  # fmt: skip
    calls = []

    def load_dataset(path, name=None, split=None, streaming=False, revision=None):
        calls.append((path, name, split, streaming, revision))
        return iter(rows[(path, name, split)])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    ts = open_corpus("tinystories")
    assert list(ts.splits["train"]()) == ["Once upon a time.", "The end."]
    assert list(ts.splits["val"]()) == ["A val story."]
    wt = open_corpus("wikitext103")
    assert list(wt.splits["train"]()) == [
        " = Alpha = \n Alpha text .\n = = Sub = = \n more .",
        " = Beta = \n Beta text .",
    ]
    assert all(streaming for *_, streaming, _ in calls)
    assert {(path, revision) for path, *_, revision in calls} == {  # pinned commits (download.py)
        ("roneneldan/TinyStories", "f54c09fd23315a6f9c86f9dc80f725de7d8f9c64"),
        ("Salesforce/wikitext", "b08601e04326c79dfdd32d625aee71d232d685c3"),
    }
    m = prepare("tinystories", tmp_path, tokenizer="bytes")
    assert m["splits"]["val"]["tokens"] == len("A val story.") + 1
    with pytest.raises(UserError, match="has its own validation split"):
        prepare("tinystories", tmp_path / "x", tokenizer="bytes", val_docs=3)


def test_uint32_shards_for_vocabularies_over_65535(tmp_path):
    tokens = np.array([0, 65535, 65536, 99_999], dtype=np.uint32)
    write_shard(tmp_path / "s.bin", tokens)
    assert read_shard(tmp_path / "s.bin").dtype == np.dtype("<u4")
    assert read_shard(tmp_path / "s.bin").tolist() == tokens.tolist()
    from gpt2lab.shards import token_dtype

    assert (
        token_dtype(50257) == np.uint16
        and token_dtype(65535) == np.uint16
        and token_dtype(65536) == np.uint32
    )


def test_bad_inputs_are_clear_errors_and_touch_nothing(shared_data, tmp_path):
    with pytest.raises(UserError, match="neither an existing path nor a named dataset"):
        prepare(tmp_path / "missing.txt", tmp_path / "o1", tokenizer="bytes")
    (tmp_path / "empty.txt").write_text("  \n\n ")
    with pytest.raises(UserError, match="has no documents"):
        prepare(tmp_path / "empty.txt", tmp_path / "o2", tokenizer="bytes")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": "no closing brace"\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2: not valid JSON"):
        prepare(tmp_path / "bad.jsonl", tmp_path / "o3", tokenizer="bytes")
    (tmp_path / "nofield.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(UserError, match=r"nofield.jsonl:1: record has no 'text' field"):
        prepare(tmp_path / "nofield.jsonl", tmp_path / "o4", tokenizer="bytes")
    # Undecodable bytes are replaced and counted, not fatal.
    (tmp_path / "latin1.txt").write_bytes("café au lait".encode("latin-1") + b" and \xff\xfe more")
    m = prepare(tmp_path / "latin1.txt", tmp_path / "o5", tokenizer="bytes", val_fraction=0.5)
    assert m["replaced_undecodable_bytes"] == 3
    # A finished directory asked for with another tokenizer is refused and left exactly as it was.
    before = {p.name: p.read_bytes() for p in (tmp_path / "o5").iterdir()}
    with pytest.raises(UserError, match="was prepared with tokenizer"):
        gpt2 = str(shared_data / "gpt2")
        prepare(tmp_path / "latin1.txt", tmp_path / "o5", tokenizer="gpt2", gpt2_vocab=gpt2, val_fraction=0.5)
    assert {p.name: p.read_bytes() for p in (tmp_path / "o5").iterdir()} == before
    assert prepare(tmp_path / "latin1.txt", tmp_path / "o5", tokenizer="bytes", val_fraction=0.5) == m
    # A truncated shard is reported, not read.
    shard = tmp_path / "o5" / m["splits"]["train"]["shards"][0]
    shard.write_bytes(shard.read_bytes()[:-1])
    with pytest.raises(UserError, match="is truncated or corrupt"):
        read_shard(shard)


# --- the loader ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """Three train shards of distinct, known tokens (0..n-1), so every window is identifiable."""
    d = tmp_path_factory.mktemp("loader")
    names = []
    for i, n in enumerate((1000, 1, 537)):  # the 1-token shard is too short for any window
        start = sum((1000, 1, 537)[:i])
        write_shard(d / f"t_train_{i:06d}.bin", np.arange(start, start + n, dtype=np.uint16))
        names.append(f"t_train_{i:06d}.bin")
    manifest = {"format": "gpt2lab-shards", "version": 1, "vocab_size": 2000, "eot_id": 0,
                "splits": {"train": {"tokens": 1538, "documents": 1, "shards": names}}}  # fmt: skip
    (d / "manifest.json").write_text(json.dumps(manifest))
    return d


@pytest.mark.parametrize("mode", ["random", "sequential"])
def test_batches_are_shifted_windows_and_resume_exactly(data_dir, mode):
    loader = ShardLoader(data_dir, "train", batch_size=4, seq_len=16, mode=mode, seed=7)
    stream = [loader.next_batch() for _ in range(30)]
    for x, y in stream:
        assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1]) and torch.all(y - x == 1)  # consecutive tokens, one shard
    resumed = ShardLoader(data_dir, "train", batch_size=4, seq_len=16, mode=mode, seed=7)
    first = ShardLoader(data_dir, "train", batch_size=4, seq_len=16, mode=mode, seed=7)
    for _ in range(12):
        first.next_batch()
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))  # survives JSON
    for x, y in stream[12:]:
        rx, ry = resumed.next_batch()
        assert torch.equal(rx, x) and torch.equal(ry, y)


def test_sequential_mode_visits_every_window_once_per_epoch_and_ranks_are_disjoint(data_dir):
    loaders = [
        ShardLoader(data_dir, "train", 3, 16, rank=r, world_size=2, mode="sequential") for r in range(2)
    ]
    n_windows = 999 // 16 + 536 // 16  # stride-16 windows of 17 tokens per usable shard
    assert loaders[0].n_windows == n_windows == 95
    seen: list[list[int]] = [[], []]
    steps = 2 * n_windows // 6 + 1  # two epochs' worth of global batches of 2 ranks x 3 windows
    for _ in range(steps):
        for r, loader in enumerate(loaders):
            x, _ = loader.next_batch()
            seen[r] += x[:, 0].tolist()  # the first token identifies the window
    # Global step k reads stream positions [6k, 6k + 6): rank 0 the first 3, rank 1 the next 3.
    stream = [t for k in range(steps) for r in range(2) for t in seen[r][3 * k : 3 * k + 3]]
    epoch1, epoch2 = stream[:n_windows], stream[n_windows : 2 * n_windows]
    assert len(set(epoch1)) == n_windows and set(epoch1) == set(epoch2)  # each window once per epoch
    assert epoch1 != epoch2  # reshuffled
    assert not set(seen[0][:45]) & set(seen[1][:45])  # the first 15 steps (90 windows) are disjoint


def test_random_mode_ranks_read_different_streams(data_dir):
    a = ShardLoader(data_dir, "train", 8, 16, rank=0, world_size=2)
    b = ShardLoader(data_dir, "train", 8, 16, rank=1, world_size=2)
    assert not torch.equal(a.next_batch()[0], b.next_batch()[0])


def test_loader_errors(data_dir):
    with pytest.raises(UserError, match="too small for one window of seq_len \\+ 1 = 1001 tokens"):
        ShardLoader(data_dir, "train", 1, 1000)
    with pytest.raises(UserError, match="fewer than one global batch"):
        ShardLoader(data_dir, "train", 50, 16, world_size=2, mode="sequential")
    with pytest.raises(UserError, match="has no 'val' split"):
        ShardLoader(data_dir, "val", 1, 8)
    loader = ShardLoader(data_dir, "train", 2, 8)
    with pytest.raises(UserError, match="loader state has seq_len 16, this loader has 8"):
        loader.load_state_dict({**loader.state_dict(), "seq_len": 16})


@pytest.mark.parametrize("mode", ["random", "sequential"])
def test_one_process_accumulating_reads_what_two_processes_read(data_dir, mode):
    """Micro-batch m of rank r is stream m * world_size + r: the global batch does not depend on the split."""
    single = ShardLoader(data_dir, "train", 2, 16, mode=mode, grad_accum=2)
    ranks = [ShardLoader(data_dir, "train", 2, 16, rank=r, world_size=2, mode=mode) for r in range(2)]
    for _ in range(5):
        assert torch.equal(single.next_batch()[0], ranks[0].next_batch()[0])
        assert torch.equal(single.next_batch()[0], ranks[1].next_batch()[0])
    assert single.state_dict()["step"] == ranks[0].state_dict()["step"] == 5
