"""The data pipeline's stages, each a function from files to files with a report whose counts add up.

    JSONL(.gz) --clean_corpus--> cleaned JSONL --tokenize_corpus--> PREFIX.bin/.idx --mix_dataset--> PREFIX.bin/.idx
                 rules + dedup                    workers, +EOS              per-source length upsampling

- ``clean_corpus``: each document's kind (code or prose, ``clean.SourceKinds``) and the 360Zhinao rules of its
  kind (``clean.py``) in worker processes, then exact and MinHash-LSH document dedup in this process (they need one
  shared index), written to ``cleaned.jsonl``; then paragraph and sentence dedup of the prose documents (two
  streaming passes over that file: count, rewrite) into ``deduped.jsonl``. Every other field of an input record
  is written back out with it. Memory: one hash per distinct
  document, paragraph and sentence unit, plus the LSH index; text is streamed.
- ``tokenize_corpus``: documents stream from the files, batches go to worker processes that run the tokenizer's own
  batch encode, and this process appends EOS and writes them in input order (the output does not depend on the
  number of workers) with each document's source in the sidecar.
- ``mix_dataset``: reads the token counts and sources of a tokenized dataset, plans the mixture (``mixture.py``),
  and writes the emitted documents in a seeded shuffled order (cut into pieces for the ``cut`` strategy), with a
  report table, JSON and a length-histogram PNG.

Past one machine, the same stages map onto datatrove's pipeline blocks and executors (see ``dedup.py``); here every
stage runs on one machine with ``workers`` processes.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict

import numpy as np

from ..configtools import ConfigError
from ..files import write_json
from .documents import Document, ReadReport, iter_documents


def progress_bar(total: int | None, unit: str, desc: str, enabled: bool):
    """A tqdm bar of ``unit`` items with its rate (and ETA when ``total`` is known), off when not ``enabled``; the
    data stages' one progress display."""
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, unit_scale=True, desc=desc, disable=not enabled, mininterval=1.0)


def _batches(docs: Iterable[Document], max_bytes: int, max_docs: int) -> Iterator[list[Document]]:
    batch, size = [], 0
    for doc in docs:
        batch.append(doc)
        size += len(doc.text)
        if size >= max_bytes or len(batch) >= max_docs:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _pool(workers: int, initializer=None, initargs=()):
    """A process pool (fork where the platform has it: workers inherit the imported modules) or None for 0."""
    if workers < 0:
        raise ConfigError(f"workers must be >= 0 (0 = in this process), got {workers}")
    if workers == 0:
        if initializer is not None:
            initializer(*initargs)
        return None
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    return ctx.Pool(workers, initializer=initializer, initargs=initargs)


def _map_batches(pool, fn, batches: Iterable[list[Document]], window: int = 8
                 ) -> Iterator[tuple[list[Document], object]]:
    """(batch, fn(batch)) in input order. Up to ``window`` batches are queued on the workers while this process
    consumes the oldest, so workers keep busy while it writes; only fn's results come back (this process keeps
    the documents it sent)."""
    if pool is None:
        for batch in batches:
            yield batch, fn(batch)
        return
    from collections import deque

    queued: deque = deque()
    for batch in batches:
        queued.append((batch, pool.apply_async(fn, (batch,))))
        if len(queued) >= window:
            done, result = queued.popleft()
            yield done, result.get()
    while queued:
        done, result = queued.popleft()
        yield done, result.get()


# ---- clean + dedup ----------------------------------------------------------------------------------------------
_RULES = None  # (prose rules, code rules, SourceKinds) of this worker


def _init_rules(rules, code_rules, kinds) -> None:
    global _RULES
    _RULES = (rules, code_rules, kinds)


def _failed_rules(batch: list[Document]) -> list[tuple[str | None, str]]:
    """(first failed rule or None, kind) per document: code documents are judged by the code rules."""
    from .clean import first_failed_rule

    rules, code_rules, kinds = _RULES
    out = []
    for doc in batch:
        kind = kinds.kind(doc.source, doc.text, doc.extra)
        out.append((first_failed_rule(doc.text, code_rules if kind == "code" else rules), kind))
    return out


def _record_line(text: str, source: str, extra: dict) -> str:
    """One output JSONL line: ``text``, ``source``, then every other field of the input record. A field that
    would overwrite ``text`` or ``source`` (input read with other ``--text-key``/``--source-key`` names) is written
    as ``input_<name>``; values JSON cannot hold (a Parquet timestamp) are written as their str()."""
    record = {"text": text, "source": source}
    for key, value in extra.items():
        record[f"input_{key}" if key in record else key] = value
    return json.dumps(record, ensure_ascii=False, default=str) + "\n"


def _with_kinds(path: str, kinds: list[str]) -> Iterator[tuple[Document, str]]:
    """(document, kind) of a file this stage wrote, with ``kinds`` in the order its documents were written."""
    return zip(iter_documents([path], "text", "source", on_error="fail"), kinds, strict=True)


class SourceBreakdown:
    """Per source: documents in (by kind), removed per cleaning rule and dedup stage, changed by paragraph or
    sentence dedup, and out; ``consistent`` checks in == removed + out for every source."""

    def __init__(self):
        self.rows: dict[str, dict] = {}

    def row(self, source: str) -> dict:
        """The counts of ``source`` (created on first use)."""
        return self.rows.setdefault(source, {"documents_in": 0, "code": 0, "prose": 0, "removed": {},
                                             "changed": {"paragraph": 0, "sentence": 0}, "documents_out": 0})

    def removed(self, source: str, why: str) -> None:
        """Count one document of ``source`` removed by rule or stage ``why``."""
        removed = self.row(source)["removed"]
        removed[why] = removed.get(why, 0) + 1

    def consistent(self) -> bool:
        """True when every source's input is its output plus its removals."""
        return all(r["documents_in"] == r["documents_out"] + sum(r["removed"].values()) == r["code"] + r["prose"]
                   for r in self.rows.values())

    def as_dict(self) -> dict[str, dict]:
        """Rows by source name, sorted."""
        return {name: self.rows[name] for name in sorted(self.rows)}


def clean_corpus(inputs: list[str], out_dir: str, rules=None, dedup=None, workers: int = 2,
                 text_key: str = "text", source_key: str = "source", on_error: str = "skip",
                 progress: bool = True, kinds=None, code_rules=None) -> dict:
    """Clean and deduplicate ``inputs`` (JSONL files or folders) into ``out_dir/deduped.jsonl`` (records
    ``{"text", "source", ...}`` with every other input field kept); returns the report (also written to
    ``out_dir/clean_report.json``): read counts and corrupt lines, documents removed per rule, per dedup stage, a
    per-source breakdown (``per_source``), and what was written; every count adds up.
    ``rules``: ``CleaningRules`` for prose (None: defaults); ``code_rules``: for code (None:
    ``CleaningRules.code()``, the empty check only); ``dedup``: ``DedupConfig`` (None: defaults; its
    ``group_kinds`` says which kinds paragraph and sentence dedup touch, prose only by default); ``kinds``:
    ``SourceKinds`` (None: every document's kind guessed from its ``path`` field or its lines)."""
    from .clean import CleaningReport, CleaningRules, SourceKinds
    from .dedup import DedupConfig, DedupReport, ExactDedup, NearDedup, ParagraphDedup, SentenceDedup

    rules, cfg = rules or CleaningRules(), dedup or DedupConfig()
    code_rules, kinds = code_rules or CleaningRules.code(), kinds or SourceKinds()
    os.makedirs(out_dir, exist_ok=True)
    read, cleaning, dd, per_source = ReadReport(), CleaningReport(), DedupReport(), SourceBreakdown()
    exact = ExactDedup() if cfg.exact else None
    near = NearDedup(cfg.near_threshold, cfg.num_perm, cfg.ngram, seed=cfg.seed + 1) if cfg.near else None
    cleaned_path, out_path = os.path.join(out_dir, "cleaned.jsonl"), os.path.join(out_dir, "deduped.jsonl")
    t0 = time.perf_counter()
    written: dict[str, int] = {}  # documents per source in the latest file written
    doc_kinds = []  # kind of each document of the latest file written, in order
    docs = iter_documents(inputs, text_key, source_key, on_error=on_error, report=read)
    pool = _pool(workers, _init_rules, (rules, code_rules, kinds))
    bar = progress_bar(None, "doc", "clean", progress)
    try:
        with open(cleaned_path + ".tmp", "w") as out:  # renamed when complete
            for batch, failed in _map_batches(pool, _failed_rules, _batches(docs, 4 << 20, 2048)):
                for doc, (rule, kind) in zip(batch, failed):
                    cleaning.add(rule)
                    row = per_source.row(doc.source)
                    row["documents_in"] += 1
                    row[kind] += 1
                    if rule is not None:
                        per_source.removed(doc.source, rule)
                        continue
                    dd.documents_in += 1
                    if exact is not None and exact.seen(doc.text):
                        dd.exact_removed += 1
                        per_source.removed(doc.source, "exact")
                        continue
                    if near is not None and near.seen(doc.text):
                        dd.near_removed += 1
                        per_source.removed(doc.source, "near")
                        continue
                    written[doc.source] = written.get(doc.source, 0) + 1
                    doc_kinds.append(kind)
                    out.write(_record_line(doc.text, doc.source, doc.extra))
                bar.update(len(batch))
    finally:
        bar.close()
        if pool is not None:
            pool.close()
            pool.join()
    os.replace(cleaned_path + ".tmp", cleaned_path)

    stages = []
    if cfg.paragraph_fraction is not None:
        stages.append(("paragraph", ParagraphDedup(cfg.paragraph_fraction, cfg.seed)))
    if cfg.sentence:
        stages.append(("sentence", SentenceDedup(cfg.sentence_min_tokens, cfg.seed)))
    source_path = cleaned_path
    for name, stage in stages:  # two streaming passes per stage: count every unit, then rewrite
        for doc, kind in _with_kinds(source_path, doc_kinds):
            if kind in cfg.group_kinds:
                stage.count(doc.text)
        target = os.path.join(out_dir, f"{name}.tmp.jsonl")
        emptied, written, next_kinds = 0, {}, []
        with open(target, "w") as out:
            for doc, kind in _with_kinds(source_path, doc_kinds):
                text = stage.rewrite(doc.text) if kind in cfg.group_kinds else doc.text
                if not text.strip():
                    emptied += 1
                    per_source.removed(doc.source, f"{name}_emptied")
                    continue
                if text != doc.text:
                    per_source.row(doc.source)["changed"][name] += 1
                written[doc.source] = written.get(doc.source, 0) + 1
                next_kinds.append(kind)
                out.write(_record_line(text, doc.source, doc.extra))
        doc_kinds = next_kinds
        dd.record_stage(name, stage, emptied)
        if source_path != cleaned_path:
            os.remove(source_path)
        source_path = target
    if source_path == cleaned_path:
        shutil.copyfile(cleaned_path, out_path)
    else:
        os.replace(source_path, out_path)
    dd.documents_out = sum(written.values())
    for source, n in written.items():
        per_source.row(source)["documents_out"] = n
    named = set(kinds.by_source)
    report = {"read": read.as_dict(), "cleaning": cleaning.as_dict(), "dedup": dd.as_dict(),
              "per_source": per_source.as_dict(), "written": dd.documents_out, "output": out_path,
              "rules": asdict(rules), "code_rules": asdict(code_rules), "dedup_config": asdict(cfg),
              "source_types": dict(kinds.by_source), "source_types_unused": sorted(named - set(per_source.rows)),
              "seconds": round(time.perf_counter() - t0, 2)}
    if not cleaning.consistent() or not dd.consistent() or cleaning.total != read.documents or \
            not per_source.consistent():
        raise RuntimeError(f"clean_corpus: counts do not add up: {report}")  # a bug, never bad input
    write_json(os.path.join(out_dir, "clean_report.json"), report)
    return report


# ---- tokenize ---------------------------------------------------------------------------------------------------
_TOKENIZER = None


def _init_tokenizer(spec: str, eos: int | None) -> None:
    from .tokenizer import load_tokenizer

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one thread per worker: workers are the parallelism
    global _TOKENIZER
    _TOKENIZER = load_tokenizer(spec, eos)


def _encode(batch: list[Document]) -> tuple[np.ndarray, np.ndarray, int]:
    """(flat int32 tokens, int64 lengths, UTF-8 bytes) of a batch; flat arrays pickle far faster than lists of
    lists."""
    ids = _TOKENIZER.encode_batch([d.text for d in batch], num_threads=1)
    lengths = np.fromiter((len(x) for x in ids), np.int64, len(ids))
    flat = np.concatenate([np.asarray(x, np.int32) for x in ids]) if ids else np.zeros(0, np.int32)
    size = sum(len(d.text.encode("utf-8", "surrogatepass")) for d in batch)
    return flat, lengths, size


def check_val_fraction(val_fraction: float | None) -> None:
    """ConfigError naming ``--val-fraction`` unless it is None (no split) or a number strictly between 0 and 1."""
    if val_fraction is None:
        return
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
        raise ConfigError(f"--val-fraction {val_fraction!r}: must lie strictly between 0 and 1 (e.g. 0.05 holds out "
                          "5% of the documents); leave it out for no validation set")


def val_prefix(out_prefix: str) -> str:
    """Prefix of the held-out dataset ``tokenize_corpus`` writes beside ``out_prefix``: ``OUT`` -> ``OUT_val``."""
    from .indexed import dataset_prefix

    return dataset_prefix(out_prefix) + "_val"


def tokenize_corpus(inputs: list[str], tokenizer: str, out_prefix: str, workers: int = 2, eos_token_id: int | None
                    = None, text_key: str = "text", source_key: str = "source", on_error: str = "skip",
                    batch_bytes: int = 1 << 20, progress: bool = True, val_fraction: float | None = None,
                    seed: int = 0) -> dict:
    """Tokenize ``inputs`` (JSONL files/folders) with ``tokenizer`` (a load_tokenizer spec) into ``out_prefix``
    .bin/.idx, one document per sequence with EOS appended, sources in the sidecar. Returns the report (also in the
    dataset's meta): documents, tokens, bytes, MB/s, read counts; empty texts are written as a lone EOS, so the
    document count equals the read count.

    ``val_fraction``: hold out each document with this probability (seeded by ``seed``, one draw per document in
    input order, so the split depends on neither the workers nor the batch sizes) into a second dataset at
    ``val_prefix(out_prefix)``; the report's ``splits`` gives both prefixes with their document and token counts.
    A split that leaves either side empty is refused (ConfigError) and neither dataset is written."""
    from .indexed import IndexedDatasetWriter
    from .tokenizer import load_tokenizer

    check_val_fraction(val_fraction)
    tok = load_tokenizer(tokenizer, eos_token_id)
    eos = tok.eos_token_id
    if eos is None:
        raise ConfigError(f"tokenizer {tokenizer} has no EOS id, and documents are packed with EOS between them: pass "
                          f"--eos-token-id")
    read = ReadReport()
    docs = iter_documents(inputs, text_key, source_key, on_error=on_error, report=read)
    t0 = time.perf_counter()
    pool = _pool(workers, _init_tokenizer, (tokenizer, eos_token_id))
    bar = progress_bar(None, "B", "tokenize", progress)
    writers = [IndexedDatasetWriter(out_prefix, vocab_size=tok.vocab_size)]
    if val_fraction is not None:
        writers.append(IndexedDatasetWriter(val_prefix(out_prefix), vocab_size=tok.vocab_size))
    rng = np.random.default_rng([int(seed), 0x7A1])
    split_docs, split_tokens = [0, 0], [0, 0]  # train, val
    n_docs = n_tokens = n_bytes = 0
    try:
        for batch, (flat, lengths, size) in _map_batches(pool, _encode, _batches(docs, batch_bytes, 100_000)):
            ends = np.cumsum(lengths)
            side = (rng.random(len(batch)) < val_fraction).astype(int) if val_fraction else np.zeros(len(batch), int)
            for doc_in, end, length, part in zip(batch, ends, lengths, side):
                doc = np.empty(length + 1, np.int32)
                doc[:length] = flat[end - length:end]
                doc[length] = eos
                writers[part].add_document(doc, doc_in.source)
                split_docs[part] += 1
                split_tokens[part] += int(length) + 1
            n_docs, n_tokens, n_bytes = n_docs + len(batch), n_tokens + int(lengths.sum()) + len(batch), \
                n_bytes + size
            bar.update(size)
        seconds = time.perf_counter() - t0
        report = {"documents": n_docs, "tokens": n_tokens, "bytes": n_bytes, "seconds": seconds,
                  "mb_per_s": round(n_bytes / 1e6 / max(seconds, 1e-9), 3), "workers": workers,
                  "tokenizer": tokenizer, "eos_token_id": eos, "vocab_size": tok.vocab_size, "read": read.as_dict()}
        if n_docs != read.documents:
            raise RuntimeError(f"tokenize_corpus: read {read.documents} documents but wrote {n_docs}")
        if n_docs == 0:
            raise ConfigError(f"no documents in {inputs} ({read.format()}): nothing to write")
        if val_fraction is None:
            writers[0].finalize(report)
            return report
        if min(split_docs) == 0:
            empty = "validation" if split_docs[1] == 0 else "training"
            raise ConfigError(f"--val-fraction {val_fraction} (seed {seed}) put {split_docs[1]} of {n_docs} "
                              f"documents in the validation set, leaving the {empty} set empty: "
                              f"{'raise' if split_docs[1] == 0 else 'lower'} --val-fraction or give more documents; "
                              "nothing was written")
        names = ("train", "val")
        report["splits"] = {name: {"prefix": w.prefix, "documents": d, "tokens": t}
                            for name, w, d, t in zip(names, writers, split_docs, split_tokens)}
        split = {"val_fraction": val_fraction, "seed": seed, "train": writers[0].prefix, "val": writers[1].prefix}
        for name, writer in zip(names, writers):
            own = report["splits"][name]
            writer.finalize({**report, "documents": own["documents"], "tokens": own["tokens"],
                             "split": {"part": name, **split}})
    except BaseException:
        for writer in writers:
            if not writer.finalized:
                writer.abort()
        raise
    finally:
        bar.close()
        if pool is not None:
            pool.close()
            pool.join()
    return report


# ---- mix --------------------------------------------------------------------------------------------------------
def mix_dataset(in_prefix: str, out_prefix: str, strategy: str = "per_source_upsample", *, long_threshold: int = 4096,
                long_share: float = 0.7, target_weights: dict[str, float] | None = None,
                total_tokens: int | None = None, upsample_domains: Iterable[str] = (), cut_length: int | None = None,
                downsample_long: bool = True, seed: int = 0, report_dir: str | None = None) -> dict:
    """Write ``out_prefix`` .bin/.idx: the documents of ``in_prefix`` (a tokenized dataset with sources) as the
    mixture plan emits them (dropped, kept or repeated, in a seeded shuffled order; for ``cut``, cut into pieces of at
    most ``cut_length`` tokens, each non-final piece ending in an added EOS so the packer sees a boundary). Writes
    ``mixture.json`` (stats before/after, plan parameters), ``mixture.txt`` (the table) and ``mixture_lengths.png``
    to ``report_dir`` (default: beside ``out_prefix``) and returns the report; its ``own_profile`` maps each source
    that kept its own length profile (per_source_upsample, no long or no short documents) to its long share."""
    from .indexed import IndexedDataset, IndexedDatasetWriter
    from .mixture import format_report, mixture_stats, plan_mixture, plot_lengths

    data = IndexedDataset(in_prefix)
    if data.sources is None:
        raise ConfigError(f"{in_prefix} has no sources sidecar ({data.paths['sources']}): mixing needs each "
                          f"document's source; write it with tokenize_corpus / megatron-lc data tokenize")
    eos = data.meta.get("eos_token_id")
    lengths = np.asarray(data.sequence_lengths, np.int64)
    names = np.asarray(data.source_names, dtype=object)[np.asarray(data.sources, np.int64)]
    plan = plan_mixture(lengths, names, strategy, long_threshold=long_threshold, long_share=long_share,
                        target_weights=target_weights, total_tokens=total_tokens, upsample_domains=upsample_domains,
                        cut_length=cut_length, seed=seed, downsample_long=downsample_long)
    if plan.cut_length is not None and eos is None:
        raise ConfigError(f"{in_prefix}: its meta has no eos_token_id, which the cut strategy appends to cut pieces")
    before, after = mixture_stats(lengths, names), mixture_stats(lengths, names, plan)
    vocab = data.meta.get("vocab_size") or int(np.iinfo(data.dtype).max) + 1
    with IndexedDatasetWriter(out_prefix, vocab_size=vocab) as writer:
        for i in plan.document_indices(shuffle=True):
            tokens, source = data.get(int(i)), str(names[i])
            if plan.cut_length is None or len(tokens) <= plan.cut_length:
                writer.add_document(tokens, source)
                continue
            step = plan.cut_length - 1  # content per non-final piece; the piece's last token is an added EOS
            for start in range(0, len(tokens), step):
                piece = tokens[start:start + step]
                if start + step < len(tokens):
                    piece = np.append(piece, eos)
                writer.add_document(piece, source)
        own = {n: after["sources"][n]["long_share"] for n in plan.own_profile}  # achieved long share of each
        report = {"input": data.prefix, "output": writer.prefix, "plan": plan.to_dict(), "before": before,
                  "after": after, "own_profile": own, "table": format_report(before, after)}
        writer.finalize({**data.meta, "mixture": {k: v for k, v in report.items() if k != "table"}})
    report_dir = report_dir or os.path.dirname(os.path.abspath(out_prefix))
    os.makedirs(report_dir, exist_ok=True)
    write_json(os.path.join(report_dir, "mixture.json"), report)
    with open(os.path.join(report_dir, "mixture.txt"), "w") as f:
        f.write(report["table"] + "\n")
    report["png"] = os.path.join(report_dir, "mixture_lengths.png")
    plot_lengths(lengths, names, plan, report["png"])
    return report


# ---- throughput -------------------------------------------------------------------------------------------------
def bench_tokenize(inputs: list[str], tokenizer: str, out_prefix: str, workers: int = 2,
                   eos_token_id: int | None = None, text_key: str = "text") -> dict:
    """Side by side on the same text and cores: the tokenizer's own batch encode (all texts in memory, its own
    threads = ``workers``) vs our tokenize_corpus end to end (read JSONL, encode in ``workers`` processes, pack with
    EOS, write .bin/.idx). Returns both MB/s and their ratio."""
    from .tokenizer import load_tokenizer

    texts = [d.text for d in iter_documents(inputs, text_key, on_error="skip")]
    size = sum(len(t.encode("utf-8", "surrogatepass")) for t in texts)
    tok = load_tokenizer(tokenizer, eos_token_id)
    if tok.__class__.__name__ == "HFTokenizerFile":
        os.environ["RAYON_NUM_THREADS"] = str(max(1, workers))  # read once, at the library's first parallel call
    t0 = time.perf_counter()
    tok.encode_batch(texts, num_threads=max(1, workers))
    library = time.perf_counter() - t0
    ours = tokenize_corpus(inputs, tokenizer, out_prefix, workers, eos_token_id, text_key, progress=False)
    library_mb_s, ours_mb_s = size / 1e6 / library, ours["bytes"] / 1e6 / ours["seconds"]
    return {"bytes": size, "workers": workers, "tokenizer": tokenizer, "library_mb_per_s": library_mb_s,
            "pipeline_mb_per_s": ours_mb_s, "ratio": ours_mb_s / library_mb_s, "read": ours["read"]}
