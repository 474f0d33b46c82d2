"""Scoring over HTTP, checked with the tools that use it: echo + logprobs equal transformers' GPT-2
log_softmax; lm-evaluation-harness (`local-completions`, its remote tokenizer through /tokenize)
scores a HellaSwag-style task to the same per-choice log-likelihoods as `gpt2lab eval hellaswag`,
for a GPT-2-vocabulary model and for a char model; vLLM's tokenizer endpoints; embeddings; the
sampling parameters; logprobs on chat; template tokens kept out of completions' text.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import httpx
import pytest
import torch
from conftest import SHARED_DATA
from test_generate import small_model
from test_server import KEY, Server, _one_thread, ckpt, serve_cfg  # noqa: F401
from test_server_chat import CHAT, chat_ckpt  # noqa: F401

from gpt2lab import sft
from gpt2lab.checkpoint import save_checkpoint
from gpt2lab.evaluate import hellaswag, load_hellaswag
from gpt2lab.interop import save_pretrained
from gpt2lab.tokenizer import CharTokenizer, get_tokenizer

GPT2_VOCAB = SHARED_DATA / "gpt2"
HELLASWAG = SHARED_DATA / "hellaswag" / "hellaswag_val_subset1000.jsonl"


def need(path: Path) -> None:
    if not path.exists():
        pytest.skip(f"shared test data not found at {path}")


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    """A small random GPT-2 with GPT-2's vocabulary, in Hugging Face's layout (--pretrained DIR)."""
    need(GPT2_VOCAB)
    model = small_model(vocab_size=50257, n_embd=32, n_head=2, n_layer=2, block_size=256, seed=3)
    path = tmp_path_factory.mktemp("hf") / "tiny-gpt2"
    save_pretrained(model, path)
    return path, model


@pytest.fixture(scope="module")
def gpt2_server(gpt2_dir):
    path, _ = gpt2_dir
    cfg = serve_cfg(path, max_tokens=32)
    cfg.ckpt, cfg.pretrained, cfg.gpt2_vocab = None, str(path), str(GPT2_VOCAB)
    with Server(cfg) as s:
        yield s


def post(server, path: str, body: dict, status: int = 200) -> dict:
    r = httpx.post(server.url + path, json=body, timeout=60)
    assert r.status_code == status, r.text
    return r.json()


# --- echo + logprobs -----------------------------------------------------------------------------


def test_echo_logprobs_equal_transformers_log_softmax(gpt2_dir, gpt2_server):
    transformers = pytest.importorskip("transformers")
    path, _ = gpt2_dir
    hf = transformers.GPT2LMHeadModel.from_pretrained(path).eval()
    tok = get_tokenizer("gpt2", vocab_dir=GPT2_VOCAB)
    text = "The quick brown fox jumps over the lazy dog, and then it rests."
    ids = tok.encode(text)
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([ids])).logits[0].double(), dim=-1)  # (T, V)
    for prompt in (text, ids):  # text, and token ids as lm-eval sends them
        body = {"prompt": prompt, "echo": True, "logprobs": 5, "max_tokens": 0, "temperature": 0}
        lp = post(gpt2_server, "/v1/completions", body)["choices"][0]["logprobs"]
        assert len(lp["token_logprobs"]) == len(ids) and lp["token_logprobs"][0] is None
        want = ref[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
        got = torch.tensor(lp["token_logprobs"][1:], dtype=torch.float64)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
        top = ref[len(ids) // 2 - 1].topk(5)
        alternatives = lp["top_logprobs"][len(ids) // 2]
        assert sorted(alternatives.values(), reverse=True) == pytest.approx(top.values.tolist(), abs=1e-4)
        assert "".join(lp["tokens"]) == text
        assert lp["text_offset"] == [len(tok.decode(ids[:i])) for i in range(len(ids))]
    # with max_tokens 1 (lm-eval's request) the prompt's scores come first, then the generated token
    body = {"prompt": ids, "echo": True, "logprobs": 1, "max_tokens": 1, "temperature": 0}
    choice = post(gpt2_server, "/v1/completions", body)["choices"][0]
    assert len(choice["logprobs"]["token_logprobs"]) == len(ids) + 1
    assert choice["text"].startswith(text)
    generated = choice["logprobs"]["token_logprobs"][-1]
    assert generated == pytest.approx(ref[-1].max().item(), abs=1e-4)  # greedy took the argmax


# --- lm-evaluation-harness -------------------------------------------------------------------------

TASK_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data}
validation_split: validation
output_type: multiple_choice
doc_to_text: "{{{{query}}}}"
doc_to_target: "{{{{label}}}}"
doc_to_choice: "{{{{choices}}}}"
metric_list:
  - metric: acc
"""


def lm_eval_loglikelihoods(tmp: Path, url: str, model: str, examples, max_length: int) -> list[list[float]]:
    """Per-choice log-likelihoods from lm-eval's `local-completions` against a live server."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    rows = [
        {"query": ex.harness_context, "choices": ex.harness_endings, "label": ex.label} for ex in examples
    ]
    data = tmp / "hellaswag_local.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    name = f"gpt2lab_hs_{model.replace('-', '_')}"
    (tmp / "tasks").mkdir(exist_ok=True)
    (tmp / "tasks" / f"{name}.yaml").write_text(TASK_YAML.format(name=name, data=data))
    with pytest.MonkeyPatch.context() as mp:  # offline, and a private Hugging Face cache
        for key, value in dict(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_HOME=str(tmp / "hf")).items():
            mp.setenv(key, value)
        out = lm_eval.simple_evaluate(
            model="local-completions",
            model_args={
                "base_url": url + "/v1/completions",
                "model": model,
                "tokenizer_backend": "auto",  # detects /tokenizer_info and /tokenize: the remote tokenizer
                "max_length": max_length,
                "num_concurrent": 1,
                "max_retries": 1,
            },
            tasks=[name],
            task_manager=TaskManager(include_path=str(tmp / "tasks"), include_defaults=False),
            log_samples=True,
            limit=len(rows),
        )
    samples = sorted(out["samples"][name], key=lambda s: s["doc_id"])
    return [[float(r[0][0]) for r in s["resps"]] for s in samples]


def our_loglikelihoods(model, tok, examples) -> list[list[float]]:
    result = hellaswag(model, tok, examples)
    return [[-x for x in p["harness_losses"]] for p in result["predictions"]]


@pytest.mark.slow
def test_lm_eval_scores_equal_gpt2lab_eval_hellaswag_gpt2_vocab(gpt2_dir, gpt2_server, tmp_path):
    need(HELLASWAG)
    _, model = gpt2_dir
    examples = load_hellaswag(HELLASWAG, limit=4)
    tok = get_tokenizer("gpt2", vocab_dir=GPT2_VOCAB)
    theirs = lm_eval_loglikelihoods(tmp_path, gpt2_server.url, "tiny-gpt2", examples, 256)
    ours = our_loglikelihoods(model, tok, examples)
    assert len(theirs) == 4 and all(len(t) == 4 for t in theirs)
    torch.testing.assert_close(torch.tensor(theirs), torch.tensor(ours), atol=1e-4, rtol=0)


@pytest.mark.slow
def test_lm_eval_scores_equal_gpt2lab_eval_hellaswag_char_model(tmp_path):
    """A char model has no tokenizer lm-eval knows: it tokenizes through the server's /tokenize."""
    need(HELLASWAG)
    examples = [ex for ex in load_hellaswag(HELLASWAG, limit=40) if len(ex.harness_context) < 200][:3]
    text = "".join(ex.harness_context + "".join(ex.harness_endings) for ex in examples) + " "
    tok = CharTokenizer(sorted(set(text)))
    model = small_model(vocab_size=tok.vocab_size, block_size=512, seed=5)
    path = save_checkpoint(tmp_path / "tiny-char", model, extra={"tokenizer": tok.to_spec()})
    with Server(serve_cfg(path, max_tokens=8)) as s:
        theirs = lm_eval_loglikelihoods(tmp_path, s.url, "tiny-char", examples, 512)
    ours = our_loglikelihoods(model, tok, examples)
    torch.testing.assert_close(torch.tensor(theirs), torch.tensor(ours), atol=1e-4, rtol=0)


# --- vLLM's tokenizer endpoints --------------------------------------------------------------------


def test_tokenize_detokenize_and_tokenizer_info(gpt2_server):
    tok = get_tokenizer("gpt2", vocab_dir=GPT2_VOCAB)
    text = "Hello world<|endoftext|>"
    got = post(
        gpt2_server, "/tokenize", {"prompt": text, "add_special_tokens": False, "return_token_strs": True}
    )
    assert got["tokens"] == tok.encode(text, allowed_special="all") and got["tokens"][-1] == 50256
    assert got["count"] == len(got["tokens"]) and got["max_model_len"] == 256
    assert "".join(got["token_strs"]) == text
    assert post(gpt2_server, "/detokenize", {"tokens": got["tokens"]}) == {"prompt": text}
    info = httpx.get(gpt2_server.url + "/tokenizer_info", timeout=10).json()
    assert info["eos_token"] == "<|endoftext|>" and info["model_max_length"] == 256
    assert info["vocab_size"] == 50257 and info["chat_template"] is None


def test_tokenize_chat_messages_and_the_chat_template(chat_ckpt):  # noqa: F811
    jinja2 = pytest.importorskip("jinja2")
    path, tok = chat_ckpt
    with Server(serve_cfg(path)) as s:
        got = post(s, "/tokenize", {"messages": CHAT})
        assert got["tokens"] == sft.render_chat(tok, CHAT)
        info = httpx.get(s.url + "/tokenizer_info", timeout=10).json()
    rendered = jinja2.Template(info["chat_template"]).render(messages=CHAT, add_generation_prompt=True)
    assert tok.encode(rendered, allowed_special="all") == got["tokens"]


# --- embeddings ----------------------------------------------------------------------------------------


def test_embeddings_are_the_mean_pooled_final_hidden_state(gpt2_dir, gpt2_server):
    _, model = gpt2_dir
    tok = get_tokenizer("gpt2", vocab_dir=GPT2_VOCAB)
    texts = ["A cat sat on the mat.", "Stock markets fell sharply today after the announcement"]
    out = post(gpt2_server, "/v1/embeddings", {"input": texts, "model": "tiny-gpt2"})
    assert out["object"] == "list" and [d["index"] for d in out["data"]] == [0, 1]
    assert out["usage"]["prompt_tokens"] == sum(len(tok.encode(t)) for t in texts)
    for text, d in zip(texts, out["data"], strict=True):
        with torch.no_grad():
            hidden = model(torch.tensor([tok.encode(text)]), hidden=True)[0]  # (T, C)
        want = torch.nn.functional.normalize(hidden.mean(0), dim=0)
        torch.testing.assert_close(torch.tensor(d["embedding"]), want, atol=1e-5, rtol=0)
    b64 = post(gpt2_server, "/v1/embeddings", {"input": texts[0], "encoding_format": "base64"})
    import base64
    import struct

    raw = base64.b64decode(b64["data"][0]["embedding"])
    assert list(struct.unpack(f"<{len(raw) // 4}f", raw)) == pytest.approx(
        out["data"][0]["embedding"], abs=1e-6
    )
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=gpt2_server.url + "/v1", api_key="x", max_retries=0)
    e = client.embeddings.create(model="tiny-gpt2", input=texts)
    assert e.data[1].embedding == pytest.approx(out["data"][1]["embedding"], abs=1e-6)


# --- sampling parameters ----------------------------------------------------------------------------


def test_sampling_parameters_change_what_is_generated(ckpt):  # noqa: F811
    with Server(serve_cfg(ckpt)) as s:
        base = {"prompt": "abc", "max_tokens": 20, "temperature": 0}
        plain = post(s, "/v1/completions", base)["choices"][0]["text"]
        assert len(set(plain)) < 20  # greedy on this model repeats itself
        # logit_bias: +100 on one token makes it the only choice; -100 bans the greedy one
        forced = post(s, "/v1/completions", {**base, "logit_bias": {str(ord("q")): 100}})
        assert forced["choices"][0]["text"] == "q" * 20
        banned = post(s, "/v1/completions", {**base, "logit_bias": {str(ord(plain[0])): -100}})
        assert banned["choices"][0]["text"][0] != plain[0]
        # presence_penalty 2 (and repetition_penalty) discourage repeats: more distinct characters
        for extra in ({"presence_penalty": 2.0}, {"repetition_penalty": 3.0}, {"frequency_penalty": 2.0}):
            text = post(s, "/v1/completions", {**base, **extra})["choices"][0]["text"]
            assert len(set(text)) > len(set(plain)), extra
        # min_tokens: the end-of-text token is banned until then (its logit boosted, so it would end at once)
        eot = {str(256): 100}
        assert post(s, "/v1/completions", {**base, "logit_bias": eot})["usage"]["completion_tokens"] == 1
        got = post(s, "/v1/completions", {**base, "logit_bias": eot, "min_tokens": 5})
        assert got["usage"]["completion_tokens"] == 6 and got["choices"][0]["finish_reason"] == "stop"
        ignored = post(s, "/v1/completions", {**base, "logit_bias": eot, "ignore_eos": True, "max_tokens": 4})
        assert ignored["choices"][0]["finish_reason"] == "length"
        stopped = post(s, "/v1/completions", {**base, "stop_token_ids": [ord(plain[3])]})
        assert stopped["choices"][0]["text"] == plain[:3]
        # accepted and ignored; a feature we lack is a clear 400
        ok = {"user": "u1", "store": False, "metadata": {"k": "v"}, "service_tier": "auto"}
        assert post(s, "/v1/completions", {**base, **ok})["choices"][0]["text"] == plain


def test_chat_logprobs_and_template_tokens_kept_out_of_completions(chat_ckpt):  # noqa: F811
    path, tok = chat_ckpt
    with Server(serve_cfg(path)) as s:
        body = {"messages": CHAT, "max_tokens": 8, "temperature": 0, "logprobs": True, "top_logprobs": 3}
        choice = post(s, "/v1/chat/completions", body)["choices"][0]
        content = choice["logprobs"]["content"]
        assert 1 <= len(content) <= 8 and all(len(c["top_logprobs"]) == 3 for c in content)
        assert all(
            c["logprob"] <= 0 and c["logprob"] == pytest.approx(c["top_logprobs"][0]["logprob"])
            for c in content
        )
        # a completion that runs through the template's tokens shows none of them as text
        ids = sft.render_chat(tok, CHAT)
        end = tok.special_tokens[sft.END]
        bias = {str(end): 100}
        raw = post(s, "/v1/completions", {"prompt": ids, "max_tokens": 5, "logit_bias": bias, "logprobs": 0})
        assert raw["choices"][0]["text"] == "" and raw["usage"]["completion_tokens"] == 5
        assert raw["choices"][0]["logprobs"]["tokens"] == [sft.END] * 5  # generated, counted, not shown
        shown = post(
            s,
            "/v1/completions",
            {"prompt": ids, "max_tokens": 5, "logit_bias": bias, "skip_special_tokens": False},
        )
        assert shown["choices"][0]["text"] == sft.END * 5


def test_logprob_values_are_log_probabilities(ckpt):  # noqa: F811
    with Server(serve_cfg(ckpt)) as s:
        body = {"prompt": "hello", "max_tokens": 6, "logprobs": 5, "seed": 3}
        lp = post(s, "/v1/completions", body)["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == 6 and lp["text_offset"][0] == 5
    for top in lp["top_logprobs"]:
        values = list(top.values())
        assert all(v <= 0 for v in values) and sum(math.exp(v) for v in values) <= 1 + 1e-5
