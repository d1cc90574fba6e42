"""``megatron-lc train`` and ``megatron-lc convert``: argument parsing and the glue to the trainer and checkpoints."""
from __future__ import annotations

import argparse
import os

from ..configtools import ConfigError


def add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML run config (see configs/); omitted: defaults plus the overrides")
    p.add_argument("--resume", help="none | auto (newest complete checkpoint in checkpoint.dir) | a step_<N> folder; "
                                    "same as checkpoint.resume=...")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="override config values, e.g. optim.lr=1e-4 train.steps=10 parallel.cp=2")


def run_train(args: argparse.Namespace) -> int:
    """Load and check the config (before any process group starts), then train."""
    from .config import load_train_config

    overrides = list(args.overrides)
    if args.resume:
        overrides.append(f"checkpoint.resume={args.resume}")
    cfg = load_train_config(args.config, overrides)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cfg.check_world(world)  # a mesh that does not fit the world fails here, on every rank, before any collective
    from .trainer import train

    train(cfg)
    return 0


def add_convert_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--from", dest="source", required=True,
                   help="a checkpoint folder step_<N>/ (ours) or an HF Qwen2 folder (config.json + safetensors)")
    p.add_argument("--to", dest="target", required=True,
                   help="output: an HF folder (from a checkpoint), or a checkpoint folder step_0/ (from HF)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="dtype of the written HF weights (default: float32)")


def run_convert(args: argparse.Namespace) -> int:
    from .convert import checkpoint_to_hf, hf_to_checkpoint, is_checkpoint

    if not os.path.isdir(args.source):
        raise ConfigError(f"--from {args.source}: no such folder")
    if is_checkpoint(args.source):
        checkpoint_to_hf(args.source, args.target, dtype=args.dtype)
    elif os.path.isfile(os.path.join(args.source, "config.json")):
        hf_to_checkpoint(args.source, args.target)
    else:
        raise ConfigError(f"--from {args.source} is neither a checkpoint (trainer_state.pt) nor an HF folder "
                          f"(config.json)")
    print(f"wrote {args.target}")
    return 0
