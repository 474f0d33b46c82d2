"""GGUF export, read back by the `gguf` package's own reader (llama.cpp's gguf-py): architecture, metadata,
token list and tensors equal to the checkpoint's (exact for f32). Running the file in llama.cpp itself is
bench/llamacpp.py (it compiles llama.cpp: not CI)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import randomized, small_config

from gpt2lab import GPT, sft
from gpt2lab.bpe import bytes_to_unicode
from gpt2lab.checkpoint import save_checkpoint
from gpt2lab.cli import main
from gpt2lab.errors import UserError
from gpt2lab.interop.gguf import save_gguf
from gpt2lab.tokenizer import CharTokenizer, get_tokenizer

gguf = pytest.importorskip("gguf", reason="the gguf package (the dev extra) is the reference reader")


def read(path):
    reader = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in reader.fields.items()}
    tensors = {t.name: t for t in reader.tensors}
    return fields, tensors


def as_array(t) -> np.ndarray:
    """A tensor as float32 in numpy (rows, cols) order, dequantized with gguf's own code."""
    data = gguf.quants.dequantize(t.data, t.tensor_type)
    return np.asarray(data, dtype=np.float32).reshape([int(n) for n in reversed(t.shape)])


@pytest.fixture
def small_bpe(shared_data, tmp_path):
    """A 300-token BPE `gpt2lab tokenizer train` made (GPT-2's 50K tokens cost gguf's reader ~10 s)."""
    from gpt2lab.tokenizer import train_tokenizer

    corpus = shared_data / "tinystories" / "cs336_tinystories_sample.txt"
    train_tokenizer([corpus], 300, tmp_path / "tok", progress=False)
    return get_tokenizer(tmp_path / "tok")


@pytest.mark.slow
def test_gguf_f32_reads_back_exactly(shared_data, tmp_path):
    """GPT-2's vocabulary in 50304 rows (47 padding rows), no biases, an untied head, another MLP width."""
    model = randomized(GPT(small_config(vocab_size=50304, bias=False, tie_weights=False, n_inner=96)))
    out = save_gguf(model, get_tokenizer("gpt2", vocab_dir=shared_data / "gpt2"), tmp_path / "m.gguf")
    fields, tensors = read(out)
    cfg = model.config
    assert fields["general.architecture"] == "gpt2"
    assert fields["gpt2.context_length"] == cfg.block_size and fields["gpt2.embedding_length"] == cfg.n_embd
    assert fields["gpt2.feed_forward_length"] == 96 and fields["gpt2.block_count"] == cfg.n_layer
    assert fields["gpt2.attention.head_count"] == cfg.n_head
    assert fields["gpt2.attention.layer_norm_epsilon"] == pytest.approx(cfg.layer_norm_epsilon)
    assert fields["general.file_type"] == int(gguf.LlamaFileType.ALL_F32)
    # The tokenizer: GPT-2's own files, token for token, and a [PAD] for each padding row.
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    encoder = json.loads((shared_data / "gpt2" / "encoder.json").read_text())
    tokens = fields["tokenizer.ggml.tokens"]
    assert len(tokens) == 50304 and tokens[:50257] == sorted(encoder, key=encoder.get)
    assert tokens[50257:] == [f"[PAD{i}]" for i in range(50257, 50304)]
    types = fields["tokenizer.ggml.token_type"]
    assert types[50256] == gguf.TokenType.CONTROL and types[50257] == gguf.TokenType.UNUSED
    assert types[:50256] == [gguf.TokenType.NORMAL] * 50256
    merges = (shared_data / "gpt2" / "vocab.bpe").read_text(encoding="utf-8").splitlines()[1:]
    assert fields["tokenizer.ggml.merges"] == [m for m in merges if m]
    assert fields["tokenizer.ggml.bos_token_id"] == fields["tokenizer.ggml.eos_token_id"] == 50256
    # Tensors: llama.cpp's names, our (out, in) layout, bit-identical; zero biases for a bias-free model.
    sd = model.state_dict()
    expected = {
        "token_embd.weight": sd["transformer.wte.weight"],
        "position_embd.weight": sd["transformer.wpe.weight"],
        "output.weight": sd["lm_head.weight"],
        "output_norm.weight": sd["transformer.ln_f.weight"],
        "blk.1.attn_qkv.weight": sd["transformer.h.1.attn.c_attn.weight"],
        "blk.0.ffn_up.weight": sd["transformer.h.0.mlp.c_fc.weight"],
        "blk.1.ffn_down.weight": sd["transformer.h.1.mlp.c_proj.weight"],
        "blk.0.attn_output.bias": torch.zeros(cfg.n_embd),
    }
    for name, t in expected.items():
        assert np.array_equal(as_array(tensors[name]), t.numpy()), name
    per_block = {"attn_norm", "attn_qkv", "attn_output", "ffn_norm", "ffn_up", "ffn_down"}
    top = {"token_embd", "position_embd", "output_norm", "output_norm.bias", "output"}
    assert len(tensors) == len(top) + cfg.n_layer * len(per_block) * 2  # every block module: weight and bias


@pytest.mark.parametrize("outtype, tolerance", [("f32", 0.0), ("f16", 1e-3), ("q8_0", 2e-2)])
def test_convert_to_gguf(outtype, tolerance, small_bpe, tmp_path, capsys):
    model = randomized(GPT(small_config(vocab_size=320)))
    ckpt = save_checkpoint(tmp_path / "ckpt", model, extra={"tokenizer": small_bpe.to_spec()})
    out = tmp_path / f"m-{outtype}.gguf"
    args = ["convert", "--ckpt", str(ckpt), "--format", "gguf", "--outtype", outtype, "--out", str(out)]
    assert main(args) == 0
    assert f"wrote GGUF {out} ({outtype}," in capsys.readouterr().out
    fields, tensors = read(out)
    qkv = tensors["blk.0.attn_qkv.weight"]
    want = {"f32": "F32", "f16": "F16", "q8_0": "Q8_0"}[outtype]
    assert qkv.tensor_type == gguf.GGMLQuantizationType[want]
    assert tensors["position_embd.weight"].tensor_type == gguf.GGMLQuantizationType.F32  # kept, as llama.cpp
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    got = as_array(qkv)
    ref = model.state_dict()["transformer.h.0.attn.c_attn.weight"].numpy()
    assert np.abs(got - ref).max() <= tolerance * np.abs(ref).max()
    assert fields["tokenizer.ggml.tokens"][small_bpe.eot_id] == "<|endoftext|>"


def test_gguf_of_a_chat_model_and_a_trained_bpe(small_bpe, tmp_path):
    """A vocabulary `tokenizer train` made, with the chat template's tokens: llama.cpp's converter could not
    name its pre-tokenizer (it hashes known vocabularies); the file states GPT-2's."""
    model = randomized(GPT(small_config(vocab_size=320)))
    chat_tok, added = sft.add_template_tokens(model, small_bpe)
    save_gguf(model, chat_tok, tmp_path / "chat.gguf")
    fields, _ = read(tmp_path / "chat.gguf")
    table = bytes_to_unicode()
    tokens = fields["tokenizer.ggml.tokens"]
    assert tokens[:256] == [table[b] for b in range(256)] and tokens[300:304] == list(added)
    assert [fields["tokenizer.ggml.token_type"][i] for i in added.values()] == [gguf.TokenType.CONTROL] * 4
    assert fields["tokenizer.ggml.eot_token_id"] == added[sft.END]
    assert "<|assistant|>" in fields["tokenizer.chat_template"]


def test_gguf_refuses_what_llama_cpp_cannot_compute(small_bpe, tmp_path):
    with pytest.raises(UserError, match=r"GPTConfig.activation = 'gelu' has no equivalent there"):
        save_gguf(GPT(small_config(vocab_size=320, activation="gelu")), small_bpe, tmp_path / "a.gguf")
    with pytest.raises(UserError, match="is not byte-level BPE: llama.cpp's gpt2 tokenizer cannot reproduce"):
        save_gguf(GPT(small_config(vocab_size=64)), CharTokenizer(list("abc")), tmp_path / "b.gguf")
    assert not list(tmp_path.glob("*.gguf"))
