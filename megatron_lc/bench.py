"""``megatron-lc bench WHAT``: one subcommand per benchmark, each with its own flags.

- ``kernels``: each op's implementations (bench_kernels.py).
- ``train``: one training step, ours vs HF transformers (+ Liger-Kernel) (bench_train.py).
"""
from __future__ import annotations

import argparse


def add_bench_args(p: argparse.ArgumentParser) -> None:
    from . import bench_kernels, bench_train

    sub = p.add_subparsers(dest="what", metavar="WHAT", required=True)
    kernels = sub.add_parser("kernels", help="each op: torch, torch.compile, our Triton kernels (table and plot)",
                             description=bench_kernels.__doc__.split("\n\n")[0])
    bench_kernels.add_bench_args(kernels)
    train = sub.add_parser("train", help="one training step: ours vs HF transformers (+ Liger-Kernel): tokens/s, "
                                         "peak memory, MFU, longest S",
                           description=bench_train.__doc__.split("\n\n")[0])
    bench_train.add_train_args(train)


def run_bench(args: argparse.Namespace) -> int:
    from . import bench_kernels, bench_train

    if args.what == "kernels":
        return bench_kernels.run_bench(args)
    return bench_train.run_bench(args)
