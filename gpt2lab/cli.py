"""The `gpt2lab` command: subcommands -> config -> the module that does the work. No logic here."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from typing import Any

from gpt2lab.config import PRESETS, GPTConfig, SampleConfig
from gpt2lab.errors import UserError


def _parse_optional(inner: type) -> Any:
    def parse(text: str) -> Any:
        return None if text.lower() in ("none", "null") else inner(text)

    parse.__name__ = inner.__name__  # argparse names the type in its error messages
    return parse


def add_config_flags(parser: argparse.ArgumentParser, cls: type, group_title: str) -> None:
    """One kebab-case flag per dataclass field (`n_embd` -> `--n-embd`), typed from its annotation.

    Flags default to "not given", so only what the user types overrides the preset or recipe.
    """
    group = parser.add_argument_group(group_title)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
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
            flag, dest=f.name, default=argparse.SUPPRESS, help=f"default: {f.default!r}", **kwargs
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
    from gpt2lab.pretrained import convert

    print(convert(args.out, ckpt=args.ckpt, pretrained=args.pretrained))


def cmd_sample(args: argparse.Namespace) -> None:
    from gpt2lab.generate import run

    run(SampleConfig(**config_overrides(args, SampleConfig)))


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
        help="Hugging Face GPT-2 <-> gpt2lab checkpoint",
        description="--pretrained NAME_OR_DIR writes a gpt2lab checkpoint; --ckpt DIR writes a Hugging Face "
        "GPT-2 directory (loadable by transformers.GPT2LMHeadModel.from_pretrained).",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="gpt2lab checkpoint directory to export")
    src.add_argument(
        "--pretrained", help="Hugging Face GPT-2 directory, or a hub name (gpt2, gpt2-medium, ...)"
    )
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser(
        "sample",
        help="generate text from a checkpoint or a pretrained GPT-2",
        description="One of --ckpt DIR or --pretrained NAME_OR_DIR. With --prompt or --prompt-file: "
        "print the samples; with neither: interactive, one prompt per line until end of input.",
    )
    add_config_flags(p, SampleConfig, "sampling")
    p.set_defaults(func=cmd_sample)
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
