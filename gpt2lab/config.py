"""Typed configuration: the GPT-2 architecture (GPTConfig) and its named presets."""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, fields
from typing import Any, Literal

from gpt2lab.errors import UserError


def closest(name: str, choices: list[str]) -> str:
    """' (did you mean X?)' for the choice nearest to `name`, or '' when nothing is near."""
    match = difflib.get_close_matches(name, choices, n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


@dataclass
class GPTConfig:
    """A GPT-2-family architecture. Defaults are GPT-2 124M (OpenAI, 2019)."""

    block_size: int = 1024  # context length T
    vocab_size: int = 50257  # rows of wte / lm_head; may exceed the tokenizer's vocab (padding)
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    n_inner: int | None = None  # MLP hidden size; None means 4 * n_embd, as GPT-2
    dropout: float = 0.0  # embeddings, attention weights and residual branches
    bias: bool = True  # biases in Linear and LayerNorm layers; GPT-2 has them
    tie_weights: bool = True  # lm_head shares wte's matrix, as GPT-2
    pos_embedding: Literal["learned", "sinusoidal"] = "learned"
    norm_position: Literal["pre", "post"] = "pre"  # pre-LN (GPT-2) or post-LN (Vaswani et al. 2017)
    attn_impl: Literal["sdpa", "explicit"] = "sdpa"  # fused kernel, or softmax(QK^T/sqrt(d))V spelled out
    layer_norm_epsilon: float = 1e-5  # GPT-2's value
    init_std: float = 0.02  # GPT-2: weights ~ N(0, 0.02)

    def __post_init__(self) -> None:
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise UserError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.n_inner is not None and (
            not isinstance(self.n_inner, int) or isinstance(self.n_inner, bool) or self.n_inner <= 0
        ):
            raise UserError(f"GPTConfig.n_inner must be a positive integer or None, got {self.n_inner!r}")
        if self.n_embd % self.n_head != 0:
            raise UserError(f"GPTConfig.n_embd {self.n_embd} is not divisible by n_head {self.n_head}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise UserError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout!r}")
        for name in ("layer_norm_epsilon", "init_std"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not value > 0:
                raise UserError(f"GPTConfig.{name} must be a positive number, got {value!r}")
        for name in ("bias", "tie_weights"):
            if not isinstance(getattr(self, name), bool):
                raise UserError(f"GPTConfig.{name} must be true or false, got {getattr(self, name)!r}")
        for name, allowed in (
            ("pos_embedding", ("learned", "sinusoidal")),
            ("norm_position", ("pre", "post")),
            ("attn_impl", ("sdpa", "explicit")),
        ):
            if getattr(self, name) not in allowed:
                raise UserError(f"GPTConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.pos_embedding == "sinusoidal" and self.n_embd % 2 != 0:
            raise UserError(f"GPTConfig.n_embd {self.n_embd} must be even for sinusoidal positions")

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @property
    def mlp_size(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> GPTConfig:
        """A named architecture (see PRESETS), with any field overridden: preset("gpt2", dropout=0.1)."""
        if name not in PRESETS:
            raise UserError(
                f"unknown model preset {name!r}{closest(name, list(PRESETS))}; known: {list(PRESETS)}"
            )
        return cls.from_dict({**PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GPTConfig:
        """Build from a plain dict (a recipe table or config.json), rejecting unknown keys by name."""
        known = [f.name for f in fields(cls)]
        for key in d:
            if key not in known:
                raise UserError(f"unknown GPTConfig field {key!r}{closest(key, known)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


PRESETS: dict[str, dict[str, Any]] = {
    # OpenAI's four GPT-2 sizes (Radford et al. 2019, Table 2; shapes from their released checkpoints).
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),
    # Seed report "tinytiny": WikiText-103, 26.40M parameters without position embeddings.
    # Vocab 50257 padded to 50304 = 64 * 786 so the embedding matmuls hit fast kernel shapes.
    "tinytiny": dict(
        n_layer=4, n_head=4, n_embd=384, block_size=256, bias=False, vocab_size=50304, dropout=0.0
    ),
    # Seed report on TinyStories: the original Transformer's choices (sinusoidal positions,
    # post-LayerNorm, dropout 0.1) at 6 layers x 512 wide with a 2048-wide MLP.
    "ts-6l512": dict(
        n_layer=6,
        n_head=8,
        n_embd=512,
        n_inner=2048,
        block_size=256,
        pos_embedding="sinusoidal",
        norm_position="post",
        dropout=0.1,
        tie_weights=True,
    ),
    # CPU quick start on tinyshakespeare characters (65 distinct), trains in minutes.
    "char-tiny": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=65, dropout=0.0),
}


def pad_vocab_size(vocab_size: int, multiple: int = 64) -> int:
    """Round vocab_size up to a multiple (50257 -> 50304): matmuls with such shapes run faster on GPUs."""
    return -(-vocab_size // multiple) * multiple


@dataclass
class SampleConfig:
    """`gpt2lab sample`: the model to load, the prompt, and how to sample (see generate.py)."""

    ckpt: str | None = None  # a gpt2lab checkpoint directory
    pretrained: str | None = None  # a Hugging Face GPT-2 directory, or a hub name (gpt2, ...)
    prompt: str | None = None  # neither prompt nor prompt_file: interactive, one prompt per stdin line
    prompt_file: str | None = None
    num_samples: int = 1
    max_new_tokens: int = 200
    temperature: float = 1.0  # 0 = greedy
    top_k: int | None = None
    top_p: float | None = None  # nucleus sampling, in (0, 1]
    repetition_penalty: float = 1.0  # 1 = off
    frequency_penalty: float = 0.0  # 0 = off
    stop: str | None = None  # stop at this text (not shown)
    seed: int | None = None
    stream: bool = False  # print text as it is generated
    gpt2_vocab: str | None = None  # directory with GPT-2's encoder.json + vocab.bpe
    device: str = "auto"  # auto = cuda when available, else cpu
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    compile: bool = False  # CUDA: decode through a captured CUDA graph
