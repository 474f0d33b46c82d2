"""`gpt2lab eval loss|hellaswag` on the command line: tables, JSON files, one-line errors."""

from __future__ import annotations

import json

import pytest
from conftest import randomized, small_config
from test_evaluate import prepare_bytes, record, write_jsonl

from gpt2lab import GPT
from gpt2lab.checkpoint import save_checkpoint
from gpt2lab.cli import main
from gpt2lab.evaluate import evaluate_loss, hellaswag, load_hellaswag
from gpt2lab.interop import save_pretrained
from gpt2lab.tokenizer import get_tokenizer

SUBSET = "hellaswag/hellaswag_val_subset1000.jsonl"


def bytes_checkpoint(path, **fields):
    model = randomized(GPT(small_config(vocab_size=257, block_size=1024, **fields)))
    save_checkpoint(path, model, {"tokenizer": get_tokenizer("bytes").to_spec()})
    return model


def test_eval_loss_writes_json_next_to_the_checkpoint(tmp_path, capsys):
    data = prepare_bytes(tmp_path)
    model = bytes_checkpoint(tmp_path / "ckpt")
    capsys.readouterr()
    assert (
        main(["eval", "loss", "--ckpt", str(tmp_path / "ckpt"), "--data", str(data), "--seq-len", "64"]) == 0
    )
    out = capsys.readouterr().out
    saved = json.loads((tmp_path / "ckpt" / "eval_loss.json").read_text())
    expected = evaluate_loss(model, data, "val", seq_len=64)
    assert saved["loss"] == pytest.approx(expected["loss"], rel=1e-6)
    assert saved["perplexity"] == pytest.approx(expected["perplexity"], rel=1e-6)
    assert saved["tokens"] == expected["tokens"] and saved["split"] == "val"
    assert f"| loss | {expected['loss']:.4f} |" in out and "| bits per byte |" in out
    args = ["eval", "loss", "--ckpt", str(tmp_path / "ckpt"), "--data", str(data), "--split", "train"]
    assert main([*args, "--max-tokens", "100", "--json", str(tmp_path / "out.json")]) == 0
    assert json.loads((tmp_path / "out.json").read_text())["tokens"] == 100


def test_eval_loss_vocab_mismatch_is_one_line(tmp_path, capsys):
    data = prepare_bytes(tmp_path)
    save_checkpoint(tmp_path / "ckpt", randomized(GPT(small_config(vocab_size=101))))
    assert main(["eval", "loss", "--ckpt", str(tmp_path / "ckpt"), "--data", str(data)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gpt2lab eval: error: ") and err.count("\n") == 1
    assert "vocabulary of 257 ids but the model's has only 101" in err


def test_eval_hellaswag_pretrained(tmp_path, shared_data, capsys):
    pytest.importorskip("transformers")
    model = randomized(GPT(small_config(vocab_size=50257, block_size=256)))
    save_pretrained(model, tmp_path / "hf")
    args = ["eval", "hellaswag", "--pretrained", str(tmp_path / "hf"), "--data", str(shared_data / SUBSET)]
    args += ["--gpt2-vocab", str(shared_data / "gpt2"), "--limit", "6", "--batch-size", "4"]
    assert main([*args, "--json", str(tmp_path / "out.json")]) == 0
    out = capsys.readouterr()
    result = json.loads((tmp_path / "out.json").read_text())
    for key in ("acc", "acc_norm", "harness_acc", "harness_acc_norm", "n", "predictions"):
        assert key in result
    assert result["n"] == 6 and [p["index"] for p in result["predictions"]] == list(range(6))
    tok = get_tokenizer("gpt2", vocab_dir=shared_data / "gpt2")
    direct = hellaswag(model, tok, load_hellaswag(shared_data / SUBSET, limit=6))
    assert [p["pred_norm"] for p in result["predictions"]] == [p["pred_norm"] for p in direct["predictions"]]
    assert f"| harness acc_norm (per character) | {direct['harness_acc_norm']:.4f} |" in out.out
    assert "6/6" in out.err and out.err.startswith("hellaswag")  # the progress line (progress.py)
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["config.json", "model.safetensors"]


def test_eval_hellaswag_checkpoint_tokenizer_and_errors(tmp_path, capsys):
    data = write_jsonl(tmp_path / "h.jsonl", [json.dumps(record()), json.dumps(record(label=0))])
    bytes_checkpoint(tmp_path / "ckpt", n_layer=1)
    assert main(["eval", "hellaswag", "--ckpt", str(tmp_path / "ckpt"), "--data", str(data), "--quiet"]) == 0
    result = json.loads((tmp_path / "ckpt" / "eval_hellaswag.json").read_text())
    assert result["n"] == 2 and [p["label"] for p in result["predictions"]] == [2, 0]
    assert capsys.readouterr().err == ""  # --quiet: no progress bar

    bad = write_jsonl(tmp_path / "bad.jsonl", [json.dumps(record()), json.dumps(record(label=9))])
    assert main(["eval", "hellaswag", "--ckpt", str(tmp_path / "ckpt"), "--data", str(bad)]) == 2
    assert "bad.jsonl:2: label 9 is not one of 0, 1, 2, 3" in capsys.readouterr().err

    # no tokenizer in the checkpoint: GPT-2's is used, and a --gpt2-vocab without its files is an error
    save_checkpoint(tmp_path / "small", randomized(GPT(small_config(vocab_size=101))))
    vocab = ["--gpt2-vocab", str(tmp_path / "nowhere")]
    assert main(["eval", "hellaswag", "--ckpt", str(tmp_path / "small"), "--data", str(data), *vocab]) == 2
    assert "GPT-2 vocab dir" in capsys.readouterr().err


def test_eval_hellaswag_gpt2_tokenizer_too_big_for_checkpoint(tmp_path, shared_data, capsys):
    data = write_jsonl(tmp_path / "h.jsonl", [json.dumps(record())])
    save_checkpoint(tmp_path / "small", randomized(GPT(small_config(vocab_size=101))))
    args = ["eval", "hellaswag", "--ckpt", str(tmp_path / "small"), "--data", str(data)]
    assert main([*args, "--gpt2-vocab", str(shared_data / "gpt2")]) == 2
    err = capsys.readouterr().err
    assert err == (
        "gpt2lab eval: error: tokenizer 'gpt2' has 50257 token ids but the model's vocabulary has only 101: "
        "they do not belong together\n"
    )
    assert not (tmp_path / "small" / "eval_hellaswag.json").exists()
