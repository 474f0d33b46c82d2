"""Training: run(cfg) is one flat function, read top to bottom, from a laptop CPU to many GPUs (torchrun).

Order of things, each in one visible place: processes and device -> data source (token shards or a
.jsonl of examples, chosen once) -> model -> LoRA -> the run directory (lock, start or resume) ->
compile -> DDP/FSDP -> optimizer -> loop (eval, checkpoint, step, log) -> the end. Whatever happens,
`finally` restores the signal handlers, releases the lock, closes the loggers and leaves the process
group. The raw model (`raw`) is the one saved, evaluated and sampled; `model` is what trains.

What survives what (docs/reliability.md names the tests): a kill at any moment loses at most the steps
since the last checkpoint and --resume continues bit-exactly; a full disk stops the run with one line,
the last checkpoint intact; a non-finite loss, gradient or weight never reaches a checkpoint; a run
directory belongs to one run (a second one is refused, a concurrent one locked out).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from gpt2lab import checkpoint as ckpt
from gpt2lab import distributed, lora
from gpt2lab.atomic import directory_lock, writing
from gpt2lab.config import (
    ModelConfig,
    TrainConfig,
    family_config_class,
    model_config_from_dict,
    pad_vocab_size,
    usable_cpus,
)
from gpt2lab.dataloader import ShardData
from gpt2lab.documents import split_batches
from gpt2lab.errors import UserError, WriteError
from gpt2lab.evaluate import hellaswag, hellaswag_file, load_hellaswag
from gpt2lab.generate import generate
from gpt2lab.interop import peft
from gpt2lab.interop.hf import load_pretrained, pretrained_tokenizer
from gpt2lab.ladder import build_model
from gpt2lab.model import GPT
from gpt2lab.muon import Muon, muon_param_groups
from gpt2lab.sft import SFTData

# Dense bf16 peak FLOP/s by GPU name, for MFU (vendor data sheets; SXM parts). Override: --peak-flops.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "4090": 165e12}
METRICS = "metrics.jsonl"


def lr_at(step: int, cfg: TrainConfig, elapsed: float = 0.0) -> float:
    """The learning rate of optimizer step `step` (0-based): linear warmup, then the schedule. Under a
    time budget (max_time) the schedule is as far along as the steps or the budget spent (`elapsed`
    seconds of training) say, whichever is further."""
    min_lr = cfg.learning_rate / 10 if cfg.min_lr is None else cfg.min_lr
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.learning_rate
    spent = elapsed / cfg.max_time if cfg.max_time else 0.0  # the fraction of the time budget spent
    if cfg.lr_schedule == "wsd":  # warmup-stable-decay: flat, then a linear decay over the last fraction
        decay_start = cfg.max_steps - round(cfg.wsd_decay_fraction * cfg.max_steps)
        frac = (step - decay_start) / max(1, cfg.max_steps - decay_start)
        if cfg.wsd_decay_fraction:
            frac = max(frac, 1 - (1 - spent) / cfg.wsd_decay_fraction)
        return cfg.learning_rate + min(1.0, max(0.0, frac)) * (min_lr - cfg.learning_rate)
    decay_end = cfg.lr_decay_steps or cfg.max_steps
    span = max(1, decay_end - cfg.warmup_steps)  # cosine: 1 -> 0 over [warmup, end]
    frac = max(1.0 if step >= decay_end else (step - cfg.warmup_steps) / span, spent)
    if frac >= 1:
        return min_lr
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * frac)) * (cfg.learning_rate - min_lr)


def make_optimizer(model: GPT, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over the parameters that train; weight decay on matrices (2-D: linear weights, embeddings)
    only, not biases or LayerNorms, nor a matrix of which only some rows train (lora.train_token_rows:
    decay would move the frozen rows). --optimizer muon: Muon for the blocks' matrices (muon.py)."""
    if cfg.optimizer == "muon":
        groups = muon_param_groups(model, cfg.weight_decay, lr_scale=cfg.muon_lr / cfg.learning_rate)
        betas = (cfg.beta1, cfg.beta2)
        return Muon(groups, cfg.learning_rate, betas, cfg.eps, momentum=cfg.muon_momentum)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p.dim() >= 2 and not hasattr(p, "trainable_rows") for p in params]
    groups = [
        {"params": [p for p, d in zip(params, decay, strict=True) if d], "weight_decay": cfg.weight_decay},
        {"params": [p for p, d in zip(params, decay, strict=True) if not d], "weight_decay": 0.0},
    ]
    fused = device.type == "cuda"  # one kernel for all parameters instead of a loop over them
    return torch.optim.AdamW(
        groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused
    )


def model_config(cfg: TrainConfig, data_vocab: int, eot_id: int | None = None) -> ModelConfig:
    """The architecture: its family (cfg.model["family"], default "gpt"), a GPT's preset < recipe/CLI
    fields; vocab from the data, padded, and the ladder's eot_id from the data, unless set explicitly."""
    fields = dict(cfg.model)
    if "vocab_size" not in fields:
        fields["vocab_size"] = pad_vocab_size(data_vocab, cfg.pad_vocab_multiple)
    if "eot_id" not in fields and hasattr(family_config_class(fields.get("family", "gpt")), "eot_id"):
        fields["eot_id"] = eot_id  # the ladder's MLP / WaveNet read EOT before a window's first token
    model_cfg = model_config_from_dict(fields, cfg.preset)
    if model_cfg.vocab_size < data_vocab:
        raise UserError(
            f"the data's vocabulary ({data_vocab} tokens) does not fit the model's vocab_size "
            f"{model_cfg.vocab_size}"
        )
    return model_cfg


def load_init(cfg: TrainConfig) -> tuple[GPT, dict[str, Any] | None]:
    """The model to start from (cfg.init_from: a gpt2lab checkpoint or run directory, else a Hugging Face
    GPT-2 directory / name) and its tokenizer spec (None: GPT-2's own); dropout from cfg.model if set."""
    overrides = {k: v for k, v in cfg.model.items() if k == "dropout"}
    if ckpt.is_checkpoint(cfg.init_from):
        return ckpt.load_model(cfg.init_from, **overrides), ckpt.read_config(cfg.init_from).get("tokenizer")
    return load_pretrained(cfg.init_from, **overrides), pretrained_tokenizer(cfg.init_from)


def open_data(cfg: TrainConfig, verbose: bool) -> ShardData | SFTData:
    """The data source: token shards (a directory `gpt2lab prepare` wrote) or a .jsonl of examples."""
    if not cfg.data:
        raise UserError("train needs --data DIR (written by `gpt2lab prepare`) or --data FILE.jsonl")
    if Path(cfg.data).suffix != ".jsonl":
        return ShardData(cfg.data, cfg.windows)
    if cfg.init_from == "scratch":
        raise UserError("fine-tuning on a .jsonl needs a model to start from: --from CKPT or --pretrained")
    return SFTData(cfg.data, cfg.val_data, cfg.val_fraction, cfg.seed, cfg.pad_vocab_multiple, verbose)


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """None (plain fp32) on CPU by default; bf16 on CUDA when supported, else fp16 (with a GradScaler)."""
    if cfg.dtype == "float32" or (cfg.dtype == "auto" and device.type != "cuda"):
        return None
    if cfg.dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.dtype]


def read_log(path: Path) -> list[dict[str, Any]]:
    """The events of a metrics.jsonl. A torn last line (a kill or a full disk cut its write short) is
    dropped with a warning; an unreadable line elsewhere is a UserError naming it."""
    if not path.is_file():
        return []
    try:
        lines = path.read_bytes().decode("utf-8", errors="replace").split("\n")
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    complete, torn = lines[:-1], lines[-1]  # the text after the last newline was never finished
    events = []
    for i, line in enumerate(complete, 1):
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            event = None
        if not isinstance(event, dict) or not isinstance(event.get("step"), int):
            if i == len(complete) and not torn:  # a line the writer was cut in (its newline made it)
                torn = line
                break
            raise UserError(f"{path}:{i} is not a metrics event; fix or delete that line to resume")
        events.append(event)
    if torn.strip():
        print(f"warning: {path}: dropped a torn last line ({len(torn)} bytes) a crash left", file=sys.stderr)
    return events


class Logger:
    """metrics.jsonl (one JSON object per event), optional TensorBoard / W&B, and the loss plot."""

    def __init__(self, out_dir: Path, cfg: TrainConfig, enabled: bool, history: list[dict[str, Any]]):
        self.out_dir, self.enabled, self.history = out_dir, enabled, history
        self.tb = self.wandb = None
        if not enabled:
            return
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # optional extras: imported when asked for
            except ImportError:
                raise UserError(
                    "--tensorboard needs the tensorboard package: pip install tensorboard"
                ) from None
            self.tb = SummaryWriter(str(out_dir / "tensorboard"))
        if cfg.wandb:
            try:
                import wandb
            except ImportError:
                raise UserError("--wandb needs the wandb package: pip install wandb") from None
            self.wandb = wandb.init(project=cfg.wandb_project, config=cfg.to_dict(), dir=str(out_dir))

    def log(self, event: dict[str, Any]) -> None:
        """Append one event. A failed write (a full disk) is cut back off, so no torn line stays."""
        if not self.enabled:
            return
        path = self.out_dir / METRICS
        with writing(path), open(path, "ab", buffering=0) as f:
            size = f.tell()
            try:
                data = (json.dumps(event) + "\n").encode()
                while data:
                    data = data[f.write(data) :]
            except OSError:
                f.truncate(size)
                raise
        self.history.append(event)
        numbers = {k: v for k, v in event.items() if isinstance(v, (int, float)) and k != "step"}
        if self.tb is not None:
            for k, v in numbers.items():
                self.tb.add_scalar(k, v, event["step"])
        if self.wandb is not None:
            self.wandb.log(numbers, step=event["step"])

    def plot(self) -> None:
        """loss.png: train and val loss against the step (written atomically)."""
        if not self.enabled:
            return
        import matplotlib  # imported on first use: it costs a second, and a run without evals never plots

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
        for key, style in (("train_loss", "-"), ("val_loss", "o-")):
            points = [(e["step"], e[key]) for e in self.history if key in e]
            if points:
                ax.plot(*zip(*points, strict=True), style, label=key.replace("_", " "), markersize=3)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        try:
            ckpt.atomic_write(self.out_dir / "loss.png", lambda p: fig.savefig(p, format="png"))
        finally:
            plt.close(fig)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    return (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
        if seconds >= 3600
        else f"{seconds // 60}m{seconds % 60:02d}s"
    )


def last_checkpoint(out_dir: Path, vocab_size: int, fix: str) -> str:
    """Which checkpoint of the run is good after a failure, and what to do: `fix` is the remedy
    (e.g. "free space") that --resume needs first. A checkpoint whose train loss was already worse
    than guessing uniformly over the vocabulary is not called good: the run had diverged before it."""
    latest = ckpt.read_pointer(out_dir, ckpt.LATEST)
    if latest is None or not (latest / ckpt.CONFIG).is_file():
        return f"No checkpoint was written yet: {fix}, then start over (--overwrite)"
    loss = ckpt.read_config(latest).get("train_loss")
    uniform = math.log(vocab_size)
    if isinstance(loss, (int, float)) and not loss <= uniform:
        return (
            f"The last checkpoint, {latest.name}, was saved at train loss {loss:.4g}, worse than guessing "
            f"(ln {vocab_size} = {uniform:.2f}): the run had diverged before it. {fix[0].upper() + fix[1:]}, "
            "then start over (--overwrite)"
        )
    at = f" (train loss {loss:.4f})" if isinstance(loss, (int, float)) else ""
    return f"The last checkpoint, {latest.name}{at}, is intact: {fix}, then --resume continues from it"


def run(cfg: TrainConfig) -> dict[str, Any]:
    """Train as cfg says; returns a summary (final and best losses, steps, median step time)."""
    # --- processes, device, numerics ------------------------------------------------------------
    dist = distributed.setup(cfg.device)
    device, print0 = dist.device, distributed.print0
    cleanup = contextlib.ExitStack()  # undone in `finally`, newest first, whatever happens
    cleanup.callback(distributed.teardown)
    out_dir, raw, step = Path(cfg.out_dir), None, 0
    try:
        if cfg.threads:  # this process's setting until run() returns (a caller may run more than one)
            cleanup.callback(torch.set_num_threads, torch.get_num_threads())
            torch.set_num_threads(cfg.threads)
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls on Ampere+: ~fp32 accuracy for training
        torch.backends.cudnn.allow_tf32 = True
        amp_dtype = autocast_dtype(cfg, device)
        autocast = (
            (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext
        )
        scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)  # fp16: loss scaling

        # --- data source: token shards, or a .jsonl of examples for fine-tuning; chosen once ----------
        data = open_data(cfg, verbose=dist.is_main)

        # --- model: new, sized by the data's vocabulary, or loaded to start from ----------------------
        torch.manual_seed(cfg.seed)  # the same initial weights on every process
        if cfg.init_from == "scratch":
            raw = build_model(model_config(cfg, data.vocab_size, data.eot_id), "this run's config")
            model_spec, source = None, None
        else:
            (raw, model_spec), source = load_init(cfg), cfg.init_from
        T = cfg.seq_len or raw.config.block_size
        if raw.config.block_size < T:
            raise UserError(f"seq_len {T} exceeds the model's block_size {raw.config.block_size}")
        # The data and the model must belong together (vocabulary, tokenizer); fine-tuning adds tokens here.
        tokenizer_spec = data.fit(raw, model_spec, source, T)
        model_cfg = raw.config

        # --- LoRA: adapters on the frozen model; the chat template's token rows train with them -------
        lora_config = None
        if cfg.method == "lora":
            lora.apply_lora(raw, cfg.lora_targets, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout)
            if data.template_tokens:  # (peft's trainable_token_indices); the rest of the vocabulary is frozen
                ids = sorted(data.template_tokens.values())
                lora.train_token_rows(raw, ids[0], ids[-1] + 1)
            lora_config = lora.lora_settings(raw)
        raw.to(device).train()

        # --- batch geometry and the training batches ------------------------------------------------
        tokens_per_micro = cfg.batch_size * T * dist.world_size
        total = cfg.total_batch_size or tokens_per_micro
        if total % tokens_per_micro:
            raise UserError(
                f"total_batch_size {total} is not divisible by batch_size {cfg.batch_size} x seq_len {T} "
                f"x {dist.world_size} processes = {tokens_per_micro}"
            )
        grad_accum = total // tokens_per_micro
        train_loader = data.loader(
            cfg.batch_size, T, dist.rank, dist.world_size, cfg.seed, device, grad_accum, cfg.loader_mode
        )

        # --- the run directory: one run owns it -----------------------------------------------------
        # A directory that holds a run is continued (--resume) or replaced (--overwrite), never mixed
        # into, and nothing in it is touched before that is decided; a lock keeps a second process out.
        held = ckpt.run_contents(out_dir)
        if held and not cfg.resume and not cfg.overwrite:
            latest = ckpt.read_pointer(out_dir)
            what = f"its latest checkpoint is {latest.name}" if latest else f"it has {', '.join(held[:3])}"
            raise UserError(
                f"{out_dir} already holds a run ({what}): --resume continues it, --overwrite deletes it "
                "and starts over; or choose another --out-dir"
            )
        failure = None
        if dist.is_main:
            try:
                cleanup.enter_context(directory_lock(out_dir, "training run"))
                ckpt.repair(out_dir)  # what a killed writer left: temporaries, a `best` not yet moved
                if cfg.overwrite and held:
                    removed = ", ".join(ckpt.remove_run(out_dir))
                    print0(f"--overwrite: deleted the previous run in {out_dir}: {removed}")
            except UserError as e:
                failure = e
        if distributed.any_process(failure is not None, device):  # every rank stops, or none
            raise failure or UserError(f"stopped: rank 0 could not take {out_dir}")

        # --- resume: weights, step, data position, RNG states (the optimizer's once it exists) -------
        best_val, bad_evals, skips, state, src = math.inf, 0, 0, None, None
        trained_s = 0.0  # seconds of training before this process (max_time's clock)
        if cfg.resume and cfg.resume != "latest":
            src = ckpt.resolve(cfg.resume)
        elif cfg.resume and ckpt.read_pointer(out_dir) is not None:
            src = ckpt.resolve(out_dir)
        elif cfg.resume:
            print0(f"--resume: {out_dir} has no checkpoint yet; starting a new run")
        if src is not None:
            saved = ckpt.read_config(src)
            if saved["model"] != model_cfg.to_dict():
                diff = [
                    f"{k} {saved['model'].get(k)!r} vs {v!r}"
                    for k, v in model_cfg.to_dict().items()
                    if saved["model"].get(k) != v
                ]
                raise UserError(f"cannot resume from {src}: another architecture ({', '.join(diff)})")
            if saved.get("lora") != lora_config:
                raise UserError(
                    f"cannot resume from {src}: LoRA settings {saved.get('lora')} vs {lora_config}"
                )
            state = ckpt.load_state(src)
            ckpt.copy_weights(raw, ckpt.load_model(src, merge=False).state_dict(), str(src))
            try:
                scaler.load_state_dict(state["scaler"])
                train_loader.load_state_dict(state["loader"])
                torch.set_rng_state(state["rng"]["cpu"])
                if device.type == "cuda" and state["rng"]["cuda"]:
                    torch.cuda.set_rng_state(
                        state["rng"]["cuda"][dist.local_rank % len(state["rng"]["cuda"])]
                    )
            except (KeyError, TypeError, ValueError, RuntimeError) as e:
                if isinstance(e, UserError):
                    raise
                raise UserError(
                    f"{src / ckpt.STATE} does not fit this run ({type(e).__name__}: {e})"
                ) from None
            step, best_val, bad_evals, skips = (
                state["step"],
                state["best_val"],
                state["bad_evals"],
                state["skips"],
            )
            trained_s = state.get("train_s", 0.0)  # absent in checkpoints from before max_time
            print0(f"resumed from {src} at step {step}")
            limit, flag = "", ""
            if step >= cfg.max_steps:
                limit, flag = f"max_steps {cfg.max_steps}", "--max-steps"
            elif cfg.max_time and trained_s >= cfg.max_time:
                limit, flag = f"max_time {cfg.max_time:g} s, {trained_s:.1f} s trained", "--max-time"
            if limit:
                print0(f"the run is finished ({limit}); raise {flag} to train on")
                return {"step": step, "train_loss": math.nan, "best_val_loss": best_val,
                        "median_step_ms": math.nan, "tokens": 0, "stopped": "already finished",
                        "out_dir": str(out_dir)}  # fmt: skip
        else:
            torch.manual_seed(cfg.seed + dist.rank)  # dropout differs across processes

        # --- parallelism and compile; `raw` is the module saved, evaluated and sampled ---------------
        # DDP: compile, then wrap (DDP then sees one fused graph per bucket). FSDP2: shard each block and
        # the root in place (raw's parameters become shards), then compile.
        model: Any = raw
        if cfg.fsdp and dist.enabled:
            from torch.distributed.fsdp import fully_shard  # torch >= 2.6 has it here (older: _composable)

            for block in raw.transformer.h:
                fully_shard(block)
            fully_shard(raw)
        if cfg.compile:
            model = torch.compile(model)
        if dist.enabled and not cfg.fsdp:
            model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[dist.local_rank] if device.type == "cuda" else None
            )

        # --- optimizer, after sharding (it must hold the parameters that train) ---------------------
        # State dicts go through torch.distributed.checkpoint's helpers, in their full (unsharded) form,
        # keyed by parameter name: one format for one process, DDP and FSDP, so a run can resume in any.
        full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        optimizer = make_optimizer(raw, cfg, device)
        if state is not None:
            try:
                set_optimizer_state_dict(
                    raw, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True)
                )
            except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as e:
                reason = str(e).splitlines()[0][:200] if str(e) else ""
                raise UserError(
                    f"{src / ckpt.STATE}: the optimizer state does not fit this model "
                    f"({type(e).__name__}: {reason})"
                ) from None

        # --- the log: it continues the run it resumes (up to the resumed step), else starts afresh ----
        history = [e for e in read_log(out_dir / METRICS) if e["step"] <= step] if src is not None else []
        if dist.is_main:
            lines = "".join(json.dumps(e) + "\n" for e in history)
            ckpt.atomic_write(out_dir / METRICS, lambda p: p.write_text(lines))
        logger = Logger(out_dir, cfg, dist.is_main, history)
        cleanup.callback(logger.close)
        gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
        peak = cfg.peak_flops or next((v for k, v in PEAK_FLOPS.items() if k in gpu), None)
        name = cfg.preset if isinstance(raw, GPT) else f"{model_cfg.family} ({type(raw).__name__})"
        print0(
            f"model: {cfg.init_from if cfg.init_from != 'scratch' else name}, {raw.num_params():,} "
            f"parameters, vocab {model_cfg.vocab_size}; data {data.description}; device {device}"
            f"{' ' + gpu if gpu else ''}, {dist.world_size} process(es), {torch.get_num_threads()} CPU "
            f"thread(s), autocast {amp_dtype or 'off (fp32)'}, compile {cfg.compile}"
        )
        if lora_config is not None:
            n_train, n_all = lora.trainable_fraction(raw)
            targets = ", ".join(lora_config["targets"])
            print0(
                f"LoRA rank {cfg.lora_rank}, alpha {cfg.lora_alpha:g} on {targets}: "
                f"{n_train:,} of {n_all:,} parameters train ({n_train / n_all:.2%})"
            )
        load, cpus = (os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0), usable_cpus()
        if device.type == "cpu" and not cfg.threads and load > cpus:  # bench/threads.py measured 7-12x
            print0(f"note: the CPUs are busy (load {load:.1f} on {cpus}): --threads 1 may be far faster")
        print0(
            f"batch: {cfg.batch_size} x {'up to ' if data.padded else ''}{T} tokens x {dist.world_size} "
            f"processes x {grad_accum} accumulation = {total:,} tokens/step; {cfg.max_steps} steps"
            + (f" or {fmt_time(cfg.max_time)} of training, whichever comes first" if cfg.max_time else "")
        )

        # --- stop cleanly on SIGTERM / SIGINT: finish the step, save, exit ---------------------------
        stop_signal: list[int] = []

        def on_signal(signum: int, frame: Any) -> None:
            stop_signal.append(signum)

        for s in (signal.SIGTERM, signal.SIGINT):
            cleanup.callback(signal.signal, s, signal.signal(s, on_signal))

        def save(at_step: int, is_best: bool, train_loss: float | None, train_s: float) -> None:
            """Checkpoint the state *before* step `at_step`: resuming from it runs that step next.
            Weights that are not all finite are never written (every rank checks its own shard)."""
            local = (p.to_local() if hasattr(p, "to_local") else p for p in raw.parameters())
            if distributed.any_process(not all(torch.isfinite(p).all() for p in local), device):
                raise UserError(
                    f"step {at_step}: the weights hold NaN or inf values; stopped without saving them. "
                    + last_checkpoint(out_dir, model_cfg.vocab_size, "lower the learning rate")
                )
            tensors = get_model_state_dict(raw, options=full)  # collective under FSDP: every rank calls it
            state = {
                "optimizer": get_optimizer_state_dict(raw, optimizer, options=full),
                "scaler": scaler.state_dict(),
                "loader": train_loader.state_dict(),
                "step": at_step,
                "best_val": best_val,
                "bad_evals": bad_evals,
                "skips": skips,
                "train_s": train_s,
                "rng": {
                    "cpu": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else [],
                },
            }
            if not dist.is_main:
                return
            extra = {"train": cfg.to_dict(), "tokenizer": tokenizer_spec, "step": at_step,
                     "best_val": best_val, "is_best": is_best, "train_loss": train_loss}  # fmt: skip
            if lora_config is not None:  # the weights hold the frozen base and the adapters (lora_A, lora_B)
                extra["lora"] = lora_config
            path = ckpt.save_checkpoint(ckpt.step_dir(out_dir, at_step), raw, extra, state, tensors)
            ckpt.set_pointer(out_dir, ckpt.LATEST, path)  # first: repair() completes `best` from it
            if is_best:
                ckpt.set_pointer(out_dir, ckpt.BEST, path)
            ckpt.prune(out_dir, cfg.keep_last)

        # --- the loop -------------------------------------------------------------------------------
        step_times: list[float] = []
        first_step, tokens_seen, last_loss, last_logged, stopped = step, 0, None, math.nan, ""
        t_start, first_line = time.perf_counter(), None  # first_line: (time, step) of the first progress line
        window = {"steps": 0, "tokens": 0, "seconds": 0.0}  # the steps since the last progress line

        def clock() -> float:
            """Seconds of training, this process's and before a resume: max_time's clock. Under DDP rank 0's
            and the others' differ a little: all take their mean, so they stop at the same step."""
            t = trained_s + time.perf_counter() - t_start
            if cfg.max_time and dist.enabled:
                t = distributed.all_reduce_mean(torch.tensor(t, dtype=torch.float64, device=device)).item()
            return t

        of = "" if cfg.max_time else f"/{cfg.max_steps}"  # "step 120/2000"; under a time budget, "step 120"
        train_s = trained_s  # read after every step (the evaluations before it included)
        while True:
            last = step >= cfg.max_steps or (cfg.max_time is not None and train_s >= cfg.max_time)

            # --- eval: val loss (all-reduced), HellaSwag, samples; early stopping -------------------
            eval_now = data.has_val and (
                last or (cfg.eval_interval and step % cfg.eval_interval == 0 and step > first_step)
            )
            is_best = False
            if eval_now:
                result = data.evaluate(raw, cfg.batch_size, T, cfg.eval_tokens or None, device, autocast())
                raw.train()
                val = result["loss"]
                is_best = val < best_val
                best_val, bad_evals = (val, 0) if is_best else (best_val, bad_evals + 1)
                logger.log({"step": step, "val_loss": val, "val_perplexity": result["perplexity"]})
                print0(f"step {step:>6}: val loss {val:.4f} (best {best_val:.4f})")
                logger.plot()
                if cfg.early_stopping_patience and bad_evals >= cfg.early_stopping_patience:
                    stopped = f"early stopping: no better val loss in {bad_evals} evaluations"
            if cfg.hellaswag_interval and (
                last or (step % cfg.hellaswag_interval == 0 and step > first_step)
            ):
                examples = load_hellaswag(hellaswag_file(cfg.hellaswag_data), cfg.hellaswag_limit or None)
                hs = hellaswag(raw, data.tokenizer(), examples, cfg.batch_size, device, autocast=autocast())
                raw.train()
                logger.log({"step": step, "hellaswag_acc_norm": hs["acc_norm"], "hellaswag_n": hs["n"]})
                print0(f"step {step:>6}: HellaSwag acc_norm {hs['acc_norm']:.4f} ({hs['n']} examples)")
            sample_due = (
                last
                or stopped
                or (cfg.sample_interval and step % cfg.sample_interval == 0 and step > first_step)
            )
            if cfg.sample_tokens and dist.is_main and sample_due:
                tok = data.tokenizer()
                prompt = tok.encode(cfg.sample_prompt) if cfg.sample_prompt else [tok.eot_id]
                ids = generate(raw, prompt, cfg.sample_tokens, temperature=0.8, top_k=200, seed=cfg.seed,
                               eot_id=tok.eot_id, vocab_size=tok.vocab_size)  # fmt: skip
                raw.train()
                print0(f"step {step:>6}: sample: {cfg.sample_prompt + tok.decode(ids)!r}")

            # --- checkpoint (every rank agrees on a signal received by any of them) -------------------
            if distributed.any_process(bool(stop_signal), device) and not stopped:
                stopped = (
                    f"stopped by signal {stop_signal[0]}"
                    if stop_signal
                    else "stopped by a signal on another rank"
                )
            periodic = step % cfg.checkpoint_interval == 0
            if step > first_step and (last or stopped or periodic or is_best):
                save(
                    step,
                    is_best,
                    None if last_loss is None else distributed.all_reduce_mean(last_loss).item(),
                    clock(),
                )
            if last or stopped:
                break

            # --- step: grad_accum micro-batches, clip, optimizer ------------------------------------
            t0 = time.perf_counter()
            if getattr(model_cfg, "fit", None) == "counts":
                # The counting bigram has no gradient: its one step (max_steps is 1) counts every target of
                # the train split once and sets its weights to the smoothed log frequencies (ladder.py).
                n, last_logged = raw.fit_counts(
                    split_batches(cfg.data, "train", cfg.batch_size, T, cfg.windows)
                )
                step, tokens_seen = step + 1, tokens_seen + n
                step_times.append(time.perf_counter() - t0)
                logger.log(
                    {"step": step, "train_loss": last_logged, "elapsed_s": time.perf_counter() - t_start}
                )
                print0(f"step {step:>6}{of} | counted {n:,} train targets | loss {last_logged:.4f}")
                continue
            lr = lr_at(step, cfg, train_s)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = torch.zeros((), device=device)
            step_tokens = 0  # tokens in this step's batches (.jsonl rows are padded to their batch's longest)
            for micro in range(grad_accum):
                x, y = train_loader.next_batch()
                step_tokens += x.numel() * dist.world_size
                sync = (
                    micro == grad_accum - 1
                )  # gradients are reduced across processes on the last micro-step
                if cfg.fsdp and dist.enabled:
                    raw.set_requires_gradient_sync(sync)
                with (
                    model.no_sync()
                    if dist.enabled and not cfg.fsdp and not sync
                    else contextlib.nullcontext()
                ):
                    with autocast():
                        loss = model(x, y) / grad_accum
                    scaler.scale(loss).backward()
                loss_sum += loss.detach()
            scaler.unscale_(optimizer)
            norm = torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg.grad_clip or float("inf"))
            # The norm is identical on every process (gradients are all-reduced), so all take the same branch.
            # Under fp16 an overflow is the GradScaler's business (it skips the step and lowers the scale);
            # there only a non-finite loss counts.
            if scaler.is_enabled():
                nonfinite = distributed.any_process(not torch.isfinite(loss_sum).item(), device)
            else:
                nonfinite = not torch.isfinite(norm).item()
            if nonfinite:
                skips += 1
                optimizer.zero_grad(set_to_none=True)
                scaler.update()
                msg = f"step {step}: non-finite loss or gradient (grad norm {norm.item()})"
                if cfg.on_nonfinite == "stop" or skips > cfg.max_skips:
                    fix = "lower the learning rate"
                    raise UserError(f"{msg}; stopped. {last_checkpoint(out_dir, model_cfg.vocab_size, fix)}")
                print0(f"{msg}; batch skipped ({skips}/{cfg.max_skips})")
                step += 1
                continue
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            last_loss = loss_sum
            if device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            step_times.append(dt)
            tokens_seen += step_tokens
            window = {"steps": window["steps"] + 1, "tokens": window["tokens"] + step_tokens,
                      "seconds": window["seconds"] + dt}  # fmt: skip
            train_s = clock()
            ends = step == cfg.max_steps or (cfg.max_time is not None and train_s >= cfg.max_time)

            # --- log: throughput over the steps since the last line; ETA from the pace since the first --
            if step % cfg.log_interval == 0 or ends:
                train_loss = last_logged = distributed.all_reduce_mean(loss_sum).item()
                now = time.perf_counter()
                tok_s = window["tokens"] / window["seconds"]
                step_ms = window["seconds"] / window["steps"] * 1e3
                # ETA: wall time per step since the first line (evals and checkpoints included, the slow
                # first steps not): steadier than any one interval, and what the remaining steps will cost.
                if first_line is None:
                    first_line, pace = (now, step), (now - t_start) / (step - first_step)
                else:
                    pace = (now - first_line[0]) / (step - first_line[1])
                eta = (cfg.max_steps - step) * pace
                done = step / cfg.max_steps
                if cfg.max_time:  # the budget left, when it ends the run first
                    eta = min(eta, max(0.0, cfg.max_time - train_s))
                    done = max(done, train_s / cfg.max_time)
                event = {
                    "step": step,
                    "train_loss": train_loss,
                    "lr": lr,
                    "grad_norm": norm.item(),
                    "tokens_per_sec": tok_s,
                    "step_ms": step_ms,
                    "elapsed_s": now - t_start,
                }
                mfu = ""
                if peak:
                    event["mfu"] = raw.mfu(tok_s / dist.world_size, peak, T)
                    mfu = f" | MFU {event['mfu']:.1%}"
                logger.log(event)
                window = {"steps": 0, "tokens": 0, "seconds": 0.0}
                filled = int(20 * min(1.0, done))
                bar = "█" * filled + "·" * (20 - filled)
                print0(
                    f"step {step:>6}{of} {bar} | loss {train_loss:.4f} | lr {lr:.2e} | "
                    f"norm {norm.item():.2f} | {tok_s / 1e3:,.1f}K tok/s{mfu} | {step_ms:.0f} ms/step | "
                    f"{fmt_time(now - t_start)} | ETA {fmt_time(eta)}"
                )

        # --- the end: a LoRA run also writes its adapter (and, asked, the merged model) -------------
        if lora_config is not None and dist.is_main:
            path = peft.save_adapter(
                raw,
                out_dir / "adapter",
                base=cfg.init_from,
                tokenizer=data.tokenizer(),
                template_tokens=data.template_tokens,
                extra={
                    "pad_vocab_multiple": cfg.pad_vocab_multiple,
                    "tokenizer": tokenizer_spec,
                    "step": step,
                },  # fmt: skip
            )
            size = (path / peft.WEIGHTS).stat().st_size
            print0(f"adapter: {path} ({size / 1e6:.2f} MB)")
            if cfg.merge:
                merged = ckpt.save_checkpoint(
                    out_dir / "merged",
                    lora.merged_copy(raw),
                    {
                        "train": cfg.to_dict(),
                        "tokenizer": tokenizer_spec,
                        "step": step,
                        "merged_from": str(path),
                    },
                )
                print0(f"merged model: {merged} (an ordinary checkpoint: sample, eval, serve, convert)")
        logger.plot()
        median_ms = statistics.median(step_times) * 1e3 if step_times else math.nan
        summary = {
            "step": step,
            "train_loss": last_logged,
            "best_val_loss": best_val,
            "median_step_ms": median_ms,
            "tokens": tokens_seen,
            "stopped": stopped or ("max_steps reached" if step >= cfg.max_steps else "max_time reached"),
            "out_dir": str(out_dir),
        }
        timing = f"median step time {median_ms:.1f} ms" if step_times else "no steps run"
        print0(
            f"done: {summary['stopped']} at step {step}; best val loss {best_val:.4f}; {timing}; "
            f"checkpoints in {out_dir}"
        )
        if summary["stopped"] == "max_time reached" and step < cfg.warmup_steps:
            print0(f"note: the time budget ended during the warmup ({step} of {cfg.warmup_steps} steps): the "
                   "learning rate never decayed; lower --warmup-steps or raise --max-time")  # fmt: skip
        return summary
    except WriteError as e:  # a full disk, a quota: the writer left no partial file behind
        vocab = raw.config.vocab_size if raw is not None else 2
        fix = "free space" if "space" in str(e) or "quota" in str(e) else "fix that"
        raise WriteError(f"{e}; stopped at step {step}. {last_checkpoint(out_dir, vocab, fix)}") from None
    finally:
        cleanup.close()
