"""POST /v1/chat/completions: the chat template (sft.py) over the same engine as /v1/completions.

The model is test_server's tiny byte model with the template's tokens added (as `gpt2lab finetune`
does), saved as a checkpoint; OpenAI's own client talks to it.
"""

from __future__ import annotations

import httpx
import pytest
import torch
from test_server import KEY, Server, serve_cfg, tiny_byte_model

from gpt2lab import lora, sft
from gpt2lab.checkpoint import save_checkpoint
from gpt2lab.interop.peft import save_adapter
from gpt2lab.server import load
from gpt2lab.tokenizer import ByteTokenizer

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say something."}]


@pytest.fixture(scope="module")
def chat_ckpt(tmp_path_factory):
    model = tiny_byte_model()
    tok, added = sft.add_template_tokens(model, ByteTokenizer())
    assert added  # the byte tokenizer has no template tokens: they take padded rows 257..260
    path = tmp_path_factory.mktemp("chat") / "tiny-chat"
    save_checkpoint(path, model, extra={"tokenizer": tok.to_spec()})
    return path, tok


@pytest.fixture(scope="module")
def byte_ckpt(tmp_path_factory):
    """The same tiny byte model without the template's tokens (a pretrained, not fine-tuned, model)."""
    path = tmp_path_factory.mktemp("chat") / "tiny-bytes"
    save_checkpoint(path, tiny_byte_model(), extra={"tokenizer": ByteTokenizer().to_spec()})
    return path


@pytest.fixture(scope="module")
def chat_server(chat_ckpt):
    with Server(serve_cfg(chat_ckpt[0]), api_key=KEY) as s:
        yield s


@pytest.fixture
def chat_client(chat_server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=chat_server.url + "/v1", api_key=KEY, max_retries=0, timeout=30)


def test_chat_completion_streams_the_same_text_and_counts_the_template(chat_client, chat_ckpt):
    _, tok = chat_ckpt
    kw = dict(model="tiny-chat", messages=CHAT, max_tokens=30, temperature=0.9, seed=3, n=2)
    full = chat_client.chat.completions.create(**kw)
    assert full.object == "chat.completion" and full.id.startswith("chatcmpl-")
    assert [c.message.role for c in full.choices] == ["assistant", "assistant"]
    assert full.usage.prompt_tokens == len(sft.render_chat(tok, CHAT))
    streamed, roles, finishes = ["", ""], [[], []], [None, None]
    for chunk in chat_client.chat.completions.create(**kw, stream=True):
        assert chunk.object == "chat.completion.chunk"
        for c in chunk.choices:
            roles[c.index] += [c.delta.role] if c.delta.role else []
            streamed[c.index] += c.delta.content or ""
            finishes[c.index] = c.finish_reason or finishes[c.index]
    assert roles == [["assistant"], ["assistant"]]  # once per choice, in its first chunk
    assert streamed == [c.message.content for c in full.choices]
    assert finishes == [c.finish_reason for c in full.choices]
    assert all(f in ("stop", "length") for f in finishes)


def test_greedy_chat_is_the_completion_of_the_rendered_template_up_to_end(chat_client, chat_ckpt):
    """The chat endpoint is the completions engine on render_chat's ids, stopping at <|end|>."""
    _, tok = chat_ckpt
    ids = sft.render_chat(tok, CHAT)
    chat = chat_client.chat.completions.create(model="tiny-chat", messages=CHAT, max_tokens=60, temperature=0)
    plain = chat_client.completions.create(model="tiny-chat", prompt=ids, max_tokens=60, temperature=0)
    text = plain.choices[0].text
    assert chat.choices[0].message.content == text.split(sft.END)[0]
    assert chat.choices[0].finish_reason == ("stop" if sft.END in text else plain.choices[0].finish_reason)


def test_chat_bad_input_is_a_400_and_a_model_without_the_template_is_refused(chat_server, byte_ckpt):
    h = {"Authorization": f"Bearer {KEY}"}
    url = chat_server.url + "/v1/chat/completions"
    cases = [
        ({"model": "tiny-chat"}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "robot"),
        ({"messages": [{"role": "user"}]}, "content"),
        ({"messages": CHAT, "prompt": "x"}, "prompt"),
        ({"messages": CHAT, "max_tokens": 10_000}, "max_tokens"),
        ({"messages": CHAT, "tools": [{"type": "function"}]}, "tools"),
        ({"messages": CHAT, "response_format": {"type": "json_object"}}, "response_format"),
    ]
    for body, word in cases:
        r = httpx.post(url, json=body, headers=h, timeout=30)
        assert r.status_code == 400, (body, r.text)
        assert word in r.json()["error"]["message"], (body, r.text)
    parts = [{"role": "developer", "content": [{"type": "text", "text": "hi"}]}]  # OpenAI's newer forms
    ok = httpx.post(url, json={"messages": parts, "max_tokens": 3}, headers=h, timeout=30)
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["role"] == "assistant"
    with Server(serve_cfg(byte_ckpt)) as plain:  # the byte model was never given the template's tokens
        r = httpx.post(plain.url + "/v1/chat/completions", json={"messages": CHAT}, timeout=30)
        assert r.status_code == 400 and "chat template" in r.json()["error"]["message"]
        assert httpx.get(plain.url + "/health", timeout=30).json()["status"] == "ok"


def test_serve_puts_a_lora_adapter_onto_its_base(tmp_path, byte_ckpt):
    """--adapter: the base's tokenizer gains the template tokens and the model computes base + B A."""
    base = tiny_byte_model()
    tok, _ = sft.add_template_tokens(base, ByteTokenizer())
    lora.apply_lora(base, ("c_attn",), rank=4, alpha=8)
    torch.manual_seed(1)
    for layer in lora.lora_layers(base).values():
        torch.nn.init.normal_(layer.lora_B, std=0.5)  # a non-zero update (B starts at zero)
    save_adapter(
        base,
        tmp_path / "adapter",
        template_tokens={t: tok.special_tokens[t] for t in sft.TEMPLATE_TOKENS},
    )
    model, served_tok = load(serve_cfg(byte_ckpt, adapter=str(tmp_path / "adapter")))
    assert served_tok.special_tokens[sft.END] == tok.special_tokens[sft.END]
    idx = torch.tensor([sft.render_chat(tok, CHAT)])
    with torch.no_grad():
        assert (model(idx) - base(idx)).abs().max().item() <= 1e-5
        plain, _ = load(serve_cfg(byte_ckpt))
        assert (plain(idx[:, :1]) - model(idx[:, :1])).abs().max().item() > 1e-4
