"""Shared test helpers: the real data in ../shared/data, and small random models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gpt2lab import GPT, GPTConfig

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Tests never read or write the user's ~/.cache/gpt2lab (subprocesses inherit this too)."""
    patch = pytest.MonkeyPatch()
    patch.setenv("GPT2LAB_CACHE", str(tmp_path_factory.mktemp("gpt2lab-cache")))
    yield
    patch.undo()


@pytest.fixture
def shared_data() -> Path:
    """../shared/data (see its SOURCES.md); tests that need it skip on a clone without it."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared test data not found at {SHARED_DATA}")
    return SHARED_DATA


# Every speedrun option of GPTConfig at once but zero_init (zero projections would hide whether attention
# and the MLP compute anything; tests that train add it).
SPEEDRUN_OPTIONS = dict(
    pos_embedding="rope", qk_norm=True, activation="relu2", tie_weights=False, bias=False, logit_softcap=15.0
)


def shakespeare_text(chars: int, fallback_words: int) -> str:
    """The first `chars` characters of ../shared/data's tinyshakespeare, or without it a made-up text
    of `fallback_words` words."""
    path = SHARED_DATA / "tinyshakespeare.txt"
    if path.exists():
        return path.read_text()[:chars]
    return " ".join(f"w{i % 89}" for i in range(fallback_words))


def small_config(**overrides) -> GPTConfig:
    """A GPT-2-shaped model small enough to run anything on CPU in milliseconds."""
    fields = dict(n_layer=2, n_head=4, n_embd=64, block_size=32, vocab_size=101)
    return GPTConfig(**{**fields, **overrides})


def randomized(model: GPT, seed: int = 0) -> GPT:
    """The model with every parameter, biases and LayerNorms included, set to random values.

    GPT-2's initialisation leaves biases at 0 and LayerNorms at 1, which would let a converter
    that drops or transposes them pass unnoticed; random values make every tensor count.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if ".ln_" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)  # LayerNorm gains around 1
            else:
                p.copy_((0.02 if p.dim() == 2 else 0.1) * noise)
    return model.eval()


def tiktoken_gpt2(gpt2: Path):
    """tiktoken's GPT-2 Encoding, built by tiktoken's own reader of encoder.json + vocab.bpe (not ours)."""
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    ranks = data_gym_to_mergeable_bpe_ranks(str(gpt2 / "vocab.bpe"), str(gpt2 / "encoder.json"))
    return tiktoken.Encoding(
        "gpt2-reference",
        pat_str=r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": 50256},
    )


@pytest.fixture(scope="session")
def tiktoken_reference():
    """tiktoken_gpt2 on ../shared/data/gpt2."""
    gpt2 = SHARED_DATA / "gpt2"
    if not gpt2.is_dir():
        pytest.skip(f"GPT-2 vocabulary files not found at {gpt2}")
    return tiktoken_gpt2(gpt2)
