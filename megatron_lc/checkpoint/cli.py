"""``megatron-lc convert``: between our checkpoint folders (``step_<N>/``) and HF Qwen2 folders, either way."""
from __future__ import annotations

import argparse
import os


def add_convert_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--from", dest="source", required=True,
                   help="a checkpoint folder step_<N>/ (ours) or an HF Qwen2 folder (config.json + safetensors)")
    p.add_argument("--to", dest="target", required=True,
                   help="output: an HF folder (from a checkpoint), or a checkpoint folder step_0/ (from HF)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="dtype of the written HF weights (default: float32)")
    p.add_argument("--tokenizer", default=None,
                   help="checkpoint -> HF: the tokenizer whose files are copied beside the weights (sentencepiece "
                        ".model, HF tokenizer.json, or a folder holding either) (default: the one recorded in the "
                        "meta of the run's training dataset)")
    p.add_argument("--force", action="store_true",
                   help="write into an existing non-empty --to folder: files of the same names are replaced, other "
                        "files are kept (without it, only a new, empty or half-written checkpoint folder is used)")
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="HF -> checkpoint: accept NaN/inf weights (refused by default)")


def run_convert(args: argparse.Namespace) -> int:
    """Convert ``--from`` to the other kind of folder at ``--to``; print what was written where."""
    from ..configtools import ConfigError
    from .convert import checkpoint_to_hf, folder_kind, hf_to_checkpoint

    if folder_kind(args.source, "--from") == "checkpoint":
        wrote = checkpoint_to_hf(args.source, args.target, dtype=args.dtype, force=args.force,
                                 tokenizer=args.tokenizer)
        record = wrote["record"]
        print(f"wrote HF folder {os.path.abspath(args.target)}: {', '.join(wrote['files'])}")
        print(f"  trained at seq_len {record['trained_seq_len']} for {record['steps']} steps (training.json)"
              if record["trained_seq_len"] else "  training length unknown (a weights-only checkpoint)")
        if wrote["tokenizer_files"]:
            print(f"  tokenizer: {', '.join(wrote['tokenizer_files'])} copied from {record['tokenizer']} "
                  f"({wrote['tokenizer_note']})")
        elif record["tokenizer"] == "bytes":
            print("  tokenizer: the UTF-8 byte tokenizer (no files; training.json records it for eval)")
        else:
            print(f"  tokenizer: none copied ({wrote['tokenizer_note']}); pass --tokenizer to convert (or to eval) "
                  f"with the tokenizer the model was trained with")
    else:
        if args.tokenizer is not None:
            raise ConfigError(f"--tokenizer {args.tokenizer}: only for checkpoint -> HF (an HF folder keeps its "
                              f"tokenizer files; a checkpoint has none); leave it out")
        hf_to_checkpoint(args.source, args.target, force=args.force, allow_nonfinite=args.allow_nonfinite)
        print(f"wrote checkpoint {os.path.abspath(args.target)} (weights only: a run started from it begins at "
              f"step 0 with a fresh optimizer)")
    return 0
