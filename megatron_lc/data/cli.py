"""``megatron-lc data STAGE``: train-tokenizer, clean, tokenize, mix, verify, bench (``pipeline.py``: the flow).

A typical run::

    megatron-lc data clean raw/ --out work/clean
    megatron-lc data train-tokenizer work/clean/deduped.jsonl --vocab-size 32000 --out work/tok
    megatron-lc data tokenize work/clean/deduped.jsonl --tokenizer work/tok.model --out work/tokens --val-fraction 0.05
    megatron-lc data mix work/tokens --strategy per_source_upsample --long-share 0.7 --out work/mixed

and ``data.train_tokens: work/mixed``, ``data.val_tokens: work/tokens_val`` in the training config. A stage whose
input could not be read to its end (a truncated .jsonl.gz) writes what it read, prints an ``INPUT LOST`` line last
and exits with status 65 (``documents.INPUT_LOST_STATUS``) unless ``--allow-partial-input`` is given.
"""
from __future__ import annotations

import argparse
import json
import os

from ..configtools import ConfigError
from .documents import INPUT_LOST_STATUS, input_status


def _weights(text: str) -> dict[str, float]:
    out = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"--weights wants SOURCE=WEIGHT,..., got {part!r}")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--weights: {value!r} (for {name}) is not a number") from None
    return out


def _input_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", help="JSONL / JSONL.gz / Parquet files or folders of them")
    p.add_argument("--text-key", default="text", help="field holding the text (default text)")
    p.add_argument("--source-key", default="source",
                   help="field naming the source/domain (default source; missing: the file name)")
    p.add_argument("--on-error", default="skip", choices=("skip", "fail"),
                   help="a corrupt or truncated line: report it with file and line and go on (skip, default), or "
                        "stop (fail)")
    p.add_argument("--allow-partial-input", action="store_true",
                   help=f"a file that cannot be read to its end (a truncated .jsonl.gz) loses the rest of it: the "
                        f"stage still writes what it read and says INPUT LOST, then exits with status "
                        f"{INPUT_LOST_STATUS}; with this flag it exits 0 (the line stays)")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2)),
                   help="worker processes (default: one per CPU; 0 runs in this process)")


def add_data_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="stage", metavar="STAGE", required=True)

    t = sub.add_parser("train-tokenizer", help="train a sentencepiece BPE/unigram model (byte fallback, split "
                                               "digits, ChatML specials) on a sample of the corpus")
    _input_args(t)
    t.add_argument("--out", required=True, help="output prefix: writes PREFIX.model")
    t.add_argument("--vocab-size", type=int, default=32000)
    t.add_argument("--model-type", default="bpe", choices=("bpe", "unigram"))
    t.add_argument("--sample-sentences", type=int, default=2_000_000,
                   help="train on a seeded sample of this many sentences (lines) (default 2M; 0 = all)")
    t.add_argument("--seed", type=int, default=0)

    c = sub.add_parser("clean", help="360Zhinao cleaning rules, then exact, MinHash-LSH, paragraph (30%%) and "
                                     "sentence (sqrt N) dedup (prose only: code keeps its lines); writes "
                                     "OUT/deduped.jsonl and OUT/clean_report.json with a per-source breakdown")
    _input_args(c)
    c.add_argument("--out", required=True, help="output folder")
    c.add_argument("--rules", default=None, help="YAML file overriding CleaningRules thresholds (megatron_lc/data/"
                   "clean.py; a threshold set to null turns its rule off)")
    c.add_argument("--near-threshold", type=float, default=0.8, help="MinHash-LSH Jaccard threshold (default 0.8)")
    c.add_argument("--paragraph-fraction", type=float, default=0.3,
                   help="fraction of each identical-paragraph group deleted (default 0.3)")
    c.add_argument("--no-near", action="store_true", help="skip near-duplicate document dedup")
    c.add_argument("--no-sentence", action="store_true", help="skip sentence dedup")
    c.add_argument("--no-paragraph", action="store_true", help="skip paragraph dedup (for every source)")
    c.add_argument("--code-sources", default="", metavar="A,B",
                   help="sources whose documents are code: no paragraph/sentence dedup, --code-rules instead of the "
                        "prose rules (default: guessed per document from its --path-key extension, else its lines)")
    c.add_argument("--prose-sources", default="", metavar="C,D",
                   help="sources whose documents are prose (paragraph and sentence dedup, the 360Zhinao rules)")
    c.add_argument("--source-types", default=None, metavar="FILE.yaml",
                   help="YAML mapping source -> code or prose (with --code-sources/--prose-sources; a source given "
                        "both kinds is an error)")
    c.add_argument("--path-key", default="path",
                   help="record field with the document's file path, whose extension tells code from prose when "
                        "the source is not named (default path)")
    c.add_argument("--code-rules", default=None, metavar="FILE.yaml",
                   help="CleaningRules thresholds for code documents (default: every prose rule off, only empty "
                        "documents are removed)")
    c.add_argument("--seed", type=int, default=0)

    k = sub.add_parser("tokenize", help="tokenize into a Megatron .bin/.idx dataset (EOS after each document, "
                                        "sources in a sidecar)")
    _input_args(k)
    k.add_argument("--tokenizer", required=True, help="sentencepiece .model, HF tokenizer.json (or folder), or bytes")
    k.add_argument("--eos-token-id", type=int, default=None, help="EOS id when the tokenizer does not define one")
    k.add_argument("--out", required=True, help="output prefix: writes PREFIX.bin, PREFIX.idx and sidecars")
    k.add_argument("--val-fraction", type=float, default=None,
                   help="hold out this fraction of the documents (by document, seeded by --seed; strictly between "
                        "0 and 1) as a validation dataset at PREFIX_val, for data.val_tokens (default: no split)")
    k.add_argument("--seed", type=int, default=0, help="seed of the --val-fraction split (default 0)")

    m = sub.add_parser("mix", help="apply a mixture strategy to a tokenized dataset: per-source length upsampling "
                                   "(default), global, chosen domains, cut, original; report table, JSON and PNG")
    m.add_argument("dataset", help="prefix of a dataset written by `data tokenize`")
    m.add_argument("--out", required=True, help="output prefix")
    m.add_argument("--strategy", default="per_source_upsample",
                   choices=("original", "cut", "global_upsample", "per_source_upsample", "upsample_domains"))
    m.add_argument("--long-threshold", type=int, default=4096, help="a document is long above this many tokens")
    m.add_argument("--long-share", type=float, default=0.7, help="target share of tokens in long documents")
    m.add_argument("--weights", type=_weights, default=None,
                   help="target token share per source, SOURCE=W,... (default: the corpus' own shares)")
    m.add_argument("--total-tokens", type=int, default=None, help="output size in tokens (default: the input's)")
    m.add_argument("--domains", default="", help="comma-separated sources for upsample_domains")
    m.add_argument("--cut-length", type=int, default=None, help="piece length for the cut strategy "
                   "(default: --long-threshold)")
    m.add_argument("--keep-long-sources", action="store_true",
                   help="sources already above --long-share keep their own profile (default: brought to it)")
    m.add_argument("--seed", type=int, default=0)

    v = sub.add_parser("verify", help="check .bin/.idx datasets against the fingerprints written with them and "
                                      "print each one's token id range (scanned once and cached in PREFIX.scan.json "
                                      "when its sidecar has none)")
    v.add_argument("datasets", nargs="+", help="dataset prefixes (or the path of either file)")

    b = sub.add_parser("bench", help="tokenize+pack throughput vs the tokenizer's own batch encode, same text and "
                                     "cores")
    _input_args(b)
    b.add_argument("--tokenizer", required=True)
    b.add_argument("--eos-token-id", type=int, default=None)
    b.add_argument("--out", required=True, help="output prefix of the dataset it writes")
    from . import sft_cli, synth_qa_cli  # argparse only: their work imports torch lazily

    f = sub.add_parser("sft", help="chats (OpenAI messages or ShareGPT JSONL) -> ChatML token ids + answer mask "
                                   "(an SFT .bin/.idx dataset, sft_format.py), with a report")
    sft_cli.add_args(f)
    q = sub.add_parser("synth-qa", help="synthetic long multi-doc / single-doc extractive QA chats from document "
                                        "JSONL, deterministic with a seed")
    synth_qa_cli.add_args(q)
    for stage_parser in (t, c, k, m, v, b, f, q):
        stage_parser.set_defaults(stage_parser=stage_parser)  # errors print this stage's usage line


def run_data(args: argparse.Namespace):
    """Run the stage ``args.stage``; a bad value (ConfigError) exits 2 with the stage's own usage line
    (``megatron-lc data mix``), not the one of ``megatron-lc data``."""
    try:
        return _run_stage(args)
    except ConfigError as e:
        parser = getattr(args, "stage_parser", None)
        if parser is None:
            raise
        parser.error(str(e))


def _run_stage(args: argparse.Namespace):
    from . import pipeline

    if args.stage == "train-tokenizer":
        from .documents import ReadReport, iter_documents
        from .tokenizer import train_sentencepiece

        read = ReadReport()
        texts = (d.text for d in iter_documents(args.inputs, args.text_key, args.source_key, on_error=args.on_error,
                                                report=read))
        path = train_sentencepiece(texts, args.out, args.vocab_size, model_type=args.model_type,
                                   input_sentence_size=args.sample_sentences, seed=args.seed,
                                   num_threads=max(1, args.workers))
        print(read.format())
        print(f"wrote {path}")
        return input_status(read.as_dict(), args.allow_partial_input)
    if args.stage == "clean":
        from ..configtools import check_keys, from_dict, load_yaml
        from .clean import CleaningRules, SourceKinds
        from .dedup import DedupConfig

        rules = from_dict(CleaningRules, load_yaml(args.rules) or {}, f"--rules {args.rules}") if args.rules else None
        code_rules = None
        if args.code_rules:
            overrides = load_yaml(args.code_rules) or {}
            check_keys(CleaningRules, overrides, f"--code-rules {args.code_rules}")
            code_rules = CleaningRules.code(overrides)
        kinds = SourceKinds.from_flags(args.code_sources, args.prose_sources, args.source_types, args.path_key)
        dedup = DedupConfig(near=not args.no_near, near_threshold=args.near_threshold,
                            paragraph_fraction=None if args.no_paragraph else args.paragraph_fraction,
                            sentence=not args.no_sentence, seed=args.seed)
        report = pipeline.clean_corpus(args.inputs, args.out, rules=rules, dedup=dedup, workers=args.workers,
                                       text_key=args.text_key, source_key=args.source_key, on_error=args.on_error,
                                       kinds=kinds, code_rules=code_rules)
        _print_clean(report)
        return input_status(report["read"], args.allow_partial_input)
    if args.stage == "tokenize":
        pipeline.check_val_fraction(args.val_fraction)  # before the tokenizer loads
        report = pipeline.tokenize_corpus(args.inputs, args.tokenizer, args.out, args.workers, args.eos_token_id,
                                          args.text_key, args.source_key, args.on_error,
                                          val_fraction=args.val_fraction, seed=args.seed)
        print(f"{report['documents']:,} documents, {report['tokens']:,} tokens, {report['bytes'] / 1e6:,.1f} MB in "
              f"{report['seconds']:.1f} s ({report['mb_per_s']:.2f} MB/s, {args.workers} workers) -> {args.out}")
        for name, part in report.get("splits", {}).items():
            print(f"  {name}: {part['prefix']} ({part['documents']:,} documents, {part['tokens']:,} tokens)")
        _print_read(report["read"])
        return input_status(report["read"], args.allow_partial_input)
    if args.stage == "mix":
        domains = [d.strip() for d in args.domains.split(",") if d.strip()]
        report = pipeline.mix_dataset(args.dataset, args.out, args.strategy, long_threshold=args.long_threshold,
                                      long_share=args.long_share, target_weights=args.weights,
                                      total_tokens=args.total_tokens, upsample_domains=domains,
                                      cut_length=args.cut_length, downsample_long=not args.keep_long_sources,
                                      seed=args.seed)
        print(report["table"])
        _print_own_profile(report, args)
        print(f"wrote {report['output']} and the report beside it ({report['png']})")
        return report
    if args.stage == "verify":
        from .indexed import IndexedDataset

        for path in args.datasets:
            ds = IndexedDataset(path)
            ids = ds.token_id_range()
            print(f"{ds.prefix}: {'verified' if ds.verified else 'unverified (no fingerprints)'}, {len(ds):,} "
                  f"sequences, {ds.num_tokens:,} {ds.dtype} tokens, token ids "
                  f"{'none' if ids is None else f'{ids[0]}..{ids[1]}'}")
        return 0
    if args.stage == "bench":
        result = pipeline.bench_tokenize(args.inputs, args.tokenizer, args.out, args.workers, args.eos_token_id,
                                         args.text_key)
        print(json.dumps(result))
        print(f"tokenizer batch encode {result['library_mb_per_s']:.2f} MB/s; tokenize+pack "
              f"{result['pipeline_mb_per_s']:.2f} MB/s ({100 * result['ratio']:.0f}%) on {args.workers} workers")
        return input_status(result["read"], args.allow_partial_input)
    if args.stage == "sft":
        from . import sft_cli

        return sft_cli.run(args)
    if args.stage == "synth-qa":
        from . import synth_qa_cli

        return synth_qa_cli.run(args)
    raise ConfigError(f"unknown data stage {args.stage!r}")


def _print_own_profile(report: dict, args: argparse.Namespace) -> None:
    """One line per source that kept its own length profile under per_source_upsample, with its long share."""
    own = report["own_profile"]
    if not own:
        return
    print(f"{len(own)} source(s) kept their own length profile and token share (--long-share {args.long_share} "
          f"cannot apply inside them); the corpus' long share is "
          f"{100 * report['after']['total']['long_share']:.1f}%:")
    for name, share in own.items():
        why = "no document" if share == 0 else "only documents"
        print(f"  {name}: long share {100 * share:.1f}% ({why} above --long-threshold {args.long_threshold} tokens)")


def _print_read(read: dict) -> None:
    print(f"read {read['files']} files, {read['lines']:,} lines: {read['documents']:,} documents, "
          f"{read['blank']:,} blank, {read['corrupt']:,} corrupt")
    for line in read["corrupt_lines"][:20]:
        print(f"  corrupt: {line}")


def _print_clean(report: dict) -> None:
    _print_read(report["read"])
    cleaning, dedup = report["cleaning"], report["dedup"]
    print("cleaning: " + json.dumps(cleaning))
    print("dedup: " + json.dumps(dedup))
    _print_per_source(report["per_source"])
    for name in report["source_types_unused"]:
        print(f"note: source {name!r} is named by --code-sources/--prose-sources/--source-types but no document "
              "has it (check the spelling against the table above)")
    print(f"wrote {report['written']:,} documents to {report['output']}")


def _print_per_source(rows: dict) -> None:
    """The per-source breakdown of a clean report: documents in (code/prose), removed per rule or stage, changed by
    paragraph/sentence dedup, out."""
    head = ("source", "in", "code", "prose", "removed", "changed", "out")
    table = [head]
    for name, r in rows.items():
        removed = ", ".join(f"{k} {v}" for k, v in sorted(r["removed"].items())) or "-"
        changed = ", ".join(f"{k} {v}" for k, v in r["changed"].items() if v) or "-"
        table.append((name, str(r["documents_in"]), str(r["code"]), str(r["prose"]), removed, changed,
                      str(r["documents_out"])))
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    for row in table:
        print("  " + " | ".join(c.ljust(w) for c, w in zip(row, widths)))
