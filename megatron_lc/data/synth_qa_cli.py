"""``megatron-lc data synth-qa``: the flags and the run of the synthetic QA stage (``synth_qa.py`` does the work).

Argparse only at import time (no torch, no tokenizer), so ``megatron-lc data --help`` stays light.
"""
from __future__ import annotations

import argparse
import os


def add_args(p: argparse.ArgumentParser) -> None:
    """Add this stage's arguments to its argparse parser ``p``."""
    p.add_argument("inputs", nargs="+", metavar="DOCS", help="document JSONL / JSONL.gz / Parquet files or folders")
    p.add_argument("--kind", default="multi-doc", choices=("multi-doc", "single-doc"),
                   help="multi-doc: several documents shuffled, questions over one or two of them; single-doc: "
                        "questions over the segments of one long document (default multi-doc)")
    p.add_argument("--length", default="4096", metavar="N[,N...]",
                   help="target chat lengths in tokens, comma-separated, K = 1024 (e.g. 4K,32K,360K); each chat "
                        "fits its target and is filled to near it (default 4096)")
    p.add_argument("--num", type=int, default=100, help="chats per --length (default 100)")
    p.add_argument("--questions", type=int, default=3, help="questions (user/assistant turns) per chat (default 3)")
    p.add_argument("--min-docs", type=int, default=4,
                   help="multi-doc: each document takes at most length / this many tokens, so a chat holds at "
                        "least this many documents (default 4)")
    p.add_argument("--compare-share", type=float, default=0.25,
                   help="multi-doc: share of questions that need two documents (which number is larger) "
                        "(default 0.25)")
    p.add_argument("--answer-words", default="1-3", metavar="LO-HI",
                   help="--writer rule: a copy question's answer is this many words, drawn per question (default "
                        "1-3; the question says how many)")
    p.add_argument("--key-words", type=int, default=5, metavar="N",
                   help="--writer rule: words in a question's quoted key phrase (default 5); the key is unique in "
                        "its context, so with 1 only words that occur once there are asked about")
    p.add_argument("--seed", type=int, default=0, help="the same seed gives byte-identical output (default 0)")
    p.add_argument("--tokenizer", default="bytes",
                   help="counts the tokens of --length: sentencepiece .model, HF tokenizer.json or folder, or "
                        "bytes (default bytes); use the one `data sft` will use")
    p.add_argument("--out", required=True, metavar="FILE.jsonl",
                   help="chats in OpenAI messages form with their QA metadata; the report goes to "
                        "FILE.report.json")
    p.add_argument("--writer", default="rule", choices=("rule", "openai"),
                   help="rule: copy questions over the text, built in (default); openai: an OpenAI-compatible "
                        "chat endpoint writes the questions (--api-base, --api-model)")
    p.add_argument("--api-base", default=None, help="--writer openai: the endpoint, e.g. http://localhost:8000/v1")
    p.add_argument("--api-model", default=None, help="--writer openai: the model name the endpoint serves")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY",
                   help="--writer openai: environment variable holding the API key (default OPENAI_API_KEY; "
                        "unset: no key sent)")
    p.add_argument("--text-key", default="text", help="record field holding the text (default text)")
    p.add_argument("--source-key", default="source", help="record field naming the source (default source)")
    p.add_argument("--title-key", default="title",
                   help="record field holding the document's title (default title; missing: its path field, "
                        "else the first line of its text)")
    p.add_argument("--on-error", default="skip", choices=("skip", "fail"),
                   help="a corrupt input line: report it with file:line and go on (skip, default) or stop (fail)")
    p.add_argument("--allow-partial-input", action="store_true",
                   help="exit 0 even when an input file could not be read to its end (the INPUT LOST line stays)")


def run(args: argparse.Namespace) -> int:
    """Run the stage: read the documents, write the chats and the report; returns the exit status."""
    from ..configtools import ConfigError
    from ..files import write_json
    from . import synth_qa
    from .documents import ReadReport, input_status
    from .tokenizer import load_tokenizer

    lengths = synth_qa.parse_lengths(args.length)
    cfg = synth_qa.SynthConfig(kind=args.kind, questions=args.questions, min_docs=args.min_docs,
                               compare_share=args.compare_share, seed=args.seed)
    cfg.check()
    if args.num < 1:
        raise ConfigError(f"--num {args.num}: want at least one chat")
    if args.writer == "openai":
        if not args.api_base or not args.api_model:
            raise ConfigError("--writer openai needs --api-base URL and --api-model NAME")
        writer = synth_qa.OpenAIWriter(args.api_base, args.api_model, os.environ.get(args.api_key_env) or None,
                                       questions=args.questions)
    else:
        if args.key_words < 1:
            raise ConfigError(f"--key-words {args.key_words}: want at least 1")
        writer = synth_qa.RuleBasedWriter(phrase_words=args.key_words,
                                          answer_words=synth_qa.parse_range(args.answer_words, "--answer-words"))
    tokenizer = load_tokenizer(args.tokenizer)
    read = ReadReport()
    pool, skipped = synth_qa.load_pool(args.inputs, args.text_key, args.source_key, args.title_key, args.on_error,
                                       read)
    print(read.format())
    print(f"{len(pool):,} documents usable" + "".join(f"; {n:,} left out: {why}" for why, n in skipped.items()))
    report = synth_qa.generate(pool, tokenizer, writer, cfg, lengths, args.num, args.out)
    report.update({"inputs": list(args.inputs), "tokenizer": args.tokenizer, "read": read.as_dict(),
                   "documents_usable": len(pool), "documents_left_out": dict(skipped)})
    path = args.out + ".report.json"
    write_json(path, report)
    print(synth_qa.format_report(report))
    print(f"wrote {args.out} and {path}")
    return input_status(read.as_dict(), args.allow_partial_input)
