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
    p.add_argument("--force", action="store_true",
                   help="write into an existing non-empty --to folder: files of the same names are replaced, other "
                        "files are kept (without it, only a new, empty or half-written checkpoint folder is used)")
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="HF -> checkpoint: accept NaN/inf weights (refused by default)")


def run_convert(args: argparse.Namespace) -> int:
    """Convert ``--from`` to the other kind of folder at ``--to``."""
    from .convert import checkpoint_to_hf, folder_kind, hf_to_checkpoint

    if folder_kind(args.source, "--from") == "checkpoint":
        checkpoint_to_hf(args.source, args.target, dtype=args.dtype, force=args.force)
    else:
        hf_to_checkpoint(args.source, args.target, force=args.force, allow_nonfinite=args.allow_nonfinite)
    print(f"wrote {args.target}")
    return 0
