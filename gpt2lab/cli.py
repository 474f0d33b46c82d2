"""The `gpt2lab` command: subcommands -> config -> the module that does the work. No logic here."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from typing import Any

from gpt2lab.config import (
    PRESETS,
    ChatConfig,
    GPTConfig,
    PrepareConfig,
    SampleConfig,
    TrainConfig,
    finetune_defaults,
    load_recipe,
)
from gpt2lab.errors import UserError


def _parse_optional(inner: type) -> Any:
    def parse(text: str) -> Any:
        return None if text.lower() in ("none", "null") else inner(text)

    parse.__name__ = inner.__name__  # argparse names the type in its error messages
    return parse


def add_config_flags(
    parser: argparse.ArgumentParser,
    cls: type,
    group_title: str,
    exclude: tuple[str, ...] = (),
    defaults: dict[str, Any] | None = None,
) -> None:
    """One kebab-case flag per dataclass field (`n_embd` -> `--n-embd`), typed from its annotation.

    Flags default to "not given", so only what the user types overrides the preset or recipe.
    """
    group = parser.add_argument_group(group_title)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        hint, kwargs = hints[f.name], {}
        args = typing.get_args(hint)
        if hint is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(hint) is typing.Literal:
            kwargs["choices"] = list(args)
        elif isinstance(hint, types.UnionType) and type(None) in args:
            kwargs["type"] = _parse_optional(next(a for a in args if a is not type(None)))
            kwargs["metavar"] = f"{kwargs['type'].__name__.upper()}|none"
        else:
            kwargs["type"] = hint
        flag = "--" + f.name.replace("_", "-")
        group.add_argument(
            flag,
            dest=f.name,
            default=argparse.SUPPRESS,
            help=f"default: {(defaults or {}).get(f.name, f.default)!r}",
            **kwargs,
        )


def config_overrides(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The dataclass fields the user set on the command line."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}


def cmd_info(args: argparse.Namespace) -> None:
    from gpt2lab.info import describe, presets_table

    overrides = config_overrides(args, GPTConfig)
    if args.preset is None and not overrides:
        print(presets_table())
        return
    name = args.preset or "gpt2"
    print(describe(GPTConfig.preset(name, **overrides), name, args.seq_len))


def cmd_convert(args: argparse.Namespace) -> None:
    from gpt2lab.interop.convert import convert

    print(
        convert(
            args.out,
            ckpt=args.ckpt,
            pretrained=args.pretrained,
            adapter=args.adapter,
            format=args.format,
            outtype=args.outtype,
            gpt2_vocab=args.gpt2_vocab,
        )
    )


def cmd_train(args: argparse.Namespace) -> None:
    from gpt2lab.train import run

    fields = load_recipe(args.recipe) if args.recipe else {"model": {}}
    fields.update(config_overrides(args, TrainConfig))
    fields["model"] = {**fields["model"], **config_overrides(args, GPTConfig)}
    run(TrainConfig(**fields))


def cmd_finetune(args: argparse.Namespace) -> None:
    from gpt2lab.train import run

    fields: dict[str, Any] = {"model": {}, **finetune_defaults(getattr(args, "method", "full"))}
    fields.update({k: v for k, v in config_overrides(args, TrainConfig).items() if k != "lora_targets"})
    fields["init_from"] = args.from_ckpt or args.pretrained
    if args.lora_targets:
        fields["lora_targets"] = ",".join(args.lora_targets)
    if args.dropout is not None:
        fields["model"] = {"dropout": args.dropout}
    run(TrainConfig(**fields))


def cmd_chat(args: argparse.Namespace) -> None:
    from gpt2lab.chat import run

    run(ChatConfig(**config_overrides(args, ChatConfig)))


def cmd_prepare(args: argparse.Namespace) -> None:
    from gpt2lab.shards import run

    run(PrepareConfig(**config_overrides(args, PrepareConfig)))  # SOURCE is the positional argument


def cmd_cache(args: argparse.Namespace) -> None:
    from gpt2lab.download import run_cache

    run_cache(args.action or "list", getattr(args, "paths", []))


def cmd_tokenizer(args: argparse.Namespace) -> None:
    from gpt2lab.tokenizer import get_tokenizer, parse_ids, stats, train_tokenizer

    if args.action == "train":
        print(
            train_tokenizer(
                args.input,
                args.vocab_size,
                args.out,
                args.special,
                name=args.name,
                progress=not args.quiet,
            )
        )
        return
    tok = get_tokenizer(args.tokenizer, vocab_dir=args.gpt2_vocab, backend=args.backend, corpus=args.corpus)
    if args.action == "encode":
        text = args.text if args.text is not None else _read_text(args.input)
        print(" ".join(map(str, tok.encode(text, allowed_special="all" if args.allow_special else set()))))
    elif args.action == "decode":
        sys.stdout.write(tok.decode(parse_ids(args.ids if args.ids is not None else _read_text(args.input))))
        sys.stdout.write("\n")
    else:
        print(stats(tok, args.input, args.top))


def cmd_eval(args: argparse.Namespace) -> None:
    from gpt2lab.evaluate import run_hellaswag, run_loss

    common = dict(
        ckpt=args.ckpt,
        pretrained=args.pretrained,
        batch_size=args.batch_size,
        gpt2_vocab=args.gpt2_vocab,
        json_out=args.json,
        device=args.device,
    )
    if args.kind == "loss":
        print(
            run_loss(args.data, split=args.split, max_tokens=args.max_tokens, seq_len=args.seq_len, **common)
        )
    else:
        print(run_hellaswag(data=args.data, limit=args.limit, progress=not args.quiet, **common))


def _read_text(path: str) -> str:
    try:
        return sys.stdin.read() if path == "-" else open(path, encoding="utf-8").read()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path!r} as UTF-8 text ({e})") from None


def cmd_sample(args: argparse.Namespace) -> None:
    from gpt2lab.generate import run

    run(SampleConfig(**config_overrides(args, SampleConfig)))


# --- serve -----------------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> None:
    from gpt2lab.config import ServeConfig
    from gpt2lab.server import run

    run(ServeConfig(**config_overrides(args, ServeConfig)))


def add_serve_parser(sub: argparse._SubParsersAction) -> None:
    from gpt2lab.config import ServeConfig

    p = sub.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API, with a web playground",
        description="One of --ckpt DIR or --pretrained NAME_OR_DIR. POST /v1/completions, GET /v1/models, "
        "GET /health, and the playground at /. Binds 127.0.0.1 by default; another --host needs --api-key "
        '(or $GPT2LAB_API_KEY). Needs the serve extra: pip install -e ".[serve]".',
    )
    add_config_flags(p, ServeConfig, "serving")
    p.set_defaults(func=cmd_serve)


# --- end serve -------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpt2lab", description="GPT-2 from scratch: train, evaluate, sample, serve, fine-tune."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "info",
        help="parameters, FLOPs/token and memory of an architecture",
        description="No arguments: a table of the presets. With --preset and/or field flags: a report.",
    )
    p.add_argument(
        "--preset", choices=list(PRESETS), help="model preset (default gpt2 when fields are given)"
    )
    p.add_argument(
        "--seq-len", type=int, default=None, help="sequence length for FLOPs (default: block_size)"
    )
    add_config_flags(p, GPTConfig, "model fields (override the preset)")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser(
        "convert",
        help="export to Hugging Face / GGUF / peft, or import a Hugging Face GPT-2",
        description="--ckpt DIR writes a complete Hugging Face folder (weights, tokenizer, chat template, "
        "generation config, model card) that transformers, vLLM and lm-eval load, or with --format gguf a "
        "GGUF file for llama.cpp; --pretrained NAME_OR_DIR writes a gpt2lab checkpoint; --adapter DIR "
        "rewrites a LoRA adapter of gpt2lab's old format in peft's. Every result is read back and checked.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="gpt2lab checkpoint (or run) directory to export")
    src.add_argument(
        "--pretrained", help="Hugging Face GPT-2 directory, or a hub name (gpt2, gpt2-medium, ...)"
    )
    src.add_argument("--adapter", help="LoRA adapter directory in gpt2lab's old format, to rewrite for peft")
    p.add_argument("--out", required=True, help="output directory (a .gguf file with --format gguf)")
    p.add_argument("--format", choices=["hf", "gguf"], default="hf", help="with --ckpt: hf (default) or gguf")
    p.add_argument(
        "--outtype", choices=["f32", "f16", "q8_0"], default="f32", help="GGUF tensor type (default f32)"
    )
    p.add_argument("--gpt2-vocab", default=None, metavar="DIR", help="folder with encoder.json + vocab.bpe")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser(
        "train",
        help="train a GPT-2 (one process, or many under torchrun -m gpt2lab train ...)",
        description="Settings: defaults < --recipe NAME|PATH.toml < flags. Every TrainConfig and GPTConfig "
        "field is a flag (--learning-rate 1e-3, --n-layer 6). --resume continues the latest checkpoint in "
        "--out-dir (or --resume DIR) exactly where it stopped.",
    )
    p.add_argument("--recipe", help="recipe name (recipes/NAME.toml) or a .toml path")
    p.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=argparse.SUPPRESS,
        metavar="CKPT",
        help="resume the latest checkpoint in --out-dir, or the checkpoint CKPT",
    )
    add_config_flags(p, TrainConfig, "training settings", exclude=("model", "resume"))
    add_config_flags(p, GPTConfig, "model fields (override the recipe's preset)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "finetune",
        help="fine-tune a checkpoint or OpenAI's GPT-2 on a .jsonl, fully or with LoRA",
        description="Supervised fine-tuning through the training loop of `train` (checkpoints, --resume, "
        'logging, val loss, early stopping). --data FILE.jsonl: one {"prompt", "completion"} or '
        '{"messages": [{"role", "content"}, ...]} object per line; only completions and assistant '
        "messages count in the loss. The chat template's tokens are added to the vocabulary. LoRA runs also "
        "write OUT_DIR/adapter (and with --merge OUT_DIR/merged). Every TrainConfig field is a flag.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--from", dest="from_ckpt", metavar="CKPT", help="gpt2lab checkpoint or run directory")
    src.add_argument("--pretrained", help="Hugging Face GPT-2 directory, or a hub name (gpt2, ...)")
    p.add_argument("--data", required=True, metavar="FILE.jsonl", help="the examples")
    p.add_argument(
        "--lora-targets", nargs="+", default=None, metavar="NAME", help="layers to adapt (default c_attn)"
    )
    p.add_argument("--dropout", type=float, default=None, help="the model's dropout (default: the base's)")
    p.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=argparse.SUPPRESS,
        metavar="CKPT",
        help="resume the latest checkpoint in --out-dir, or the checkpoint CKPT",
    )
    add_config_flags(
        p,
        TrainConfig,
        "training settings (learning rate default: 5e-4 with --method lora)",
        exclude=("model", "resume", "data", "init_from", "lora_targets", "preset"),
        defaults=finetune_defaults("full"),
    )
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser(
        "chat",
        help="talk to a fine-tuned model in the terminal",
        description="One user message per line; the reply streams. /reset starts a new conversation, /quit "
        "(or end of input) leaves. --adapter DIR puts a LoRA adapter onto the base of --ckpt/--pretrained.",
    )
    add_config_flags(p, ChatConfig, "chat")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser(
        "prepare",
        help="tokenize a corpus into token shards",
        description="SOURCE: a named dataset (tinystories, wikitext103, fineweb-edu, shakespeare) or a path: "
        "a .txt file (--separator eot|blank-line|TEXT splits it into documents), a folder of .txt files, "
        "a .jsonl or .parquet file (--text-field). Re-running resumes an interrupted prepare.",
    )
    p.add_argument("source", help="named dataset or path")
    add_config_flags(p, PrepareConfig, "prepare settings", exclude=("source",))
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser(
        "cache",
        help="the downloads cache: list the pinned files and their state; seed it offline",
        description="Every file gpt2lab downloads is pinned by SHA-256 and kept in $GPT2LAB_CACHE (default "
        "~/.cache/gpt2lab). `gpt2lab cache` lists them with their state; `gpt2lab cache add FILE_OR_FOLDER "
        "...` copies in each file whose SHA-256 is pinned, so a machine without internet needs no download.",
    )
    csub = p.add_subparsers(dest="action", metavar="ACTION")
    csub.add_parser("list", help="the pinned files, where they go, their hashes and state (the default)")
    c = csub.add_parser(
        "add", help="copy pinned files (found by SHA-256 in files and folders) into the cache"
    )
    c.add_argument("paths", nargs="+", metavar="FILE_OR_FOLDER")
    p.set_defaults(func=cmd_cache)

    p = sub.add_parser(
        "tokenizer",
        help="train a byte-level BPE; encode, decode, stats",
        description="Tokenizers: gpt2 (OpenAI's vocab), a directory `tokenizer train` wrote, char, bytes.",
    )
    tsub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    t = tsub.add_parser("train", help="learn a BPE vocabulary from text files or folders")
    t.add_argument("--input", nargs="+", required=True, help="text file(s) or folder(s) (UTF-8)")
    t.add_argument("--vocab-size", type=int, required=True, help="256 bytes + merges + special tokens")
    t.add_argument("--out", required=True, help="output directory (encoder.json, vocab.bpe, vocab.tiktoken)")
    t.add_argument(
        "--special", nargs="*", default=[], metavar="TOKEN", help="special tokens besides <|endoftext|>"
    )
    t.add_argument("--name", default=None, help="tokenizer name (default: the --out folder name)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    for action, help_ in (
        ("encode", "text -> token ids"),
        ("decode", "token ids -> text"),
        ("stats", "bytes/token on a file and the first merges"),
    ):
        t = tsub.add_parser(action, help=help_)
        t.add_argument("--tokenizer", default="gpt2", help="gpt2 | bytes | char | DIR (default gpt2)")
        t.add_argument(
            "--gpt2-vocab", default=None, metavar="DIR", help="folder with encoder.json + vocab.bpe"
        )
        t.add_argument("--backend", choices=["tiktoken", "python"], default=None, help="BPE encoder")
        t.add_argument("--corpus", default=None, help="text file the char tokenizer's alphabet comes from")
        if action == "encode":
            src = t.add_mutually_exclusive_group(required=True)
            src.add_argument("--text", help="text to encode")
            src.add_argument("--input", help="UTF-8 file to encode ('-' for stdin)")
            t.add_argument(
                "--allow-special", action="store_true", help="map <|endoftext|> etc. in text to ids"
            )
        elif action == "decode":
            src = t.add_mutually_exclusive_group(required=True)
            src.add_argument("--ids", help='ids, e.g. "15496 995"')
            src.add_argument("--input", help="file of ids ('-' for stdin)")
        else:
            t.add_argument("--input", required=True, help="UTF-8 file to measure")
            t.add_argument("--top", type=int, default=20, help="how many merges to list (default 20)")
    p.set_defaults(func=cmd_tokenizer)

    p = sub.add_parser(
        "eval",
        help="loss / perplexity / bits per byte of a split; HellaSwag accuracy",
        description="Results are printed as a table and written as JSON: to --json, else next to the "
        "checkpoint as eval_loss.json / eval_hellaswag.json (--pretrained without --json: printed only).",
    )
    esub = p.add_subparsers(dest="kind", required=True, metavar="KIND")
    for kind, help_ in (
        ("loss", "mean loss, perplexity and bits per byte over all tokens of a prepared split"),
        ("hellaswag", "HellaSwag accuracy, completion style and lm-evaluation-harness style"),
    ):
        e = esub.add_parser(kind, help=help_)
        src = e.add_mutually_exclusive_group(required=True)
        src.add_argument("--ckpt", help="gpt2lab checkpoint directory")
        src.add_argument("--pretrained", help="Hugging Face GPT-2 directory, or a hub name (gpt2, ...)")
        e.add_argument(
            "--gpt2-vocab", default=None, metavar="DIR", help="folder with encoder.json + vocab.bpe"
        )
        e.add_argument("--json", default=None, metavar="OUT.json", help="where to write the results")
        e.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
        if kind == "loss":
            e.add_argument("--data", required=True, help="directory `gpt2lab prepare` wrote")
            e.add_argument("--split", default="val", help="split to evaluate (default val)")
            e.add_argument("--max-tokens", type=int, default=None, help="predict only the first N tokens")
            e.add_argument("--batch-size", type=int, default=8, help="windows per forward (default 8)")
            e.add_argument("--seq-len", type=int, default=None, help="window length (default: the context)")
        else:
            e.add_argument(
                "--data",
                default=None,
                metavar="FILE",
                help="hellaswag_val.jsonl or the 6-lines-per-task .txt (default: download the official "
                "val jsonl into $GPT2LAB_CACHE/hellaswag)",
            )
            e.add_argument("--limit", type=int, default=None, help="score only the first N examples")
            e.add_argument("--batch-size", type=int, default=4, help="examples per forward (default 4)")
            e.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "sample",
        help="generate text from a checkpoint or a pretrained GPT-2",
        description="One of --ckpt DIR or --pretrained NAME_OR_DIR. With --prompt or --prompt-file: "
        "print the samples; with neither: interactive, one prompt per line until end of input.",
    )
    add_config_flags(p, SampleConfig, "sampling")
    p.set_defaults(func=cmd_sample)

    add_serve_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except UserError as e:
        print(f"gpt2lab {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0
