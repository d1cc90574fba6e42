"""``megatron-lc bench WHAT``: one subcommand per benchmark, each with its own flags (see megatron_lc.bench).

Every benchmark writes under its ``--out`` folder; its default shows in ``--help``, and after the run this command
prints the folder and the files the run wrote there.
"""
from __future__ import annotations

import argparse
import os
import time
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


def written_since(folder: str, start: float, shown: int = 12) -> str:
    """The files under ``folder`` modified at or after ``start`` (a time.time()), as one comma-separated line of
    paths relative to it (the first ``shown``, then a count); "" when there are none."""
    names = sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs
                   if os.path.getmtime(os.path.join(d, f)) >= start)
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def run_bench(args: argparse.Namespace) -> int:
    """Run the benchmark ``args.what``, then print where it wrote; returns its exit status."""
    start = time.time() - 0.1  # file times come from a coarser clock: they can trail time.time() by a tick
    status = BENCHES[args.what].run(args)
    wrote = written_since(args.out, start) if os.path.isdir(args.out) else ""
    print(f"[bench {args.what}] wrote under {os.path.abspath(args.out)}: {wrote or 'nothing'}", flush=True)
    return status
