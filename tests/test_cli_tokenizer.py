"""`gpt2lab tokenizer train|encode|decode|stats` through cli.main, as a user runs them."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpt2lab.cli import main
from gpt2lab.tokenizer import get_tokenizer

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SHAKESPEARE = DATA / "tinyshakespeare.txt"
GPT2_DIR = DATA / "gpt2"


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"needs {path} (the shared real-data folder, see ../shared/data/SOURCES.md)")
    return path


def test_train_then_load_encode_decode_stats(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(need(SHAKESPEARE).read_text(encoding="utf-8")[:200_000], encoding="utf-8")
    out = tmp_path / "tok"
    args = ["tokenizer", "train", "--input", str(corpus), "--vocab-size", "600", "--out", str(out)]
    assert main([*args, "--special", "<|sep|>", "--quiet"]) == 0
    assert "vocab_size 600" in capsys.readouterr().out
    tok = get_tokenizer(out)
    assert (tok.vocab_size, tok.eot_id, tok.name) == (600, 598, "tok")

    assert (
        main(["tokenizer", "encode", "--tokenizer", str(out), "--text", "ROMEO:<|sep|>", "--allow-special"])
        == 0
    )
    ids = [int(x) for x in capsys.readouterr().out.split()]
    assert ids == tok.encode("ROMEO:<|sep|>", allowed_special="all") and ids[-1] == 599
    assert main(["tokenizer", "decode", "--tokenizer", str(out), "--ids", " ".join(map(str, ids))]) == 0
    assert capsys.readouterr().out == "ROMEO:<|sep|>\n"

    assert main(["tokenizer", "stats", "--tokenizer", str(out), "--input", str(corpus), "--top", "3"]) == 0
    report = capsys.readouterr().out
    n_tokens = len(tok.encode(corpus.read_text(encoding="utf-8"), allowed_special="all"))
    assert f"tokens         {n_tokens:,}" in report
    assert f"bytes/token    {200_000 / n_tokens:.3f}" in report  # Shakespeare's first 200k chars are ASCII
    merges = [
        line.split()
        for line in report.splitlines()
        if line.strip().startswith(("256:", "257:", "258:", "259:"))
    ]
    assert [m[0] for m in merges] == ["256:", "257:", "258:"]


def test_gpt2_encode_with_vocab_flag(capsys):
    args = ["tokenizer", "encode", "--gpt2-vocab", str(need(GPT2_DIR)), "--text", "Hello world"]
    assert main(args) == 0
    assert capsys.readouterr().out.split() == ["15496", "995"]
    assert main([*args[:4], "--backend", "python", "--text", "Hello world"]) == 0
    assert capsys.readouterr().out.split() == ["15496", "995"]


def test_user_errors_exit_2_with_one_line(tmp_path, capsys):
    corpus = tmp_path / "tiny.txt"
    corpus.write_text("hello hello world")
    assert (
        main(
            [
                "tokenizer",
                "train",
                "--input",
                str(corpus),
                "--vocab-size",
                "5000",
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("gpt2lab tokenizer: error: corpus too small for vocab_size 5000")
    assert not (tmp_path / "o").exists()  # nothing written on failure
    assert main(["tokenizer", "decode", "--tokenizer", "bytes", "--ids", "1 2 300"]) == 2
    assert "token id 300 out of range" in capsys.readouterr().err
    assert main(["tokenizer", "decode", "--tokenizer", "bytes", "--ids", "1 x"]) == 2
    assert "token id 'x' is not an integer" in capsys.readouterr().err
    missing = str(tmp_path / "missing.txt")
    assert (
        main(["tokenizer", "train", "--input", missing, "--vocab-size", "300", "--out", str(tmp_path / "o")])
        == 2
    )
    assert "does not exist" in capsys.readouterr().err
