"""Evaluation: HellaSwag against an independent transformers computation, loss against a hand computation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import randomized, small_config

from gpt2lab import GPT
from gpt2lab.evaluate import hellaswag, load_hellaswag

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
    model.save_pretrained(tmp_path / "hf")
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
