"""Tokenizer throughput and training time, against tiktoken and Hugging Face tokenizers, in one run.

    python bench/tokenizer.py [--data ../shared/data] [--repeat 5]

Prints a markdown table. Encoding: GPT-2's vocabulary on the TinyStories slice + WikiText-2 +
tinyshakespeare, as one string per file and as a batch of lines. Training: the same corpus, regex,
vocab size and special token for ours and for tokenizers' ByteLevel BPE.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from importlib.metadata import version
from pathlib import Path

from gpt2lab import bpe
from gpt2lab.tokenizer import get_tokenizer

EOT = "<|endoftext|>"
ENCODE_FILES = [
    "tinystories/TinyStories-train_first2316stories.txt",
    "wikitext2/valid.raw.txt",
    "tinyshakespeare.txt",
]
BIG_CORPUS = [
    *ENCODE_FILES,
    "wikitext2/valid.txt",
    "hellaswag/hellaswag_val_full.txt",
    "tokenizer_tests/taylorswift.txt",
    "tokenizer_tests/corpus.en",
]


def chunks(text: str, size: int) -> list[str]:
    """text cut after a newline about every `size` characters (documents for the batch benchmark)."""
    out, start = [], 0
    while start < len(text):
        end = text.find("\n", start + size)
        end = len(text) if end < 0 else end + 1
        out.append(text[start:end])
        start = end
    return out


def best_of(repeat: int, *fns) -> list[float]:
    """Best time of each function over `repeat` rounds, interleaved, so machine drift hits all alike."""
    best = [float("inf")] * len(fns)
    for _ in range(repeat):
        for k, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - t0)
    return best


def tiktoken_reference(gpt2_dir: Path):
    """tiktoken's own Encoding, from tiktoken's own reader of the GPT-2 files (no gpt2lab code)."""
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    os.environ.setdefault("TIKTOKEN_CACHE_DIR", "")
    ranks = data_gym_to_mergeable_bpe_ranks(str(gpt2_dir / "vocab.bpe"), str(gpt2_dir / "encoder.json"))
    return tiktoken.Encoding(
        "gpt2", pat_str=bpe.GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={EOT: 50256}
    )


def hf_train(files: list[Path], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([str(f) for f in files], trainer)
    return tok


def main() -> None:
    default_data = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=default_data)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    data, gpt2_dir = args.data, args.data / "gpt2"

    texts = [(data / f).read_text(encoding="utf-8") for f in ENCODE_FILES]
    docs = [doc for t in texts for doc in chunks(t, 16_000)]
    mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    ref = tiktoken_reference(gpt2_dir)
    fast = get_tokenizer("gpt2", vocab_dir=gpt2_dir, backend="tiktoken")
    # a fresh BPE, so the Python path starts with an empty pre-token cache (its first pass is timed)
    python = bpe.load_gpt2_files(gpt2_dir / "encoder.json", gpt2_dir / "vocab.bpe")
    threads = os.cpu_count() or 1

    rows = []
    (t_py,) = best_of(1, lambda: [python.encode(t) for t in texts])
    t_fast, t_ref = best_of(
        args.repeat,
        lambda: [fast.encode(t) for t in texts],
        lambda: [ref.encode(t, disallowed_special=()) for t in texts],
    )
    assert (
        [python.encode(t) for t in texts]
        == [fast.encode(t) for t in texts]
        == [ref.encode(t, disallowed_special=()) for t in texts]
    )
    rows.append(("encode GPT-2, one string per file", mb, t_py, t_fast, t_ref))
    t_fast_b, t_ref_b = best_of(
        args.repeat,
        lambda: fast.encode_batch(docs),
        lambda: ref.encode_batch(docs, num_threads=threads, disallowed_special=()),
    )
    rows.append(
        (f"encode_batch GPT-2, {len(docs)} docs of ~16 kB, {threads} threads", mb, None, t_fast_b, t_ref_b)
    )

    print(
        f"machine: {platform.machine()}, {threads} CPUs, Python {platform.python_version()}, "
        f"tiktoken {version('tiktoken')}, tokenizers {version('tokenizers')}"
    )
    print(f"encode corpus: {', '.join(ENCODE_FILES)} ({mb:.2f} MB)\n")
    print("| encode | our Python path MB/s | our fast path MB/s | tiktoken MB/s | fast / tiktoken |")
    print("|---|---:|---:|---:|---:|")
    for name, size, tp, tf, tr in rows:
        py = f"{size / tp:.2f}" if tp else "-"
        print(f"| {name} | {py} | {size / tf:.1f} | {size / tr:.1f} | {tr / tf:.2f}x |")

    print(
        "\n| train (same corpus, regex, vocab size, EOT special token) | corpus MB | vocab asked "
        "| ours: vocab, s | HF tokenizers: vocab, s | ours / HF time |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    tinystories = [data / ENCODE_FILES[0]]
    big = [data / f for f in BIG_CORPUS]
    for label, files, vocab in (
        ("TinyStories slice", tinystories, 16384),
        ("TinyStories slice", tinystories, 8192),
        ("all shared texts", big, 16384),
    ):
        size = sum(f.stat().st_size for f in files) / 1e6
        t0 = time.perf_counter()
        ours = bpe.train([f.read_text(encoding="utf-8") for f in files], vocab, [EOT], progress=False)
        t_ours = time.perf_counter() - t0
        t0 = time.perf_counter()
        hf = hf_train(files, vocab)
        t_hf = time.perf_counter() - t0
        print(
            f"| {label} | {size:.1f} | {vocab} | {ours.vocab_size}, {t_ours:.2f} s | {hf.get_vocab_size()}, "
            f"{t_hf:.2f} s | {t_ours / t_hf:.1f}x |"
        )


if __name__ == "__main__":
    main()
