"""Our LoRA against Hugging Face peft's on the same transformers GPT-2; merge, adapter files, errors."""

from __future__ import annotations

import pytest
import torch
from conftest import randomized, small_config

from gpt2lab import GPT, GPTConfig
from gpt2lab.errors import UserError
from gpt2lab.interop import load_pretrained
from gpt2lab.interop.peft import load_adapter, save_adapter
from gpt2lab.lora import (
    LoRALinear,
    apply_lora,
    lora_state_dict,
    merge_lora,
    merged_copy,
    trainable_fraction,
    unmerge_lora,
)


def _set_adapters(model: torch.nn.Module, seed: int = 3) -> None:
    """Nonzero A and B everywhere (B starts at zero, which would make any LoRA forward look right)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("targets", [("c_attn",), ("c_attn", "c_proj", "c_fc")], ids=["c_attn", "all"])
def test_lora_forward_equals_peft(tmp_path, targets):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_layer=2, n_head=4, n_embd=64, n_positions=32, vocab_size=101)
    ).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.05 * torch.randn_like(p))
    hf.save_pretrained(tmp_path / "hf")
    ours = load_pretrained(tmp_path / "hf")
    apply_lora(ours, targets, rank=8, alpha=16)
    ours.eval()
    # GPT-2's Conv1D stores weights (in, out): peft needs fan_in_fan_out=True; its lora_A/lora_B are
    # nn.Linear with weights (r, in) and (out, r), the same layout as ours.
    peft_model = peft.get_peft_model(
        hf,
        peft.LoraConfig(
            r=8, lora_alpha=16, target_modules=list(targets), fan_in_fan_out=True, lora_dropout=0.0
        ),
    ).eval()
    _set_adapters(ours)
    ours_lora = lora_state_dict(ours)
    n = 0
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                # base_model.model.transformer.h.0.attn.c_attn.lora_A.default.weight -> ours
                key = name.removeprefix("base_model.model.").replace(".default.weight", "")
                p.copy_(ours_lora[key])
                n += 1
    assert n == len(ours_lora) > 0
    idx = torch.randint(0, 101, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs, mine = peft_model(idx).logits, ours(idx)
        diff = (mine - theirs).abs().max().item()
        print(f"our LoRA vs peft ({', '.join(targets)}): max |logit diff| {diff:.2e}")
        assert diff <= 1e-5
        # the adapters matter (a test with zero B would pass the line above trivially)
        with peft_model.disable_adapter():
            assert (peft_model(idx).logits - mine).abs().max().item() > 1e-3
        merge_lora(ours)
        assert (ours(idx) - mine).abs().max().item() <= 1e-5  # merged == unmerged
        assert (merged_copy(ours)(idx) - mine).abs().max().item() <= 1e-5
        unmerge_lora(ours)
        assert (ours(idx) - mine).abs().max().item() <= 1e-5


def test_lora_starts_as_the_base_and_trains_only_adapters():
    base = randomized(GPT(small_config()))
    model = randomized(GPT(small_config()))
    idx = torch.randint(0, 101, (2, 16), generator=torch.Generator().manual_seed(0))
    apply_lora(model, ["c_attn", "mlp.c_proj"], rank=4, alpha=8)
    names = dict(model.named_parameters())
    assert "transformer.h.0.attn.c_attn.weight" in names  # base names unchanged
    assert "transformer.h.0.mlp.c_proj.lora_A" in names and "transformer.h.0.attn.c_proj.lora_A" not in names
    assert {n for n, p in names.items() if p.requires_grad} == {n for n in names if "lora_" in n}
    with torch.no_grad():
        assert torch.equal(model(idx), base(idx))  # B = 0: the identity update
    model(idx, idx).backward()
    assert all(p.grad is None for n, p in names.items() if "lora_" not in n)


def test_gpt2_124m_trainable_fraction_and_adapter_size(tmp_path, capsys):
    model = GPT(GPTConfig.preset("gpt2"))
    apply_lora(model, ["c_attn"], rank=8, alpha=16)
    n_train, n_all = trainable_fraction(model)
    assert n_train == 12 * 8 * (768 + 3 * 768)  # per layer: A (8, 768) + B (2304, 8)
    print(f"GPT-2 124M, LoRA r=8 on c_attn: {n_train:,} of {n_all:,} parameters ({n_train / n_all:.2%})")
    assert 0.0023 < n_train / n_all < 0.0025  # ~0.24%
    save_adapter(model, tmp_path / "adapter")
    size = (tmp_path / "adapter" / "adapter_model.safetensors").stat().st_size
    assert size < 2 * 1024 * 1024, size  # 294,912 fp32 numbers: 1.18 MB
    assert "0.24%" in capsys.readouterr().out


def test_adapter_round_trip_and_wrong_base(tmp_path):
    torch.manual_seed(0)
    trained = apply_lora(randomized(GPT(small_config())), ["c_attn", "c_fc"], rank=4, alpha=4)
    _set_adapters(trained)
    save_adapter(trained, tmp_path / "a")
    idx = torch.randint(0, 101, (1, 16), generator=torch.Generator().manual_seed(0))
    loaded = load_adapter(randomized(GPT(small_config())), tmp_path / "a")  # same base weights (seed 0)
    assert not any(isinstance(m, LoRALinear) and not m.merged for m in loaded.modules())
    with torch.no_grad():
        assert (loaded(idx) - trained.eval()(idx)).abs().max().item() <= 1e-5
    with pytest.raises(UserError, match=r"another base architecture \(n_embd 64 vs 32\)"):
        load_adapter(GPT(small_config(n_embd=32)), tmp_path / "a")
    with pytest.raises(UserError, match=r"another base architecture \(vocab_size 101 vs 120\)"):
        load_adapter(GPT(small_config(vocab_size=120)), tmp_path / "a")
    with pytest.raises(UserError, match="not a LoRA adapter directory"):
        load_adapter(GPT(small_config()), tmp_path)


def test_unknown_target_suggests_the_closest():
    with pytest.raises(
        UserError, match=r"LoRA target 'c_atn' matches no linear layer \(did you mean 'c_attn'\?\)"
    ):
        apply_lora(GPT(small_config()), ["c_atn"])
    with pytest.raises(UserError, match="lora rank must be a positive integer"):
        apply_lora(GPT(small_config()), ["c_attn"], rank=0)
