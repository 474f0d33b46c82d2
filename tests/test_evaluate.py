"""Evaluation: HellaSwag against an independent transformers computation, loss against a hand computation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import randomized, small_config

from gpt2lab import GPT
from gpt2lab.errors import UserError
from gpt2lab.evaluate import evaluate_loss, hellaswag, load_hellaswag
from gpt2lab.interop import save_pretrained

SUBSET = "hellaswag/hellaswag_val_subset1000.jsonl"


def tiny_gpt2() -> GPT:
    """GPT-2's vocabulary (so its tokenizer fits) on a 2-layer, 64-wide body: cheap to run on CPU."""
    return randomized(GPT(small_config(vocab_size=50257, block_size=256)), seed=7)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Many small forwards: one thread is several times faster than two when other jobs share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def subset_path():
    from conftest import SHARED_DATA

    if not (SHARED_DATA / SUBSET).is_file():
        pytest.skip(f"HellaSwag subset not found at {SHARED_DATA / SUBSET}")
    return SHARED_DATA / SUBSET


# --- an independent scorer: transformers' GPT-2 and tiktoken's tokenizer, one sequence at a time ---


def reference_preprocess(text: str) -> str:
    """lm-evaluation-harness's HellaSwag cleaning, spelled out independently of gpt2lab's."""
    import re

    text = text.strip()
    text = text.replace(" [title]", ". ")
    while True:
        m = re.search(r"\[[^\]]*\]", text)  # the shortest "[...]" first, one at a time
        if m is None:
            break
        text = text[: m.start()] + text[m.end() :]
    return text.replace("  ", " ")


def hf_loss(hf, context_ids: list[int], ending_ids: list[int]) -> float:
    """Summed cross-entropy of ending_ids after context_ids, from transformers' logits of those positions."""
    ids = torch.tensor([context_ids + ending_ids])
    n = len(ending_ids)
    with torch.no_grad():
        logits = hf(ids[:, :-1], logits_to_keep=n).logits[0]  # (n, V): predictions of the ending tokens
    return float(F.cross_entropy(logits.double(), ids[0, -n:], reduction="sum"))


def reference_scores(hf, enc, rec: dict) -> dict:
    completion = []
    for ending in rec["endings"]:
        e = enc.encode(" " + ending)
        completion.append((hf_loss(hf, enc.encode(rec["ctx"]), e), len(e)))
    context = reference_preprocess(
        rec["activity_label"] + ": " + rec["ctx_a"] + " " + rec["ctx_b"].capitalize()
    )
    context_ids = enc.encode(context.rstrip())
    harness = []
    for ending in rec["endings"]:
        choice = reference_preprocess(ending)
        whole = enc.encode(context + " " + choice)
        assert whole[: len(context_ids)] == context_ids
        harness.append((hf_loss(hf, context_ids, whole[len(context_ids) :]), len(choice)))
    return {
        "pred": int(np.argmin([s for s, _ in completion])),
        "pred_norm": int(np.argmin([s / n for s, n in completion])),
        "harness_pred": int(np.argmax([-s for s, _ in harness])),
        "harness_pred_norm": int(np.argmax([-s / n for s, n in harness])),
        "losses": [s for s, _ in completion],
        "harness_losses": [s for s, _ in harness],
    }


@pytest.mark.slow
def test_hellaswag_matches_transformers(shared_data, tiktoken_reference, tmp_path):
    """First 200 records: our batched scorer's choices and losses equal transformers' one by one."""
    transformers = pytest.importorskip("transformers")
    from gpt2lab.tokenizer import get_tokenizer

    model = tiny_gpt2()
    tok = get_tokenizer("gpt2", vocab_dir=shared_data / "gpt2")
    ours = hellaswag(model, tok, load_hellaswag(subset_path(), limit=200), batch_size=16)
    assert ours["n"] == 200
    save_pretrained(model, tmp_path / "hf")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    records = [json.loads(line) for line in (shared_data / SUBSET).read_text().splitlines()[:200]]
    for rec, got in zip(records, ours["predictions"], strict=True):
        ref = reference_scores(hf, tiktoken_reference, rec)
        assert (got["ind"], got["label"]) == (rec["ind"], rec["label"])
        for key in ("pred", "pred_norm", "harness_pred", "harness_pred_norm"):
            assert got[key] == ref[key], (got["index"], key, got, ref)
        for key in ("losses", "harness_losses"):
            diff = np.abs(np.array(got[key]) - np.array(ref[key])).max()
            assert diff < 1e-4, (got["index"], key, got[key], ref[key])
    pred_of = {"acc": "pred", "acc_norm": "pred_norm", "harness_acc": "harness_pred"}
    pred_of["harness_acc_norm"] = "harness_pred_norm"
    for key, pred in pred_of.items():
        assert ours[key] == sum(p[pred] == p["label"] for p in ours["predictions"]) / 200


def test_random_weights_score_chance():
    """All 1000 records, a random model: every accuracy inside 0.25 +- 3 sigma of the binomial.

    A byte-level model keeps this cheap (a 257-row output layer instead of GPT-2's 50257); the
    scoring code does not depend on the tokenizer.
    """
    from gpt2lab.tokenizer import get_tokenizer

    examples = load_hellaswag(subset_path())
    model = randomized(GPT(small_config(vocab_size=257, block_size=1024, n_layer=1, n_embd=32, n_head=2)))
    result = hellaswag(model, get_tokenizer("bytes"), examples, batch_size=16)
    assert result["n"] == len(examples) == 1000
    sigma = math.sqrt(0.25 * 0.75 / 1000)
    for key in ("acc", "acc_norm", "harness_acc", "harness_acc_norm"):
        assert abs(result[key] - 0.25) < 3 * sigma, (key, result[key])
    assert [p["index"] for p in result["predictions"]] == list(range(1000))


# --- loss over a prepared split ------------------------------------------------------------------


def prepare_bytes(tmp_path, shard_tokens: int = 500) -> Path:
    """A corpus of 40 made-up documents tokenized with the bytes tokenizer; val = the first 12."""
    from gpt2lab.config import PrepareConfig
    from gpt2lab.shards import run

    rng = np.random.default_rng(0)
    words = ["the", "cat", "sat", "on", "a", "mat", "héllo", "naïve", "日本", "ok,", "end."]
    docs = [" ".join(rng.choice(words, size=rng.integers(5, 60))) for _ in range(40)]
    src = tmp_path / "corpus.txt"
    src.write_text("\n\n".join(docs), encoding="utf-8")
    out = tmp_path / "data"
    cfg = PrepareConfig(
        source=str(src),
        out=str(out),
        tokenizer="bytes",
        separator="blank-line",
        val_docs=12,
        shard_tokens=shard_tokens,
    )
    run(cfg)
    return out


def split_tokens(data: Path, split: str = "val") -> np.ndarray:
    from gpt2lab.shards import read_manifest, read_shard

    names = read_manifest(data)["splits"][split]["shards"]
    assert len(names) >= 2  # the stream must cross a shard boundary
    return np.concatenate([np.asarray(read_shard(data / n), dtype=np.int64) for n in names])


def direct_nats(model: GPT, tokens: np.ndarray, T: int, n_targets: int) -> float:
    """Sum of -log p(token | the tokens before it in its window), windows of T starting at 0, T, 2T, ..."""
    total = 0.0
    with torch.no_grad():
        for a in range(0, n_targets, T):
            b = min(a + T, n_targets)
            x = torch.from_numpy(tokens[a:b])[None]
            logp = torch.log_softmax(model(x)[0].double(), dim=-1)  # (b - a, V)
            targets = torch.from_numpy(tokens[a + 1 : b + 1])
            total -= float(logp[torch.arange(b - a), targets].sum())
    return total


@pytest.mark.parametrize("max_tokens", [None, 77])
def test_loss_equals_direct_computation(tmp_path, max_tokens):
    data = prepare_bytes(tmp_path)
    tokens = split_tokens(data)
    model = randomized(GPT(small_config(vocab_size=257, block_size=32)))
    model.train()  # evaluate_loss must switch to eval mode and back
    got = evaluate_loss(model, data, "val", batch_size=3, max_tokens=max_tokens)
    assert model.training
    model.eval()
    n = len(tokens) - 1 if max_tokens is None else max_tokens
    nats = direct_nats(model, tokens, 32, n)
    assert got["tokens"] == n
    assert got["loss"] == pytest.approx(nats / n, rel=1e-6)
    assert got["perplexity"] == pytest.approx(math.exp(nats / n), rel=1e-6)
    # bytes tokenizer: every id below 256 is one byte, EOT (256) none
    n_bytes = int((tokens[1 : n + 1] < 256).sum())
    assert got["bits_per_byte"] == pytest.approx(nats / math.log(2) / n_bytes, rel=1e-6)
    # windows are the same whatever the batch size
    again = evaluate_loss(model, data, "val", batch_size=1, max_tokens=max_tokens)
    assert again["loss"] == pytest.approx(got["loss"], rel=1e-6)


def test_loss_errors(tmp_path):
    data = prepare_bytes(tmp_path)
    model = randomized(GPT(small_config(vocab_size=101, block_size=32)))
    with pytest.raises(UserError, match="vocabulary of 257 ids but the model's has only 101"):
        evaluate_loss(model, data)
    model = randomized(GPT(small_config(vocab_size=257, block_size=32)))
    with pytest.raises(UserError, match="no 'test' split"):
        evaluate_loss(model, data, "test")
    with pytest.raises(UserError, match="seq_len 64"):
        evaluate_loss(model, data, seq_len=64)


# --- reading HellaSwag ----------------------------------------------------------------------------


def record(**overrides) -> dict:
    rec = {
        "ind": 5,
        "activity_label": "Making a cake",
        "ctx_a": "A woman [title] mixes flour.",
        "ctx_b": "she",
        "ctx": "A woman [title] mixes flour. she",
        "endings": ["bakes  it.", "[step] eats it.", "sings.", "leaves."],
        "label": 2,
    }
    return {**rec, **overrides}


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_jsonl_fields_and_harness_preprocessing(tmp_path):
    path = write_jsonl(tmp_path / "h.jsonl", [json.dumps(record()), json.dumps(record(label="1", ind=6))])
    first, second = load_hellaswag(path)
    assert (first.index, first.ind, first.label, second.label) == (0, 5, 2, 1)
    assert first.context == "A woman [title] mixes flour. she"
    assert first.harness_context == "Making a cake: A woman. mixes flour. She"
    # as the harness: strip first, then drop tags, so a leading tag leaves a leading space
    assert first.harness_endings == ["bakes it.", " eats it.", "sings.", "leaves."]
    assert load_hellaswag(path, limit=1)[0].ind == 5


def test_text_layout(shared_data):
    examples = load_hellaswag(shared_data / "hellaswag" / "hellaswag_val_full.txt", limit=3)
    assert [ex.label for ex in examples] == [3, 3, 2]
    assert (
        examples[0].context
        == examples[0].harness_context
        == "Roof shingle removal: A man is sitting on a roof. he"
    )
    assert examples[0].endings[3] == "starts pulling up roofing on a roof."


@pytest.mark.parametrize(
    "lines, message",
    [
        ([json.dumps(record()), '{"ind": 1, "ctx": ', json.dumps(record())], r"h\.jsonl:2: not valid JSON"),
        ([json.dumps(record()), "", json.dumps(record(label=4))], r"h\.jsonl:3: label 4 is not one of"),
        ([json.dumps(record(label=-1))], "label -1"),
        ([json.dumps(record(label="x"))], "label 'x'"),
        ([json.dumps(record(endings=["a", "b"]))], "endings a list of 4"),
        ([json.dumps({k: v for k, v in record().items() if k != "ctx_b"})], "missing field 'ctx_b'"),
        (["[1, 2]"], "expected a JSON object"),
    ],
)
def test_bad_jsonl(tmp_path, lines, message):
    path = write_jsonl(tmp_path / "h.jsonl", lines)
    with pytest.raises(UserError, match=message):
        load_hellaswag(path)


def test_bad_text_layout_and_paths(tmp_path):
    path = tmp_path / "h.txt"
    path.write_text("ctx\n1\na\nb\nc\n")
    with pytest.raises(UserError, match="5 lines is not a multiple of 6"):
        load_hellaswag(path)
    path.write_text("ctx\n7\na\nb\nc\nd\n")
    with pytest.raises(UserError, match=r"h\.txt:2: label 7"):
        load_hellaswag(path)
    from gpt2lab.evaluate import hellaswag_file

    with pytest.raises(UserError, match="does not exist"):
        hellaswag_file(tmp_path / "missing.jsonl")


def test_tokenizer_must_fit_the_model():
    from gpt2lab.tokenizer import get_tokenizer

    ex = load_hellaswag_from_records([record()])
    model = randomized(GPT(small_config(vocab_size=200)))
    with pytest.raises(UserError, match="257 token ids but the model's vocabulary has only 200"):
        hellaswag(model, get_tokenizer("bytes"), ex)


def load_hellaswag_from_records(records: list[dict]):
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        return load_hellaswag(write_jsonl(Path(d) / "h.jsonl", [json.dumps(r) for r in records]))


# --- download -------------------------------------------------------------------------------------


class FakeResponse:
    def __init__(self, data: bytes):
        self.data = data

    def read(self, n: int = -1) -> bytes:
        data, self.data = (self.data, b"") if n < 0 else (self.data[:n], self.data[n:])
        return data

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_download_into_cache(tmp_path, monkeypatch):
    import dataclasses
    import hashlib
    import urllib.request

    from gpt2lab import download, evaluate

    payload = (json.dumps(record()) + "\n").encode()
    urls = []

    def fake_urlopen(url, timeout=None):
        urls.append(url)
        return FakeResponse(payload)

    monkeypatch.setenv("GPT2LAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    # a wrong checksum: refused, nothing stored under the name
    with pytest.raises(UserError, match="sha256"):
        evaluate.hellaswag_file()
    assert not (tmp_path / "cache" / "hellaswag" / "hellaswag_val.jsonl").exists()
    pin = dataclasses.replace(download.HELLASWAG_VAL, sha256=hashlib.sha256(payload).hexdigest())
    monkeypatch.setattr(download, "HELLASWAG_VAL", pin)
    path = evaluate.hellaswag_file()
    assert path == tmp_path / "cache" / "hellaswag" / "hellaswag_val.jsonl"
    assert path.read_bytes() == payload
    assert urls == [pin.url] * 2
    assert evaluate.hellaswag_file() == path and len(urls) == 2  # cached: no second download
    assert load_hellaswag(path)[0].label == 2


def test_download_offline_names_data_flag(tmp_path, monkeypatch):
    import urllib.error
    import urllib.request

    from gpt2lab import evaluate

    def offline(url, timeout=None):
        raise urllib.error.URLError("no network")

    monkeypatch.setenv("GPT2LAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(UserError, match="--data FILE"):
        evaluate.hellaswag_file()


# --- DDP: 2 processes (gloo) give the single-process numbers ---------------------------------------


def _ddp_worker(rank: int, world: int, tmp: str) -> None:
    import torch.distributed as dist

    from gpt2lab.tokenizer import get_tokenizer

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world)
    try:
        model = randomized(GPT(small_config(vocab_size=257, block_size=1024, n_layer=1)))
        loss = evaluate_loss(model, Path(tmp) / "data", "val", batch_size=2, seq_len=64)
        examples = load_hellaswag(Path(tmp) / "h.jsonl")
        hs = hellaswag(model, get_tokenizer("bytes"), examples, batch_size=2)
        (Path(tmp) / f"rank{rank}.json").write_text(json.dumps({"loss": loss, "hellaswag": hs}))
    finally:
        dist.destroy_process_group()


def test_ddp_two_ranks_equal_one_process(tmp_path):
    import torch.multiprocessing as mp

    from gpt2lab.tokenizer import get_tokenizer

    prepare_bytes(tmp_path)
    records = [record(label=k % 4, ctx_b=f"she {k}", ind=k) for k in range(7)]  # 7: ranks get 4 and 3
    write_jsonl(tmp_path / "h.jsonl", [json.dumps(r) for r in records])
    mp.spawn(_ddp_worker, args=(2, str(tmp_path)), nprocs=2)
    model = randomized(GPT(small_config(vocab_size=257, block_size=1024, n_layer=1)))
    loss = evaluate_loss(model, tmp_path / "data", "val", batch_size=2, seq_len=64)
    hs = hellaswag(model, get_tokenizer("bytes"), load_hellaswag(tmp_path / "h.jsonl"), batch_size=2)
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["loss"]["tokens"] == loss["tokens"]
        for key in ("loss", "perplexity", "bits_per_byte"):
            assert got["loss"][key] == pytest.approx(loss[key], rel=1e-6)
        assert got["hellaswag"]["n"] == 7
        for key in ("acc", "acc_norm", "harness_acc", "harness_acc_norm"):
            assert got["hellaswag"][key] == hs[key]
        for p, q in zip(got["hellaswag"]["predictions"], hs["predictions"], strict=True):
            assert p["index"] == q["index"] and p["losses"] == pytest.approx(q["losses"], abs=1e-4)
