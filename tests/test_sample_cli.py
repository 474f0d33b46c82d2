"""`gpt2lab sample`: greedy text equals transformers' greedy text; bad flags are one-line errors.

The real tests need gpt2lab.tokenizer (skipped without it); the same CLI paths also run here with a
stand-in GPT-2 tokenizer built from tiktoken and OpenAI's vocab files in ../shared/data.
"""

from __future__ import annotations

import io
import sys
import types

import pytest
import torch
from test_generate import gpt2_tiktoken, small_model

from gpt2lab.cli import main
from gpt2lab.config import SampleConfig
from gpt2lab.generate import generate, run
from gpt2lab.interop import save_pretrained


class StandInTokenizer:
    """GPT-2's tokenizer with the interface of gpt2lab.tokenizer's (encode/decode/decode_bytes/eot_id)."""

    name = "gpt2"

    def __init__(self):
        self.enc = gpt2_tiktoken()
        self.eot_id = 50256
        self.vocab_size = 50257

    def encode(self, text, allowed_special=frozenset()):
        return self.enc.encode(text, allowed_special=allowed_special, disallowed_special=())

    def decode(self, ids):
        return self.enc.decode(ids)

    def decode_bytes(self, ids):
        return self.enc.decode_bytes(ids)


@pytest.fixture
def gpt2_dir(tmp_path):
    """A tiny random GPT-2 with GPT-2's vocabulary, saved in Hugging Face's layout."""
    model = small_model(vocab_size=50257, n_embd=32, n_head=2, n_layer=1, block_size=64)
    save_pretrained(model, tmp_path / "hf")
    return tmp_path / "hf", model


@pytest.fixture
def stand_in(monkeypatch):
    tok = StandInTokenizer()
    module = types.ModuleType("gpt2lab.tokenizer")
    module.get_tokenizer = module.model_tokenizer = lambda *args, **kwargs: tok
    monkeypatch.setitem(sys.modules, "gpt2lab.tokenizer", module)
    return tok


def run_cli(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_sample_greedy_prints_prompt_and_transformers_greedy_text(gpt2_dir, stand_in, capsys):
    transformers = pytest.importorskip("transformers")
    path, model = gpt2_dir
    prompt = "Hello, my name is"
    argv = ["sample", "--pretrained", str(path), "--prompt", prompt, "--max-new-tokens", "12"]
    code, out, err = run_cli([*argv, "--temperature", "0", "--device", "cpu"], capsys)
    assert code == 0, err
    ids = stand_in.encode(prompt)
    hf = transformers.GPT2LMHeadModel.from_pretrained(path).eval()
    with torch.no_grad():
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, pad_token_id=0)[0]
    new = ref[len(ids) :].tolist()
    text = stand_in.decode(new[: new.index(50256)] if 50256 in new else new)
    assert out == prompt + text + "\n"
    code, streamed, _ = run_cli([*argv, "--temperature", "0", "--device", "cpu", "--stream"], capsys)
    assert streamed == out


def test_sample_num_samples_seed_and_interactive(gpt2_dir, stand_in, capsys):
    path, _ = gpt2_dir
    argv = ["sample", "--pretrained", str(path), "--max-new-tokens", "8", "--seed", "3", "--device", "cpu"]
    code, out, _ = run_cli([*argv, "--prompt", "Once", "--num-samples", "3", "--top-k", "50"], capsys)
    assert code == 0 and out.count("-" * 40) == 2 and out.startswith("Once")
    assert run_cli([*argv, "--prompt", "Once", "--num-samples", "3", "--top-k", "50"], capsys)[1] == out
    # interactive: one prompt per input line, until the input ends
    out_io = io.StringIO()
    cfg = SampleConfig(pretrained=str(path), max_new_tokens=5, temperature=0, device="cpu")
    run(cfg, inp=io.StringIO("first\nsecond\n"), out=out_io)
    lines = out_io.getvalue().splitlines()
    assert lines[0].startswith("first") and any(line.startswith("second") for line in lines[1:])


def test_sample_uses_the_tokenizer_for_token_ids(gpt2_dir, stand_in, capsys):
    path, model = gpt2_dir
    argv = ["sample", "--pretrained", str(path), "--prompt", "abc", "--max-new-tokens", "6"]
    code, out, _ = run_cli([*argv, "--temperature", "0", "--device", "cpu"], capsys)
    new = generate(model, stand_in.encode("abc"), 6, temperature=0)
    if 50256 in new:
        new = new[: new.index(50256)]
    assert out == "abc" + stand_in.decode(new) + "\n"


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--top-p", "1.5"], r"top_p must be in \(0, 1\], got 1.5"),
        (["--temperature", "-1"], "temperature must be >= 0"),
        (["--ckpt", "x"], "exactly one of --ckpt DIR or --pretrained"),
        (["--prompt-file", "f.txt"], "give --prompt or --prompt-file, not both"),
        (["--num-samples", "0"], "--num-samples must be a positive integer, got 0"),
    ],
)
def test_sample_bad_flags_are_one_line_errors(gpt2_dir, stand_in, capsys, flags, message):
    import re

    path, _ = gpt2_dir
    argv = ["sample", "--pretrained", str(path), "--prompt", "hi", *flags]
    code, out, err = run_cli(argv, capsys)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and re.search(message, err), err


def test_sample_with_the_real_tokenizer(gpt2_dir, capsys, shared_vocab):
    pytest.importorskip("gpt2lab.tokenizer", reason="gpt2lab.tokenizer is not in this branch yet")
    from gpt2lab.tokenizer import get_tokenizer

    path, model = gpt2_dir
    tok = get_tokenizer("gpt2", vocab_dir=shared_vocab)
    argv = ["sample", "--pretrained", str(path), "--prompt", "Hello there", "--max-new-tokens", "10"]
    code, out, err = run_cli([*argv, "--temperature", "0", "--gpt2-vocab", str(shared_vocab)], capsys)
    assert code == 0, err
    new = generate(model, tok.encode("Hello there"), 10, temperature=0, eot_id=tok.eot_id)
    if new and new[-1] == tok.eot_id:
        new = new[:-1]
    assert out == "Hello there" + tok.decode(new) + "\n"


@pytest.fixture
def shared_vocab():
    from test_generate import SHARED_DATA

    folder = SHARED_DATA / "gpt2"
    if not (folder / "encoder.json").is_file():
        pytest.skip(f"GPT-2 vocab not found at {folder}")
    return folder


@pytest.mark.parametrize("flags", [["--temperature", "1e-39"], ["--top-p", "1e-320"]])
def test_sample_with_a_temperature_or_top_p_too_small_to_sample_from_prints_greedy_text(
    gpt2_dir, stand_in, capsys, flags
):
    path, _ = gpt2_dir
    argv = [
        "sample",
        "--pretrained",
        str(path),
        "--prompt",
        "Hello",
        "--max-new-tokens",
        "8",
        "--device",
        "cpu",
    ]
    code, greedy, err = run_cli([*argv, "--temperature", "0"], capsys)
    assert code == 0, err
    code, out, err = run_cli([*argv, "--seed", "1", *flags], capsys)
    assert code == 0 and err == "" and out == greedy


def test_sample_quantize_int8(gpt2_dir, stand_in, capsys):
    path, _ = gpt2_dir
    argv = [
        "sample",
        "--pretrained",
        str(path),
        "--prompt",
        "Hello",
        "--max-new-tokens",
        "8",
        "--device",
        "cpu",
    ]
    code, out, err = run_cli([*argv, "--temperature", "0", "--quantize", "int8"], capsys)
    assert code == 0, err
    assert out.startswith("Hello") and len(out) > len("Hello\n")
    code, out, err = run_cli([*argv, "--quantize", "int8", "--dtype", "bfloat16"], capsys)
    assert code == 2 and "float32" in err
