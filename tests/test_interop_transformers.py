"""`gpt2lab convert --ckpt` folders in the tools users load them with: transformers' pipeline (greedy text
equals `gpt2lab sample --temperature 0`), lm-evaluation-harness (the same HellaSwag log-likelihoods as
`gpt2lab eval hellaswag`); the model card; file modes; what is refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import randomized, small_config

from gpt2lab import GPT
from gpt2lab.checkpoint import save_checkpoint
from gpt2lab.cli import main
from gpt2lab.config import pad_vocab_size
from gpt2lab.tokenizer import get_tokenizer, train_tokenizer

transformers = pytest.importorskip("transformers", reason="transformers (the dev extra) is the reference")

PROMPT = "Once upon a time, a little dog"
CARD = {"train": {"data": "data/tinystories", "total_batch_size": 4096, "init_from": "scratch"}}


def checkpoint_with(tok, out: Path, block_size: int = 64, clear: bool = True, **card) -> Path:
    """A random model with tok's vocabulary; clear: its greedy choices are clear (large token embeddings)."""
    model = randomized(GPT(small_config(vocab_size=pad_vocab_size(tok.vocab_size), block_size=block_size)))
    if clear:
        with torch.no_grad():
            model.transformer.wte.weight.mul_(50)  # logits spread by ~8: no near-ties for kernels to flip
    return save_checkpoint(out, model, extra={"tokenizer": tok.to_spec(), **CARD, **card})


@pytest.fixture
def tokenizers(shared_data, tmp_path):
    corpus = shared_data / "tinystories" / "TinyStories-train_first2316stories.txt"
    train_tokenizer([corpus], 4096, tmp_path / "ts4k", progress=False)
    return {
        "gpt2": get_tokenizer("gpt2", vocab_dir=shared_data / "gpt2"),
        "bpe4k": get_tokenizer(tmp_path / "ts4k"),
    }


@pytest.mark.parametrize("which", ["gpt2", "bpe4k"])
def test_pipeline_greedy_text_equals_gpt2lab_sample(which, tokenizers, shared_data, tmp_path, capsys):
    tok = tokenizers[which]
    ckpt = checkpoint_with(tok, tmp_path / "ckpt", step=100, best_val=3.25)
    vocab = ["--gpt2-vocab", str(shared_data / "gpt2")]
    assert main(["convert", "--ckpt", str(ckpt), "--out", str(tmp_path / "hf"), *vocab]) == 0
    assert "read back: identical logits and token ids" in capsys.readouterr().out
    args = ["sample", "--ckpt", str(ckpt), "--prompt", PROMPT, "--temperature", "0", "--max-new-tokens", "30"]
    assert main([*args, "--device", "cpu", *vocab]) == 0
    ours = capsys.readouterr().out
    pipe = transformers.pipeline("text-generation", model=str(tmp_path / "hf"), device="cpu")
    theirs = pipe(PROMPT, max_new_tokens=30, do_sample=False)[0]["generated_text"]
    assert len(ours) > len(PROMPT) + 20
    assert ours == theirs + "\n"
    if which == "gpt2":  # 50257 tokens in 50304 rows: the padding rows are no token, never generated
        generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
        assert generation["suppress_tokens"] == list(range(50257, 50304))


def test_folder_is_complete_with_a_model_card(tokenizers, tmp_path, capsys):
    ckpt = checkpoint_with(tokenizers["bpe4k"], tmp_path / "ckpt", step=100, best_val=3.25)
    assert main(["convert", "--ckpt", str(ckpt), "--out", str(tmp_path / "hf")]) == 0
    files = sorted(p.name for p in (tmp_path / "hf").iterdir())
    assert files == [
        "README.md", "config.json", "generation_config.json", "merges.txt", "model.safetensors",
        "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json", "vocab.json",
    ]  # fmt: skip
    card = (tmp_path / "hf" / "README.md").read_text()
    for fact in ("2 layers, 4 heads, width 64", "data/tinystories", "409,600", "3.2500", "AutoTokenizer"):
        assert fact in card, fact  # architecture, data, tokens seen (100 steps x 4096), val loss, how to load


# safetensors' writer creates its file with mode 0600; atomic.py (issue 15) gives written files the umask's
# mode. Until that lands on this branch, this test is expected to fail on model.safetensors.
@pytest.mark.xfail(
    reason="exported weights are 0600 until issue 15's atomic-write file modes land", strict=False
)
def test_exported_files_are_readable_by_others_per_the_umask(tokenizers, tmp_path):
    ckpt = checkpoint_with(tokenizers["bpe4k"], tmp_path / "ckpt")
    old = os.umask(0o022)
    try:
        assert main(["convert", "--ckpt", str(ckpt), "--out", str(tmp_path / "hf")]) == 0
        assert (
            main(["convert", "--ckpt", str(ckpt), "--format", "gguf", "--out", str(tmp_path / "m.gguf")]) == 0
        )
    finally:
        os.umask(old)
    for p in [*(tmp_path / "hf").iterdir(), tmp_path / "m.gguf"]:
        assert p.stat().st_mode & 0o777 == 0o644, (p.name, oct(p.stat().st_mode))


def test_an_exported_folder_samples_and_fine_tunes_with_its_own_tokenizer_and_exports_the_chat_model(
    tokenizers, tmp_path, capsys
):
    """Import mirrors export: --pretrained on a folder with a 4K BPE (not GPT-2's) uses that tokenizer."""
    ckpt = checkpoint_with(tokenizers["bpe4k"], tmp_path / "ckpt")
    assert main(["convert", "--ckpt", str(ckpt), "--out", str(tmp_path / "hf")]) == 0
    capsys.readouterr()
    args = ["sample", "--prompt", PROMPT, "--temperature", "0", "--max-new-tokens", "20", "--device", "cpu"]
    assert main([*args, "--ckpt", str(ckpt)]) == 0
    from_ckpt = capsys.readouterr().out
    assert main([*args, "--pretrained", str(tmp_path / "hf")]) == 0
    assert capsys.readouterr().out == from_ckpt
    data = tmp_path / "chat.jsonl"
    data.write_text(
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
    )
    ft = [
        "finetune",
        "--pretrained",
        str(tmp_path / "hf"),
        "--data",
        str(data),
        "--out-dir",
        str(tmp_path / "ft"),
    ]
    assert (
        main([*ft, "--max-steps", "2", "--batch-size", "1", "--val-fraction", "0", "--eval-interval", "0"])
        == 0
    )
    assert "added tokens {'<|system|>': 4096" in capsys.readouterr().out  # after the 4K vocabulary
    # The fine-tuned model exports with its chat template: transformers renders sft.render_chat's tokens.
    assert main(["convert", "--ckpt", str(tmp_path / "ft"), "--out", str(tmp_path / "ft_hf")]) == 0
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "ft_hf")
    messages = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Once upon a time?"}]
    got = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    got = got["input_ids"] if hasattr(got, "keys") else got
    from gpt2lab import sft
    from gpt2lab.checkpoint import read_config

    tok = get_tokenizer(read_config(tmp_path / "ft")["tokenizer"])
    assert list(got) == sft.render_chat(tok, messages)


def test_model_py_imports_nothing_of_checkpoints_hugging_face_or_lora():
    code = (
        "import sys, gpt2lab.model; bad = [m for m in sys.modules if m.startswith(('gpt2lab.checkpoint', "
        "'gpt2lab.interop', 'gpt2lab.lora', 'transformers', 'peft', 'gguf', 'safetensors'))]; print(bad)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "[]", done.stdout + done.stderr


def test_convert_refuses_what_it_cannot_express_in_one_line(tokenizers, tmp_path, capsys):
    tok = tokenizers["bpe4k"]
    model = GPT(small_config(vocab_size=4096, pos_embedding="sinusoidal"))
    save_checkpoint(tmp_path / "sin", model, extra={"tokenizer": tok.to_spec()})
    assert main(["convert", "--ckpt", str(tmp_path / "sin"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "gpt2lab convert: error: cannot export to Hugging Face GPT-2: GPTConfig.pos_embedding = 'sinusoidal' "
        "has no equivalent there (it holds 'learned')"
    ]
    # Another model family (issue 17's ladder: bigram, MLP, WaveNet) is refused by name, not crashed on.
    save_checkpoint(tmp_path / "bigram", GPT(small_config()), extra={"family": "bigram"})
    assert main(["convert", "--ckpt", str(tmp_path / "bigram"), "--out", str(tmp_path / "o")]) == 2
    assert "holds a 'bigram' model; only GPT-2 transformers convert" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# --- lm-evaluation-harness --------------------------------------------------------------------------


@pytest.mark.slow
def test_lm_eval_hellaswag_loglikelihoods_equal_gpt2lab_eval(shared_data, tmp_path, capsys):
    """lm-eval's `hf` model (what `lm_eval --model hf --model_args pretrained=DIR` runs) on the exported
    folder, offline, on a local task built from ../shared/data."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager
    from test_server_scoring import TASK_YAML

    from gpt2lab.evaluate import load_hellaswag

    source, n = shared_data / "hellaswag" / "hellaswag_val_subset1000.jsonl", 12
    tok = get_tokenizer("gpt2", vocab_dir=shared_data / "gpt2")
    ckpt = checkpoint_with(tok, tmp_path / "ckpt", block_size=256, clear=False)  # sums of ~-11 per token
    vocab = ["--gpt2-vocab", str(shared_data / "gpt2")]
    assert main(["convert", "--ckpt", str(ckpt), "--out", str(tmp_path / "hf"), *vocab]) == 0
    args = ["eval", "hellaswag", "--ckpt", str(ckpt), "--data", str(source), "--limit", str(n), "--quiet"]
    assert main([*args, "--json", str(tmp_path / "ours.json"), *vocab]) == 0
    ours = json.loads((tmp_path / "ours.json").read_text())["predictions"]

    # The harness's own HellaSwag preprocessing is what gpt2lab's harness-style rows use.
    docs = [
        {"query": ex.harness_context, "choices": ex.harness_endings, "label": ex.label}
        for ex in load_hellaswag(source, n)
    ]
    (tmp_path / "hs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "tasks").mkdir()
    task = TASK_YAML.format(name="gpt2lab_hs_export", data=tmp_path / "hs.jsonl")
    (tmp_path / "tasks" / "gpt2lab_hs_export.yaml").write_text(task)
    with pytest.MonkeyPatch.context() as mp:  # offline, and a private Hugging Face cache
        for key, value in dict(
            HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home")
        ).items():
            mp.setenv(key, value)
        out = lm_eval.simple_evaluate(
            model="hf",
            model_args={"pretrained": str(tmp_path / "hf"), "device": "cpu"},
            tasks=["gpt2lab_hs_export"],
            task_manager=TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False),
            batch_size=4,
            log_samples=True,
        )
    samples = sorted(out["samples"]["gpt2lab_hs_export"], key=lambda s: s["doc_id"])
    theirs = [[float(r[0][0]) for r in s["resps"]] for s in samples]
    assert len(theirs) == n
    for i, pred in enumerate(ours):
        ll = [-x for x in pred["harness_losses"]]
        assert max(abs(a - b) for a, b in zip(ll, theirs[i], strict=True)) <= 1e-4, (i, ll, theirs[i])
