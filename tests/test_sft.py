"""Fine-tuning data: the chat template, loss masking, added tokens, the padded loader, bad records."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import randomized, small_config

from gpt2lab import GPT
from gpt2lab.errors import UserError
from gpt2lab.model import IGNORE_INDEX
from gpt2lab.sft import (
    END,
    TEMPLATE_TOKENS,
    SFTLoader,
    add_template_tokens,
    chat_stop_ids,
    collate,
    load_examples,
    render_chat,
    render_example,
)
from gpt2lab.tokenizer import CharTokenizer, get_tokenizer

CHARS = "abcdefgh =>?"


def char_tok() -> CharTokenizer:
    return CharTokenizer(CHARS)


def test_template_tokens_take_padding_rows_or_grow_the_vocabulary(shared_data):
    gpt2 = get_tokenizer("gpt2", vocab_dir=shared_data / "gpt2")
    padded = GPT(small_config(vocab_size=50304, n_embd=32, n_head=2))
    wte = padded.transformer.wte.weight.detach().clone()
    tok, added = add_template_tokens(padded, gpt2)
    assert added == {t: 50257 + k for k, t in enumerate(TEMPLATE_TOKENS)}
    assert padded.config.vocab_size == 50304 and padded.lm_head.weight is padded.transformer.wte.weight
    assert torch.equal(padded.transformer.wte.weight[:50257], wte[:50257])  # real tokens untouched
    assert torch.allclose(padded.transformer.wte.weight[50257], wte[:50257].mean(0))

    exact = GPT(small_config(vocab_size=50257, n_embd=32, n_head=2))  # OpenAI's GPT-2: no spare rows
    tok2, _ = add_template_tokens(exact, gpt2, pad_multiple=64)
    assert exact.config.vocab_size == 50304 == exact.transformer.wte.weight.shape[0]
    assert exact.lm_head.weight is exact.transformer.wte.weight  # still tied
    assert exact(torch.tensor([[50260, 1]])).shape == (1, 2, 50304)
    # The tokenizer knows them, and its spec (what a checkpoint stores) restores them.
    again = get_tokenizer(tok2.to_spec(), vocab_dir=shared_data / "gpt2")
    ids = render_chat(again, [{"role": "user", "content": "Hi <|user|>"}])
    assert ids[:2] == [50256, 50258] and ids[-2:] == [50260, 50259]  # EOT <|user|> ... <|end|> <|assistant|>
    assert 50258 not in ids[2:-2]  # text that spells a template token stays text
    assert again.decode(ids) == "<|endoftext|><|user|>Hi <|user|><|end|><|assistant|>"
    assert chat_stop_ids(again) == [50260, 50256]
    assert add_template_tokens(exact, again)[1] == {}  # a second fine-tune adds nothing


def test_chat_loss_mask_counts_only_assistant_content_and_end():
    tok, _ = add_template_tokens(GPT(small_config(vocab_size=20)), char_tok())
    ids, mask = render_example(
        tok,
        {
            "messages": [
                {"role": "system", "content": "ab"},
                {"role": "user", "content": "cd"},
                {"role": "assistant", "content": "dc"},
                {"role": "user", "content": "e"},
                {"role": "assistant", "content": "f"},
            ]
        },
        "x",
    )
    text = [tok.decode([i]) for i in ids]
    counted = "".join(t for t, m in zip(text, mask, strict=True) if m)
    assert counted == "dc<|end|>f<|end|>"
    ids, mask = render_example(tok, {"prompt": "ab=", "completion": "ba"}, "x")
    assert [tok.decode([i]) for i, m in zip(ids, mask, strict=True) if m] == ["b", "a", "<|endoftext|>"]


def test_prompt_targets_do_not_change_the_loss_response_targets_do():
    tok, _ = add_template_tokens(model := randomized(GPT(small_config(vocab_size=20))), char_tok())
    examples = [
        render_example(tok, {"prompt": "abc=", "completion": "cba"}, "1"),
        render_example(
            tok,
            {"messages": [{"role": "user", "content": "hg"}, {"role": "assistant", "content": "gh"}]},
            "2",
        ),
    ]
    x, y = collate(examples, pad_id=tok.eot_id)
    assert (y == IGNORE_INDEX).any() and (y != IGNORE_INDEX).any()
    with torch.no_grad():
        loss = model(x, y)
        # Whatever the prompt positions' and the padding's targets would be, they are ignored: only the
        # response counts. Build targets that differ everywhere the mask is off.
        other = torch.where(y == IGNORE_INDEX, torch.randint(0, 16, y.shape), y)
        masked_other = torch.where(y == IGNORE_INDEX, IGNORE_INDEX, other)
        assert torch.equal(model(x, masked_other), loss)
        # Changing a prompt token's would-be target changes nothing; changing a response target does.
        changed = y.clone()
        changed[y != IGNORE_INDEX] = (changed[y != IGNORE_INDEX] + 1) % 16
        assert not torch.allclose(model(x, changed), loss)
        # The loss is the mean over response tokens only.
        logits = model(x)
        keep = y != IGNORE_INDEX
        manual = torch.nn.functional.cross_entropy(logits[keep], y[keep])
        assert torch.allclose(manual, loss)
        # Padding never reaches the real tokens (right padding under causal attention).
        alone = model(x[1:, : len(examples[1][0]) - 1])
        assert torch.allclose(alone[0], logits[1, : len(examples[1][0]) - 1], atol=1e-5)


def test_loader_resumes_exactly_and_streams_do_not_depend_on_the_split():
    tok, _ = add_template_tokens(GPT(small_config(vocab_size=20)), char_tok())
    examples = [
        render_example(tok, {"prompt": "ab" * (i % 5 + 1), "completion": "c"}, str(i)) for i in range(23)
    ]
    a = SFTLoader(examples, 4, tok.eot_id, seed=1)
    batches = [a.next_batch() for _ in range(10)]
    b = SFTLoader(examples, 4, tok.eot_id, seed=1)
    [b.next_batch() for _ in range(6)]
    c = SFTLoader(examples, 4, tok.eot_id, seed=1)
    c.load_state_dict(b.state_dict())
    for x, y in batches[6:]:
        x2, y2 = c.next_batch()
        assert torch.equal(x, x2) and torch.equal(y, y2)
    # two ranks with one micro-batch each read what one process with 2 accumulation steps reads
    one = SFTLoader(examples, 4, tok.eot_id, seed=1, grad_accum=2)
    r0 = SFTLoader(examples, 4, tok.eot_id, rank=0, world_size=2, seed=1)
    r1 = SFTLoader(examples, 4, tok.eot_id, rank=1, world_size=2, seed=1)
    assert one.indices(3, 0) == r0.indices(3) and one.indices(3, 1) == r1.indices(3)
    with pytest.raises(UserError, match="loader state has batch_size 4, this loader has 8"):
        SFTLoader(examples, 8, tok.eot_id, seed=1).load_state_dict(b.state_dict())


def _write(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def test_bad_records_name_the_file_line_and_field(tmp_path):
    tok, _ = add_template_tokens(GPT(small_config(vocab_size=20)), char_tok())
    good = {"prompt": "ab", "completion": "ba"}
    cases = [
        ([good, {"prompt": "ab"}], r"bad.jsonl:2: missing field 'completion'"),
        ([good, "", {"completion": "x"}], r"bad.jsonl:3: missing field 'prompt'"),
        ([good, "{not json"], r"bad.jsonl:2: not valid JSON"),
        ([{"messages": [{"role": "user"}]}], r"bad.jsonl:1: message 1 has no 'content' field"),
        ([{"messages": [{"role": "robot", "content": "a"}]}], r"bad.jsonl:1: message 1 has role 'robot'"),
        ([{"messages": [{"role": "user", "content": "a"}]}], r"bad.jsonl:1: no assistant message"),
        ([good, {"prompt": "xyz", "completion": "a"}], r"bad.jsonl:2: character 'x'"),
        ([[1, 2]], r"bad.jsonl:1: expected a JSON object, got list"),
    ]
    for lines, message in cases:
        with pytest.raises(UserError, match=message):
            load_examples(_write(tmp_path / "bad.jsonl", lines), tok, 32)
    with pytest.raises(UserError, match="no records"):
        load_examples(_write(tmp_path / "empty.jsonl", ["", "  "]), tok, 32)
    with pytest.raises(UserError, match="does not exist"):
        load_examples(tmp_path / "missing.jsonl", tok, 32)


def test_long_examples_are_cut_with_a_count_and_empty_ones_dropped(tmp_path, capsys):
    tok, _ = add_template_tokens(GPT(small_config(vocab_size=20)), char_tok())
    path = _write(
        tmp_path / "d.jsonl",
        [
            {"prompt": "ab", "completion": "ba"},
            {"prompt": "a", "completion": "b" * 40},  # cut, keeps part of its response
            {"prompt": "a" * 40, "completion": "b"},  # the response is past the context: dropped
        ],
    )
    examples = load_examples(path, tok, 16)
    assert len(examples) == 2 and max(len(ids) for ids, _ in examples) == 16
    assert "2 of 3 examples are longer than the context (16 tokens) and were cut; 1 had no response left" in (
        capsys.readouterr().err
    )


def test_template_token_missing_from_the_vocabulary():
    with pytest.raises(UserError, match=rf"tokenizer 'char' has no {END.replace('|', '[|]')} token"):
        chat_stop_ids(char_tok())
    with pytest.raises(
        UserError, match="has no <[|]end[|]> token: the model was not fine-tuned with the chat"
    ):
        render_chat(char_tok(), [{"role": "user", "content": "ab"}])
    # a tokenizer whose template ids do not fit the model
    tok, _ = add_template_tokens(GPT(small_config(vocab_size=20)), char_tok())
    with pytest.raises(
        UserError, match=r"template token <\|system\|> has id 13, outside the model's vocabulary of 13"
    ):
        add_template_tokens(GPT(small_config(vocab_size=13)), tok)


def test_chat_drops_the_oldest_turns_to_fit_the_context_keeping_the_system_message():
    from gpt2lab.chat import fit_context

    tok, _ = add_template_tokens(GPT(small_config(vocab_size=20)), char_tok())
    turns = [{"role": "system", "content": "hh"}]
    for _ in range(5):
        turns += [{"role": "user", "content": "abcd"}, {"role": "assistant", "content": "dcba"}]
    turns.append({"role": "user", "content": "efg"})
    kept, ids = fit_context(tok, turns, budget=24)
    assert len(ids) <= 24 and ids == render_chat(tok, kept)
    assert kept[0] == turns[0] and kept[-1] == turns[-1] and kept == [turns[0], *turns[-len(kept) + 1 :]]
    assert len(kept) < len(turns)
    kept, ids = fit_context(tok, turns, budget=1000)
    assert kept == turns
