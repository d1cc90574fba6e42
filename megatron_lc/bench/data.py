"""``megatron-lc bench data``: tokenize+pack throughput vs the tokenizer's own batch encode, side by side on the same
text and cores.

    megatron-lc bench data --mb 40 --workers 2 --out /tmp/bench_data

Builds a corpus of the Python standard library's docstrings (source "docs") and source files (one JSONL record per
file, source "code"), up to ``--mb`` MB; trains a sentencepiece BPE model and an HF byte-level BPE tokenizer.json
on a sample of it; then for each tokenizer runs ``megatron_lc.data.pipeline.bench_tokenize``: the library's batch
encode over all texts in memory with ``--workers`` threads, then ``tokenize_corpus`` end to end (read JSONL, encode
in ``--workers`` processes, append EOS, write .bin/.idx). Prints one row per tokenizer and writes
``bench_data.json`` in ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Iterable

from ..data.documents import iter_documents
from ..data.pipeline import bench_tokenize
from ..data.stdlib_text import stdlib_docstrings, stdlib_sources
from ..data.tokenizer import train_sentencepiece


def build_corpus(path: str, max_mb: float) -> int:
    """Write the JSONL corpus to ``path``: 8 MiB of stdlib docstrings, then whole stdlib source files (tests
    included) until ``max_mb`` MB; returns its size in bytes of text."""
    size, limit = 0, int(max_mb * 1e6)
    with open(path, "w") as f:
        for text in stdlib_docstrings(8 * 2**20):
            f.write(json.dumps({"text": text, "source": "docs"}) + "\n")
            size += len(text.encode())
        for text in stdlib_sources(skip_dirs=frozenset()):
            if size >= limit:
                break
            f.write(json.dumps({"text": text, "source": "code"}) + "\n")
            size += len(text.encode())
    return size


def train_hf_bpe(texts: Iterable[str], path: str, vocab_size: int) -> str:
    """Train an HF byte-level BPE tokenizer (GPT-2/Qwen2 style) on ``texts``; saves tokenizer.json at ``path``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>",
                                                                          "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.save(path)
    return path


def add_data_args(p: argparse.ArgumentParser) -> None:
    """The flags of ``megatron-lc bench data``."""
    p.add_argument("--mb", type=float, default=40.0, help="corpus size in MB (default 40)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--out", default="bench_data_out", help="folder for bench_data.json (default: %(default)s)")


def run_data(args: argparse.Namespace) -> int:
    """``megatron-lc bench data``: build the corpus, train both tokenizers, time both paths; writes bench_data.json."""
    os.makedirs(args.out, exist_ok=True)
    corpus = os.path.join(args.out, "corpus.jsonl")
    size = build_corpus(corpus, args.mb)
    sample = [d.text for i, d in enumerate(iter_documents([corpus])) if i % 8 == 0]
    t0 = time.perf_counter()
    sp = train_sentencepiece(sample, os.path.join(args.out, "sp"), args.vocab_size, input_sentence_size=200_000,
                             num_threads=args.workers)
    hf = train_hf_bpe(sample, os.path.join(args.out, "tokenizer.json"), args.vocab_size)
    print(f"corpus {size / 1e6:.1f} MB; tokenizers trained in {time.perf_counter() - t0:.0f} s")
    rows = []
    for name, spec, eos in (("sentencepiece BPE", sp, None), ("HF byte-level BPE", hf, 0)):
        result = bench_tokenize([corpus], spec, os.path.join(args.out, name.split()[0]), args.workers, eos)
        rows.append({"tokenizer": name, **result})
        print(f"{name:>20}: batch encode {result['library_mb_per_s']:6.2f} MB/s | tokenize+pack "
              f"{result['pipeline_mb_per_s']:6.2f} MB/s | {100 * result['ratio']:.0f}% ({args.workers} workers)",
              flush=True)
    with open(os.path.join(args.out, "bench_data.json"), "w") as f:
        json.dump(rows, f, indent=1)
    return 0
