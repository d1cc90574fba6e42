"""``megatron-lc bench WHAT``: one subcommand per benchmark, each with its own flags (see megatron_lc.bench)."""
from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import NamedTuple

from . import cp, data, kernels, train


class _Bench(NamedTuple):
    help: str
    doc: str  # the subcommand's description: the first paragraph of its module's docstring
    add_args: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


BENCHES = {
    "kernels": _Bench("each op: torch, torch.compile, our Triton kernels (table and plot)", kernels.__doc__,
                      kernels.add_kernels_args, kernels.run_kernels),
    "train": _Bench("one training step: ours vs HF transformers (+ Liger-Kernel): tokens/s, peak memory, MFU, "
                    "longest S", train.__doc__, train.add_train_args, train.run_train),
    "cp": _Bench("context-parallel attention per rank vs CP degree: time and peak memory (spawns the ranks)",
                 cp.__doc__, cp.add_cp_args, cp.run_cp),
    "data": _Bench("tokenize+pack throughput vs the tokenizer's own batch encode", data.__doc__, data.add_data_args,
                   data.run_data),
}


def add_bench_args(p: argparse.ArgumentParser) -> None:
    """Add one subparser per benchmark (``args.what``) with that benchmark's flags."""
    sub = p.add_subparsers(dest="what", metavar="WHAT", required=True)
    for what, bench in BENCHES.items():
        bench.add_args(sub.add_parser(what, help=bench.help, description=bench.doc.split("\n\n")[0]))


def run_bench(args: argparse.Namespace) -> int:
    """Run the benchmark ``args.what``; returns its exit status."""
    return BENCHES[args.what].run(args)
