"""The ``megatron-lc`` command: one subcommand per job, in one flat table (``COMMANDS``).

Each entry is a help line, a function that adds its flags to an argparse parser, and a function that runs it from
the parsed namespace; they live in each package's ``cli.py`` (the demo is an app of its own) and are imported only
for the subcommand used: ``megatron-lc --help`` and ``megatron-lc train --help`` import no torch. A new job is one
entry here; ``megatron-lc --help`` lists exactly what exists. Nothing imports this module: it is the entry point
(``megatron-lc``, ``python -m megatron_lc.cli``, ``torchrun -m megatron_lc.cli train ...``).
"""
from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import dataclass
from typing import Any

from . import __version__
from .configtools import ConfigError


@dataclass(frozen=True)
class Command:
    """One subcommand: its help line and where its two functions live (``"module:function"``, imported only when
    that subcommand is used, so ``--help`` and usage errors answer without importing torch)."""
    help: str
    add_args: str  # adds its flags to an argparse parser
    run: str  # runs it from the parsed namespace; a return value other than an int exit status means success
    intermixed: bool = False  # flags may come between its positionals (train: overrides after --resume auto)

    def load(self, which: str):
        module, name = getattr(self, which).split(":")
        return getattr(importlib.import_module(module, __package__), name)


COMMANDS: dict[str, Command] = {
    "demo": Command("train a 3M-parameter model on the stdlib's docstrings for a few minutes on CPU, then generate",
                    ".demo:add_demo_args", ".demo:run_demo"),
    "train": Command("train a model from a YAML config (one process, or every process of torchrun)",
                     ".train.cli:add_train_args", ".train.cli:run_train", intermixed=True),
    "convert": Command("convert between our checkpoints (step_<N>/) and HF Qwen2 folders",
                       ".checkpoint.cli:add_convert_args", ".checkpoint.cli:run_convert"),
    "bench": Command("benchmark the kernels of each op (bench kernels), a training step against HF transformers "
                     "(bench train), context-parallel attention (bench cp) or tokenization (bench data), and write "
                     "a table and plot", ".bench.cli:add_bench_args", ".bench.cli:run_bench"),
    "data": Command("prepare training data: train a tokenizer, clean and deduplicate, tokenize into .bin/.idx, mix "
                    "by per-source length upsampling (data STAGE)", ".data.cli:add_data_args", ".data.cli:run_data"),
    "eval": Command("evaluate a model: needle in a haystack over lengths x depths (eval niah), loss by position "
                    "and domain (eval loss) or long-context QA, exact match and token F1 (eval qa), with JSON, table "
                    "and PNG", ".eval.cli:add_eval_args",
                    ".eval.cli:run_eval"),
    "generate": Command("continue a prompt with a trained model or HF folder (sharded over the ranks under torchrun)",
                        ".generate.cli:add_generate_args", ".generate.cli:run_generate"),
    "chat": Command("talk with a model in the ChatML format, one message per line of stdin (/reset, /quit)",
                    ".generate.cli:add_chat_args", ".generate.cli:run_chat"),
}


def _chosen(argv: list[str]) -> str | None:
    """The subcommand named in ``argv`` (the top level has no flags that take a value), or None."""
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(only: str | None = "*") -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser and each subcommand's parser (for errors prefixed by the subcommand). ``only``: the one
    subcommand whose flags are added (and whose module is imported); "*" adds every subcommand's, None none."""
    parser = argparse.ArgumentParser(prog="megatron-lc",
                                     description="Long-context LLM training for Qwen2-style models.")
    parser.add_argument("--version", action="version", version=f"megatron-lc {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers = {}
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.help, description=command.help[0].upper() + command.help[1:] + ".")
        if only in ("*", name):
            command.load("add_args")(p)
        subparsers[name] = p
    return parser, subparsers


def parse_args(parser: argparse.ArgumentParser, subparsers: dict[str, argparse.ArgumentParser],
               argv: list[str]) -> argparse.Namespace:
    """``argv`` parsed; an ``intermixed`` command's own arguments are parsed with parse_intermixed_args (argparse
    cannot do that through subparsers), so ``train --resume auto train.steps=9`` and ``train a=1 --resume auto
    b=2`` keep every override, in order."""
    args, extra = parser.parse_known_args(argv)
    if args.command is not None and COMMANDS[args.command].intermixed:
        rest = argv[argv.index(args.command) + 1:]  # the top level has no flags that take a value
        return subparsers[args.command].parse_intermixed_args(rest, argparse.Namespace(command=args.command))
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``) and run the subcommand; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser, subparsers = build_parser(_chosen(argv))
    args = parse_args(parser, subparsers, argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        status = COMMANDS[args.command].load("run")(args)
    except ConfigError as e:  # a bad flag value: usage error (exit 2) naming the flag, no traceback
        subparsers[args.command].error(str(e))
    return status if isinstance(status, int) else 0


if __name__ == "__main__":
    sys.exit(main())
