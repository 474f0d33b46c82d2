"""Fine-tuning end to end: a small pretrained base learns an instruction task with LoRA and fully.

The task, generated here: reverse a word of 3-5 letters from "abcdef". The base is pretrained (by
`gpt2lab finetune` from a random checkpoint) on reversal in a raw format, "abc>" -> "cba", with words
of 3-7 letters. Fine-tuning then teaches formats the base never saw, so it scores ~0 on them before:
- LoRA: the chat template, user "abc" -> assistant "cba" (new tokens, new positions);
- full: "abc=" -> "abc", a different task (copying) under a new separator.
Exact match is measured by greedy generation on 100 words that no fine-tuning example contains
(of the 216 + 1296 + 7776 possible).
"""

from __future__ import annotations

import io
import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from gpt2lab import GPT, GPTConfig, sft
from gpt2lab.chat import run as chat
from gpt2lab.checkpoint import load_model, read_config, resolve, save_checkpoint
from gpt2lab.cli import main
from gpt2lab.config import ChatConfig
from gpt2lab.generate import generate
from gpt2lab.interop.peft import WEIGHTS as ADAPTER_WEIGHTS
from gpt2lab.interop.peft import attach_adapter
from gpt2lab.tokenizer import CharTokenizer, get_tokenizer

LETTERS = "abcdef"
COMMON = ["--batch-size", "32", "--log-interval", "100", "--seed", "0", "--checkpoint-interval", "1000"]


def word(rng: random.Random, longest: int = 5) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, longest)))


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def chat_record(w: str) -> dict:
    return {"messages": [{"role": "user", "content": w}, {"role": "assistant", "content": w[::-1]}]}


def held_out(seen: set[str], n: int = 100) -> list[str]:
    """n distinct words of 3-5 letters that are not in `seen` (the fine-tuning words)."""
    rng, words = random.Random(12345), []
    while len(words) < n:
        w = word(rng)
        if w not in seen and w not in words:
            words.append(w)
    return words


def exact_match(model: GPT, tok, fmt: str, words: list[str]) -> float:
    """The fraction of words whose greedy answer is exactly right."""
    right = 0
    for w in words:
        if fmt == "chat":
            prompt, stop, answer = (
                sft.render_chat(tok, [{"role": "user", "content": w}]),
                sft.chat_stop_ids(tok)[0],
                w[::-1],
            )
        else:
            prompt, stop, answer = sft.render_prompt(tok, w + "="), tok.eot_id, w
        out = generate(model, prompt, 8, temperature=0, eot_id=stop, vocab_size=tok.vocab_size)
        right += tok.decode([t for t in out if t != stop]) == answer
    return right / len(words)


def model_and_tok(ckpt: Path):
    return load_model(resolve(ckpt)), get_tokenizer(read_config(resolve(ckpt))["tokenizer"])


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A 2-layer, 64-wide char model pretrained on "word>drow" (~300 steps, ~10 s on an idle 2-core CPU)."""
    root = tmp_path_factory.mktemp("ft")
    tok = CharTokenizer(sorted(LETTERS + ">="))
    torch.manual_seed(0)
    init = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=24, vocab_size=tok.vocab_size))
    save_checkpoint(root / "init", init, {"tokenizer": tok.to_spec()})
    rng = random.Random(0)
    data = write_jsonl(
        root / "pre.jsonl",
        [{"prompt": (w := word(rng, 7)) + ">", "completion": w[::-1]} for _ in range(4000)],
    )
    args = ["finetune", "--from", str(root / "init"), "--data", str(data), "--out-dir", str(root / "base")]
    assert main([*args, "--max-steps", "300", "--learning-rate", "3e-3", "--val-fraction", "0", *COMMON]) == 0
    return root / "base"


@pytest.mark.slow
def test_lora_learns_the_chat_format_and_chat_uses_it(base, tmp_path, capsys):
    rng = random.Random(1)
    words = [word(rng) for _ in range(2000)]
    data = write_jsonl(tmp_path / "chat.jsonl", [chat_record(w) for w in words])
    test_words = held_out(set(words))
    before = exact_match(*model_and_tok(base), "chat", test_words)
    out = tmp_path / "lora"
    args = ["finetune", "--from", str(base), "--data", str(data), "--out-dir", str(out), "--method", "lora"]
    args += [
        "--lora-targets",
        "c_attn",
        "c_proj",
        "c_fc",
        "--lora-rank",
        "8",
        "--lora-alpha",
        "16",
        "--merge",
    ]
    args += [
        "--max-steps",
        "800",
        "--learning-rate",
        "1e-2",
        "--warmup-steps",
        "10",
        "--val-fraction",
        "0.05",
    ]
    assert main([*args, "--eval-interval", "800", *COMMON]) == 0
    printed = capsys.readouterr().out
    assert "LoRA rank 8, alpha 16 on attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj:" in printed
    assert "1900 train / 100 val examples" in printed and "val loss" in printed

    model, tok = model_and_tok(out)  # the run's checkpoint: frozen base + adapters, merged on load
    after = exact_match(model, tok, "chat", test_words)
    print(f"LoRA chat reversal exact match: {before:.2f} before, {after:.2f} after")
    assert before <= 0.1 and after >= 0.9

    # The merged export and base + adapter compute the same model.
    merged, _ = model_and_tok(out / "merged")
    assert "lora" not in read_config(out / "merged")
    base_model, base_tok = model_and_tok(base)
    adapted_tok = attach_adapter(base_model, base_tok, out / "adapter")
    idx = torch.tensor([sft.render_chat(tok, [{"role": "user", "content": "abcde"}])])
    with torch.no_grad():
        assert (merged(idx) - model(idx)).abs().max() <= 1e-5
        assert (base_model(idx) - model(idx)).abs().max() <= 1e-5
    assert adapted_tok.to_spec() == tok.to_spec()
    adapter_config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "LORA"  # peft's format (tests/test_interop_peft.py loads it)
    assert adapter_config["target_modules"] == ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
    assert adapter_config["r"] == 8 and adapter_config["lora_alpha"] == 16
    assert (out / "adapter" / ADAPTER_WEIGHTS).stat().st_size < 100_000

    # gpt2lab chat: multi-turn, /reset, /quit; both from the run and from base + adapter.
    for cfg in (
        ChatConfig(ckpt=str(out), temperature=0),
        ChatConfig(ckpt=str(base), adapter=str(out / "adapter"), temperature=0),
    ):
        replies = io.StringIO()
        chat(cfg, io.StringIO("abcd\nfed\n/reset\n\nbbac\n/quit\nnever read\n"), replies)
        assert replies.getvalue() == "dcba\ndef\ncabb\n"


@pytest.mark.slow
def test_full_finetuning_learns_a_new_task(base, tmp_path):
    rng = random.Random(2)
    data = write_jsonl(
        tmp_path / "copy.jsonl", [{"prompt": (w := word(rng)) + "=", "completion": w} for _ in range(2000)]
    )
    test_words = held_out({json.loads(line)["prompt"][:-1] for line in data.read_text().splitlines()})
    before = exact_match(*model_and_tok(base), "=", test_words)
    out = tmp_path / "full"
    args = ["finetune", "--from", str(base), "--data", str(data), "--out-dir", str(out), "--method", "full"]
    assert (
        main([*args, "--max-steps", "300", "--learning-rate", "3e-3", "--warmup-steps", "10", *COMMON]) == 0
    )
    after = exact_match(*model_and_tok(out), "=", test_words)
    print(f"full fine-tuning copy exact match: {before:.2f} before, {after:.2f} after")
    assert before <= 0.1 and after >= 0.9
    assert not (out / "adapter").exists()


def test_lora_resume_is_exact_and_only_adapters_and_template_rows_change(base, tmp_path):
    rng = random.Random(3)
    data = write_jsonl(tmp_path / "chat.jsonl", [chat_record(word(rng)) for _ in range(200)])

    def finetune(out: Path, steps: int, *extra: str) -> None:
        args = [
            "finetune",
            "--from",
            str(base),
            "--data",
            str(data),
            "--out-dir",
            str(out),
            "--method",
            "lora",
        ]
        args += [
            "--lora-dropout",
            "0.1",
            "--max-steps",
            str(steps),
            "--lr-decay-steps",
            "20",
            "--val-fraction",
            "0.1",
        ]
        assert (
            main([*args, "--learning-rate", "1e-2", "--eval-interval", "5", "--log-interval", "1", *extra])
            == 0
        )

    finetune(tmp_path / "straight", 20)
    finetune(tmp_path / "split", 10)
    finetune(tmp_path / "split", 20, "--resume")
    losses = [
        [json.loads(line) for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
        for d in ("straight", "split")
    ]
    pick = [[(e["step"], e.get("train_loss"), e.get("val_loss")) for e in run] for run in losses]
    assert pick[0] == pick[1] and len(pick[0]) > 20  # bit-identical, dropout included
    a = (tmp_path / "straight" / "adapter" / ADAPTER_WEIGHTS).read_bytes()
    assert a == (tmp_path / "split" / "adapter" / ADAPTER_WEIGHTS).read_bytes()

    # Everything but the adapters and the template tokens' rows is exactly the base.
    from safetensors.torch import load_file

    trained = load_file(resolve(tmp_path / "straight") / "model.safetensors")
    start = read_config(base)["tokenizer"]["added_tokens"]["<|system|>"]
    for name, tensor in load_model(resolve(base)).state_dict().items():
        if name == "lm_head.weight":
            continue
        if name == "transformer.wte.weight":
            assert torch.equal(trained[name][:start], tensor[:start]) and torch.equal(
                trained[name][start + 4 :], tensor[start + 4 :]
            )
            assert not torch.equal(trained[name][start : start + 4], tensor[start : start + 4])
        else:
            assert torch.equal(trained[name], tensor), name


def test_finetune_from_hugging_face_gpt2_grows_the_vocabulary(tmp_path, shared_data, capsys):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64))
    hf.save_pretrained(tmp_path / "hf")  # vocab 50257: no spare rows
    # As a hub download has them: the vocabulary beside the weights, the test's cache empty and no network.
    shutil.copy(shared_data / "gpt2" / "encoder.json", tmp_path / "hf" / "vocab.json")
    shutil.copy(shared_data / "gpt2" / "vocab.bpe", tmp_path / "hf" / "merges.txt")
    rng = random.Random(4)
    data = write_jsonl(tmp_path / "d.jsonl", [chat_record(word(rng)) for _ in range(20)])
    out = tmp_path / "out"
    args = ["finetune", "--pretrained", str(tmp_path / "hf"), "--data", str(data), "--out-dir", str(out)]
    assert main([*args, "--method", "lora", "--max-steps", "3", "--batch-size", "2"]) == 0
    printed = capsys.readouterr().out
    assert (
        "added tokens {'<|system|>': 50257, '<|user|>': 50258, '<|assistant|>': 50259, '<|end|>': 50260}"
        in printed
    )
    saved = read_config(resolve(out))
    assert saved["model"]["vocab_size"] == 50304 and saved["tokenizer"]["added_tokens"]["<|end|>"] == 50260
    model, tok = model_and_tok(out)
    assert model.config.vocab_size == 50304 and tok.vocab_size == 50261
    # The adapter goes back onto the same Hugging Face base (the vocabulary grows the same way) ...
    replies = io.StringIO()
    chat(
        ChatConfig(pretrained=str(tmp_path / "hf"), adapter=str(out / "adapter"), max_new_tokens=3, seed=0),
        io.StringIO("hi\n"),
        replies,
    )
    assert replies.getvalue().endswith("\n")
    # ... and not onto another architecture.
    other = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_layer=3, n_head=2, n_embd=32, n_positions=64)
    )
    other.save_pretrained(tmp_path / "other")
    assert main(["chat", "--pretrained", str(tmp_path / "other"), "--adapter", str(out / "adapter")]) == 2
    assert "was trained on another base architecture (n_layer 2 vs 3)" in capsys.readouterr().err


def test_finetune_bad_input(base, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [chat_record("abc")] * 4)
    args = ["finetune", "--from", str(base), "--data", str(data), "--out-dir", str(tmp_path / "o")]
    assert main([*args, "--method", "lora", "--lora-targets", "c_atn"]) == 2
    assert "LoRA target 'c_atn' matches no linear layer (did you mean 'c_attn'?)" in capsys.readouterr().err
    (tmp_path / "bad.jsonl").write_text('{"prompt": "ab", "completion": "ba"}\n{"prompt": "ab"}\n')
    assert (
        main(
            [
                "finetune",
                "--from",
                str(base),
                "--data",
                str(tmp_path / "bad.jsonl"),
                "--out-dir",
                str(tmp_path),
            ]
        )
        == 2
    )
    assert "bad.jsonl:2: missing field 'completion'" in capsys.readouterr().err
    assert main(["chat", "--ckpt", str(tmp_path / "nothing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    plain = tmp_path / "plain"  # a checkpoint whose tokenizer never got the template
    save_checkpoint(
        plain,
        GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=8, vocab_size=9)),
        {"tokenizer": CharTokenizer("abcdefgh", []).to_spec()},
    )
    assert main(["chat", "--ckpt", str(plain)]) == 2
    assert (
        "has no <|end|> token: the model was not fine-tuned with the chat template" in capsys.readouterr().err
    )


@pytest.mark.slow
def test_lora_finetuning_two_processes_equal_one_with_accumulation(base, tmp_path):
    import os
    import subprocess
    import sys

    rng = random.Random(5)
    data = write_jsonl(tmp_path / "chat.jsonl", [chat_record(word(rng)) for _ in range(100)])
    args = ["finetune", "--from", str(base), "--data", str(data), "--method", "lora", "--max-steps", "6"]
    args += ["--batch-size", "4", "--log-interval", "1", "--eval-interval", "3", "--val-fraction", "0.1"]
    args += ["--learning-rate", "1e-2", "--lora-targets", "c_attn", "c_fc"]
    assert main([*args, "--out-dir", str(tmp_path / "one"), "--total-batch-size", "192"]) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [*cmd, "-m", "gpt2lab", *args, "--out-dir", str(tmp_path / "two")],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 process(es)" in result.stdout and "x 2 accumulation" not in result.stdout

    def events(d: str) -> list[tuple]:
        lines = (tmp_path / d / "metrics.jsonl").read_text().splitlines()
        return [(e["step"], e.get("train_loss"), e.get("val_loss")) for e in map(json.loads, lines)]

    one, two = events("one"), events("two")
    assert [e[0] for e in one] == [e[0] for e in two] and len(one) == 8  # 6 steps + 2 evals
    for a, b in zip(one, two, strict=True):
        assert all(x == y or abs(x - y) < 1e-5 for x, y in zip(a[1:], b[1:], strict=True)), (a, b)
