"""Exported tokenizers, read by Hugging Face's own code: AutoTokenizer gives gpt2lab's ids on every text of
../shared/data (special tokens included), chat templates render sft.render_chat's tokens, and what cannot be
exact is refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import small_config

from gpt2lab import GPT, sft
from gpt2lab.config import pad_vocab_size
from gpt2lab.errors import UserError
from gpt2lab.interop import save_pretrained
from gpt2lab.interop.hf_tokenizer import read_hf_tokenizer, tokenizer_json
from gpt2lab.tokenizer import AddedTokens, ByteTokenizer, CharTokenizer, get_tokenizer, train_tokenizer

transformers = pytest.importorskip("transformers", reason="transformers (the dev extra) is the reference")

CHAT = [
    {"role": "system", "content": "Answer in one word."},
    {"role": "user", "content": "Hi there! What's 2+2?\n"},
    {"role": "assistant", "content": " four"},
    {"role": "user", "content": "And <3 \u00e9t\u00e9 \U0001f600?"},
]


def same_spec(a, b) -> bool:
    """The same tokenizer (a BPE read back from a folder is named after the folder)."""
    return {k: v for k, v in a.to_spec().items() if k != "name"} == {
        k: v for k, v in b.to_spec().items() if k != "name"
    }


def export(tok, out: Path, block_size: int = 64) -> Path:
    """A tiny model with tok's vocabulary (padded to a multiple of 64), exported with tok."""
    model = GPT(small_config(vocab_size=pad_vocab_size(tok.vocab_size), block_size=block_size))
    return save_pretrained(model, out, tok)


def shared_texts(shared_data: Path) -> list[str]:
    """Every text file of ../shared/data, cut at line ends into ~64 KB pieces (encoded in parallel)."""
    pieces = []
    for path in sorted(p for p in shared_data.rglob("*") if p.is_file()):
        text = path.read_text(encoding="utf-8")
        start = 0
        while start < len(text):
            end = text.find("\n", start + 65536)
            end = len(text) if end < 0 else end + 1
            pieces.append(text[start:end])
            start = end
    return pieces


@pytest.fixture(scope="module")
def bpe4k(tmp_path_factory, request):
    """A 4K BPE trained by `gpt2lab tokenizer train` on TinyStories, with one extra special token."""
    from conftest import SHARED_DATA

    corpus = SHARED_DATA / "tinystories" / "TinyStories-train_first2316stories.txt"
    if not corpus.is_file():
        pytest.skip(f"{corpus} not found")
    out = tmp_path_factory.mktemp("tok") / "ts4k"
    train_tokenizer([corpus], 4096, out, special_tokens=["<|sep|>"], progress=False)
    return get_tokenizer(out)


@pytest.mark.slow
@pytest.mark.parametrize("which", ["gpt2", "bpe4k"])
def test_autotokenizer_ids_equal_gpt2lab_on_all_shared_data(which, shared_data, bpe4k, tmp_path):
    tok = get_tokenizer("gpt2", vocab_dir=shared_data / "gpt2") if which == "gpt2" else bpe4k
    hf = transformers.AutoTokenizer.from_pretrained(export(tok, tmp_path / "hf"))
    assert len(hf) == tok.vocab_size and hf.eos_token_id == tok.eot_id
    texts = shared_texts(shared_data)
    assert sum(t.count("<|endoftext|>") for t in texts) > 2000  # TinyStories' separators: specials count
    ours = tok.encode_batch(texts, allowed_special="all")
    theirs = hf(texts, verbose=False)["input_ids"]
    assert sum(map(len, ours)) > 1_000_000
    for text, a, b in zip(texts, ours, theirs, strict=True):
        assert a == b, text[:80]
    assert hf.decode(ours[0]) == texts[0]  # and back to the same text


@pytest.mark.parametrize("kind", ["char", "bytes"])
def test_char_and_byte_tokenizers_are_exact(kind, shared_data, tmp_path):
    corpus = shared_data / "tinyshakespeare.txt"
    tok = CharTokenizer.from_corpus(corpus) if kind == "char" else ByteTokenizer()
    out = export(tok, tmp_path / "hf")
    hf = transformers.AutoTokenizer.from_pretrained(out)
    text = (
        corpus.read_text(encoding="utf-8")[:200_000]
        + "<|endoftext|>"
        + "ROMEO: \u00e9\U0001f600"[: 7 if kind == "char" else 99]
    )
    ids = tok.encode(text, allowed_special="all")
    assert hf(text)["input_ids"] == ids
    assert hf.decode(ids) == text
    assert same_spec(read_hf_tokenizer(out), tok)  # and gpt2lab reads the folder back to the same tokenizer
    hf.save_pretrained(tmp_path / "resaved")  # as transformers itself writes it
    assert same_spec(read_hf_tokenizer(tmp_path / "resaved"), tok)
    if kind == "char":  # a character outside the alphabet fails there as here: never a silent <unk>
        with pytest.raises(Exception, match="Missing \\[UNK\\]"):
            hf("caf\u00e9")
        with pytest.raises(UserError, match="is not among"):
            tok.encode("caf\u00e9")


@pytest.mark.parametrize("base", ["bpe4k", "bytes"])
def test_apply_chat_template_equals_render_chat(base, bpe4k, tmp_path):
    tok = bpe4k if base == "bpe4k" else ByteTokenizer()
    model = GPT(small_config(vocab_size=pad_vocab_size(tok.vocab_size), block_size=256))
    chat_tok, added = sft.add_template_tokens(model, tok)
    assert added and isinstance(chat_tok, AddedTokens)
    out = save_pretrained(model, tmp_path / "hf", chat_tok)
    hf = transformers.AutoTokenizer.from_pretrained(out)
    for messages in (CHAT, CHAT[:3], CHAT[1:2]):
        for gen in (True, False):
            got = hf.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True)
            got = got["input_ids"] if hasattr(got, "keys") else got
            assert list(got) == sft.render_chat(chat_tok, messages, add_generation_prompt=gen)
    with pytest.raises(Exception, match="role must be"):
        hf.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == sft.chat_stop_ids(chat_tok)  # <|end|> and <|endoftext|>
    assert same_spec(read_hf_tokenizer(out), chat_tok)
    hf.save_pretrained(tmp_path / "resaved")  # transformers' own serialization reads back the same
    assert same_spec(read_hf_tokenizer(tmp_path / "resaved"), chat_tok)


def test_the_exported_folder_reads_back_as_the_same_tokenizer(bpe4k, shared_data, tmp_path):
    """Import mirrors export: the 4K BPE and GPT-2's vocabulary come back as themselves (GPT-2 by name)."""
    assert same_spec(read_hf_tokenizer(export(bpe4k, tmp_path / "a")), bpe4k)
    gpt2 = get_tokenizer("gpt2", vocab_dir=shared_data / "gpt2")
    assert read_hf_tokenizer(export(gpt2, tmp_path / "b")).to_spec() == gpt2.to_spec()


def test_tokenizers_gpt2lab_cannot_reproduce_are_refused(tmp_path):
    doc = tokenizer_json(ByteTokenizer())
    doc["normalizer"] = {"type": "NFC"}
    (tmp_path / "tokenizer.json").write_text(json.dumps(doc))
    with pytest.raises(UserError, match="a normalizer \\(NFC\\) gpt2lab does not reproduce"):
        read_hf_tokenizer(tmp_path)
    doc = tokenizer_json(ByteTokenizer())
    doc["model"]["type"] = "Unigram"
    (tmp_path / "tokenizer.json").write_text(json.dumps(doc))
    with pytest.raises(UserError, match="model type 'Unigram'"):
        read_hf_tokenizer(tmp_path)
    with pytest.raises(UserError, match="has '<unk>' in its alphabet"):
        tokenizer_json(CharTokenizer(list("ab"), ["<|endoftext|>", "<unk>"]))


def test_exported_config_carries_the_models_own_special_ids(bpe4k, tmp_path):
    out = export(bpe4k, tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    eot = bpe4k.eot_id
    assert eot != 50256 and config["bos_token_id"] == config["eos_token_id"] == eot
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == generation["pad_token_id"] == eot
    assert bpe4k.vocab_size == 4096 and "suppress_tokens" not in generation  # no padding rows to keep off
    hf = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert hf.generation_config.eos_token_id == eot
    with torch.no_grad():
        assert hf(torch.tensor([[1, 2, 3]])).logits.shape[-1] == pad_vocab_size(bpe4k.vocab_size)
