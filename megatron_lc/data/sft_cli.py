"""``megatron-lc data sft CHATS... --tokenizer T --out PREFIX``: chats (OpenAI ``messages`` or ShareGPT
``conversations`` JSONL) -> ChatML token ids + answer mask, an SFT dataset (sft_format.py), with a report printed and
written as ``PREFIX.report.json``. The work is ``chat_data.build_sft_dataset``; this module only parses flags and
prints, and imports nothing heavy at import time (``megatron-lc data --help`` stays light)."""
from __future__ import annotations

import argparse

from .chat_template import DEFAULT_SYSTEM
from .documents import INPUT_LOST_STATUS, ON_ERROR, input_status


def add_args(p: argparse.ArgumentParser) -> None:
    """Add the ``data sft`` arguments to its argparse parser ``p``."""
    p.add_argument("inputs", nargs="+", metavar="CHATS",
                   help="JSONL / JSONL.gz files (or folders of them), one chat per line: {\"messages\": [{\"role\", "
                        "\"content\"}, ...]} or {\"conversations\": [{\"from\": human|gpt|system, \"value\"}, ...]}")
    p.add_argument("--tokenizer", required=True,
                   help="sentencepiece .model or HF tokenizer.json (or folder) holding <|im_start|> and <|im_end|> "
                        "(`megatron-lc data train-tokenizer` adds them; the byte tokenizer has none)")
    p.add_argument("--out", required=True, help="output prefix: writes PREFIX.bin/.idx (tokens), "
                                                "PREFIX.answer.bin/.idx (answer mask) and PREFIX.report.json")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="longest chat in tokens (the training data.seq_len); a longer one is an error unless "
                        "--truncate left (default: no limit)")
    p.add_argument("--truncate", choices=("left",), default=None,
                   help="left: cut a chat over --max-tokens from the left of its context, never an answer token "
                        "(one that cannot fit so is dropped and counted)")
    p.add_argument("--last-turn-only", action="store_true",
                   help="only the last assistant turn of each chat carries loss (default: every assistant turn)")
    system = p.add_mutually_exclusive_group()
    system.add_argument("--system", default=DEFAULT_SYSTEM, metavar="TEXT",
                        help=f"system message for chats that have none (default: Qwen2's {DEFAULT_SYSTEM!r})")
    system.add_argument("--no-default-system", action="store_true",
                        help="chats without a system message get none")
    p.add_argument("--on-error", default="skip", choices=ON_ERROR,
                   help="a record that is not a chat (bad JSON, unknown role, turns out of order, no assistant "
                        "turn, ...): report it with file:line and go on (skip, default), or stop (fail)")
    p.add_argument("--allow-partial-input", action="store_true",
                   help=f"a file that cannot be read to its end (a truncated .jsonl.gz) still gives what was read "
                        f"and an INPUT LOST line; exit 0 instead of {INPUT_LOST_STATUS}")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Build the dataset, print and write its report; returns the exit status (``INPUT_LOST_STATUS`` when an
    input was cut short, unless ``--allow-partial-input``)."""
    from ..files import write_json
    from .chat_data import build_sft_dataset, check_sft_options

    check_sft_options(args.max_tokens, args.truncate)
    report = build_sft_dataset(args.inputs, args.tokenizer, args.out, max_tokens=args.max_tokens,
                               truncate=args.truncate, last_turn_only=args.last_turn_only,
                               default_system=None if args.no_default_system else args.system,
                               on_error=args.on_error, progress=not args.no_progress)
    path = report["prefix"] + ".report.json"
    write_json(path, report)
    print(format_report(report))
    print(f"wrote {report['prefix']}.bin/.idx (tokens), {report['prefix']}.answer.bin/.idx (answer mask) and {path}")
    return input_status(report["read"], args.allow_partial_input)


def format_report(report: dict) -> str:
    """The report of ``build_sft_dataset`` as lines for a terminal."""
    read, dropped = report["read"], report["dropped"]
    share = 100 * report["answer_tokens"] / max(report["tokens"], 1)
    lines = [(f"read {read['files']} files, {read['lines']:,} lines: {report['chats_read']:,} chats, "
              f"{read['blank']:,} blank, {read['corrupt']:,} not chats ({report['chats_per_s']:,.0f} chats/s)")]
    lines.append(f"wrote {report['written']:,} chats, {report['tokens']:,} tokens, {report['answer_tokens']:,} "
                 f"answer tokens ({share:.1f}%), longest {report['max_length']:,}; {report['too_long']:,} over "
                 f"--max-tokens, {report['truncated']:,} of them truncated")
    lines.append(f"dropped {dropped['total']:,}" + (":" if dropped["total"] else ""))
    for reason, row in dropped["by_reason"].items():
        lines.append(f"  {row['count']:,} {reason}: {'; '.join(row['first'][:3])}"
                     f"{' ...' if row['count'] > 3 else ''}")
    lines.append("length histogram (tokens: chats): " + ", ".join(f"{k}: {v:,}" for k, v in
                                                                   report["length_histogram"].items()))
    return "\n".join(lines)
