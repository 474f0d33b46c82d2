"""Typed configuration: the GPT-2 architecture (GPTConfig) and its named presets."""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import sys
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar, Literal

from gpt2lab.errors import UserError, quote

FLOAT32_MAX = 3.4028234663852886e38  # weights, gradients and learning rates become float32 tensors


def closest(name: str, choices: list[str]) -> str:
    """' (did you mean X?)' for the choice nearest to `name`, or '' when nothing is near."""
    match = difflib.get_close_matches(name, choices, n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one, else all)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def physical_memory() -> int | None:
    """Bytes of RAM on this machine, or None where the OS does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def is_count(v: Any) -> bool:
    """Whether v is a non-negative integer (not a bool, not a float that looks like one)."""
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _type_error(hint: Any, value: Any) -> str | None:
    """Why `value` is not of the type `hint` (int, float, str, bool, a Literal, X | None, dict), or None."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if isinstance(hint, types.UnionType) or origin is typing.Union:
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _type_error(inner[0], value) if len(inner) == 1 else None
    if origin is Literal:
        return None if value in args else f"one of {args}"
    if hint is bool:
        return None if isinstance(value, bool) else "true or false"
    if hint is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "an integer"
    if hint is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return "a number"
        # NaN or inf would pass every range check (all comparisons with NaN are false) and poison the run
        if not math.isfinite(value):
            return "a finite number"
        return None if abs(value) <= FLOAT32_MAX else "a finite number within float32's range (3.4e38)"
    if hint is str:
        return None if isinstance(value, str) else "text"
    if origin is dict or hint is dict:
        return None if isinstance(value, dict) else "a table of fields"
    return None


def check_fields(config: Any) -> None:
    """UserError for the first field of a config dataclass whose value is not of its declared type.

    The one check behind every config (flags, recipes, config.json files): ints are ints (not 1e8
    nor "12"), floats are finite numbers within float32's range, Literals one of their choices. The
    range checks in each __post_init__ run after it, on values of the right type.
    """
    hints = typing.get_type_hints(type(config))
    name = type(config).__name__
    for f in fields(config):
        why = _type_error(hints[f.name], getattr(config, f.name))
        if why is not None:
            raise UserError(f"{name}.{f.name} must be {why}, got {quote(getattr(config, f.name))}")


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
    pos_embedding: Literal["learned", "sinusoidal", "rope"] = "learned"  # rope: rotary, in attention
    norm_position: Literal["pre", "post"] = "pre"  # pre-LN (GPT-2) or post-LN (Vaswani et al. 2017)
    attn_impl: Literal["sdpa", "explicit"] = "sdpa"  # fused kernel, or softmax(QK^T/sqrt(d))V spelled out
    activation: Literal["gelu_tanh", "gelu", "relu2"] = "gelu_tanh"  # GPT-2's tanh GELU, erf GELU, relu(x)^2
    layer_norm_epsilon: float = 1e-5  # GPT-2's value
    init_std: float = 0.02  # GPT-2: weights ~ N(0, 0.02)
    # Speedrun options (model.py's docstring; off by default, so the model is GPT-2):
    rope_base: float = 10000.0  # rotary positions: the base of the wavelengths (Su et al. 2021)
    qk_norm: bool = False  # RMS-normalise each head's queries and keys before attention
    zero_init: bool = False  # attn/mlp output projections (and an untied lm_head) start at zero
    logit_softcap: float = 0.0  # > 0: logits = cap * tanh(logits / cap) (Gemma 2); 0 = off

    def __post_init__(self) -> None:
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise UserError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        for name, limit in LIMITS.items():  # before anything is allocated: a config file can ask for anything
            value = getattr(self, name)
            if value is not None and value > limit:
                raise UserError(f"GPTConfig.{name} {value} is beyond gpt2lab's limit of {limit:,}")
        if self.n_inner is not None and (
            not isinstance(self.n_inner, int) or isinstance(self.n_inner, bool) or self.n_inner <= 0
        ):
            raise UserError(f"GPTConfig.n_inner must be a positive integer or None, got {self.n_inner!r}")
        if self.n_embd % self.n_head != 0:
            raise UserError(f"GPTConfig.n_embd {self.n_embd} is not divisible by n_head {self.n_head}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise UserError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout!r}")
        for name in ("layer_norm_epsilon", "init_std", "rope_base"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not value > 0:
                raise UserError(f"GPTConfig.{name} must be a positive number, got {value!r}")
        if not isinstance(self.logit_softcap, (int, float)) or self.logit_softcap < 0:
            raise UserError(f"GPTConfig.logit_softcap must be >= 0 (0 = off), got {self.logit_softcap!r}")
        for name in ("bias", "tie_weights", "qk_norm", "zero_init"):
            if not isinstance(getattr(self, name), bool):
                raise UserError(f"GPTConfig.{name} must be true or false, got {getattr(self, name)!r}")
        for name, allowed in (
            ("pos_embedding", ("learned", "sinusoidal", "rope")),
            ("norm_position", ("pre", "post")),
            ("attn_impl", ("sdpa", "explicit")),
            ("activation", ("gelu_tanh", "gelu", "relu2")),
        ):
            if getattr(self, name) not in allowed:
                raise UserError(f"GPTConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.pos_embedding == "sinusoidal" and self.n_embd % 2 != 0:
            raise UserError(f"GPTConfig.n_embd {self.n_embd} must be even for sinusoidal positions")
        if self.pos_embedding == "rope" and self.head_size % 2 != 0:
            raise UserError(f"GPTConfig head size {self.head_size} (n_embd / n_head) must be even for rope")
        check_fields(self)  # what the checks above leave: floats that are inf

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


# Sizes no GPT-2-family model comes near (GPT-3 175B: 96 layers, 12288 wide, context 2048), as bounds
# a config must stay within; memory is checked too, when a model is built (ladder.build_model).
LIMITS = {
    "block_size": 1 << 20,
    "vocab_size": 1 << 31,  # shards hold uint32 token ids
    "n_layer": 1024,
    "n_head": 1 << 14,
    "n_embd": 1 << 17,
    "n_inner": 1 << 19,
}


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


# --- the model ladder (ladder.py): the families below GPT, each with its own config -------------------
# A checkpoint's config.json records the family in its "model" dict; absent means "gpt", so every GPT
# checkpoint written before the ladder existed still reads as one.


class LadderConfig:
    """What the ladder's configs share: a family name, from_dict / to_dict, positive-integer checks."""

    family: ClassVar[str]
    vocab_size: int
    block_size: int

    def check_positive(self, *names: str) -> None:
        for name in names:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise UserError(f"{type(self).__name__}.{name} must be a positive integer, got {value!r}")

    def default_eot(self) -> None:
        """eot_id None -> the last id (where char and byte vocabularies keep <|endoftext|>); then check it."""
        if self.eot_id is None:
            self.eot_id = self.vocab_size - 1
        if not isinstance(self.eot_id, int) or not 0 <= self.eot_id < self.vocab_size:
            raise UserError(f"{type(self).__name__}.eot_id must be in [0, vocab_size), got {self.eot_id!r}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Any:
        known = [f.name for f in fields(cls)]
        for key in d:
            if key not in known:
                raise UserError(f"unknown {cls.__name__} field {key!r}{closest(key, known)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return {"family": self.family, **dataclasses.asdict(self)}


@dataclass
class BigramConfig(LadderConfig):
    """The bigram (makemore part 1): the next token's logits are one row of a (V, V) matrix, W[token].

    fit "counts": W = log((N + smoothing) / row sums), N the train split's bigram counts, gathered in
    one pass without a gradient. fit "gradient": W trains like any network (the neural bigram), from
    zeros (uniform), and converges to the counting model.
    """

    family: ClassVar[str] = "bigram"
    vocab_size: int = 27
    block_size: int = 16  # the window the loader and the sampler use; each prediction sees one token
    fit: Literal["counts", "gradient"] = "gradient"
    smoothing: float = 1.0  # add-k for fit "counts": the lecture's N + 1

    def __post_init__(self) -> None:
        check_fields(self)
        self.check_positive("vocab_size", "block_size")
        if self.fit not in ("counts", "gradient"):
            raise UserError(f"BigramConfig.fit must be 'counts' or 'gradient', got {self.fit!r}")
        k = self.smoothing
        if isinstance(k, bool) or not isinstance(k, (int, float)) or not k >= 0:
            raise UserError(f"BigramConfig.smoothing must be a number >= 0, got {self.smoothing!r}")


@dataclass
class MLPConfig(LadderConfig):
    """Bengio et al. 2003 as makemore part 2 builds it: the embeddings of the last `context` tokens,
    concatenated, one tanh hidden layer, then the logits. Defaults: the lecture's 3 x 10 -> 200."""

    family: ClassVar[str] = "mlp"
    vocab_size: int = 27
    block_size: int = 16  # the window; each position sees the last `context` tokens of it
    context: int = 3
    n_embd: int = 10
    n_hidden: int = 200
    eot_id: int | None = None  # positions before a window's start read as this token (default: the last id)

    def __post_init__(self) -> None:
        check_fields(self)
        self.check_positive("vocab_size", "block_size", "context", "n_embd", "n_hidden")
        self.default_eot()


@dataclass
class WaveNetConfig(LadderConfig):
    """The hierarchical MLP of makemore part 5 (after van den Oord et al. 2016): the last 2 ** n_layer
    tokens fused in pairs, layer by layer. Defaults: the lecture's 76,579-parameter net (8 tokens)."""

    family: ClassVar[str] = "wavenet"
    vocab_size: int = 27
    block_size: int = 16
    n_layer: int = 3  # context = 2 ** n_layer tokens
    n_embd: int = 24
    n_hidden: int = 128
    eot_id: int | None = None  # positions before a window's start read as this token (default: the last id)

    def __post_init__(self) -> None:
        check_fields(self)
        self.check_positive("vocab_size", "block_size", "n_layer", "n_embd", "n_hidden")
        self.default_eot()

    @property
    def context(self) -> int:
        return 2**self.n_layer


LADDER = {c.family: c for c in (BigramConfig, MLPConfig, WaveNetConfig)}
FAMILIES = ["gpt", *LADDER]  # the rungs, lowest last: gpt, bigram, mlp, wavenet
ModelConfig = GPTConfig | BigramConfig | MLPConfig | WaveNetConfig


def family_config_class(family: Any) -> type:
    """The config dataclass of a family name ("gpt" -> GPTConfig)."""
    if family == "gpt":
        return GPTConfig
    if family not in LADDER:
        raise UserError(f"unknown model family {family!r}{closest(str(family), FAMILIES)}; known: {FAMILIES}")
    return LADDER[family]


def model_config_from_dict(d: dict[str, Any], preset: str | None = None) -> ModelConfig:
    """The architecture a "model" dict describes (a recipe's [model], config.json's "model"): its
    "family" (absent: "gpt") and that family's fields. A GPT starts from `preset` when one is given;
    presets are GPT-2 shapes, so the other families ignore it."""
    fields_ = dict(d)
    cls = family_config_class(fields_.pop("family", "gpt"))
    if cls is GPTConfig and preset is not None:
        return GPTConfig.preset(preset, **fields_)
    return cls.from_dict(fields_)


def pad_vocab_size(vocab_size: int, multiple: int = 64) -> int:
    """Round vocab_size up to a multiple (50257 -> 50304): matmuls with such shapes run faster on GPUs."""
    return -(-vocab_size // multiple) * multiple


@dataclass
class PrepareConfig:
    """`gpt2lab prepare`: a corpus -> token shards (see shards.py)."""

    source: str = ""  # a named dataset (tinystories, wikitext103, fineweb-edu, shakespeare) or a path
    out: str = ""  # output directory
    tokenizer: str = "gpt2"  # gpt2, char, bytes, or a tokenizer directory
    gpt2_vocab: str | None = None  # directory with GPT-2's encoder.json + vocab.bpe (else the cache)
    separator: str | None = None  # split .txt files into documents at this text ("eot", "blank-line", "line")
    text_field: str = "text"  # field of .jsonl records / column of .parquet files
    val_fraction: float | None = None  # val = the last fraction of the text (default 0.1)
    val_docs: int | None = None  # val = the first N documents (instead of val_fraction)
    shard_tokens: int = 100_000_000  # tokens per shard file (build-nanogpt: 1e8)
    max_tokens: int | None = None  # stop the train split after this many tokens
    workers: int = 1  # tokenizer processes
    name: str | None = None  # shard file prefix (default: the source's name)
    split: str | None = None  # "TRAIN/VAL[/TEST]" % of whole documents, shuffled (--separator line: 80/10/10)
    split_seed: int = 42  # the shuffle of --split: random.Random(42), the makemore lectures' random.seed(42)
    revision: str | None = None  # Hugging Face commit of a named dataset (default: the pinned one)

    def __post_init__(self) -> None:
        check_fields(self)
        if self.val_fraction is not None and self.val_docs is not None:
            raise UserError("give --val-fraction or --val-docs, not both")
        if self.split is not None and (self.val_fraction is not None or self.val_docs is not None):
            raise UserError("give --split or --val-fraction / --val-docs, not both")
        if self.val_fraction is not None and not 0 < self.val_fraction < 1:
            raise UserError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        for name in ("val_docs", "max_tokens"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise UserError(f"{name} must be positive, got {value}")
        if self.shard_tokens <= 0 or self.workers <= 0:
            raise UserError(
                f"shard_tokens and workers must be positive, got {self.shard_tokens}, {self.workers}"
            )
        if self.workers > usable_cpus():  # each worker is a process holding a tokenizer: more only contend
            raise UserError(f"workers {self.workers} exceeds the {usable_cpus()} CPUs this process may use")
        aliases = {"eot": "<|endoftext|>", "blank-line": "\n\n", "line": "\n"}
        if self.separator is not None:
            sep = aliases.get(self.separator, self.separator)
            self.separator = sep.replace("\\n", "\n").replace("\\t", "\t").replace("\\r", "\r")
            if not self.separator:
                raise UserError("separator must not be empty")
        if self.separator == "\n" and self.split is None and self.val_fraction is self.val_docs is None:
            self.split = "80/10/10"  # one document a line (names.txt): the makemore lectures' split
        if self.split is not None:
            self.split_fractions()  # fails early on a malformed --split

    def split_fractions(self) -> tuple[float, float]:
        """The cumulative fractions (end of train, end of val) of the shuffled documents: "80/10/10" ->
        (0.8, 0.9); the rest is test. Computed as the lectures do: n1 = int(0.8 * n), n2 = int(0.9 * n)."""
        parts = str(self.split).split("/")
        try:
            numbers = [float(p) for p in parts]
        except ValueError:
            numbers = []
        if len(parts) not in (2, 3) or len(numbers) != len(parts) or min(numbers, default=-1) < 0:
            raise UserError(f"--split must be TRAIN/VAL[/TEST] percentages like 80/10/10, got {self.split!r}")
        if numbers[0] <= 0 or numbers[1] <= 0:
            raise UserError(f"--split {self.split!r}: train and val must both be > 0")
        total = sum(numbers)
        return numbers[0] / total, (numbers[0] + numbers[1]) / total


@dataclass
class TrainConfig:
    """`gpt2lab train`: everything about a run except the architecture (GPTConfig, under `model`).

    Batch geometry: each process runs micro-batches of batch_size x seq_len tokens; an optimizer
    step sums grad_accum = total_batch_size / (batch_size * seq_len * world_size) of them.
    """

    data: str = ""  # a prepared data directory (gpt2lab prepare), or a fine-tuning .jsonl (see sft.py)
    out_dir: str = "out"  # checkpoints, metrics.jsonl, loss.png
    preset: str = "gpt2"  # the model preset; fields in `model` override it
    init_from: str = "scratch"  # "scratch", a gpt2lab checkpoint / run directory, or a HF GPT-2 dir / name
    method: Literal["full", "lora"] = "full"  # train every weight, or LoRA adapters on a frozen model
    lora_rank: int = 8
    lora_alpha: float = 16.0  # the adapter's update is scaled by lora_alpha / lora_rank
    lora_dropout: float = 0.0
    lora_targets: str = "c_attn"  # layer names, comma-separated: c_attn, c_proj, c_fc, attn.c_proj, ...
    merge: bool = False  # LoRA: also write out_dir/merged, a plain checkpoint with the adapter folded in
    val_data: str | None = None  # .jsonl data: a separate validation file
    val_fraction: float = 0.0  # .jsonl data without val_data: hold out this fraction of the examples
    seed: int = 1337
    max_steps: int = 5000
    # A time budget: seconds of training (its evaluations, checkpoints and a compile included; not start-up
    # nor the final evaluation). The run ends at max_time or max_steps, whichever comes first, and the
    # learning rate schedule is as far along as either says, so a budget ends with its decay done.
    max_time: float | None = None
    batch_size: int = 12  # micro-batch per process
    seq_len: int | None = None  # default: the model's block_size
    total_batch_size: int | None = None  # tokens per optimizer step; default: one micro-batch per process
    learning_rate: float = 6e-4
    min_lr: float | None = None  # default: learning_rate / 10
    lr_schedule: Literal["cosine", "constant", "wsd"] = "cosine"
    warmup_steps: int = 0
    lr_decay_steps: int | None = None  # cosine reaches min_lr here; default max_steps
    wsd_decay_fraction: float = 0.2  # warmup-stable-decay: the last fraction of steps decays linearly
    weight_decay: float = 0.1  # on 2-D weights only
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    optimizer: Literal["adamw", "muon"] = "adamw"  # muon: Muon for the blocks' matrices, AdamW for the rest
    muon_lr: float = 0.02  # Muon's peak learning rate (the schedule scales it as learning_rate)
    muon_momentum: float = 0.95  # Muon's Nesterov momentum (modded-nanogpt)
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping (the norm is still logged)
    loader_mode: Literal["random", "sequential"] = "random"
    # "stream": windows of consecutive tokens anywhere in the split, across documents (GPT-2's way);
    # "document": each row holds one document (a long one cut into rows), padded: a token sees only its
    # own document, as the makemore lectures build their examples (see docs/ladder.md).
    windows: Literal["stream", "document"] = "stream"
    pad_vocab_multiple: int = 64  # the model's vocab_size = data vocab rounded up to this (1: no padding)
    eval_interval: int = 250  # steps between val-loss evaluations (0: only at the end)
    eval_tokens: int = 204_800  # val tokens per evaluation (0: the whole split)
    hellaswag_interval: int = 0  # steps between HellaSwag evaluations (0: never)
    hellaswag_limit: int = 0  # examples per HellaSwag evaluation (0: all)
    hellaswag_data: str | None = None  # HellaSwag jsonl (default: downloaded into the cache)
    sample_interval: int = 0  # steps between printed samples (0: only at the end when > 0 tokens)
    sample_tokens: int = 0  # tokens per sample
    sample_prompt: str = ""
    log_interval: int = 10
    checkpoint_interval: int = 1000  # steps between checkpoints (always one at the end)
    keep_last: int = 2  # step checkpoints kept, besides the best one
    early_stopping_patience: int = 0  # stop after this many evals without a better val loss (0: off)
    on_nonfinite: Literal["stop", "skip"] = "stop"  # a NaN/inf loss or gradient: stop, or skip the batch
    max_skips: int = 3  # with on_nonfinite = "skip": stop after this many skipped batches
    device: str = "auto"  # auto, cpu, cuda, cuda:1, mps
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # autocast dtype; auto: bf16 on CUDA
    compile: bool = False  # torch.compile the model (CUDA)
    fsdp: bool = False  # shard parameters, gradients and optimizer state with FSDP2 instead of DDP
    peak_flops: float | None = None  # hardware peak FLOP/s for MFU; default: known GPUs' bf16 peak
    tensorboard: bool = False
    wandb: bool = False
    wandb_project: str = "gpt2lab"
    resume: str | None = None  # "latest" (the newest checkpoint in out_dir) or a checkpoint directory
    overwrite: bool = False  # start over in an out_dir that holds a run, deleting that run's files first
    threads: int | None = None  # torch's CPU threads (default: torch's choice, one per core)
    model: dict[str, Any] = dataclasses.field(default_factory=dict)  # GPTConfig field overrides

    def __post_init__(self) -> None:
        check_fields(self)
        for name in ("max_steps", "batch_size", "log_interval", "checkpoint_interval", "pad_vocab_multiple"):
            if getattr(self, name) <= 0:
                raise UserError(f"{name} must be positive, got {getattr(self, name)}")
        counts = ("warmup_steps", "eval_interval", "eval_tokens", "keep_last", "early_stopping_patience")
        counts += ("hellaswag_interval", "hellaswag_limit", "sample_interval", "sample_tokens", "max_skips")
        for name in counts:
            if getattr(self, name) < 0:
                raise UserError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.learning_rate <= 0 or (self.min_lr is not None and self.min_lr < 0):
            raise UserError(
                f"learning_rate must be > 0 and min_lr >= 0, got {self.learning_rate}, {self.min_lr}"
            )
        if self.grad_clip < 0 or self.weight_decay < 0:
            raise UserError(
                f"grad_clip and weight_decay must be >= 0, got {self.grad_clip}, {self.weight_decay}"
            )
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1 and self.eps > 0):
            raise UserError(
                f"beta1 and beta2 must be in [0, 1) and eps > 0, got {self.beta1}, {self.beta2}, {self.eps}"
            )
        if self.muon_lr <= 0 or not 0 <= self.muon_momentum < 1:
            raise UserError(
                f"muon_lr must be > 0 and muon_momentum in [0, 1), got {self.muon_lr}, {self.muon_momentum}"
            )
        if self.max_time is not None and not self.max_time > 0:
            raise UserError(f"max_time must be a positive number of seconds, got {self.max_time}")
        if not 0 <= self.wsd_decay_fraction <= 1:
            raise UserError(f"wsd_decay_fraction must be in [0, 1], got {self.wsd_decay_fraction}")
        if self.lora_rank <= 0 or self.lora_alpha <= 0 or not 0 <= self.lora_dropout < 1:
            raise UserError(
                f"lora_rank and lora_alpha must be positive and lora_dropout in [0, 1), got "
                f"{self.lora_rank}, {self.lora_alpha}, {self.lora_dropout}"
            )
        if self.method == "lora" and self.fsdp:
            # FSDP2 turns parameters into sharded DTensors: the frozen/trainable split per tensor and the
            # template-row gradient hook (lora.train_token_rows) are not carried over. Adapters are small.
            raise UserError("--method lora does not run under --fsdp yet; use DDP (torchrun's default)")
        if not 0 <= self.val_fraction < 1:
            raise UserError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.threads is not None and self.threads < 1:
            raise UserError(f"threads must be >= 1, got {self.threads}")
        if self.resume and self.overwrite:
            raise UserError("--resume continues the run in out_dir and --overwrite deletes it: give one")
        for name, allowed in (
            ("method", ("full", "lora")),
            ("optimizer", ("adamw", "muon")),
            ("lr_schedule", ("cosine", "constant", "wsd")),
            ("loader_mode", ("random", "sequential")),
            ("windows", ("stream", "document")),
            ("on_nonfinite", ("stop", "skip")),
            ("dtype", ("auto", "float32", "bfloat16", "float16")),
        ):
            if getattr(self, name) not in allowed:
                raise UserError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        model = model_config_from_dict(self.model, self.preset)  # fails early on a bad preset or field
        if not isinstance(model, GPTConfig):
            if self.method == "lora" or self.fsdp:
                raise UserError(f"--method lora and --fsdp need a GPT; this model is family {model.family!r}")
            if getattr(model, "fit", None) == "counts" and self.max_steps != 1:
                raise UserError(
                    "the counting bigram is fitted in one step (one pass of counts over the train split, "
                    f"no gradient): max_steps must be 1, got {self.max_steps}"
                )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_recipe(name_or_path: str) -> dict[str, Any]:
    """A recipe's fields: recipes/NAME.toml or a .toml path, tables [train] and [model], checked by name."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # Python 3.10
        import tomli as tomllib

    path = Path(name_or_path)
    if not path.suffix:
        path = RECIPES_DIR / f"{name_or_path}.toml"
        if not path.is_file():
            known = sorted(p.stem for p in RECIPES_DIR.glob("*.toml"))
            raise UserError(f"unknown recipe {name_or_path!r}{closest(name_or_path, known)}; known: {known}")
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"recipe file {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"recipe {path} is not valid TOML: {e}") from None
    for key in table:
        if key not in ("train", "model"):
            raise UserError(f"recipe {path}: unknown table [{key}]; a recipe has [train] and [model]")
    train, model = dict(table.get("train", {})), dict(table.get("model", {}))
    known_train = [f.name for f in fields(TrainConfig) if f.name != "model"]
    for key in train:
        if key not in known_train:
            raise UserError(f"recipe {path}: unknown [train] key {key!r}{closest(key, known_train)}")
    known_model = ["family", *(f.name for f in fields(family_config_class(model.get("family", "gpt"))))]
    for key in model:
        if key not in known_model:
            raise UserError(f"recipe {path}: unknown [model] key {key!r}{closest(key, known_model)}")
    return {**train, "model": model}


RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"  # recipes/ in the repository


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
    quantize: Literal["none", "int8"] = "none"  # CPU: int8 weights for the Linear layers (faster decode)

    def __post_init__(self) -> None:
        check_fields(self)


def finetune_defaults(method: str) -> dict[str, Any]:
    """`gpt2lab finetune`'s TrainConfig defaults: a short run at a low learning rate, with a val split.

    Learning rates: full fine-tuning moves pretrained weights, so 5e-5 (the order of GPT-2 / BERT
    fine-tuning); LoRA's adapters start at zero and need more, 5e-4 (the LoRA paper used 2e-4 to 1e-3).
    """
    return dict(
        max_steps=300,
        learning_rate=5e-4 if method == "lora" else 5e-5,
        warmup_steps=20,
        batch_size=8,
        weight_decay=0.0,
        eval_interval=50,
        checkpoint_interval=100,
        val_fraction=0.05,
        out_dir="out/finetune",
    )


@dataclass
class ChatConfig:
    """`gpt2lab chat`: a fine-tuned model (optionally a LoRA adapter on a base) and how to sample."""

    ckpt: str | None = None  # a gpt2lab checkpoint or run directory
    pretrained: str | None = None  # or a Hugging Face GPT-2 directory / hub name (with --adapter)
    adapter: str | None = None  # a LoRA adapter directory (finetune --method lora writes out_dir/adapter)
    system: str | None = None  # a system message that starts every conversation
    max_new_tokens: int = 256
    temperature: float = 0.7  # 0 = greedy
    top_k: int | None = None
    top_p: float | None = 0.95
    repetition_penalty: float = 1.0
    seed: int | None = None
    gpt2_vocab: str | None = None  # directory with GPT-2's encoder.json + vocab.bpe
    device: str = "auto"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"

    def __post_init__(self) -> None:
        check_fields(self)


# --- serving (gpt2lab serve) --------------------------------------------------------------------


@dataclass
class ServeConfig:
    """`gpt2lab serve`: the model to load, where to listen, and the limits that protect the server."""

    ckpt: str | None = None  # a gpt2lab checkpoint directory (or a run directory: its latest)
    pretrained: str | None = None  # a Hugging Face GPT-2 directory, or a hub name (gpt2, ...)
    adapter: str | None = None  # a LoRA adapter directory (gpt2lab finetune --method lora) put onto the model
    host: str = "127.0.0.1"  # loopback only by default; any other address needs an API key
    port: int = 8000
    # clients must send `Authorization: Bearer KEY`; else --api-key-file, else $GPT2LAB_API_KEY
    api_key: str | None = dataclasses.field(default=None, repr=False)
    api_key_file: str | None = None  # a file holding the key (not visible in `ps`, unlike --api-key)
    model_name: str | None = None  # the id /v1/models reports (default: the checkpoint's folder name)
    gpt2_vocab: str | None = None  # directory with GPT-2's encoder.json + vocab.bpe
    device: str = "auto"  # auto = cuda when available, else cpu
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    max_batch_size: int = 16  # sequences decoded together in one forward (1 = one at a time)
    max_queue: int = 64  # sequences that may wait for a batch slot; beyond: 503 + Retry-After
    max_tokens: int = 1024  # the most new tokens one request may ask for (also capped by the context)
    max_prompt_tokens: int | None = None  # default: the model's context block_size - 1
    max_n: int = 8  # completions per prompt (n); at most max_batch_size
    max_prompts: int = 16  # prompts in one request (a list prompt)
    max_streams: int = 64  # concurrent streaming responses; beyond: 429 + Retry-After
    max_body_bytes: int = 1_000_000  # request bodies above this get 413
    request_timeout_s: float = 300.0  # a request still running then ends (finish_reason "length")
    max_stop: int = 16  # stop sequences per request (OpenAI allows 4; lm-eval and humaneval send more)
    max_connections: int = 1024  # open connections served at once; beyond: 503 (uvicorn's limit_concurrency)
    read_timeout_s: float = 30.0  # a request not arrived whole this long after its first byte: closed
    compile: bool = False  # CUDA: decode through CUDA graphs (one per batch bucket)
    quantize: Literal["none", "int8"] = "none"  # CPU: int8 weights for the Linear layers (faster decode)

    def __post_init__(self) -> None:
        check_fields(self)
        if (self.ckpt is None) == (self.pretrained is None):
            raise UserError("give exactly one of --ckpt DIR or --pretrained NAME_OR_DIR")
        if not 0 <= self.port <= 65535:
            raise UserError(f"--port must be in [0, 65535], got {self.port}")
        positive = ("max_batch_size", "max_tokens", "max_n", "max_prompts", "max_streams", "max_body_bytes")
        for name in positive:
            if getattr(self, name) < 1:
                raise UserError(
                    f"--{name.replace('_', '-')} must be a positive integer, got {getattr(self, name)}"
                )
        if self.max_queue < 0:
            raise UserError(f"--max-queue must be >= 0, got {self.max_queue}")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise UserError(f"--max-prompt-tokens must be a positive integer, got {self.max_prompt_tokens}")
        if not self.request_timeout_s > 0:
            raise UserError(f"--request-timeout-s must be > 0, got {self.request_timeout_s}")
        if not self.read_timeout_s > 0:
            raise UserError(f"--read-timeout-s must be > 0, got {self.read_timeout_s}")
        for name in ("max_stop", "max_connections"):
            if getattr(self, name) < 1:
                raise UserError(
                    f"--{name.replace('_', '-')} must be a positive integer, got {getattr(self, name)}"
                )
        if self.quantize not in ("none", "int8"):
            raise UserError(f"--quantize must be none or int8, got {self.quantize!r}")
        if self.max_n > self.max_batch_size:  # the n rows of one prompt decode in one batch
            raise UserError(f"--max-n {self.max_n} exceeds --max-batch-size {self.max_batch_size}")
        if self.api_key is not None and self.api_key_file is not None:
            raise UserError("give --api-key or --api-key-file, not both")
        if self.api_key_file is not None:
            self.api_key = read_secret(self.api_key_file)
        elif self.api_key is None and "GPT2LAB_API_KEY" in os.environ:
            self.api_key = os.environ["GPT2LAB_API_KEY"]
            if not self.api_key.strip():
                raise UserError("GPT2LAB_API_KEY is set but empty: set a key, or unset it")
        if self.api_key is not None and not self.api_key.strip():
            raise UserError("--api-key must not be empty")


def read_secret(path: str) -> str:
    """The first line of a key file, stripped; UserError when it is missing, unreadable or empty."""
    try:
        with open(path, encoding="utf-8") as f:
            key = f.readline(4096).strip()
    except (OSError, UnicodeDecodeError) as e:
        reason = getattr(e, "strerror", None) or e
        raise UserError(f"cannot read the API key file {path!r}: {reason}") from None
    if not key:
        raise UserError(f"the API key file {path!r} is empty")
    return key
