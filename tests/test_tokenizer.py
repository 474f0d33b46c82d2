"""The Tokenizer interface: gpt2 (both backends), trained BPE dirs, char, bytes; specs; vocab lookup."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import urllib.error
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpt2lab import bpe
from gpt2lab.errors import UserError
from gpt2lab.tokenizer import GPT2_FILES, ByteTokenizer, CharTokenizer, Tokenizer, get_tokenizer

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
GPT2_DIR = DATA / "gpt2"
SHAKESPEARE = DATA / "tinyshakespeare.txt"
EOT = "<|endoftext|>"


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"needs {path} (the shared real-data folder, see ../shared/data/SOURCES.md)")
    return path


@pytest.fixture(scope="module")
def gpt2_fast() -> Tokenizer:
    return get_tokenizer("gpt2", vocab_dir=need(GPT2_DIR), backend="tiktoken")


@pytest.fixture(scope="module")
def gpt2_python() -> Tokenizer:
    return get_tokenizer("gpt2", vocab_dir=need(GPT2_DIR), backend="python")


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("GPT2LAB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_gpt2_backends_agree(gpt2_fast, gpt2_python):
    text = need(DATA / "tokenizer_tests" / "taylorswift.txt").read_text(encoding="utf-8")
    for tok in (gpt2_fast, gpt2_python):
        assert (tok.name, tok.vocab_size, tok.eot_id) == ("gpt2", 50257, 50256)
    assert gpt2_fast.encode(text) == gpt2_python.encode(text)
    docs = text.split("\n")[:50]
    assert (
        gpt2_fast.encode_batch(docs) == gpt2_python.encode_batch(docs) == [gpt2_fast.encode(d) for d in docs]
    )
    assert gpt2_fast.encode("Hello world") == [15496, 995]  # GPT-2's well-known ids (HF and tiktoken docs)


@pytest.mark.parametrize("backend", ["tiktoken", "python"])
def test_special_tokens_only_when_allowed(backend):
    tok = get_tokenizer("gpt2", vocab_dir=need(GPT2_DIR), backend=backend)
    text = f"a{EOT}b"
    assert tok.eot_id not in tok.encode(text)  # default: plain text
    assert tok.encode(text, allowed_special="all") == tok.encode("a") + [tok.eot_id] + tok.encode("b")
    assert tok.encode(text, allowed_special={EOT}) == tok.encode(text, allowed_special="all")
    assert tok.encode(text, allowed_special=set()) == tok.encode(text)
    for allowed in ("all", set()):
        assert tok.decode(tok.encode(text, allowed_special=allowed)) == text
    with pytest.raises(UserError, match="out of range"):
        tok.decode([50257])
    with pytest.raises(UserError, match="out of range"):
        tok.decode_bytes([-1])


def test_decode_bytes_lets_a_stream_hold_back_partial_characters(gpt2_fast):
    ids = gpt2_fast.encode("héllo 🎉!")
    pieces = [gpt2_fast.decode_bytes([i]) for i in ids]
    assert b"".join(pieces) == "héllo 🎉!".encode()
    assert any(p and not _is_utf8(p) for p in pieces)  # some token ends inside the emoji


def _is_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_trained_directory_both_backends_and_spec(tmp_path):
    text = need(SHAKESPEARE).read_text(encoding="utf-8")
    tok_bpe = bpe.train([text[:300_000]], 1024, [EOT, "<|sep|>"], progress=False)
    from gpt2lab.tokenizer import BPETokenizer

    BPETokenizer(tok_bpe, "shakes").save(tmp_path / "tok")
    fast, slow = get_tokenizer(tmp_path / "tok"), get_tokenizer(str(tmp_path / "tok"), backend="python")
    held_out = text[300_000:400_000] + EOT + "<|sep|>"
    assert (fast.name, fast.vocab_size, fast.eot_id) == ("shakes", 1024, 1022)
    assert fast.encode(held_out, allowed_special="all") == slow.encode(held_out, allowed_special="all")
    assert fast.encode(held_out, allowed_special="all")[-2:] == [1022, 1023]
    spec = json.loads(json.dumps(fast.to_spec()))  # what a checkpoint stores
    again = Tokenizer.from_spec(spec)
    assert again.encode(held_out) == fast.encode(held_out)
    assert (again.name, again.vocab_size, again.eot_id) == ("shakes", 1024, 1022)
    assert get_tokenizer(spec, backend="python").encode(held_out) == fast.encode(held_out)


def test_gpt2_spec_restores_from_cache(cache):
    shutil.copytree(need(GPT2_DIR), cache / "gpt2")
    tok = get_tokenizer("gpt2")  # no vocab_dir: found in $GPT2LAB_CACHE/gpt2
    spec = json.loads(json.dumps(tok.to_spec()))
    assert spec == {"kind": "gpt2", "version": 1, "backend": "tiktoken"}
    assert get_tokenizer(spec).encode("Hello world") == tok.encode("Hello world")
    assert get_tokenizer(spec, backend="python").encode("Hello world") == tok.encode("Hello world")


def test_explicit_gpt2_vocab_is_remembered_in_the_cache(cache, tmp_path):
    """After one --gpt2-vocab, a checkpoint's {"kind": "gpt2"} spec restores without it."""
    assert not (cache / "gpt2").exists()
    get_tokenizer("gpt2", vocab_dir=need(GPT2_DIR))
    assert get_tokenizer({"kind": "gpt2", "version": 1}).encode("Hello world") == [15496, 995]
    # A modified vocabulary is used where given, but never becomes the cached default.
    other = tmp_path / "other"
    shutil.copytree(GPT2_DIR, other)
    (other / "vocab.bpe").write_text((GPT2_DIR / "vocab.bpe").read_text() + "\n")
    shutil.rmtree(cache / "gpt2")
    get_tokenizer("gpt2", vocab_dir=other)
    assert not (cache / "gpt2").exists()


def _fake_urlopen(contents: dict[str, bytes], calls: list[str]):
    def urlopen(url, timeout=None):
        calls.append(url)
        return io.BytesIO(contents[url])

    return urlopen


def test_gpt2_download_is_verified_and_cached(cache, monkeypatch):
    need(GPT2_DIR)
    real = {url: (GPT2_DIR / name).read_bytes() for name, (url, _) in GPT2_FILES.items()}
    calls: list[str] = []
    monkeypatch.setattr("urllib.request.urlopen", _fake_urlopen(real, calls))
    tok = get_tokenizer("gpt2")
    assert tok.encode("Hello world") == [15496, 995]
    assert sorted(calls) == sorted(real)
    for name, (_, sha) in GPT2_FILES.items():
        assert hashlib.sha256((cache / "gpt2" / name).read_bytes()).hexdigest() == sha
    get_tokenizer("gpt2")
    assert len(calls) == 2  # the second time it comes from the cache


def test_gpt2_download_with_wrong_hash_is_rejected_and_not_stored(cache, monkeypatch):
    need(GPT2_DIR)
    bad = {url: (GPT2_DIR / name).read_bytes() + b"\n" for name, (url, _) in GPT2_FILES.items()}
    monkeypatch.setattr("urllib.request.urlopen", _fake_urlopen(bad, []))
    with pytest.raises(UserError, match="sha256"):
        get_tokenizer("gpt2")
    assert not (cache / "gpt2" / "encoder.json").exists()


def test_gpt2_offline_without_files_says_how_to_provide_them(cache, monkeypatch):
    def offline(url, timeout=None):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr("urllib.request.urlopen", offline)
    with pytest.raises(UserError, match="--gpt2-vocab DIR") as e:
        get_tokenizer("gpt2")
    assert str(cache / "gpt2") in str(e.value)


def test_bare_gpt2_format_directories_load(tmp_path):
    tok = get_tokenizer(need(GPT2_DIR))
    assert (tok.name, tok.eot_id, tok.encode("Hello world")) == ("gpt2", 50256, [15496, 995])
    small = bpe.train(["hello world hello"], 262, progress=False)
    small.save(tmp_path / "small", "small")
    (tmp_path / "small" / "gpt2lab_tokenizer.json").unlink()
    (tmp_path / "small" / "vocab.tiktoken").unlink()
    bare = get_tokenizer(tmp_path / "small")
    assert (bare.name, bare.vocab_size, bare.eot_id) == ("small", 262, 261)
    assert bare.encode("hello world") == small.encode("hello world")


def test_bad_vocab_dirs_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="no encoder.json"):
        get_tokenizer("gpt2", vocab_dir=tmp_path)
    with pytest.raises(UserError, match="unknown tokenizer 'nope'"):
        get_tokenizer("nope")
    with pytest.raises(UserError, match="no gpt2lab_tokenizer.json"):
        get_tokenizer(tmp_path)
    (tmp_path / "gpt2lab_tokenizer.json").write_text("{broken")
    with pytest.raises(UserError, match="not valid JSON"):
        get_tokenizer(tmp_path)
    # a valid BPE vocabulary that is not GPT-2's is refused under the name gpt2
    small = bpe.train(["hello world hello"], 260, progress=False)
    small.save(tmp_path / "small", "small")
    with pytest.raises(UserError, match="not GPT-2's vocabulary"):
        get_tokenizer("gpt2", vocab_dir=tmp_path / "small")
    with pytest.raises(UserError, match="backend 'rust'"):
        get_tokenizer(tmp_path / "small", backend="rust")


def test_char_tokenizer(tmp_path):
    need(SHAKESPEARE)
    tok = get_tokenizer("char", corpus=SHAKESPEARE)
    text = SHAKESPEARE.read_text(encoding="utf-8")
    assert tok.vocab_size == len(set(text)) + 1 and tok.eot_id == len(set(text))
    ids = tok.encode(text[:5000])
    assert len(ids) == 5000 and tok.decode(ids) == text[:5000]
    assert tok.encode(f"hi{EOT}", allowed_special="all")[-1] == tok.eot_id
    with pytest.raises(UserError, match="'<'"):  # not allowed: its characters, and Shakespeare has no '<'
        tok.encode(f"hi{EOT}")
    with pytest.raises(UserError, match="U\\+00E9"):
        tok.encode("café")
    with pytest.raises(UserError, match="out of range"):
        tok.decode([tok.vocab_size])
    tok.save(tmp_path / "char")
    for again in (get_tokenizer(tmp_path / "char"), get_tokenizer(json.loads(json.dumps(tok.to_spec())))):
        assert isinstance(again, CharTokenizer) and again.encode(text[:1000]) == ids[:1000]
    with pytest.raises(UserError, match="corpus=PATH"):
        get_tokenizer("char")


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.lists(st.one_of(st.text(), st.just(EOT)), max_size=5).map("".join))
def test_bytes_tokenizer_round_trips(text):
    tok = get_tokenizer("bytes")
    assert isinstance(tok, ByteTokenizer) and (tok.vocab_size, tok.eot_id) == (257, 256)
    assert tok.decode(tok.encode(text)) == text
    special = tok.encode(text, allowed_special="all")
    assert tok.decode(special) == text and special.count(256) == text.count(EOT)
    assert tok.decode_bytes(tok.encode(text)) == text.encode("utf-8")
    assert get_tokenizer(tok.to_spec()).encode(text) == tok.encode(text)


def test_package_reexport_is_lazy():
    import subprocess
    import sys

    code = (
        "import sys, gpt2lab; assert 'gpt2lab.tokenizer' not in sys.modules and 'regex' not in sys.modules; "
        "print(gpt2lab.get_tokenizer('bytes').vocab_size)"
    )
    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=repo)
    assert out.stdout.strip() == "257"


def test_save_replaces_a_tokenizer_dir_but_never_an_unrelated_folder(tmp_path):
    out = tmp_path / "tok"
    bpe.train(["aa bb aa bb"], 258, progress=False).save(out, "first")
    bpe.train(["cc dd cc"], 259, progress=False).save(out, "second")  # re-training into the same --out
    tok = get_tokenizer(out)
    assert (tok.name, tok.vocab_size) == ("second", 259)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok"]  # no temporary folders left behind
    other = tmp_path / "photos"
    other.mkdir()
    (other / "cat.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(UserError, match="not a gpt2lab tokenizer; not replaced"):
        ByteTokenizer().save(other)
    assert (other / "cat.jpg").read_bytes() == b"\xff\xd8"


@pytest.mark.parametrize("kind", ["bytes", "gpt2"])
def test_decode_accepts_tensors_and_arrays_of_ints(kind):
    import numpy as np
    import torch

    tok = get_tokenizer(kind, vocab_dir=need(GPT2_DIR)) if kind == "gpt2" else get_tokenizer(kind)
    ids = tok.encode("Hello, world")
    for form in (torch.tensor(ids), np.array(ids, dtype=np.uint16), tuple(ids)):
        assert tok.decode(form) == "Hello, world"
    assert tok.decode(torch.tensor(ids[0])) == tok.decode(ids[:1])
    with pytest.raises(UserError, match="must be integers, got 1.5"):
        tok.decode([1.5])
    with pytest.raises(UserError, match="out of range"):
        tok.decode(torch.tensor([tok.vocab_size]))
