"""Typed configuration: the GPT-2 architecture (GPTConfig) and its named presets."""

from __future__ import annotations

import dataclasses
import difflib
import sys
from dataclasses import dataclass, fields
from pathlib import Path
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
class PrepareConfig:
    """`gpt2lab prepare`: a corpus -> token shards (see shards.py)."""

    source: str = ""  # a named dataset (tinystories, wikitext103, fineweb-edu, shakespeare) or a path
    out: str = ""  # output directory
    tokenizer: str = "gpt2"  # gpt2, char, bytes, or a tokenizer directory
    gpt2_vocab: str | None = None  # directory with GPT-2's encoder.json + vocab.bpe (else the cache)
    separator: str | None = None  # split .txt files into documents at this text ("eot", "blank-line")
    text_field: str = "text"  # field of .jsonl records / column of .parquet files
    val_fraction: float | None = None  # val = the last fraction of the text (default 0.1)
    val_docs: int | None = None  # val = the first N documents (instead of val_fraction)
    shard_tokens: int = 100_000_000  # tokens per shard file (build-nanogpt: 1e8)
    max_tokens: int | None = None  # stop the train split after this many tokens
    workers: int = 1  # tokenizer processes
    name: str | None = None  # shard file prefix (default: the source's name)
    revision: str | None = None  # Hugging Face commit of a named dataset (default: the pinned one)

    def __post_init__(self) -> None:
        if self.val_fraction is not None and self.val_docs is not None:
            raise UserError("give --val-fraction or --val-docs, not both")
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
        aliases = {"eot": "<|endoftext|>", "blank-line": "\n\n"}
        if self.separator is not None:
            sep = aliases.get(self.separator, self.separator)
            self.separator = sep.replace("\\n", "\n").replace("\\t", "\t").replace("\\r", "\r")
            if not self.separator:
                raise UserError("separator must not be empty")


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
    model: dict[str, Any] = dataclasses.field(default_factory=dict)  # GPTConfig field overrides

    def __post_init__(self) -> None:
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
        if self.muon_lr <= 0 or not 0 <= self.muon_momentum < 1:
            raise UserError(
                f"muon_lr must be > 0 and muon_momentum in [0, 1), got {self.muon_lr}, {self.muon_momentum}"
            )
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
        for name, allowed in (
            ("method", ("full", "lora")),
            ("optimizer", ("adamw", "muon")),
            ("lr_schedule", ("cosine", "constant", "wsd")),
            ("loader_mode", ("random", "sequential")),
            ("on_nonfinite", ("stop", "skip")),
            ("dtype", ("auto", "float32", "bfloat16", "float16")),
        ):
            if getattr(self, name) not in allowed:
                raise UserError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        GPTConfig.preset(self.preset, **self.model)  # fails early, naming a bad preset or model field

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
    known_model = [f.name for f in fields(GPTConfig)]
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


# --- serving (gpt2lab serve) --------------------------------------------------------------------


@dataclass
class ServeConfig:
    """`gpt2lab serve`: the model to load, where to listen, and the limits that protect the server."""

    ckpt: str | None = None  # a gpt2lab checkpoint directory (or a run directory: its latest)
    pretrained: str | None = None  # a Hugging Face GPT-2 directory, or a hub name (gpt2, ...)
    adapter: str | None = None  # a LoRA adapter directory (gpt2lab finetune --method lora) put onto the model
    host: str = "127.0.0.1"  # loopback only by default; any other address needs an API key
    port: int = 8000
    api_key: str | None = None  # clients must send `Authorization: Bearer KEY` (else $GPT2LAB_API_KEY)
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
        if self.api_key is not None and not self.api_key.strip():
            raise UserError("--api-key must not be empty")
