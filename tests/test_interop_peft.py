"""LoRA adapters in peft's format, both ways: peft loads gpt2lab's adapters onto the exported base (logits
equal to gpt2lab's base + adapter), and a peft-made adapter loads into `gpt2lab serve --adapter`."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import randomized, small_config
from safetensors.torch import save_file
from test_lora import _set_adapters as set_adapters

from gpt2lab import GPT, lora, sft
from gpt2lab.checkpoint import save_checkpoint
from gpt2lab.cli import main
from gpt2lab.config import ServeConfig
from gpt2lab.errors import UserError
from gpt2lab.interop import save_pretrained
from gpt2lab.interop.peft import attach_adapter, save_adapter
from gpt2lab.tokenizer import ByteTokenizer

transformers = pytest.importorskip("transformers", reason="transformers (the dev extra) is the reference")
peft = pytest.importorskip("peft", reason="peft (the dev extra) is the reference")

CHAT = [{"role": "user", "content": "Hi! How are you?"}, {"role": "assistant", "content": "Fine, thanks."}]


def base_model(vocab_size: int, tie_weights: bool = True) -> GPT:
    return randomized(GPT(small_config(vocab_size=vocab_size, block_size=64, tie_weights=tie_weights)))


@pytest.mark.parametrize(
    "rows, tied",
    [(320, True), (257, True), (320, False)],
    ids=["template-in-spare-rows", "vocabulary-grows", "untied-head"],
)
def test_peft_loads_a_gpt2lab_adapter_to_the_same_logits(rows, tied, tmp_path):
    base = base_model(rows, tied)
    save_pretrained(base, tmp_path / "base", ByteTokenizer())  # what `gpt2lab convert --ckpt` writes
    tuned = base_model(rows, tied)  # the same weights (seeded)
    tok, added = sft.add_template_tokens(tuned, ByteTokenizer())
    lora.apply_lora(tuned, ["c_attn", "mlp.c_fc"], rank=4, alpha=8)
    set_adapters(tuned)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # the template tokens' rows trained too
        for i in added.values():
            tuned.transformer.wte.weight[i] = torch.randn(64, generator=g)
            if not tied:
                tuned.lm_head.weight[i] = torch.randn(64, generator=g)
    save_adapter(
        tuned, tmp_path / "adapter", base=str(tmp_path / "base"), tokenizer=tok, template_tokens=added
    )
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == str(tmp_path / "base")

    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    info = json.loads((tmp_path / "adapter" / "gpt2lab_adapter.json").read_text())
    if info["vocab_rows"] > hf.config.vocab_size:  # a base without spare rows grows first, as gpt2lab's did
        hf.resize_token_embeddings(info["vocab_rows"])
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "adapter")  # the adapter's own tokenizer
    ids = sft.render_chat(tok, CHAT)
    assert hf_tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False) == tok.decode(ids)
    idx = torch.tensor([ids])
    with torch.no_grad():
        expected = tuned.eval()(idx)
        assert (peft_model(idx).logits - expected).abs().max().item() <= 1e-5
        # and gpt2lab reads it back onto a fresh copy of the base
        again = base_model(rows, tied)
        assert (
            attach_adapter(again, ByteTokenizer(), tmp_path / "adapter").special_tokens == tok.special_tokens
        )
        assert (again(idx) - expected).abs().max().item() <= 1e-5


def test_a_peft_made_adapter_serves_in_gpt2lab(tmp_path):
    """`gpt2lab serve --adapter DIR` with an adapter peft itself trained and saved on the exported base."""
    from gpt2lab.server import load

    base = base_model(320)
    save_checkpoint(tmp_path / "ckpt", base, extra={"tokenizer": ByteTokenizer().to_spec()})
    assert main(["convert", "--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf")]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
    peft_model = peft.get_peft_model(hf, config)
    set_adapters(peft_model)
    peft_model.save_pretrained(tmp_path / "peft_adapter")
    served, tok = load(ServeConfig(ckpt=str(tmp_path / "ckpt"), adapter=str(tmp_path / "peft_adapter")))
    assert tok.to_spec() == ByteTokenizer().to_spec()  # no template tokens: the base's tokenizer
    idx = torch.tensor([tok.encode("Hello, peft!")])
    with torch.no_grad():
        diff = (served(idx) - peft_model.eval()(idx).logits).abs().max().item()
        assert diff <= 1e-5
        assert (served(idx) - base(idx)).abs().max().item() > 1e-3  # the adapter changed the model


def test_adapters_of_gpt2lab_s_old_format_still_load_and_convert(tmp_path, capsys):
    base = base_model(320)
    tuned = base_model(320)
    tok, added = sft.add_template_tokens(tuned, ByteTokenizer())
    lora.apply_lora(tuned, ["c_attn"], rank=4, alpha=8)
    set_adapters(tuned)
    old = tmp_path / "old"
    old.mkdir()
    tensors = lora.lora_state_dict(tuned)
    start = min(added.values())
    tensors["token_rows"] = tuned.transformer.wte.weight[start : start + 4].detach().clone()
    save_file(tensors, old / "adapter.safetensors")
    config = {"format": "gpt2lab-lora-adapter", "version": 1, **lora.lora_settings(tuned)}
    config.update(model=tuned.config.to_dict(), template_tokens=added, token_rows_start=start)
    config.update(tokenizer=tok.to_spec(), pad_vocab_multiple=64)
    (old / "adapter_config.json").write_text(json.dumps(config))
    idx = torch.tensor([sft.render_chat(tok, CHAT)])
    with torch.no_grad():
        expected = tuned.eval()(idx)
        again = base_model(320)
        attach_adapter(again, ByteTokenizer(), old)
        assert (again(idx) - expected).abs().max().item() <= 1e-5
    assert main(["convert", "--adapter", str(old), "--out", str(tmp_path / "new")]) == 0
    assert "wrote peft adapter" in capsys.readouterr().out
    save_pretrained(base, tmp_path / "base", ByteTokenizer())
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "new").eval()
    with torch.no_grad():
        assert (peft_model(idx).logits - expected).abs().max().item() <= 1e-5


def test_peft_options_gpt2lab_does_not_implement_are_refused_by_name(tmp_path):
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_head=4, n_embd=64, vocab_size=320))
    for option, value in [("use_dora", True), ("use_rslora", True)]:
        config = peft.LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True, **{option: value})
        peft.get_peft_model(hf, config).save_pretrained(tmp_path / option)
        hf = transformers.GPT2LMHeadModel(
            transformers.GPT2Config(n_layer=2, n_head=4, n_embd=64, vocab_size=320)
        )
        with pytest.raises(UserError, match=f"{option} = True is a peft option gpt2lab does not implement"):
            attach_adapter(base_model(320), ByteTokenizer(), tmp_path / option)
