import math

import pytest
import torch
from conftest import SPEEDRUN_OPTIONS, randomized, small_config

from gpt2lab import GPT, GPTConfig
from gpt2lab.errors import UserError
from gpt2lab.kvcache import KVCache
from gpt2lab.model import IGNORE_INDEX

VARIANTS = {
    "gpt2-style": {},
    "no-bias": dict(bias=False),
    "untied": dict(tie_weights=False),
    "post-ln": dict(norm_position="post"),
    "sinusoidal": dict(pos_embedding="sinusoidal"),
    "ts-6l512-style": dict(pos_embedding="sinusoidal", norm_position="post", n_inner=96, dropout=0.1),
    "rope": dict(pos_embedding="rope"),
    "qk-norm": dict(qk_norm=True),
    "relu2": dict(activation="relu2"),
    "softcap": dict(logit_softcap=5.0),
    # every speedrun option at once (zero_init is left out here: zero projections would hide whether
    # attention and MLP compute anything; randomized() tests give every weight a value anyway)
    "speedrun": SPEEDRUN_OPTIONS,
}


def test_parameter_counts_of_the_published_models():
    assert GPT(GPTConfig.preset("gpt2")).num_params() == 124_439_808
    # The tinytiny seed report counts parameters without position embeddings: 26.40M.
    tinytiny = GPT(GPTConfig.preset("tinytiny"))
    assert f"{tinytiny.num_params(non_embedding=True) / 1e6:.2f}M" == "26.40M"
    assert tinytiny.num_params() - tinytiny.num_params(non_embedding=True) == 256 * 384


def test_counts_match_the_state_dict():
    for overrides in VARIANTS.values():
        model = GPT(small_config(**overrides))
        unique = {t.data_ptr(): t.numel() for t in model.state_dict().values()}  # a tied matrix once
        assert model.num_params() == sum(unique.values())


@pytest.mark.parametrize("preset", ["gpt2", "tinytiny", "char-tiny", "ts-6l512"])
def test_loss_at_init_is_about_ln_vocab(preset):
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset(preset)).eval()
    V, T = model.config.vocab_size, min(64, model.config.block_size)
    idx, targets = torch.randint(0, V, (2, 8, T)).unbind(0)
    with torch.no_grad():
        loss = model(idx, targets).item()
    # Logits start near zero (std sqrt(n_embd) * 0.02 ~ 0.5), so every token is about equally likely.
    assert abs(loss - math.log(V)) < 0.2, (loss, math.log(V))


def test_initialisation_follows_gpt2():
    cfg = GPTConfig.preset("gpt2", n_layer=6)
    torch.manual_seed(0)
    model = GPT(cfg)
    block = model.transformer.h[0]
    assert model.transformer.wte.weight.std().item() == pytest.approx(0.02, rel=0.02)
    assert block.attn.c_attn.weight.std().item() == pytest.approx(0.02, rel=0.02)
    residual_std = 0.02 / math.sqrt(2 * cfg.n_layer)
    assert block.attn.c_proj.weight.std().item() == pytest.approx(residual_std, rel=0.02)
    assert block.mlp.c_proj.weight.std().item() == pytest.approx(residual_std, rel=0.02)
    assert torch.all(block.attn.c_attn.bias == 0) and torch.all(block.ln_1.weight == 1)


def test_weight_tying_shares_storage():
    model = GPT(small_config())
    assert model.lm_head.weight is model.transformer.wte.weight
    with torch.no_grad():
        model.transformer.wte.weight[3, 5] = 7.0
    assert model.lm_head.weight[3, 5].item() == 7.0
    untied = GPT(small_config(tie_weights=False))
    assert untied.lm_head.weight.data_ptr() != untied.transformer.wte.weight.data_ptr()
    assert untied.num_params() == model.num_params() + 101 * 64
    # FLOPs count the head's matmul once either way: an untied wte is a lookup, not a matmul
    assert untied.num_params(non_embedding=True) == model.num_params(non_embedding=True)
    assert untied.flops_per_token() == model.flops_per_token()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_sdpa_and_explicit_attention_agree(variant):
    overrides = VARIANTS[variant]
    sdpa = randomized(GPT(small_config(**overrides)))
    explicit = GPT(small_config(**overrides, attn_impl="explicit")).eval()
    explicit.load_state_dict(sdpa.state_dict())
    idx = torch.randint(0, 101, (3, 32))
    with torch.no_grad():
        a, b = sdpa(idx), explicit(idx)
    assert a.shape == (3, 32, 101)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("attn_impl", ["sdpa", "explicit"])
def test_causality(variant, attn_impl):
    model = randomized(GPT(small_config(**VARIANTS[variant], attn_impl=attn_impl)))
    idx = torch.randint(0, 101, (2, 20))
    changed = idx.clone()
    changed[:, 11] = (changed[:, 11] + 1) % 101
    with torch.no_grad():
        a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :11], b[:, :11], atol=0, rtol=0)  # positions <= 10 cannot see token 11
    assert (a[:, 11:] - b[:, 11:]).abs().amax(dim=-1).min() > 0  # every later position does


def test_loss_is_mean_cross_entropy_and_ignores_masked_targets():
    model = randomized(GPT(small_config()))
    idx, targets = torch.randint(0, 101, (2, 2, 16)).unbind(0)
    with torch.no_grad():
        logits = model(idx)
        loss = model(idx, targets)
        logp = torch.log_softmax(logits.double(), dim=-1)
        direct = -logp.gather(-1, targets[..., None]).mean()
        assert loss.item() == pytest.approx(direct.item(), abs=1e-5)
        masked = targets.clone()
        masked[:, :10] = IGNORE_INDEX
        kept = -logp.gather(-1, targets[..., None])[:, 10:].mean()
        assert model(idx, masked).item() == pytest.approx(kept.item(), abs=1e-5)


def test_dropout_is_active_only_in_training():
    model = GPT(small_config(dropout=0.5))
    idx = torch.randint(0, 101, (2, 16))
    model.train()
    assert not torch.equal(model(idx), model(idx))
    model.eval()
    assert torch.equal(model(idx), model(idx))


def test_backward_reaches_every_parameter():
    for overrides in VARIANTS.values():
        model = GPT(small_config(**overrides))
        idx, targets = torch.randint(0, 101, (2, 2, 16)).unbind(0)
        model(idx, targets).backward()
        for name, p in model.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_sequence_longer_than_context_is_a_clear_error():
    model = GPT(small_config())
    with pytest.raises(UserError, match="sequence length 33 exceeds the model's context block_size 32"):
        model(torch.zeros(1, 33, dtype=torch.long))


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("attn_impl", ["sdpa", "explicit"])
def test_kv_cache_forward_equals_full_forward(variant, attn_impl):
    model = randomized(GPT(small_config(**VARIANTS[variant], attn_impl=attn_impl)))
    idx = torch.randint(0, 101, (2, 24))
    cache = KVCache(model.config, batch_size=2)
    with torch.no_grad():
        full = model(idx)
        pieces = [model(idx[:, :10], kv_cache=cache), model(idx[:, 10:15], kv_cache=cache)]
        pieces += [model(idx[:, t : t + 1], kv_cache=cache) for t in range(15, 24)]  # one token at a time
    assert cache.host_lengths == [24, 24]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)
    with pytest.raises(UserError, match="KV cache is full: 33 positions needed, max_len is 32"):
        model(torch.zeros(2, 9, dtype=torch.long), kv_cache=cache)


@pytest.mark.parametrize("variant", ["gpt2-style", "rope", "speedrun"])
def test_ragged_batch_through_the_cache_equals_each_row_alone(variant):
    """Prompts of different lengths in one prefill (right-padded, each row at its own positions), then
    decode steps: every row's logits equal the plain forward of its own sequence (RoPE included)."""
    model = randomized(GPT(small_config(**VARIANTS[variant])))
    prompts = [torch.randint(0, 101, (n,)) for n in (7, 12, 3)]
    width = max(len(p) for p in prompts)
    batch = torch.stack([torch.cat([p, torch.zeros(width - len(p), dtype=torch.long)]) for p in prompts])
    nxt = torch.randint(0, 101, (3, 4))
    cache = KVCache(model.config, batch_size=3)
    with torch.no_grad():
        cache.select(slice(0, 3), n_new=[len(p) for p in prompts])
        prefill = model(batch, kv_cache=cache)
        steps = []
        for t in range(4):
            cache.select(slice(0, 3))
            steps.append(model(nxt[:, t : t + 1], kv_cache=cache))
        for b, p in enumerate(prompts):
            alone = model(torch.cat([p, nxt[b]])[None])[0]  # (len + 4, V)
            torch.testing.assert_close(prefill[b, : len(p)], alone[: len(p)], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(
                torch.cat([s[b] for s in steps]), alone[len(p) :], atol=1e-5, rtol=1e-5
            )
    assert cache.host_lengths == [11, 16, 7]


def test_static_cache_mode_equals_the_dynamic_one():
    """The CUDA-graph variant (attention over all max_len slots with a mask, positions from device
    tensors) gives the same logits as the ordinary cache, on CPU, for rows of different lengths."""
    model = randomized(GPT(small_config()))
    prompts = [torch.randint(0, 101, (n,)).tolist() for n in (5, 9)]
    caches = [KVCache(model.config, batch_size=2), KVCache(model.config, batch_size=2)]
    nxt = torch.randint(0, 101, (2, 6))
    with torch.no_grad():
        outs = []
        for static, cache in zip((False, True), caches, strict=True):
            batch = torch.tensor([prompts[0] + [0] * 4, prompts[1]])
            cache.select(slice(0, 2), n_new=[5, 9])
            model(batch, kv_cache=cache)
            got = []
            for t in range(6):
                cache.select(slice(0, 2), static=static)
                got.append(model(nxt[:, t : t + 1], kv_cache=cache))
            outs.append(torch.cat(got, dim=1))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    assert caches[1].lengths.tolist() == [11, 15]


def test_flops_and_mfu():
    model = GPT(GPTConfig.preset("gpt2"))
    N = model.num_params(non_embedding=True)
    assert model.flops_per_token(1024) == 6 * N + 12 * 12 * 12 * 64 * 1024
    assert model.flops_per_token(1024, training=False) == pytest.approx(model.flops_per_token(1024) / 3)
    # 400K tokens/s of GPT-2 124M at T=1024 on a 989 TFLOP/s GPU is about 35% MFU.
    assert model.mfu(400e3, 989e12, seq_len=1024) == pytest.approx(400e3 * 8.5518e8 / 989e12, rel=1e-3)


# --- the speedrun options -------------------------------------------------------------------------


def test_rope_attention_scores_depend_only_on_the_distance():
    """RoPE rotates a query at m and a key at n so that their dot product sees only n - m."""
    from gpt2lab.model import apply_rotary, sinusoidal_positions

    table = sinusoidal_positions(64, 16)  # (T, hs)
    q, k = torch.randn(2, 1, 1, 1, 16).unbind(0)  # one head, one token each: (1, 1, 1, hs)

    def score(m: int, n: int) -> float:
        return (apply_rotary(q, table[m : m + 1]) * apply_rotary(k, table[n : n + 1])).sum().item()

    for m, n in ((3, 1), (10, 4), (40, 40)):
        assert score(m, n) == pytest.approx(score(m + 17, n + 17), abs=1e-5)
    assert score(5, 1) != pytest.approx(score(5, 2), abs=1e-3)  # the distance itself does count
    assert torch.allclose(apply_rotary(q, table[:1]), q)  # position 0 is no rotation
    rotated = apply_rotary(q, table[7:8])
    assert rotated.norm().item() == pytest.approx(q.norm().item(), rel=1e-6)  # a rotation keeps lengths


def test_rope_model_has_no_position_parameters_and_sees_order():
    model = randomized(GPT(small_config(pos_embedding="rope")))
    assert "transformer.wpe.weight" not in model.state_dict() and "rope" not in str(model.state_dict().keys())
    idx = torch.randint(0, 101, (1, 16))
    with torch.no_grad():
        a, b = model(idx), model(idx.flip(1))
    assert not torch.allclose(a[:, -1], b[:, -1], atol=1e-4)  # positions matter without a wpe table


def test_qk_norm_makes_attention_blind_to_the_scale_of_queries_and_keys():
    model = randomized(GPT(small_config(qk_norm=True, bias=False)))
    idx = torch.randint(0, 101, (2, 16))
    with torch.no_grad():
        before = model(idx)
        C = model.config.n_embd
        for block in model.transformer.h:
            block.attn.c_attn.weight[: 2 * C] *= 7.0  # the query and key rows
        torch.testing.assert_close(model(idx), before, atol=1e-5, rtol=1e-5)
        plain = randomized(GPT(small_config(bias=False)))
        out = plain(idx)
        for block in plain.transformer.h:
            block.attn.c_attn.weight[: 2 * C] *= 7.0
        assert not torch.allclose(plain(idx), out, atol=1e-3)  # without QK-norm the scale counts


def test_relu2_activation_and_logit_softcap():
    from gpt2lab.model import MLP

    mlp = MLP(small_config(activation="relu2"))
    x = torch.randn(2, 3, 64)
    with torch.no_grad():
        expected = mlp.c_proj(torch.relu(mlp.c_fc(x)) ** 2)
        torch.testing.assert_close(mlp(x), expected)
    model = randomized(GPT(small_config(logit_softcap=2.0)))
    with torch.no_grad():
        model.lm_head.weight.mul_(100.0)  # raw logits far beyond the cap
        logits = model(torch.randint(0, 101, (2, 8)))
    assert logits.abs().max().item() <= 2.0 and logits.abs().max().item() > 1.9


def test_zero_init_starts_every_block_as_the_identity():
    torch.manual_seed(0)
    model = GPT(small_config(zero_init=True, tie_weights=False))
    for block in model.transformer.h:
        assert torch.all(block.attn.c_proj.weight == 0) and torch.all(block.mlp.c_proj.weight == 0)
    assert torch.all(model.lm_head.weight == 0) and model.transformer.wte.weight.std() > 0.01
    idx, targets = torch.randint(0, 101, (2, 2, 16)).unbind(0)
    loss = model(idx, targets)
    assert loss.item() == pytest.approx(math.log(101), abs=1e-6)  # uniform predictions
    loss.backward()
    assert model.lm_head.weight.grad.abs().sum() > 0  # and the head learns first
    tied = GPT(small_config(zero_init=True))  # a tied head is wte: it keeps its N(0, 0.02) start
    assert tied.lm_head.weight.std() > 0.01
    assert torch.all(tied.transformer.h[0].mlp.c_proj.weight == 0)
