"""Generation: cached == uncached logits (also past the context), == transformers greedy, batched ==
one at a time, sampling matches its distribution, text streaming is whole UTF-8, bad input is clear."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from gpt2lab import GPT, GPTConfig
from gpt2lab.errors import UserError
from gpt2lab.generate import (
    KVCache,
    Sampling,
    TextDecoder,
    apply_penalties,
    generate,
    sample_next,
    steps,
    stream,
    stream_text,
)
from gpt2lab.interop import save_pretrained

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
ATOL = 1e-5


def small_model(seed: int = 0, **overrides) -> GPT:
    """A small GPT-2 with every parameter random (biases and LayerNorms too), in eval mode."""
    fields = dict(n_layer=2, n_head=4, n_embd=64, block_size=32, vocab_size=101)
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**{**fields, **overrides}))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            # weights of 0.1 (not 0.02) keep logits spread out, so greedy choices are not near-ties
            p.copy_(1.0 + 0.1 * noise if ".ln_" in name and name.endswith("weight") else 0.1 * noise)
    return model.eval()


def windowed_reference(model: GPT, prompt: list[int], new_tokens: list[int], keep: int) -> list[torch.Tensor]:
    """Uncached next-token logits before each new token, on the window the documented policy gives.

    Policy: a prompt longer than the context keeps its last block_size tokens; when the sequence
    would exceed the context, the window restarts at its last `keep` tokens.
    """
    block = model.config.block_size
    device = next(model.parameters()).device
    seq = list(prompt)
    start = max(0, len(seq) - block)
    out = []
    with torch.no_grad():
        for t in new_tokens:
            if len(seq) - start > block:
                start = len(seq) - keep
            out.append(model(torch.tensor([seq[start:]], device=device))[0, -1])
            seq.append(t)
    return out


# --- cached == uncached ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides,keep",
    [
        ({}, None),  # window restarts at block_size // 2
        ({}, 1),
        ({}, 32),  # degenerate: every step past the context re-prefills the whole window
        ({"attn_impl": "explicit", "bias": False, "tie_weights": False}, 5),
        ({"pos_embedding": "sinusoidal", "norm_position": "post"}, None),
        ({"pos_embedding": "rope", "qk_norm": True, "activation": "relu2", "logit_softcap": 10.0}, None),
        ({"pos_embedding": "rope", "attn_impl": "explicit"}, 5),
    ],
)
def test_cached_logits_equal_uncached_every_step_across_the_window(overrides, keep):
    model = small_model(**overrides)
    prompt = [5, 17, 3, 99, 42]
    got = list(steps(model, [prompt], 80, seed=0, window_keep=keep, eot_id=None))
    assert len(got) == 80  # 5 + 80 tokens: the 32-token window slides several times
    new = [int(s.tokens[0]) for s in got]
    ref = windowed_reference(model, prompt, new, 16 if keep is None else keep)
    for i, (s, r) in enumerate(zip(got, ref, strict=True)):
        torch.testing.assert_close(s.logits[0], r, atol=ATOL, rtol=0, msg=f"step {i}")


def test_prompt_longer_than_context_keeps_its_last_block_size_tokens():
    model = small_model()
    prompt = [(7 * i) % 101 for i in range(45)]
    with pytest.warns(UserWarning, match="prompt of 45 tokens exceeds the context block_size 32"):
        got = list(steps(model, [prompt], 20, seed=1, eot_id=None))
    new = [int(s.tokens[0]) for s in got]
    for s, r in zip(got, windowed_reference(model, prompt, new, 16), strict=True):
        torch.testing.assert_close(s.logits[0], r, atol=ATOL, rtol=0)
    assert generate(model, prompt[-32:], 20, seed=1, eot_id=None) == new


def test_kv_cache_is_written_in_place_and_refuses_to_overflow():
    model = small_model()
    cache = KVCache(model.config, 2, max_len=10)
    ptr_k, ptr_v = cache.k.data_ptr(), cache.v.data_ptr()
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3], [4, 5, 6]]), kv_cache=cache)
        for _ in range(7):
            model(torch.tensor([[7], [8]]), kv_cache=cache)
        assert cache.pos == 10
        assert (cache.k.data_ptr(), cache.v.data_ptr()) == (ptr_k, ptr_v)
        with pytest.raises(UserError, match="KV cache is full: 11 positions needed, max_len is 10"):
            model(torch.tensor([[7], [8]]), kv_cache=cache)


# --- transformers reference -------------------------------------------------------------------------


@pytest.mark.parametrize("prompts", [[[11, 2, 7, 64, 23]], [[11, 2, 7, 64, 23], [9], [40, 41, 42]]])
def test_greedy_is_token_identical_to_transformers(tmp_path, prompts):
    transformers = pytest.importorskip("transformers")
    model = small_model(block_size=64)
    save_pretrained(model, tmp_path)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    n = 40
    ours = generate(model, prompts, n, temperature=0, eot_id=None)
    P = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (P - len(p)) + p for p in prompts])
    attention = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = hf.generate(
            ids,
            attention_mask=attention,
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
        )
    assert out[:, P:].tolist() == ours
    assert len(set(ours[0])) > 5  # a real sequence, not one token repeated


# --- batches, samples, streams ------------------------------------------------------------------------


def test_batched_prompts_equal_one_at_a_time():
    model = small_model()
    prompts = [[3, 1, 4, 1, 5, 9, 2], [6], [5, 3, 5]]
    batched = list(steps(model, prompts, 15, temperature=0, eot_id=None))
    for row, prompt in enumerate(prompts):
        single = list(steps(model, [prompt], 15, temperature=0, eot_id=None))
        assert [int(s.tokens[row]) for s in batched] == [int(s.tokens[0]) for s in single]
        for b, s in zip(batched, single, strict=True):
            torch.testing.assert_close(b.logits[row], s.logits[0], atol=ATOL, rtol=0)


def test_batched_rows_are_exact_across_the_window_slide():
    """Each row of a batch slides its own window when its own cache row is full: its logits are those
    of the uncached model on its own window, exactly as for its prompt alone (rows fill at different
    steps, since their prompts differ in length)."""
    model = small_model()
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6, 5], [6], [5, 3, 5]]
    got = list(steps(model, prompts, 50, seed=3, eot_id=None))
    for row, prompt in enumerate(prompts):
        new = [int(s.tokens[row]) for s in got]
        ref = windowed_reference(model, prompt, new, 16)
        for i, (s, r) in enumerate(zip(got, ref, strict=True)):
            torch.testing.assert_close(s.logits[row], r, atol=ATOL, rtol=0, msg=f"row {row} step {i}")
    greedy = generate(model, prompts, 50, temperature=0, eot_id=None)
    assert greedy == [generate(model, p, 50, temperature=0, eot_id=None) for p in prompts]


def test_samples_share_one_prefill_and_differ():
    model = small_model()
    prompts = [[1, 2, 3], [50, 60]]
    got = list(steps(model, prompts, 12, seed=0, num_samples=3, eot_id=None))
    first = list(steps(model, prompts, 1, temperature=0, eot_id=None))[0].logits
    for row in range(6):
        torch.testing.assert_close(got[0].logits[row], first[row // 3], atol=ATOL, rtol=0)
    outs = generate(model, prompts, 12, seed=0, num_samples=3, eot_id=None)
    assert len(outs) == 6 and all(len(o) == 12 for o in outs)
    assert len({tuple(o) for o in outs[:3]}) > 1  # samples of one prompt differ
    greedy = generate(model, [1, 2, 3], 12, temperature=0, num_samples=2, eot_id=None)
    assert greedy == [generate(model, [1, 2, 3], 12, temperature=0, eot_id=None)] * 2


def test_seed_repeats_and_stream_equals_generate():
    model = small_model()
    a = generate(model, [1, 2, 3], 30, seed=7, top_k=20, eot_id=None)
    assert a == generate(model, [1, 2, 3], 30, seed=7, top_k=20, eot_id=None)
    assert a != generate(model, [1, 2, 3], 30, seed=8, top_k=20, eot_id=None)
    assert list(stream(model, [1, 2, 3], 30, seed=7, top_k=20, eot_id=None)) == a
    rows = list(stream(model, [[1, 2, 3], [4]], 5, temperature=0, eot_id=None))
    assert len(rows) == 5 and all(len(r) == 2 and None not in r for r in rows)


def test_generation_stops_after_eot_per_row():
    model = small_model()
    free = generate(model, [[1, 2, 3], [4, 5]], 20, temperature=0, eot_id=None)
    eot = free[0][4]
    assert eot not in free[0][:4]
    out = generate(model, [[1, 2, 3], [4, 5]], 20, temperature=0, eot_id=eot)
    assert out[0] == free[0][:5]  # the EOT itself is the last token, as in transformers
    cut = free[1].index(eot) + 1 if eot in free[1] else 20
    assert out[1] == free[1][:cut]
    rows = list(stream(model, [[1, 2, 3], [4, 5]], 20, temperature=0, eot_id=eot))
    assert [r[0] for r in rows[5:]] == [None] * (len(rows) - 5)


# --- sampling ------------------------------------------------------------------------------------


def test_top_k_never_emits_a_token_outside_the_top_k():
    model = small_model()
    seen = set()
    for s in steps(model, [[1, 2, 3]], 40, seed=0, top_k=3, temperature=2.0, num_samples=8, eot_id=None):
        top = torch.topk(s.logits, 3, dim=-1).indices  # (B, 3)
        assert bool((top == s.tokens[:, None]).any(dim=-1).all())
        seen.update((top == s.tokens[:, None]).float().argmax(-1).tolist())
    assert seen == {0, 1, 2}  # the 2nd and 3rd choices are taken too: this is sampling, not argmax


def nucleus(logits: torch.Tensor, temperature: float, top_p: float) -> set[int]:
    """The smallest set of most likely tokens with probability >= top_p, computed in float64."""
    p = torch.softmax(logits.double() / temperature, -1).numpy()
    order = np.argsort(-p, kind="stable")
    n = int(np.searchsorted(np.cumsum(p[order]), top_p)) + 1
    return set(order[:n].tolist())


def test_top_p_never_emits_a_token_outside_the_nucleus():
    model = small_model()
    sizes = []
    for s in steps(model, [[1, 2, 3]], 40, seed=0, top_p=0.6, temperature=1.5, num_samples=8, eot_id=None):
        for row, t in enumerate(s.tokens.tolist()):
            allowed = nucleus(s.logits[row], 1.5, 0.6)
            assert t in allowed
            sizes.append(len(allowed))
    assert max(sizes) > 1  # the nucleus held several tokens, so the check had something to exclude


def test_top_p_filter_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.05, 0.5, 0.3, 0.15]]))
    kept = lambda p: (sample_filter(logits, p) > float("-inf"))[0].tolist()  # noqa: E731
    assert kept(0.5) == [False, True, False, False]
    assert kept(0.51) == [False, True, True, False]
    assert kept(0.9) == [False, True, True, True]
    assert kept(1.0) == [True, True, True, True]


def sample_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    from gpt2lab.generate import filter_logits

    return filter_logits(logits, None, p)


def chi_square_p(counts: np.ndarray, probs: np.ndarray) -> float:
    from scipy.stats import chisquare

    expected = probs * counts.sum()
    return float(chisquare(counts, expected).pvalue)


def test_sampled_frequencies_match_softmax_of_logits_over_temperature():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, 0.2])
    T, n = 0.7, 40_000
    g = torch.Generator().manual_seed(1234)
    draws = sample_next(logits.expand(n, -1), temperature=T, generator=g)
    counts = np.bincount(draws.numpy(), minlength=8)

    def probs(t):
        return torch.softmax(logits.double() / t, -1).numpy()

    assert chi_square_p(counts, probs(T)) > 1e-3
    # The same test has the power to reject a wrong temperature (or plain softmax(logits)):
    assert chi_square_p(counts, probs(1.0)) < 1e-6
    assert chi_square_p(counts, probs(0.6)) < 1e-6
    # top-k: the k most likely renormalised
    draws = sample_next(logits.expand(n, -1), temperature=T, top_k=3, generator=g)
    counts = np.bincount(draws.numpy(), minlength=8)
    p = probs(T)
    p[np.argsort(-p)[3:]] = 0
    assert set(np.nonzero(counts)[0]) == {0, 1, 6}
    assert chi_square_p(counts[[0, 1, 6]], p[[0, 1, 6]] / p.sum()) > 1e-3


def test_penalties_follow_their_definitions():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    counts = torch.tensor([[1.0, 2.0, 0.0, 3.0]])
    rep = apply_penalties(logits, counts, repetition_penalty=2.0, frequency_penalty=0.0)
    assert rep.tolist() == [[1.0, -4.0, 1.0, 0.25]]
    freq = apply_penalties(logits, counts, repetition_penalty=1.0, frequency_penalty=0.5)
    assert freq.tolist() == [[1.5, -3.0, 1.0, -1.0]]


def test_frequency_penalty_stops_repeats_in_generation():
    model = small_model()
    prompt = [1, 2, 3]
    plain = generate(model, prompt, 30, temperature=0, eot_id=None)
    assert len(set(plain)) < 30  # without a penalty greedy decoding repeats itself
    out = generate(model, prompt, 30, temperature=0, frequency_penalty=1e4, eot_id=None)
    assert len(set(out)) == 30 and not set(out) & set(prompt)


# --- text ------------------------------------------------------------------------------------------

TEXT = "héllo wörld → 世界 🙂!"


def byte_decode(ids: list[int]) -> bytes:
    """A byte-level stand-in tokenizer: id i < 256 is the byte i."""
    return bytes(i for i in ids if i < 256)


def test_text_pieces_are_whole_characters_when_tokens_split_them():
    dec = TextDecoder(byte_decode)
    pieces = [dec.push(b) for b in TEXT.encode()] + [dec.flush()]
    assert "".join(pieces) == TEXT
    assert "\ufffd" not in "".join(pieces)
    assert pieces.count("") >= 10  # continuation bytes were held back, not emitted as garbage
    emoji = "🙂".encode()
    dec = TextDecoder(byte_decode)
    assert [dec.push(b) for b in emoji] == ["", "", "", "🙂"]
    dec = TextDecoder(byte_decode)
    assert dec.push(0xE4) == "" and dec.flush() == "\ufffd"  # an unfinished character at the end


def test_stop_strings_are_found_across_tokens_and_never_shown():
    dec = TextDecoder(byte_decode, stop=["wör", "zzz"])
    out = ""
    for b in TEXT.encode():
        out += dec.push(b)
        if dec.stopped:
            break
    assert out == "héllo " and dec.stopped
    dec = TextDecoder(byte_decode, stop=["ab"])
    assert dec.push(ord("x")) == "x"
    assert dec.push(ord("a")) == ""  # may begin "ab": held back
    assert dec.push(ord("c")) == "ac"


def test_stream_text_and_generate_stop_at_a_stop_string():
    model = small_model(vocab_size=260, n_embd=32)
    prompt = list(b"Once upon")
    ids = generate(model, prompt, 40, temperature=0, eot_id=None)
    full = "".join(stream_text(model, prompt, 40, byte_decode, temperature=0, eot_id=None))
    assert full == byte_decode(ids).decode(errors="replace")
    start = next(i for i in range(8, len(full)) if "\ufffd" not in full[i : i + 2])
    stop = full[start : start + 2]
    cut = full.index(stop)
    got = "".join(stream_text(model, prompt, 40, byte_decode, stop=stop, temperature=0, eot_id=None))
    assert got == full[:cut]
    short = generate(model, prompt, 40, temperature=0, eot_id=None, stop=[stop], decode_bytes=byte_decode)
    assert short == ids[: len(short)] and len(short) < 40
    assert stop in byte_decode(short).decode(errors="replace")
    assert stop not in byte_decode(short[:-1]).decode(errors="replace")


def gpt2_tiktoken():
    """tiktoken's GPT-2 encoding rebuilt from OpenAI's encoder.json + vocab.bpe in ../shared/data."""
    tiktoken = pytest.importorskip("tiktoken")
    folder = SHARED_DATA / "gpt2"
    if not (folder / "encoder.json").is_file():
        pytest.skip(f"GPT-2 vocab not found at {folder}")
    # GPT-2 writes each byte as a printable character: these 188 bytes as themselves, the rest from 256 on.
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    char_to_byte = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            char_to_byte[chr(256 + extra)] = b
            extra += 1
    encoder = json.loads((folder / "encoder.json").read_text())
    ranks = {bytes(char_to_byte[c] for c in tok): i for tok, i in encoder.items() if tok != "<|endoftext|>"}
    pattern = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
    return tiktoken.Encoding(
        "gpt2-test", pat_str=pattern, mergeable_ranks=ranks, special_tokens={"<|endoftext|>": 50256}
    )


def test_text_pieces_with_the_gpt2_tokenizer():
    enc = gpt2_tiktoken()
    text = "Grüße aus Köln — 東京 🙂🎉 naïve café"
    ids = enc.encode(text)
    whole = [i for i in ids if enc.decode_single_token_bytes(i).decode("utf-8", "ignore") == ""]
    assert whole, "expected some token that holds only part of a character"
    dec = TextDecoder(enc.decode_bytes)
    pieces = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == text and "\ufffd" not in "".join(pieces)


# --- bad input ------------------------------------------------------------------------------------


def test_empty_prompt_starts_from_eot():
    model = small_model()
    assert generate(model, [], 10, seed=0, eot_id=100) == generate(model, [100], 10, seed=0, eot_id=100)
    with pytest.raises(UserError, match="empty prompt"):
        generate(model, [], 10, eot_id=None)
    with pytest.raises(UserError, match="empty prompt"):
        generate(model, [], 10)  # GPT-2's EOT 50256 is not in this 101-token vocab


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(temperature=-0.5), "temperature must be >= 0 .* got -0.5"),
        (dict(temperature=float("nan")), "temperature must be >= 0"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\], got 0.0"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\], got 1.5"),
        (dict(top_p=-0.1), r"top_p must be in \(0, 1\], got -0.1"),
        (dict(top_k=0), "top_k must be a positive integer or None, got 0"),
        (dict(repetition_penalty=0.0), "repetition_penalty must be > 0"),
        (dict(num_samples=0), "num_samples must be a positive integer, got 0"),
        (dict(window_keep=33), r"window_keep must be in \[1, block_size 32\], got 33"),
        (dict(stop=["x"]), "stop strings need decode_bytes"),
    ],
)
def test_bad_settings_are_one_clear_error(kwargs, message):
    with pytest.raises(UserError, match=message):
        generate(small_model(), [1, 2], 5, **kwargs)


def test_bad_prompts_and_lengths():
    model = small_model()
    with pytest.raises(UserError, match=r"prompt token id 101 is outside the model's vocab \[0, 101\)"):
        generate(model, [1, 101], 5)
    with pytest.raises(UserError, match="max_new_tokens must be a non-negative integer, got -1"):
        generate(model, [1], -1)
    assert generate(model, [1, 2], 0) == []
    assert generate(model, [[1, 2], [3]], 0) == [[], []]
    assert Sampling(temperature=0).temperature == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a prompt that fits the context gives no warning
        generate(model, list(range(32)), 3, eot_id=None)


def test_model_mode_is_restored():
    model = small_model().train()
    generate(model, [1, 2], 3)
    assert model.training
    with torch.no_grad():
        assert math.isfinite(float(model(torch.tensor([[1, 2]])).sum()))


# --- static-shape decode (the CUDA-graph path) -------------------------------------------------------


@pytest.mark.parametrize("num_samples,overrides", [(1, {}), (2, {}), (2, {"pos_embedding": "rope"})])
def test_static_decode_is_exact_across_the_window_and_with_padding(num_samples, overrides):
    """compile=True decodes through static_decode (fixed shapes, mask over the whole cache): on CPU it
    runs eagerly, so its logits can be checked here against the ordinary cached path."""
    model = small_model(**overrides)
    prompts = [[5, 17, 3, 99, 42], [1, 2]]
    kw = dict(seed=0, eot_id=None, num_samples=num_samples)
    plain = list(steps(model, prompts, 60, **kw))
    static = list(steps(model, prompts, 60, compile=True, **kw))
    for i, (a, b) in enumerate(zip(plain, static, strict=True)):
        assert a.tokens.tolist() == b.tokens.tolist(), f"step {i}"
        torch.testing.assert_close(a.logits, b.logits, atol=ATOL, rtol=0, msg=f"step {i}")


@pytest.mark.gpu
def test_cuda_graph_decode_matches_the_uncached_model():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model = small_model(block_size=64).cuda()
    prompt = [5, 17, 3, 99, 42]
    got = list(steps(model, [prompt], 100, seed=0, eot_id=None, compile=True))
    new = [int(s.tokens[0]) for s in got]
    ref = windowed_reference(model, prompt, new, 32)
    for s, r in zip(got, ref, strict=True):
        torch.testing.assert_close(s.logits[0], r.float(), atol=1e-4, rtol=1e-4)
    # the graph is replayed, not rebuilt: batched rows with padding agree with the eager static path
    prompts = [[5, 17, 3, 99, 42], [1, 2]]
    eager = list(steps(model.cpu(), prompts, 40, temperature=0, eot_id=None, compile=True))
    graph = list(steps(model.cuda(), prompts, 40, temperature=0, eot_id=None, compile=True))
    for a, b in zip(eager, graph, strict=True):
        torch.testing.assert_close(a.logits, b.logits.cpu(), atol=1e-4, rtol=1e-4)


def test_forward_last_only_gives_the_last_position_of_the_full_logits():
    model = small_model()
    idx = torch.tensor([[4, 8, 15, 16, 23, 42], [1, 2, 3, 4, 5, 6]])
    with torch.no_grad():
        full = model(idx)
        last = model(idx, last_only=True)
        cache = KVCache(model.config, 2)
        cache.select(slice(0, 2), n_new=[6, 4])  # row 1: 4 real tokens, then 2 of right padding
        cached = model(idx, kv_cache=cache, last_only=True)
        ref_pad = model(idx[1:, :4])[:, -1]
    assert last.shape == (2, 1, 101)
    torch.testing.assert_close(last, full[:, -1:], atol=ATOL, rtol=0)
    torch.testing.assert_close(cached[0, -1], full[0, -1], atol=ATOL, rtol=0)
    torch.testing.assert_close(cached[1, -1], ref_pad[0], atol=ATOL, rtol=0)  # its own last token
    assert cache.host_lengths == [6, 4] and cache.lengths.tolist() == [6, 4]
    with pytest.raises(UserError, match="last_only"):
        model(idx, targets=idx, last_only=True)


def test_vocab_size_keeps_samples_out_of_padding_rows():
    """A model padded to 128 rows with a 100-token tokenizer never emits ids 100..127."""
    from conftest import randomized, small_config

    from gpt2lab import GPT

    model = randomized(GPT(small_config(vocab_size=128)))
    with torch.no_grad():
        model.lm_head.weight[100:] += 5.0  # make the padding rows the most likely ones
    free = generate(model, [1, 2, 3], 40, temperature=1.0, seed=0, eot_id=None)
    limited = generate(model, [1, 2, 3], 40, temperature=1.0, seed=0, eot_id=None, vocab_size=100)
    assert max(free) >= 100  # without the limit the padding rows are sampled...
    assert max(limited) < 100  # ...with it, never


SPEEDRUN_OPTIONS = dict(
    pos_embedding="rope", qk_norm=True, activation="relu2", tie_weights=False, logit_softcap=15.0
)


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [{}, SPEEDRUN_OPTIONS], ids=["gpt2", "speedrun"])
def test_the_static_decode_step_compiles_with_fullgraph(overrides):
    """The CUDA-graph decode step (the cache's static mode) traces as one graph with no breaks, and the
    compiled step equals the ordinary cached step (aot_eager: dynamo + functionalization, no codegen,
    so this takes seconds on a CPU; a graph break or a Python value read per step would fail here)."""
    model = small_model(**overrides)
    caches = [KVCache(model.config, 2), KVCache(model.config, 2)]
    with torch.no_grad():
        for c in caches:
            c.select(slice(0, 2), n_new=[5, 3])
            model(torch.tensor([[1, 2, 3, 4, 5], [6, 7, 8, 0, 0]]), kv_cache=c)

        def step(idx):
            caches[0].select(slice(0, 2), static=True)
            return model(idx, kv_cache=caches[0])[:, -1]

        compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
        for i in range(3):
            idx = torch.tensor([[10 + i], [20 + i]])
            caches[1].select(slice(0, 2))
            torch.testing.assert_close(
                compiled(idx), model(idx, kv_cache=caches[1])[:, -1], atol=ATOL, rtol=0
            )
    assert caches[0].lengths.tolist() == caches[1].lengths.tolist() == [8, 6]


class WindowOnly(torch.nn.Module):
    """A model with forward(idx, targets) over its context and no KV cache (as the ladder's are)."""

    def __init__(self, inner: GPT):
        super().__init__()
        self.inner, self.config = inner, inner.config

    def forward(self, idx, targets=None):
        return self.inner(idx, targets)


def test_a_model_without_a_kv_cache_generates_on_its_last_block_size_tokens():
    model = small_model()
    plain = WindowOnly(model).eval()
    prompt = [5, 17, 3, 99, 42]
    got = list(steps(plain, [prompt, [1, 2]], 60, seed=0, eot_id=None, num_samples=2))
    for row, p in ((0, prompt), (2, [1, 2])):
        new = [int(s.tokens[row]) for s in got]
        ref = windowed_reference(model, p, new, keep=32)  # the window slides by one token per step
        for i, (s, r) in enumerate(zip(got, ref, strict=True)):
            torch.testing.assert_close(s.logits[row], r, atol=ATOL, rtol=0, msg=f"row {row} step {i}")


@pytest.mark.parametrize(
    "kwargs", [dict(temperature=1e-39), dict(top_p=1e-320), dict(temperature=1e-30, top_k=5)]
)
def test_a_temperature_or_top_p_too_small_to_sample_from_is_greedy(kwargs):
    model = small_model()
    greedy = generate(model, [1, 2, 3], 25, temperature=0, eot_id=None)
    assert generate(model, [1, 2, 3], 25, seed=0, eot_id=None, **kwargs) == greedy
    logits = torch.tensor([[1.0, 3.0, float("-inf"), 2.0]])
    assert sample_next(logits, temperature=1e-39).tolist() == [1]
    assert sample_next(logits, temperature=1.0, top_p=1e-320).tolist() == [1]


def test_presence_penalty_logit_bias_and_min_tokens():
    model = small_model()
    plain = generate(model, [1, 2, 3], 20, temperature=0, eot_id=None)
    assert generate(model, [1, 2, 3], 20, temperature=0, eot_id=None, logit_bias={7: 100.0}) == [7] * 20
    spread = generate(model, [1, 2, 3], 20, temperature=0, eot_id=None, presence_penalty=1e4)
    assert len(set(spread)) == 20 and len(set(plain)) < 20
    ends = generate(model, [1, 2, 3], 20, temperature=0, eot_id=plain[0])
    assert ends == [plain[0]]
    late = generate(model, [1, 2, 3], 20, temperature=0, eot_id=plain[0], min_tokens=4)
    assert plain[0] not in late[:4] and len(late) >= 5


def test_int8_weights_stay_close_to_fp32_and_generate():
    from gpt2lab.decoder import quantize_int8

    model = small_model(n_embd=128, n_head=4)
    idx = torch.tensor([[5, 17, 3, 99, 42, 8, 8, 1]])
    with torch.no_grad():
        ref = torch.log_softmax(model(idx), -1)
        q = quantize_int8(small_model(n_embd=128, n_head=4))
        got = torch.log_softmax(q(idx), -1)
    assert type(q.lm_head).__name__ == "Linear" and "quantized" in type(q.lm_head).__module__
    kl = torch.nn.functional.kl_div(got, ref, log_target=True, reduction="none").sum(-1)  # KL(fp32 || int8)
    assert 0 < kl.max().item() < 0.02, kl  # close, and not the same computation
    assert (got.argmax(-1) == ref.argmax(-1)).all()
    assert len(generate(q, [1, 2, 3], 10, temperature=0, eot_id=None)) == 10
