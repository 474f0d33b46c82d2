import pytest

from gpt2lab.config import PRESETS, GPTConfig, pad_vocab_size
from gpt2lab.errors import UserError


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(n_embd=100, n_head=12), "n_embd 100 is not divisible by n_head 12"),
        (dict(n_layer=0), "n_layer must be a positive integer, got 0"),
        (dict(block_size=-1), "block_size must be a positive integer, got -1"),
        (dict(vocab_size=50257.0), "vocab_size must be a positive integer, got 50257.0"),
        (dict(n_inner=0), "n_inner must be a positive integer or None, got 0"),
        (dict(dropout=1.0), "dropout must be in [0, 1), got 1.0"),
        (dict(dropout=-0.1), "dropout must be in [0, 1), got -0.1"),
        (dict(layer_norm_epsilon=0), "layer_norm_epsilon must be a positive number, got 0"),
        (dict(bias="yes"), "bias must be true or false, got 'yes'"),
        (dict(norm_position="middle"), "norm_position must be one of ('pre', 'post'), got 'middle'"),
        (dict(pos_embedding="alibi"), "pos_embedding must be one of ('learned', 'sinusoidal', 'rope'), got"),
        (dict(pos_embedding="rope", n_embd=36, n_head=4), "head size 9 (n_embd / n_head) must be even"),
        (dict(rope_base=0), "rope_base must be a positive number, got 0"),
        (dict(qk_norm=1), "qk_norm must be true or false, got 1"),
        (dict(logit_softcap=-1.0), "logit_softcap must be >= 0 (0 = off), got -1.0"),
        (dict(activation="swiglu"), "activation must be one of ('gelu_tanh', 'gelu', 'relu2'), got 'swiglu'"),
        (dict(attn_impl="flash"), "attn_impl must be one of ('sdpa', 'explicit'), got 'flash'"),
    ],
)
def test_bad_values_name_the_field(fields, message):
    with pytest.raises(UserError) as e:
        GPTConfig(**fields)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_unknown_preset_and_field_suggest_the_closest():
    with pytest.raises(
        UserError, match=r"unknown model preset 'gpt2-mediun' \(did you mean 'gpt2-medium'\?\)"
    ):
        GPTConfig.preset("gpt2-mediun")
    with pytest.raises(UserError, match=r"unknown GPTConfig field 'n_embed' \(did you mean 'n_embd'\?\)"):
        GPTConfig.preset("gpt2", n_embed=512)


def test_presets_build_and_round_trip_through_dicts():
    for name in PRESETS:
        cfg = GPTConfig.preset(name)
        assert GPTConfig.from_dict(cfg.to_dict()) == cfg
    ts = GPTConfig.preset("ts-6l512")
    assert (ts.n_layer, ts.n_head, ts.n_embd, ts.mlp_size, ts.block_size) == (6, 8, 512, 2048, 256)
    assert (ts.pos_embedding, ts.norm_position, ts.dropout, ts.tie_weights) == (
        "sinusoidal",
        "post",
        0.1,
        True,
    )
    tt = GPTConfig.preset("tinytiny")
    assert (tt.n_layer, tt.n_head, tt.n_embd, tt.block_size, tt.bias, tt.vocab_size, tt.dropout) == (
        4, 4, 384, 256, False, 50304, 0.0,
    )  # fmt: skip
    assert GPTConfig.preset("gpt2", dropout=0.1).dropout == 0.1  # overrides win over the preset


def test_pad_vocab_size():
    assert pad_vocab_size(50257) == 50304
    assert pad_vocab_size(50304) == 50304
    assert pad_vocab_size(65, 64) == 128
