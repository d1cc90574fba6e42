"""``megatron-lc convert``: between our checkpoint folders (``step_<N>/``) and HF Qwen2 folders, either way."""
from __future__ import annotations

import argparse


def add_convert_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--from", dest="source", required=True,
                   help="a checkpoint folder step_<N>/ (ours) or an HF Qwen2 folder (config.json + safetensors)")
    p.add_argument("--to", dest="target", required=True,
                   help="output: an HF folder (from a checkpoint), or a checkpoint folder step_0/ (from HF)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="dtype of the written HF weights (default: float32)")


def run_convert(args: argparse.Namespace) -> int:
    """Convert ``--from`` to the other kind of folder at ``--to``."""
    from .convert import checkpoint_to_hf, folder_kind, hf_to_checkpoint

    if folder_kind(args.source, "--from") == "checkpoint":
        checkpoint_to_hf(args.source, args.target, dtype=args.dtype)
    else:
        hf_to_checkpoint(args.source, args.target)
    print(f"wrote {args.target}")
    return 0
