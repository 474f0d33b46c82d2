"""Our byte-level BPE against independent references: tiktoken (encoding, file formats) and HF tokenizers."""

from __future__ import annotations

import base64
import json
import os
from collections import Counter
from itertools import pairwise
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpt2lab import bpe
from gpt2lab.errors import UserError

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
GPT2_DIR = DATA / "gpt2"
TINYSTORIES = DATA / "tinystories" / "TinyStories-train_first2316stories.txt"
REAL_TEXTS = [
    "tinystories/TinyStories-train_first2316stories.txt",
    "tinystories/cs336_tinystories_sample.txt",
    "wikitext2/valid.raw.txt",
    "wikitext2/valid.txt",
    "tinyshakespeare.txt",
    "tokenizer_tests/taylorswift.txt",
    "tokenizer_tests/corpus.en",
    "hellaswag/hellaswag_val_full.txt",
    "hellaswag/hellaswag_val_subset1000.jsonl",
]
CAP = 300_000  # characters per file for the default run; the slow test takes whole files


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"needs {path} (the shared real-data folder, see ../shared/data/SOURCES.md)")
    return path


def read_text(rel: str, cap: int | None = None) -> str:
    text = need(DATA / rel).read_text(encoding="utf-8")
    return text if cap is None else text[:cap]


@pytest.fixture(scope="module")
def gpt2() -> bpe.BPE:
    need(GPT2_DIR)
    return bpe.load_gpt2_files(GPT2_DIR / "encoder.json", GPT2_DIR / "vocab.bpe")


@pytest.fixture(scope="module")
def tiktoken_gpt2(tiktoken_reference):
    """tiktoken's GPT-2 Encoding, built by tiktoken's own reader of the same two files (not our parser)."""
    return tiktoken_reference


# --- GPT-2's vocabulary: our Python encoder == tiktoken


def test_gpt2_files_parse_to_tiktokens_ranks(gpt2, tiktoken_gpt2):
    assert gpt2.vocab_size == 50257
    assert gpt2.special_tokens == {"<|endoftext|>": 50256}
    assert gpt2.ranks == tiktoken_gpt2._mergeable_ranks


@pytest.mark.parametrize("rel", REAL_TEXTS)
def test_python_encoder_matches_tiktoken_on_real_text(gpt2, tiktoken_gpt2, rel):
    text = read_text(rel, CAP)
    ids = gpt2.encode(text)
    assert ids == tiktoken_gpt2.encode(text, disallowed_special=())
    assert gpt2.decode(ids) == text
    with_specials = gpt2.encode(text, allowed_special="all")
    assert with_specials == tiktoken_gpt2.encode(text, allowed_special="all")
    assert gpt2.decode(with_specials) == text


@pytest.mark.slow
@pytest.mark.parametrize("rel", REAL_TEXTS)
def test_python_encoder_matches_tiktoken_on_whole_files(gpt2, tiktoken_gpt2, rel):
    text = read_text(rel)
    ids = gpt2.encode(text, allowed_special="all")
    assert ids == tiktoken_gpt2.encode(text, allowed_special="all")
    assert gpt2.decode(ids) == text


EOT = "<|endoftext|>"
# Code points that this Python's Unicode tables assign: for unassigned ones (category Cn) the regex
# engines disagree by Unicode version (`regex` 2026.11 makes U+3D000 a letter; tiktoken's tables do not),
# so GPT-2's pre-tokenization of them is not a fixed function. Assigned code points keep their category.
assigned = st.characters(exclude_categories=("Cs", "Cn"))
whitespace = st.text(alphabet=" \t\n\r\x0b\x0c\u00a0\u2009\u3000", max_size=30)
emoji = st.text(
    alphabet=st.characters(min_codepoint=0x1F300, max_codepoint=0x1FAFF, exclude_categories=("Cn",)),
    max_size=10,
)
pieces = st.one_of(
    st.text(alphabet=assigned, max_size=40),
    whitespace,
    emoji,
    st.just(EOT),
    st.sampled_from(["'s", "'ll", " 123"]),
)
texts = st.lists(pieces, max_size=8).map("".join)
SETTINGS = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@SETTINGS
@given(text=texts)
def test_property_matches_tiktoken_and_round_trips(gpt2, tiktoken_gpt2, text):
    ordinary = gpt2.encode(text)
    assert ordinary == tiktoken_gpt2.encode(text, disallowed_special=())
    assert gpt2.decode(ordinary) == text
    assert 50256 not in ordinary  # not allowed: "<|endoftext|>" is plain text
    special = gpt2.encode(text, allowed_special="all")
    assert special == tiktoken_gpt2.encode(text, allowed_special="all")
    assert gpt2.decode(special) == text
    assert special.count(50256) == text.count(EOT)


@SETTINGS
@given(data=st.binary(max_size=64))
def test_property_decode_is_lossless_on_bytes(gpt2, data):
    text = data.decode("utf-8", errors="replace")
    ids = gpt2.encode(text)
    assert gpt2.decode_bytes(ids) == text.encode("utf-8")
    # token-by-token bytes concatenate to the whole, even where a token ends inside a character
    assert b"".join(gpt2.decode_bytes([i]) for i in ids) == text.encode("utf-8")


@SETTINGS
@given(data=st.binary(min_size=2, max_size=200) | st.text(alphabet="ab =\n", max_size=200).map(str.encode))
def test_property_long_piece_merging_equals_the_rescan(gpt2, data):
    assert bpe._bpe_heap(data, gpt2.ranks) == bpe._bpe_scan(data, gpt2.ranks)


def test_very_long_pieces_match_tiktoken_quickly(gpt2, tiktoken_gpt2):
    import time

    t0 = time.perf_counter()
    for text in (" " * 50_000, "ab" * 20_000, "=-" * 20_000, "\n" * 30_000 + "x", "é" * 20_000):
        assert gpt2.encode(text) == tiktoken_gpt2.encode(text)
    assert time.perf_counter() - t0 < 20  # the O(n^2) rescan would be quadratic in these lengths


def test_partial_utf8_is_replaced_only_at_the_string_boundary(gpt2):
    ids = gpt2.encode("🎉")
    assert len(ids) > 1  # GPT-2 splits this emoji's 4 bytes over several tokens
    assert gpt2.decode(ids[:1]) == "\ufffd"
    assert gpt2.decode_bytes(ids[:1]) + gpt2.decode_bytes(ids[1:]) == "🎉".encode()


def test_decode_rejects_out_of_range_ids(gpt2):
    for bad in ([50257], [0, -1], [10**9]):
        with pytest.raises(UserError, match="out of range"):
            gpt2.decode(bad)


def test_allowed_special_must_be_known(gpt2):
    with pytest.raises(UserError, match="<|im_start|>"):
        gpt2.encode("x", allowed_special={"<|im_start|>"})
    with pytest.raises(UserError, match="'all' or a set"):
        gpt2.encode("x", allowed_special="none")


# --- training


def naive_train(words: Counter[bytes], n_merges: int) -> list[tuple[int, int]]:
    """The textbook algorithm: recount all pairs before each merge; same tie rule (count, smaller ids)."""
    seqs = {w: list(w) for w in words}
    merges = []
    for k in range(n_merges):
        counts: Counter[tuple[int, int]] = Counter()
        for w, seq in seqs.items():
            for p in pairwise(seq):
                counts[p] += words[w]
        if not counts:
            break
        best = min(counts, key=lambda p: (-counts[p], p))
        merges.append(best)
        new = 256 + k
        for w, seq in seqs.items():
            out, i = [], 0
            while i < len(seq):
                if i + 1 < len(seq) and (seq[i], seq[i + 1]) == best:
                    out.append(new)
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            seqs[w] = out
    return merges


def test_incremental_training_equals_naive_recount():
    text = read_text("tinyshakespeare.txt", 40_000)
    trained = bpe.train([text], 256 + 400 + 1, progress=False)
    words = bpe.count_pretokens([text])
    assert trained.merges() == naive_train(words, 400)


def test_tie_breaking_prefers_smaller_ids():
    def merges(docs):
        tok = bpe.train(docs, 256 + 2 + 1, special_tokens=[EOT], progress=False)
        assert tok.special_tokens == {EOT: 258}
        return [tok.token_bytes(a) + tok.token_bytes(b) for a, b in tok.merges()]

    # equal counts: (a, b) has the smaller ids, so it is merged before (c, d), whatever the input order
    assert merges(["cd", "ab", "cd", "ab"]) == [b"ab", b"cd"]
    # a higher count wins over smaller ids
    assert merges(["cd", "ab", "cd", "cd"]) == [b"cd", b"ab"]


def test_training_never_merges_across_special_tokens():
    tok = bpe.train([f"ab{EOT}ab{EOT}ab"] * 200, 256 + 50 + 1, progress=False)
    learned = {tok.token_bytes(i) for i in range(256, tok.vocab_size - 1)}
    assert learned == {b"ab"}  # "<|endoftext|>" is cut out before counting, so nothing of it is learned
    assert tok.encode(f"ab{EOT}", allowed_special="all") == [256, tok.special_tokens[EOT]]


def test_corpus_too_small_for_vocab_is_a_user_error(capsys):
    with pytest.raises(UserError, match="corpus too small for vocab_size 1000: 11 bytes of text"):
        bpe.train(["hello world"], 1000, progress=False)
    with pytest.raises(UserError, match="vocab_size 100"):
        bpe.train(["hello world"], 100, progress=False)
    # A real corpus that runs out of pairs keeps the smaller vocabulary, and says so in one line.
    small = bpe.train(["hello world " * 100], 1000, progress=False)
    assert small.encode("hello world") == [small.ranks[b"hello"], small.ranks[b" world"]]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"the corpus supports only {small.vocab_size} tokens" in err


def test_file_blocks_and_folders_give_the_same_counts(tmp_path):
    text = read_text("tinyshakespeare.txt", 200_000)
    (tmp_path / "a.txt").write_text(text[:100_000], encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text(text[100_000:], encoding="utf-8")
    whole = bpe.count_pretokens([text])
    blocks = list(bpe.iter_corpus(need(DATA / "tinyshakespeare.txt"), block_chars=4096))
    assert len(blocks) > 100
    assert "".join(blocks) == read_text("tinyshakespeare.txt")
    assert bpe.count_pretokens(bpe.iter_corpus(DATA / "tinyshakespeare.txt", block_chars=4096)) == (
        bpe.count_pretokens([read_text("tinyshakespeare.txt")])
    )
    # the folder is cut at 100_000, which need not be a token boundary: only compare totals of bytes
    folder = bpe.count_pretokens(tmp_path)
    assert sum(len(w) * c for w, c in folder.items()) == sum(len(w) * c for w, c in whole.items())


@pytest.fixture(scope="module")
def trained_4k() -> bpe.BPE:
    return bpe.train(need(TINYSTORIES), 4096, special_tokens=[EOT, "<|user|>"], progress=False)


def test_saved_vocab_loads_in_tiktoken_and_encodes_identically(trained_4k, tmp_path):
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    trained_4k.save(tmp_path, "ts4k")
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", "")
    ranks = load_tiktoken_bpe(str(tmp_path / "vocab.tiktoken"))
    assert ranks == trained_4k.ranks
    enc = tiktoken.Encoding("ts4k", pat_str=bpe.GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={})
    loaded, meta = bpe.BPE.load(tmp_path)
    assert meta["name"] == "ts4k" and loaded.special_tokens == {EOT: 4094, "<|user|>": 4095}
    for rel in ("wikitext2/valid.raw.txt", "tokenizer_tests/taylorswift.txt", "tinyshakespeare.txt"):
        text = read_text(rel, 100_000)
        ids = loaded.encode(text)
        assert ids == enc.encode(text, disallowed_special=())
        assert loaded.decode(ids) == text
    assert loaded.encode(f"hi{EOT}<|user|>", allowed_special="all")[-2:] == [4094, 4095]


def test_gpt2_format_round_trip(trained_4k, tmp_path):
    """encoder.json + vocab.bpe: read back by us, and by HF tokenizers' BPE as an independent reader."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    trained_4k.save(tmp_path, "ts4k")
    hf = Tokenizer(models.BPE.from_file(str(tmp_path / "encoder.json"), str(tmp_path / "vocab.bpe")))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    for rel in ("wikitext2/valid.raw.txt", "tokenizer_tests/corpus.en"):
        text = read_text(rel, 50_000)
        assert hf.encode(text).ids == trained_4k.encode(text)
    again = bpe.load_gpt2_files(tmp_path / "encoder.json", tmp_path / "vocab.bpe")
    assert again.ranks == trained_4k.ranks
    assert again.special_tokens == trained_4k.special_tokens
    assert again.merges() == trained_4k.merges()
    assert len((tmp_path / "vocab.bpe").read_text(encoding="utf-8").splitlines()) == 1 + 4096 - 256 - 2


def test_unparseable_vocab_files_are_user_errors(tmp_path, trained_4k):
    trained_4k.save(tmp_path, "ts4k")
    enc, merges = tmp_path / "encoder.json", tmp_path / "vocab.bpe"
    enc.write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        bpe.load_gpt2_files(enc, merges)
    enc.write_text(json.dumps({"a": 0}))
    merges.write_text("#version: 0.2\na b c\n")
    with pytest.raises(UserError, match="expected two space-separated tokens"):
        bpe.load_gpt2_files(enc, merges)
    merges.write_text("#version: 0.2\na b\n")
    with pytest.raises(UserError, match="'b' is not in encoder.json"):
        bpe.load_gpt2_files(enc, merges)
    tik = tmp_path / "vocab.tiktoken"
    tik.write_text(base64.b64encode(b"a").decode() + " 0\nnot-base64!! x\n")
    with pytest.raises(UserError, match=r"vocab.tiktoken:2: expected 'base64token rank'"):
        bpe.BPE.load(tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("vocab_size", [8192, 16384])
def test_compression_within_2_percent_of_hf_tokenizers(vocab_size):
    """Same corpus, vocab size, regex and special token; bytes/token on training and held-out text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    need(TINYSTORIES)
    ours = bpe.train(TINYSTORIES, vocab_size, [EOT], progress=False)
    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train([str(TINYSTORIES)], trainer)
    # at 16384 the slice runs out of pairs (every distinct pre-token becomes one token) for both
    assert abs(ours.vocab_size - hf.get_vocab_size()) <= 0.02 * vocab_size
    fast = ours.tiktoken_encoding("ours")  # encodes as ours does (test_saved_vocab_loads_in_tiktoken...)
    for rel in ("tinystories/TinyStories-train_first2316stories.txt", "wikitext2/valid.raw.txt"):
        lines = read_text(rel).splitlines(
            keepends=True
        )  # the same pieces for both; HF is slow on one huge string
        n_bytes = sum(len(line.encode("utf-8")) for line in lines)
        ours_bpt = n_bytes / sum(map(len, fast.encode_batch(lines, allowed_special="all")))
        hf_ids = [e.ids for e in hf.encode_batch(lines)]
        hf_bpt = n_bytes / sum(map(len, hf_ids))
        assert hf.decode(hf_ids[0], skip_special_tokens=False) == lines[0]  # the reference is set up right
        print(f"vocab {vocab_size} {rel}: ours {ours_bpt:.4f} vs HF {hf_bpt:.4f} bytes/token")
        assert abs(ours_bpt / hf_bpt - 1) < 0.02, (rel, ours_bpt, hf_bpt)
