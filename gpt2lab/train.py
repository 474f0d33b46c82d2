"""Training: run(cfg) is one flat loop, read top to bottom, from a laptop CPU to many GPUs (torchrun).

Order of things, each in one visible place: processes and device -> data -> model -> optimizer ->
resume -> compile -> DDP/FSDP -> loop (eval, checkpoint, step, log) -> final checkpoint.
The raw model (`raw`) is the one saved, evaluated and sampled; `model` is what trains.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from gpt2lab import checkpoint as ckpt
from gpt2lab import distributed
from gpt2lab.config import GPTConfig, TrainConfig, pad_vocab_size
from gpt2lab.dataloader import ShardLoader
from gpt2lab.errors import UserError
from gpt2lab.model import GPT
from gpt2lab.muon import Muon, muon_param_groups
from gpt2lab.shards import read_manifest

# Dense bf16 peak FLOP/s by GPU name, for MFU (vendor data sheets; SXM parts). Override: --peak-flops.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "4090": 165e12}


def lr_at(step: int, cfg: TrainConfig) -> float:
    """The learning rate of optimizer step `step` (0-based): linear warmup, then the schedule."""
    min_lr = cfg.learning_rate / 10 if cfg.min_lr is None else cfg.min_lr
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.learning_rate
    if cfg.lr_schedule == "wsd":  # warmup-stable-decay: flat, then a linear decay over the last fraction
        decay_start = cfg.max_steps - round(cfg.wsd_decay_fraction * cfg.max_steps)
        if step < decay_start:
            return cfg.learning_rate
        frac = (step - decay_start) / max(1, cfg.max_steps - decay_start)
        return cfg.learning_rate + frac * (min_lr - cfg.learning_rate)
    decay_end = cfg.lr_decay_steps or cfg.max_steps
    if step >= decay_end:
        return min_lr
    frac = (step - cfg.warmup_steps) / max(
        1, decay_end - cfg.warmup_steps
    )  # cosine: 1 -> 0 over [warmup, end]
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


def model_config(cfg: TrainConfig, data_vocab: int) -> GPTConfig:
    """The architecture: preset < recipe/CLI fields; vocab from the data, padded, unless set explicitly."""
    fields = dict(cfg.model)
    if "vocab_size" not in fields:
        fields["vocab_size"] = pad_vocab_size(data_vocab, cfg.pad_vocab_multiple)
    model_cfg = GPTConfig.preset(cfg.preset, **fields)
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
    from gpt2lab.interop.hf import load_pretrained, pretrained_tokenizer

    return load_pretrained(cfg.init_from, **overrides), pretrained_tokenizer(cfg.init_from)


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """None (plain fp32) on CPU by default; bf16 on CUDA when supported, else fp16 (with a GradScaler)."""
    if cfg.dtype == "float32" or (cfg.dtype == "auto" and device.type != "cuda"):
        return None
    if cfg.dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.dtype]


class Logger:
    """metrics.jsonl (one JSON object per event), optional TensorBoard / W&B, and the loss plot."""

    def __init__(self, out_dir: Path, cfg: TrainConfig, enabled: bool):
        self.out_dir, self.enabled, self.history = out_dir, enabled, []
        self.tb = self.wandb = None
        if not enabled:
            return
        if (out_dir / "metrics.jsonl").is_file():
            self.history = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
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
        if not self.enabled:
            return
        self.history.append(event)
        with open(self.out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(event) + "\n")
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
        import matplotlib

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
        ckpt.atomic_write(self.out_dir / "loss.png", lambda p: fig.savefig(p, format="png"))
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


def run(cfg: TrainConfig) -> dict[str, Any]:
    """Train as cfg says; returns a summary (final and best losses, steps, median step time)."""
    # --- processes, device, numerics ------------------------------------------------------------
    dist = distributed.setup(cfg.device)
    device, print0 = dist.device, distributed.print0
    torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls on Ampere+: ~fp32 accuracy for training
    torch.backends.cudnn.allow_tf32 = True
    amp_dtype = autocast_dtype(cfg, device)
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)  # fp16 needs loss scaling
    out_dir = Path(cfg.out_dir)

    # --- data: token shards (`gpt2lab prepare`), or a .jsonl of examples for fine-tuning (sft.py) -----
    if not cfg.data:
        raise UserError("train needs --data DIR (written by `gpt2lab prepare`) or --data FILE.jsonl")
    sft_data = Path(cfg.data).suffix == ".jsonl"
    torch.manual_seed(cfg.seed)  # the same initial weights on every process
    added_tokens: dict[str, int] = {}  # tokens this run adds to the vocabulary
    template_tokens: dict[str, int] = {}  # the chat template's tokens and their ids
    if sft_data:
        # The examples are tokenized by the starting model's tokenizer, plus the chat template's tokens.
        from gpt2lab import sft
        from gpt2lab.tokenizer import model_tokenizer

        if cfg.init_from == "scratch":
            raise UserError(
                "fine-tuning on a .jsonl needs a model to start from: --from CKPT or --pretrained"
            )
        raw, tokenizer_spec = load_init(cfg)
        tok, added_tokens = sft.add_template_tokens(
            raw, model_tokenizer(tokenizer_spec, model_dir=cfg.init_from), cfg.pad_vocab_multiple
        )
        tokenizer_spec, model_cfg = tok.to_spec(), raw.config
        template_tokens = {t: tok.special_tokens[t] for t in sft.TEMPLATE_TOKENS}
        T = cfg.seq_len or model_cfg.block_size
        examples = sft.load_examples(cfg.data, tok, T + 1, verbose=dist.is_main)
        if cfg.val_data:
            train_examples, val_examples = examples, sft.load_examples(cfg.val_data, tok, T + 1, dist.is_main)
        else:
            train_examples, val_examples = sft.split_examples(examples, cfg.val_fraction, cfg.seed)
    else:
        manifest = read_manifest(cfg.data)
        tokenizer_spec, data_vocab = manifest["tokenizer"], manifest["vocab_size"]
        tok = None  # built from the spec if HellaSwag or samples need it
        if cfg.init_from == "scratch":
            model_cfg = model_config(cfg, data_vocab)
            raw = GPT(model_cfg)
        else:
            raw, _ = load_init(cfg)
            model_cfg = raw.config
            if model_cfg.vocab_size < data_vocab:
                raise UserError(f"the data's vocabulary ({data_vocab}) does not fit {cfg.init_from}")
        T = cfg.seq_len or model_cfg.block_size
    if model_cfg.block_size < T:
        raise UserError(f"seq_len {T} exceeds the model's block_size {model_cfg.block_size}")
    tokens_per_micro = cfg.batch_size * T * dist.world_size
    total = cfg.total_batch_size or tokens_per_micro
    if total % tokens_per_micro:
        raise UserError(
            f"total_batch_size {total} is not divisible by batch_size {cfg.batch_size} x seq_len {T} "
            f"x {dist.world_size} processes = {tokens_per_micro}"
        )
    grad_accum = total // tokens_per_micro
    if sft_data:  # rows of one example each, padded to the longest in the batch (at most T tokens)
        pad_id = tok.eot_id
        train_loader: Any = sft.SFTLoader(
            train_examples, cfg.batch_size, pad_id, dist.rank, dist.world_size, cfg.seed, device, grad_accum
        )
        has_val = bool(val_examples)
        data_desc = f"{len(train_examples)} train / {len(val_examples)} val examples from {cfg.data}"
    else:
        train_loader = ShardLoader(
            cfg.data,
            "train",
            cfg.batch_size,
            T,
            dist.rank,
            dist.world_size,
            cfg.loader_mode,
            cfg.seed,
            device,
            grad_accum,
        )
        has_val = "val" in manifest["splits"]
        data_desc = f"data vocab {data_vocab}"

    # --- model: full training, or LoRA adapters on the frozen model ------------------------------
    lora_config = None
    if cfg.method == "lora":
        from gpt2lab import lora

        lora.apply_lora(raw, cfg.lora_targets, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout)
        if template_tokens:
            # The template's tokens are what fine-tuning teaches: their embeddings (new, or never trained
            # by a base that only had them in its vocabulary) train with the adapters (peft's
            # trainable_token_indices); the rest of the vocabulary stays frozen.
            ids = sorted(template_tokens.values())
            lora.train_token_rows(raw, ids[0], ids[-1] + 1)
        lora_config = lora.lora_settings(raw)
    raw.to(device).train()
    flops_per_token = raw.flops_per_token(T)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    peak = cfg.peak_flops or next((v for k, v in PEAK_FLOPS.items() if k in gpu), None)

    # --- resume: weights, step, data position, RNG states (the optimizer's once it exists) -------
    step, best_val, bad_evals, skips, state = 0, math.inf, 0, 0, None
    if cfg.resume:
        src = ckpt.resolve(out_dir if cfg.resume == "latest" else cfg.resume)
        saved = ckpt.read_config(src)
        if saved["model"] != model_cfg.to_dict():
            diff = [
                f"{k} {saved['model'].get(k)!r} vs {v!r}"
                for k, v in model_cfg.to_dict().items()
                if saved["model"].get(k) != v
            ]
            raise UserError(f"cannot resume from {src}: another architecture ({', '.join(diff)})")
        if saved.get("lora") != lora_config:
            raise UserError(f"cannot resume from {src}: LoRA settings {saved.get('lora')} vs {lora_config}")
        state = ckpt.load_state(src)
        ckpt.copy_weights(raw, ckpt.load_model(src, merge=False).state_dict(), str(src))
        scaler.load_state_dict(state["scaler"])
        train_loader.load_state_dict(state["loader"])
        step, best_val, bad_evals, skips = (
            state["step"],
            state["best_val"],
            state["bad_evals"],
            state["skips"],
        )
        torch.set_rng_state(state["rng"]["cpu"])
        if device.type == "cuda" and state["rng"]["cuda"]:
            torch.cuda.set_rng_state(state["rng"]["cuda"][dist.local_rank % len(state["rng"]["cuda"])])
        print0(f"resumed from {src} at step {step}")
    else:
        torch.manual_seed(cfg.seed + dist.rank)  # dropout differs across processes

    # --- parallelism and compile; `raw` is the module saved, evaluated and sampled ---------------
    # DDP: compile, then wrap (DDP then sees one fused graph per bucket). FSDP2: shard each block and
    # the root in place (raw's parameters become shards), then compile.
    model: Any = raw
    if cfg.fsdp and dist.enabled:
        from torch.distributed.fsdp import fully_shard

        for block in raw.transformer.h:
            fully_shard(block)
        fully_shard(raw)
    if cfg.compile:
        model = torch.compile(model)
    if dist.enabled and not cfg.fsdp:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[dist.local_rank] if device.type == "cuda" else None)

    # --- optimizer, after sharding (it must hold the parameters that train) ---------------------
    # State dicts go through torch.distributed.checkpoint's helpers, in their full (unsharded) form,
    # keyed by parameter name: one format for one process, DDP and FSDP, so a run can resume in any.
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    optimizer = make_optimizer(raw, cfg, device)
    if state is not None:
        set_optimizer_state_dict(
            raw, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True)
        )

    if dist.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        # The log continues the run it resumes (up to the resumed step); a fresh run starts a fresh one.
        metrics = out_dir / "metrics.jsonl"
        kept = (
            [line for line in metrics.read_text().splitlines() if json.loads(line)["step"] <= step]
            if cfg.resume and metrics.exists()
            else []
        )
        ckpt.atomic_write(metrics, lambda p: p.write_text("".join(line + "\n" for line in kept)))
    logger = Logger(out_dir, cfg, dist.is_main)
    print0(
        f"model: {cfg.init_from if cfg.init_from != 'scratch' else cfg.preset}, {raw.num_params():,} "
        f"parameters, vocab {model_cfg.vocab_size} ({data_desc}); device {device}{' ' + gpu if gpu else ''}, "
        f"{dist.world_size} process(es), autocast {amp_dtype or 'off (fp32)'}, compile {cfg.compile}"
    )
    if added_tokens:
        print0(f"added tokens {added_tokens} (model vocab {model_cfg.vocab_size})")
    if lora_config is not None:
        n_train, n_all = lora.trainable_fraction(raw)
        print0(
            f"LoRA rank {cfg.lora_rank}, alpha {cfg.lora_alpha:g} on {', '.join(lora_config['targets'])}: "
            f"{n_train:,} of {n_all:,} parameters train ({n_train / n_all:.2%})"
        )
    print0(
        f"batch: {cfg.batch_size} x {'up to ' if sft_data else ''}{T} tokens x {dist.world_size} processes "
        f"x {grad_accum} accumulation "
        f"= {total:,} tokens/step; {cfg.max_steps} steps"
    )

    # --- stop cleanly on SIGTERM / SIGINT: finish the step, save, exit ---------------------------
    stop_signal: list[int] = []

    def on_signal(signum: int, frame: Any) -> None:
        stop_signal.append(signum)

    previous_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}

    def save(at_step: int, is_best: bool = False) -> None:
        """Checkpoint the state *before* step `at_step`: resuming from it runs that step next."""
        tensors = get_model_state_dict(raw, options=full)  # collective under FSDP: every rank calls it
        state = {
            "optimizer": get_optimizer_state_dict(raw, optimizer, options=full),
            "scaler": scaler.state_dict(),
            "loader": train_loader.state_dict(),
            "step": at_step,
            "best_val": best_val,
            "bad_evals": bad_evals,
            "skips": skips,
            "rng": {
                "cpu": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else [],
            },
        }
        if not dist.is_main:
            return
        extra = {"train": cfg.to_dict(), "tokenizer": tokenizer_spec, "step": at_step, "best_val": best_val}
        if lora_config is not None:  # the weights hold the frozen base and the adapters (lora_A, lora_B)
            extra["lora"] = lora_config
        path = ckpt.save_checkpoint(ckpt.step_dir(out_dir, at_step), raw, extra, state, tensors)
        ckpt.set_pointer(out_dir, ckpt.LATEST, path)
        if is_best:
            ckpt.set_pointer(out_dir, ckpt.BEST, path)
        ckpt.prune(out_dir, cfg.keep_last)

    # --- the loop -------------------------------------------------------------------------------
    step_times: list[float] = []
    t_start, tokens_seen, last_log_loss, stopped = time.perf_counter(), 0, math.nan, ""
    first_step = step
    while True:
        last = step >= cfg.max_steps

        # --- eval: val loss (all-reduced), HellaSwag, samples; early stopping -------------------
        eval_now = has_val and (
            last or (cfg.eval_interval and step % cfg.eval_interval == 0 and step > first_step)
        )
        is_best = False
        if eval_now:
            from gpt2lab.evaluate import evaluate_batches, evaluate_loss

            if sft_data:  # every val example, each once
                batches = sft.eval_batches(val_examples, cfg.batch_size, pad_id, dist.rank, dist.world_size)
                result = evaluate_batches(raw, batches, device, autocast=autocast())
            else:
                result = evaluate_loss(
                    raw,
                    cfg.data,
                    "val",
                    cfg.batch_size,
                    T,
                    cfg.eval_tokens or None,
                    device,
                    autocast=autocast(),
                )
            raw.train()
            val = result["loss"]
            is_best = val < best_val
            best_val, bad_evals = (val, 0) if is_best else (best_val, bad_evals + 1)
            logger.log({"step": step, "val_loss": val, "val_perplexity": result["perplexity"]})
            print0(f"step {step:>6}: val loss {val:.4f} (best {best_val:.4f})")
            logger.plot()
            if cfg.early_stopping_patience and bad_evals >= cfg.early_stopping_patience:
                stopped = f"early stopping: no better val loss in {bad_evals} evaluations"
        if cfg.hellaswag_interval and (last or (step % cfg.hellaswag_interval == 0 and step > first_step)):
            from gpt2lab.evaluate import hellaswag, hellaswag_file, load_hellaswag
            from gpt2lab.tokenizer import get_tokenizer

            tok = tok if tok is not None else get_tokenizer(tokenizer_spec)
            hs = hellaswag(
                raw,
                tok,
                load_hellaswag(hellaswag_file(cfg.hellaswag_data), cfg.hellaswag_limit or None),
                cfg.batch_size,
                device,
                autocast=autocast(),
            )
            raw.train()
            logger.log({"step": step, "hellaswag_acc_norm": hs["acc_norm"], "hellaswag_n": hs["n"]})
            print0(f"step {step:>6}: HellaSwag acc_norm {hs['acc_norm']:.4f} ({hs['n']} examples)")
        if (
            cfg.sample_tokens
            and dist.is_main
            and (
                last
                or stopped
                or (cfg.sample_interval and step % cfg.sample_interval == 0 and step > first_step)
            )
        ):
            from gpt2lab.generate import generate
            from gpt2lab.tokenizer import get_tokenizer

            tok = tok if tok is not None else get_tokenizer(tokenizer_spec)
            prompt = tok.encode(cfg.sample_prompt) if cfg.sample_prompt else [tok.eot_id]
            ids = generate(
                raw,
                prompt,
                cfg.sample_tokens,
                temperature=0.8,
                top_k=200,
                seed=cfg.seed,
                eot_id=tok.eot_id,
                vocab_size=tok.vocab_size,
            )
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
            save(step, is_best)
        if last or stopped:
            break

        # --- step: grad_accum micro-batches, clip, optimizer ------------------------------------
        t0 = time.perf_counter()
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=device)
        step_tokens = 0  # tokens in this step's batches (.jsonl rows are padded to their batch's longest)
        for micro in range(grad_accum):
            x, y = train_loader.next_batch()
            step_tokens += x.numel() * dist.world_size
            sync = micro == grad_accum - 1  # gradients are reduced across processes on the last micro-step
            if cfg.fsdp and dist.enabled:
                raw.set_requires_gradient_sync(sync)
            with model.no_sync() if dist.enabled and not cfg.fsdp and not sync else contextlib.nullcontext():
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
                distributed.teardown()
                raise UserError(
                    f"{msg}; stopped. The last good checkpoint in {out_dir} is intact "
                    "(resume with --resume, perhaps with a lower learning rate)"
                )
            print0(f"{msg}; batch skipped ({skips}/{cfg.max_skips})")
            step += 1
            continue
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        step_times.append(dt)
        tokens_seen += step_tokens

        # --- log --------------------------------------------------------------------------------
        if step % cfg.log_interval == 0 or step == cfg.max_steps:
            last_log_loss = distributed.all_reduce_mean(loss_sum).item()
            tok_s = step_tokens / dt
            elapsed = time.perf_counter() - t_start
            eta = (cfg.max_steps - step) * statistics.median(step_times[-50:])
            event = {
                "step": step,
                "train_loss": last_log_loss,
                "lr": lr,
                "grad_norm": norm.item(),
                "tokens_per_sec": tok_s,
                "step_ms": dt * 1e3,
                "elapsed_s": elapsed,
            }
            mfu = ""
            if peak:
                event["mfu"] = tok_s * flops_per_token / peak / dist.world_size
                mfu = f" | MFU {event['mfu']:.1%}"
            logger.log(event)
            done = step / cfg.max_steps
            bar = "█" * int(20 * done) + "·" * (20 - int(20 * done))
            print0(
                f"step {step:>6}/{cfg.max_steps} {bar} | loss {last_log_loss:.4f} | lr {lr:.2e} | "
                f"norm {norm.item():.2f} | {tok_s / 1e3:,.1f}K tok/s{mfu} | {dt * 1e3:.0f} ms | "
                f"{fmt_time(elapsed)} | ETA {fmt_time(eta)}"
            )

    # --- the end: a LoRA run also writes its adapter (and, asked, the merged model) -------------
    for s, handler in previous_handlers.items():
        signal.signal(s, handler)
    if lora_config is not None and dist.is_main:
        from gpt2lab.interop import peft

        path = peft.save_adapter(
            raw,
            out_dir / "adapter",
            base=cfg.init_from,
            tokenizer=tok,
            template_tokens=template_tokens,
            extra={"pad_vocab_multiple": cfg.pad_vocab_multiple, "tokenizer": tokenizer_spec, "step": step},
        )
        size = (path / peft.WEIGHTS).stat().st_size
        print0(f"adapter: {path} ({size / 1e6:.2f} MB)")
        if cfg.merge:
            merged = ckpt.save_checkpoint(
                out_dir / "merged",
                lora.merged_copy(raw),
                {"train": cfg.to_dict(), "tokenizer": tokenizer_spec, "step": step, "merged_from": str(path)},
            )
            print0(f"merged model: {merged} (an ordinary checkpoint: sample, eval, serve, convert)")
    logger.plot()
    logger.close()
    median_ms = statistics.median(step_times) * 1e3 if step_times else math.nan
    summary = {
        "step": step,
        "train_loss": last_log_loss,
        "best_val_loss": best_val,
        "median_step_ms": median_ms,
        "tokens": tokens_seen,
        "stopped": stopped or "max_steps reached",
        "out_dir": str(out_dir),
    }
    print0(
        f"done: {summary['stopped']} at step {step}; best val loss {best_val:.4f}; median step time "
        f"{median_ms:.1f} ms; checkpoints in {out_dir}"
    )
    distributed.teardown()
    return summary
