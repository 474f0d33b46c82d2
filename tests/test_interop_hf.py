"""Our GPT-2 against the reference implementation: Hugging Face transformers' GPT2LMHeadModel."""

import json

import pytest
import torch
from conftest import randomized, small_config
from safetensors.torch import load_file, save_file

from gpt2lab import GPT, GPTConfig
from gpt2lab.checkpoint import load_model, read_config, save_checkpoint
from gpt2lab.errors import UserError
from gpt2lab.interop import load_pretrained, save_pretrained
from gpt2lab.interop.convert import convert
from gpt2lab.tokenizer import ByteTokenizer

transformers = pytest.importorskip("transformers", reason="transformers (the dev extra) is the reference")


def hf_logits(path, idx):
    hf = transformers.GPT2LMHeadModel.from_pretrained(path).eval()
    with torch.no_grad():
        return hf(idx).logits


def random_hf_model(**config) -> "transformers.GPT2LMHeadModel":
    """A transformers GPT-2 with random values in every tensor (biases and LayerNorms included)."""
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**config)).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.1 * noise if ".ln_" in name and name.endswith("weight") else 0.02 * noise)
    return hf


SMALL_HF = dict(n_layer=2, n_head=4, n_embd=64, n_positions=32, vocab_size=101)


@pytest.mark.slow
def test_gpt2_124m_logits_equal_transformers_both_ways(tmp_path):
    ours = randomized(GPT(GPTConfig.preset("gpt2")))
    save_pretrained(ours, tmp_path / "ours")
    idx = torch.randint(0, 50257, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ours(idx)
    assert (hf_logits(tmp_path / "ours", idx) - expected).abs().max().item() <= 1e-4

    hf = random_hf_model()  # GPT2Config() defaults are GPT-2 124M
    hf.save_pretrained(tmp_path / "hf")
    loaded = load_pretrained(tmp_path / "hf")
    assert loaded.config == GPTConfig.preset("gpt2") and loaded.num_params() == 124_439_808
    with torch.no_grad():
        assert (loaded(idx) - hf(idx).logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        dict(bias=False),
        dict(tie_weights=False),
        dict(n_inner=80),
        dict(layer_norm_epsilon=1e-3),
        dict(activation="gelu"),
        dict(zero_init=True, tie_weights=False, bias=False),  # the speedrun options GPT-2 can hold
    ],
    ids=["gpt2-style", "no-bias", "untied", "n_inner", "eps", "exact-gelu", "speedrun-holdable"],
)
def test_small_model_exports_to_the_same_function(tmp_path, overrides):
    ours = randomized(GPT(small_config(**overrides)))
    save_pretrained(ours, tmp_path)
    idx = torch.randint(0, 101, (3, 32))
    with torch.no_grad():
        expected = ours(idx)
    assert (hf_logits(tmp_path, idx) - expected).abs().max().item() <= 1e-4
    back = load_pretrained(tmp_path)
    with torch.no_grad():
        assert (back(idx) - expected).abs().max().item() <= 1e-5


def test_small_transformers_model_imports_to_the_same_function(tmp_path):
    hf = random_hf_model(**SMALL_HF)
    hf.save_pretrained(tmp_path)
    ours = load_pretrained(tmp_path)
    assert not ours.training
    idx = torch.randint(0, 101, (3, 32))
    with torch.no_grad():
        assert (ours(idx) - hf(idx).logits).abs().max().item() <= 1e-4


def test_hub_layout_and_pytorch_bin_load(tmp_path):
    """The hub's own gpt2 files name tensors without `transformer.` and carry attn.bias mask buffers."""
    hf = random_hf_model(**SMALL_HF)
    hf.config.save_pretrained(tmp_path / "hub")
    tensors = {k: v.contiguous() for k, v in hf.transformer.state_dict().items()}
    for i in range(2):
        tensors[f"h.{i}.attn.bias"] = torch.ones(1, 1, 32, 32).tril()
    save_file(tensors, tmp_path / "hub" / "model.safetensors")
    hf.config.save_pretrained(tmp_path / "bin")
    torch.save(hf.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    idx = torch.randint(0, 101, (2, 32))
    with torch.no_grad():
        expected = hf(idx).logits
        for layout in ("hub", "bin"):
            assert (load_pretrained(tmp_path / layout)(idx) - expected).abs().max().item() <= 1e-4


def _broken_copy(tmp_path, edit):
    hf = random_hf_model(**SMALL_HF)
    hf.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    edit(tensors)
    save_file(tensors, tmp_path / "model.safetensors")
    return tmp_path


def test_missing_extra_and_misshaped_tensors_are_named(tmp_path):
    d = _broken_copy(tmp_path / "a", lambda t: t.pop("transformer.h.1.mlp.c_fc.weight"))
    with pytest.raises(UserError, match=r"missing tensor 'transformer.h.1.mlp.c_fc.weight'"):
        load_pretrained(d)
    d = _broken_copy(tmp_path / "b", lambda t: t.update({"transformer.h.2.ln_1.weight": torch.ones(64)}))
    with pytest.raises(UserError, match=r"unexpected tensor 'transformer.h.2.ln_1.weight'"):
        load_pretrained(d)
    d = _broken_copy(tmp_path / "c", lambda t: t.update({"transformer.wpe.weight": torch.zeros(16, 64)}))
    with pytest.raises(
        UserError, match=r"tensor 'transformer.wpe.weight' has shape \(16, 64\), expected \(32, 64\)"
    ):
        load_pretrained(d)


def test_unreadable_or_foreign_files_are_clear_errors(tmp_path):
    with pytest.raises(UserError, match="neither a directory nor one of the hub models"):
        load_pretrained(tmp_path / "nope")
    hf = random_hf_model(**SMALL_HF)
    hf.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(UserError, match="the weights cannot be read"):
        load_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "activation_function": "relu"}))
    with pytest.raises(UserError, match="activation_function 'relu' is not a GELU"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="config.json is not valid JSON"):
        load_pretrained(tmp_path)


def test_architectures_transformers_cannot_express_refuse_to_export_by_name(tmp_path):
    for field, value in [
        ("norm_position", "post"),
        ("pos_embedding", "sinusoidal"),
        ("pos_embedding", "rope"),  # the speedrun options (GPT2Config has no setting for them)
        ("qk_norm", True),
        ("activation", "relu2"),
        ("logit_softcap", 30.0),
    ]:
        with pytest.raises(UserError, match=rf"GPTConfig.{field} = {value!r} has no equivalent there"):
            save_pretrained(GPT(small_config(**{field: value})), tmp_path)
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_a_new_architecture_option_is_refused_by_name_unless_at_its_default():
    """Options added to GPTConfig later (value embeddings, ...) are not listed anywhere here: any field
    HF_CONVERTIBLE does not map converts only at its default, GPT-2's own behaviour."""
    import dataclasses

    from gpt2lab.interop.hf import HF_CONVERTIBLE, check_convertible

    @dataclasses.dataclass
    class Future(GPTConfig):
        value_embeds: bool = False

    check_convertible(Future(**small_config().to_dict()), HF_CONVERTIBLE, "Hugging Face GPT-2")
    with pytest.raises(
        UserError, match=r"GPTConfig.value_embeds = True has no equivalent there \(it holds False\)"
    ):
        check_convertible(
            Future(**small_config().to_dict(), value_embeds=True), HF_CONVERTIBLE, "Hugging Face GPT-2"
        )


def test_checkpoint_round_trip_and_atomic_replace(tmp_path):
    model = randomized(GPT(small_config(pos_embedding="sinusoidal", norm_position="post")))
    save_checkpoint(tmp_path / "ckpt", model, extra={"note": "first"})
    other = randomized(GPT(small_config(pos_embedding="sinusoidal", norm_position="post")), seed=1)
    save_checkpoint(tmp_path / "ckpt", other)  # replaces the old checkpoint as a whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary leftovers
    loaded = load_model(tmp_path / "ckpt")
    assert "note" not in json.loads((tmp_path / "ckpt" / "config.json").read_text())
    idx = torch.randint(0, 101, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx), other(idx), atol=0, rtol=0)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight  # still tied after loading
    with pytest.raises(UserError, match="is not a gpt2lab checkpoint: no config.json"):
        load_model(tmp_path)


def test_convert_both_directions(tmp_path):
    """checkpoint -> Hugging Face folder -> checkpoint: the same function and the same tokenizer."""
    model = randomized(GPT(small_config(vocab_size=320)))
    save_checkpoint(tmp_path / "ckpt", model, extra={"tokenizer": ByteTokenizer().to_spec()})
    report = convert(tmp_path / "hf", ckpt=tmp_path / "ckpt")
    assert "read back: identical logits and token ids" in report
    idx = torch.randint(0, 320, (2, 32))
    with torch.no_grad():
        assert (hf_logits(tmp_path / "hf", idx) - model(idx)).abs().max().item() <= 1e-4
    assert "reloaded logits identical" in convert(tmp_path / "back", pretrained=tmp_path / "hf")
    back = load_model(tmp_path / "back")
    with torch.no_grad():
        assert torch.equal(back(idx), model(idx))
    assert read_config(tmp_path / "back")["tokenizer"] == ByteTokenizer().to_spec()
    with pytest.raises(UserError, match="exactly one of"):
        convert(tmp_path / "x")


def test_convert_refuses_a_model_its_tokenizer_does_not_fit(tmp_path, shared_data):
    """A Hugging Face folder without tokenizer files means GPT-2's vocabulary: 101 rows cannot hold it."""
    random_hf_model(**SMALL_HF).save_pretrained(tmp_path / "hf")
    convert(tmp_path / "ckpt", pretrained=tmp_path / "hf")
    with pytest.raises(UserError, match="has 50257 tokens, more than the model's vocab_size 101"):
        convert(tmp_path / "out", ckpt=tmp_path / "ckpt", gpt2_vocab=shared_data / "gpt2")
    assert not (tmp_path / "out").exists()


def test_exact_gelu_is_a_different_function_that_round_trips_by_name(tmp_path):
    """activation="gelu" is the erf GELU, exported as transformers' "gelu" (GPT-2's is the tanh one)."""
    ours = randomized(GPT(small_config(activation="gelu")))
    x = torch.linspace(-4, 4, 801)
    gelu = ours.transformer.h[0].mlp.gelu
    assert torch.equal(gelu(x), torch.nn.functional.gelu(x))
    assert (gelu(x) - GPT(small_config()).transformer.h[0].mlp.gelu(x)).abs().max().item() > 1e-4
    save_pretrained(ours, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["activation_function"] == "gelu"
    assert load_pretrained(tmp_path).config.activation == "gelu"
