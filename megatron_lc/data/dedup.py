"""Multi-level deduplication of the 360Zhinao recipe (technical report, section 2.1.3): documents, paragraphs, sentences.

Stages, in the order ``dedup_corpus`` runs them:

1. Exact documents (``ExactDedup``): 128-bit BLAKE2b of the normalized text (Unicode NFKC, every whitespace run
   collapsed to one space, stripped; case kept). The first occurrence is kept.
2. Near-duplicate documents (``NearDedup``): datasketch ``MinHash`` over word n-gram shingles (n=5; tokens as in
   ``clean.tokens``: lower-cased ASCII words and single CJK characters) and ``MinHashLSH``. LSH only proposes
   candidates (banding tuned for recall); a candidate is a duplicate when its estimated Jaccard similarity reaches the
   threshold (0.8). A document is dropped when it is near any document kept before it, so the first of each cluster
   is kept. Seeded, hence deterministic.
3. Paragraphs (``ParagraphDedup``): paragraph = one non-empty line, compared exactly after whitespace
   normalization. Over the whole corpus each group of N identical paragraphs loses ``round_half_up(0.3 * N)`` of its
   occurrences (360: deleting 30% of each group was best), chosen by a seeded sample, so unique paragraphs stay.
4. Sentences (``SentenceDedup``): a unit seen N times keeps ``ceil(sqrt(N))`` copies (ceil, so at least one copy
   always stays). 360 protects short sentences with "a sliding n-gram (n=16) concatenation": we walk a document's
   sentences in order and concatenate each short sentence with the following ones until the unit holds >= 16 tokens;
   that unit is the dedup key. A short sentence is therefore only removed together with the same 16+ tokens of
   context. A document's trailing run shorter than 16 tokens is exempt.

Paragraph and sentence dedup need two passes (count, then rewrite) over a re-iterable corpus. Memory: one 64-bit key
per distinct paragraph/unit in a Python dict (about 100 bytes each), plus, during the rewrite, the sampled positions
of the groups still in progress. Near dedup keeps per kept document its LSH band keys and (with ``verify``) its
128 uint32 hash values (512 bytes). Exact dedup keeps a 16-byte digest per kept document.

Past one machine (datatrove, not a dependency; same stages, same order): run each stage as datatrove pipelines under
``LocalPipelineExecutor`` (one node, many processes), ``SlurmPipelineExecutor`` or ``RayPipelineExecutor`` (clusters),
chaining the steps with ``depends=``. Near dedup maps onto datatrove's four MinHash blocks:
``MinhashDedupSignature`` (per document shard, signatures split into band buckets) -> ``MinhashDedupBuckets`` (one task
per bucket, emits candidate pairs) -> ``MinhashDedupCluster`` (one task, union-find over pairs, keeps one document per
cluster) -> ``MinhashDedupFilter`` (per document shard, drops the rest); configure ``MinhashConfig`` with n_grams=5 and
buckets x hashes_per_bucket = 14 x 9. Exact dedup is the same three-stage pattern on whole-document hashes (recent
datatrove: ``ExactDedupSignature`` / ``ExactFindDedups`` / ``ExactDedupFilter``). Paragraph and sentence dedup follow
datatrove's ``SentenceDedupSignature`` -> ``SentenceFindDedups`` -> ``SentenceDedupFilter`` shape, but datatrove keeps
only the first copy, so the middle step must be our own block: it receives every (key, document id, position)
sharded by key, sorts each group by (document id, position) and applies ``choose_deletions`` (a pure function of
seed, key and N, so any worker gets the same answer) to keep N - round(0.3 N) paragraphs or ceil(sqrt N) units.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import random
import re
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
from datasketch import MinHash, MinHashLSH

from megatron_lc.configtools import ConfigError
from megatron_lc.data.clean import default_text_of, sentence_pieces, tokens

_WS_RE = re.compile(r"\s+")


def normalize(text: str) -> str:
    """NFKC, whitespace runs collapsed to one space, stripped; case is kept."""
    return _WS_RE.sub(" ", unicodedata.normalize("NFKC", text)).strip()


def text_digest(text: str) -> bytes:
    """16-byte BLAKE2b digest of ``normalize(text)`` (the exact-dedup key)."""
    return hashlib.blake2b(normalize(text).encode("utf-8"), digest_size=16).digest()


def key64(text: str) -> int:
    """64-bit BLAKE2b key of ``normalize(text)`` (paragraph and sentence-unit key)."""
    return int.from_bytes(hashlib.blake2b(normalize(text).encode("utf-8"), digest_size=8).digest(), "little")


# ----------------------------------------------------------------------------------------------- exact documents
class ExactDedup:
    """Streaming exact document dedup: ``seen(text)`` is True for a repeat of an earlier document's normalized text."""

    def __init__(self):
        self._digests: set[bytes] = set()
        self.documents = 0
        self.removed = 0

    def seen(self, text: str) -> bool:
        """True if ``text`` repeats an earlier text (it is then a duplicate to drop); otherwise remember it."""
        self.documents += 1
        digest = text_digest(text)
        if digest in self._digests:
            self.removed += 1
            return True
        self._digests.add(digest)
        return False

    def filter(self, docs: Iterable[Any], text_of: Callable[[Any], str] = default_text_of) -> Iterator[Any]:
        """Yield the documents whose text was not seen before."""
        return (doc for doc in docs if not self.seen(text_of(doc)))


# ----------------------------------------------------------------------------------------------- near documents
def shingles(text: str, n: int = 5) -> set[str]:
    """Word n-gram shingles of ``clean.tokens(text)``; a text with fewer than n tokens is one shingle."""
    toks = tokens(text)
    if len(toks) < n:
        return {" ".join(toks)}
    return {" ".join(toks[i:i + n]) for i in range(len(toks) - n + 1)}


def jaccard(a: set, b: set) -> float:
    """Exact Jaccard similarity |a & b| / |a | b| of two sets (1.0 for two empty sets)."""
    return len(a & b) / len(a | b) if a or b else 1.0


class NearDedup:
    """Streaming MinHash-LSH near-duplicate dedup; the first document of each near-duplicate cluster is kept.

    ``threshold``: Jaccard similarity of shingle sets at which a document counts as a near duplicate.
    ``num_perm``: MinHash permutations (datasketch). ``ngram``: shingle length in tokens. ``seed``: MinHash seed.
    ``lsh_weights``: datasketch's (false-positive, false-negative) weights that pick the LSH banding; the default
    favours recall (14 bands x 9 rows for 0.8/128: a pair at J=0.9 becomes a candidate with probability 0.999)
    because ``verify`` then removes the extra candidates. ``verify``: confirm each candidate by estimated Jaccard >=
    threshold (costs num_perm uint32 per kept document); without it every LSH candidate is a duplicate.
    """

    def __init__(self, threshold: float = 0.8, num_perm: int = 128, ngram: int = 5, seed: int = 1,
                 lsh_weights: tuple[float, float] = (0.1, 0.9), verify: bool = True):
        if not 0.0 < threshold <= 1.0:
            raise ConfigError(f"NearDedup threshold={threshold!r}: must lie in (0, 1]; 0.8 is the usual value")
        if num_perm < 2 or ngram < 1:
            raise ConfigError(f"NearDedup num_perm={num_perm!r}, ngram={ngram!r}: need num_perm >= 2 and ngram >= 1")
        self.threshold, self.num_perm, self.ngram, self.seed, self.verify = threshold, num_perm, ngram, seed, verify
        self._lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, weights=lsh_weights)
        # Building the permutations is the slow part of MinHash(); build one empty MinHash and copy it per document.
        self._empty = MinHash(num_perm=num_perm, seed=seed)
        self._signatures: list[np.ndarray] = []
        self.documents = 0
        self.removed = 0

    def minhash(self, text: str) -> MinHash:
        """The seeded MinHash of ``text``'s shingles."""
        m = self._empty.copy()
        m.update_batch([s.encode("utf-8") for s in sorted(shingles(text, self.ngram))])
        return m

    def seen(self, text: str) -> bool:
        """True if ``text`` is a near duplicate of a kept document (drop it); otherwise keep and index it."""
        self.documents += 1
        m = self.minhash(text)
        values = m.hashvalues.astype(np.uint32)
        for key in self._lsh.query(m):
            if not self.verify or float(np.mean(self._signatures[key] == values)) >= self.threshold:
                self.removed += 1
                return True
        key = len(self._signatures)
        self._signatures.append(values if self.verify else np.empty(0, np.uint32))
        self._lsh.insert(key, m, check_duplication=False)
        return False

    def filter(self, docs: Iterable[Any], text_of: Callable[[Any], str] = default_text_of) -> Iterator[Any]:
        """Yield the documents that are not near duplicates of earlier kept ones."""
        return (doc for doc in docs if not self.seen(text_of(doc)))


# ----------------------------------------------------------------------------------------------- group dedup
def round_half_up(x: float) -> int:
    """Round to the nearest integer, halves up (Python's round() would send 0.5 * odd to the even side)."""
    return math.floor(x + 0.5 + 1e-9)


def choose_deletions(seed: int, key: int, count: int, delete: int) -> set[int]:
    """Which of a group's ``count`` occurrences (0-based, corpus order) to delete: ``delete`` of them, a seeded sample.

    A pure function of (seed, key, count, delete), so every worker of a sharded run picks the same occurrences.
    """
    if not 0 <= delete <= count:
        raise ConfigError(f"cannot delete {delete} of {count} occurrences")
    if delete == 0:
        return set()
    return set(random.Random(f"{seed}:{key}").sample(range(count), delete))


class _GroupDedup:
    """Two-pass dedup of units inside documents: ``count`` every document, then ``rewrite`` every document.

    Subclasses define the units of a text and how many of N copies to keep.
    """

    unit_name = "unit"

    def __init__(self, seed: int):
        self.seed = seed
        self._counts: dict[int, int] = {}
        self._next: dict[int, int] = {}
        self._plans: dict[int, set[int]] = {}
        self.units = 0
        self.removed = 0
        self._rewriting = False

    def keep(self, n: int) -> int:
        raise NotImplementedError

    def _units(self, text: str) -> list[tuple[list[str], int | None]]:
        """(pieces, key) pairs that concatenate back to ``text``; key None marks pieces exempt from dedup."""
        raise NotImplementedError

    def count(self, text: str) -> None:
        """Pass 1: count the units of one document."""
        if self._rewriting:
            raise ConfigError(f"{type(self).__name__}: count() after rewrite() started; make a new object per corpus")
        for _, key in self._units(text):
            if key is not None:
                self._counts[key] = self._counts.get(key, 0) + 1

    def _delete(self, key: int) -> bool:
        total = self._counts.get(key, 0)
        k = self._next.get(key, 0)
        if k >= total:
            raise ConfigError(f"{type(self).__name__}: a {self.unit_name} occurs more often in the rewrite pass than "
                              "was counted; both passes must read the same corpus in the same order")
        if k == 0:
            self._plans[key] = choose_deletions(self.seed, key, total, total - self.keep(total))
        delete = k in self._plans[key]
        if k + 1 == total:
            # Group done: forget it (memory shrinks during the rewrite; a further copy is then an error).
            del self._plans[key], self._counts[key]
            self._next.pop(key, None)
        else:
            self._next[key] = k + 1
        return delete

    def rewrite(self, text: str) -> str:
        """Pass 2: the document with this corpus's chosen duplicate units removed (may come back blank)."""
        self._rewriting = True
        out: list[str] = []
        for pieces, key in self._units(text):
            if key is None:
                out.extend(pieces)
                continue
            self.units += 1
            if self._delete(key):
                self.removed += 1
                # Keep a line break the removed unit carried so the paragraphs around it stay apart.
                if any("\n" in p for p in pieces) and out and not out[-1].endswith("\n"):
                    out.append("\n")
            else:
                out.extend(pieces)
        return "".join(out)


class ParagraphDedup(_GroupDedup):
    """Paragraph dedup: each group of N identical paragraphs loses round_half_up(fraction * N) occurrences.

    Paragraph = one line of ``text.split("\\n")`` holding non-space characters, compared after ``normalize``; blank
    lines are kept as they are. Deleted lines vanish together with their line break.
    """

    unit_name = "paragraph"

    def __init__(self, fraction: float = 0.3, seed: int = 0):
        if not 0.0 <= fraction <= 1.0:
            raise ConfigError(f"ParagraphDedup fraction={fraction!r}: must lie in [0, 1] (360Zhinao uses 0.3)")
        super().__init__(seed)
        self.fraction = fraction

    def keep(self, n: int) -> int:
        """Copies kept of a group of n: n - round_half_up(fraction * n)."""
        return n - round_half_up(self.fraction * n)

    def _units(self, text):
        lines = text.split("\n")
        units = []
        for i, line in enumerate(lines):
            piece = line + ("\n" if i < len(lines) - 1 else "")
            units.append(([piece], key64(line) if line.strip() else None))
        return units

    def rewrite(self, text: str) -> str:
        """Pass 2: the document without its deleted paragraph lines."""
        self._rewriting = True
        out = []
        for line in text.split("\n"):
            if line.strip():
                self.units += 1
                if self._delete(key64(line)):
                    self.removed += 1
                    continue
            out.append(line)
        return "\n".join(out)


class SentenceDedup(_GroupDedup):
    """Sentence dedup: a unit seen N times keeps ceil(sqrt(N)) copies.

    Unit = consecutive sentences (``clean.sentence_pieces``) concatenated until they hold ``min_tokens`` tokens
    (360's sliding 16-gram concatenation; ``min_tokens=1`` makes every sentence its own unit). Line breaks after a
    unit belong to it, so a removed unit leaves no blank line. A trailing run shorter than ``min_tokens`` is exempt.
    """

    unit_name = "sentence unit"

    def __init__(self, min_tokens: int = 16, seed: int = 0):
        if min_tokens < 1:
            raise ConfigError(f"SentenceDedup min_tokens={min_tokens!r}: must be >= 1 (360Zhinao uses 16)")
        super().__init__(seed)
        self.min_tokens = min_tokens

    def keep(self, n: int) -> int:
        """Copies kept of a group of n: ceil(sqrt(n)), at least one."""
        return math.isqrt(n - 1) + 1 if n > 0 else 0

    def _units(self, text):
        units, pieces, n_tokens = [], [], 0
        for piece in sentence_pieces(text):
            piece_tokens = len(tokens(piece))
            if piece_tokens == 0 and not pieces and units:
                # Line breaks and stray marks after a unit belong to it, so removing it leaves no blank line.
                units[-1][0].append(piece)
                continue
            pieces.append(piece)
            n_tokens += piece_tokens
            if n_tokens >= self.min_tokens:
                units.append((pieces, key64("".join(pieces))))
                pieces, n_tokens = [], 0
        if pieces:
            units.append((pieces, None))
        return units


def _two_pass(stage: _GroupDedup, corpus: Iterable[str]) -> list[str]:
    if iter(corpus) is corpus:
        raise ConfigError(f"{type(stage).__name__} reads the corpus twice (count, then rewrite): pass a list or "
                          "another re-iterable, not a one-shot iterator/generator")
    for text in corpus:
        stage.count(text)
    return [stage.rewrite(text) for text in corpus]


def dedup_paragraphs(corpus: Iterable[str], fraction: float = 0.3, seed: int = 0) -> list[str]:
    """Paragraph dedup of a re-iterable corpus of texts; returns the rewritten texts (same length and order)."""
    return _two_pass(ParagraphDedup(fraction, seed), corpus)


def dedup_sentences(corpus: Iterable[str], min_tokens: int = 16, seed: int = 0) -> list[str]:
    """Sentence dedup of a re-iterable corpus of texts; returns the rewritten texts (same length and order)."""
    return _two_pass(SentenceDedup(min_tokens, seed), corpus)


# ----------------------------------------------------------------------------------------------- whole corpus
@dataclasses.dataclass
class DedupConfig:
    """Switches and settings of the four dedup stages (``dedup_corpus``)."""

    exact: bool = True
    """Drop exact duplicate documents (normalized text)."""
    near: bool = True
    """Drop MinHash-LSH near-duplicate documents."""
    near_threshold: float = 0.8
    """Estimated Jaccard of 5-gram shingle sets at which documents are near duplicates."""
    num_perm: int = 128
    """MinHash permutations (360Zhinao: 128-bit signatures)."""
    ngram: int = 5
    """Shingle length in tokens."""
    paragraph_fraction: float | None = 0.3
    """Share of each identical-paragraph group deleted (360Zhinao: 0.3 best of 0.1..0.5); None skips the stage."""
    sentence: bool = True
    """Run sentence dedup (ceil(sqrt(N)) of N copies kept)."""
    sentence_min_tokens: int = 16
    """Sentences are concatenated into units of at least this many tokens (360Zhinao: 16)."""
    group_kinds: tuple[str, ...] = ("prose",)
    """Document kinds (``clean.SourceKinds``) that paragraph and sentence dedup read and rewrite in
    ``pipeline.clean_corpus``; code is left out because its repeated lines (``)``, ``import os``) are syntax."""
    seed: int = 0
    """Seed of which paragraph/sentence copies are deleted; MinHash uses seed + 1 (datasketch's default 1 at 0)."""


@dataclasses.dataclass
class DedupReport:
    """Counts per stage. Documents: input = exact + near + emptied by paragraph/sentence dedup + output."""

    documents_in: int = 0
    exact_removed: int = 0
    near_removed: int = 0
    paragraph_emptied: int = 0
    sentence_emptied: int = 0
    documents_out: int = 0
    paragraphs_in: int = 0
    paragraphs_removed: int = 0
    sentence_units_in: int = 0
    sentence_units_removed: int = 0

    def consistent(self) -> bool:
        """True when every input document is either output or charged to exactly one stage."""
        removed = self.exact_removed + self.near_removed + self.paragraph_emptied + self.sentence_emptied
        return self.documents_in == removed + self.documents_out

    def record_stage(self, name: str, stage: _GroupDedup, emptied: int) -> None:
        """Counts of a finished ``paragraph`` or ``sentence`` stage, and the documents it left empty."""
        if name == "paragraph":
            self.paragraphs_in, self.paragraphs_removed, self.paragraph_emptied = stage.units, stage.removed, emptied
        elif name == "sentence":
            self.sentence_units_in, self.sentence_units_removed, self.sentence_emptied = (stage.units, stage.removed,
                                                                                          emptied)
        else:
            raise ValueError(f"unknown dedup stage {name!r}: paragraph or sentence")

    def as_dict(self) -> dict[str, int]:
        """All counts as a plain dict."""
        return dataclasses.asdict(self)

    def format(self) -> str:
        """One line per count."""
        d = self.as_dict()
        width = max(map(len, d))
        return "\n".join(f"{k:<{width}}  {v:>10}" for k, v in d.items())


def dedup_corpus(docs: Sequence[str], config: DedupConfig | None = None) -> tuple[list[str], DedupReport]:
    """Run exact -> near -> paragraph -> sentence dedup over a list of texts; returns (kept texts, report).

    Documents left blank by paragraph or sentence dedup are dropped and counted in the report.
    """
    cfg = config or DedupConfig()
    report = DedupReport(documents_in=len(docs))
    texts = list(docs)
    if cfg.exact:
        exact = ExactDedup()
        texts = list(exact.filter(texts))
        report.exact_removed = exact.removed
    if cfg.near:
        near = NearDedup(cfg.near_threshold, cfg.num_perm, cfg.ngram, seed=cfg.seed + 1)
        texts = list(near.filter(texts))
        report.near_removed = near.removed
    if cfg.paragraph_fraction is not None:
        stage = ParagraphDedup(cfg.paragraph_fraction, cfg.seed)
        rewritten = _two_pass(stage, texts)
        texts = [t for t in rewritten if t.strip()]
        report.record_stage("paragraph", stage, len(rewritten) - len(texts))
    if cfg.sentence:
        stage = SentenceDedup(cfg.sentence_min_tokens, cfg.seed)
        rewritten = _two_pass(stage, texts)
        texts = [t for t in rewritten if t.strip()]
        report.record_stage("sentence", stage, len(rewritten) - len(texts))
    report.documents_out = len(texts)
    return texts, report
