import os
import subprocess
import sys

import pytest
from conftest import randomized, small_config

from gpt2lab import GPT
from gpt2lab.checkpoint import save_checkpoint
from gpt2lab.cli import main
from gpt2lab.tokenizer import ByteTokenizer


def test_info_for_gpt2(capsys):
    assert main(["info", "--preset", "gpt2"]) == 0
    out = capsys.readouterr().out
    assert "124,439,808 (124.44M) all; 123,653,376 (123.65M) without position embeddings" in out
    assert "training (6N + 12·L·H·Q·T at T=1024)" in out
    # 124,439,808 fp32 weights are 0.46 GiB; weights + grads + AdamW m, v are 4x that.
    assert "weights         0.46 GiB" in out and "total           1.85 GiB" in out


def test_info_field_flags_override_the_preset(capsys):
    assert main(["info", "--preset", "tinytiny", "--n-layer", "8", "--bias", "--n-inner", "none"]) == 0
    out = capsys.readouterr().out
    assert "tinytiny: 8 layers" in out and ", bias," in out and "MLP 1536" in out
    assert main(["info"]) == 0  # no arguments: the table of presets
    assert "| `tinytiny` | 4 | 4 | 384 | 256 | 50304 | 26,496,384 | 26.40M |" in capsys.readouterr().out


def test_bad_config_is_one_line_exit_2(capsys):
    assert main(["info", "--preset", "gpt2", "--n-head", "7"]) == 2
    err = capsys.readouterr().err
    assert err == "gpt2lab info: error: GPTConfig.n_embd 768 is not divisible by n_head 7\n"


def test_convert_round_trip_on_the_command_line(tmp_path, capsys):
    pytest.importorskip("transformers")
    model = randomized(GPT(small_config(vocab_size=320)))
    save_checkpoint(tmp_path / "ckpt", model, extra={"tokenizer": ByteTokenizer().to_spec()})
    assert main(["convert", "--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf")]) == 0
    assert main(["convert", "--pretrained", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 0
    out = capsys.readouterr().out
    assert "read back: identical logits and token ids" in out and "reloaded logits identical" in out
    assert main(["convert", "--pretrained", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
    assert "is neither a directory nor one of the hub models" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_python_dash_m_entry_point():
    result = subprocess.run(
        [sys.executable, "-m", "gpt2lab", "info", "--preset", "gpt2-xl"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "1,557,611,200" in result.stdout


def test_hub_download_offline_is_a_clear_error(tmp_path):
    """The real download path, run offline: one line that says how to provide the files instead."""
    pytest.importorskip("huggingface_hub")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}
    result = subprocess.run(
        [sys.executable, "-m", "gpt2lab", "convert", "--pretrained", "gpt2", "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode == 2
    assert result.stderr.startswith(
        "gpt2lab convert: error: could not download 'gpt2' from the Hugging Face hub"
    )
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()
