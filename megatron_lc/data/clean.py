"""Document-level heuristic cleaning: the 360Zhinao rules (technical report, Appendix A).

Appendix A lists the rules but not their thresholds ("relatively loose"); the defaults below come from the Gopher
(Rae et al. 2021, Table A1), C4 and FineWeb quality filters where one exists, and say so where they do not.

Text model (bilingual, English and Chinese):
- paragraph = one non-empty line (``text.split("\\n")``, blank lines skipped). Web extractors emit one paragraph per
  line; hard-wrapped text should be unwrapped before cleaning.
- sentence = text up to an end mark (``. ! ? 。 ！ ？ …`` plus closing quotes/brackets) or a newline.
- token (for n-grams and lengths) = a run of ASCII letters/digits, or one CJK character. Chinese has no spaces, so
  each Han/Kana/Hangul character is a token on its own; punctuation is not a token.
- "English word" (abnormal word length rule) = a whitespace-separated word, stripped of surrounding punctuation, that is
  pure ASCII and contains a letter or digit. Words holding CJK characters are skipped, so a 200-character Chinese
  sentence without spaces is not one 200-character "word" and cannot trip the rule.

Rule order (a removed document is charged to the first rule it fails, in this order; Appendix A's order, with an
``empty`` check first because every ratio below needs at least one paragraph):
``empty, punctuation_ratio, ellipsis_paragraphs, no_end_punctuation, abnormal_word_length, repeated_sentences,
short_paragraphs, repeated_ngrams``.

Source kinds. The rules and the paragraph/sentence dedup are written for prose; on source code they judge lines
such as ``)`` or ``import os`` as junk. ``SourceKinds`` says whether a document is ``code`` or ``prose``: by its
source, when named (``--code-sources``, ``--prose-sources``, ``--source-types FILE.yaml``), else by the extension of
its ``path`` field when it has one (``CODE_EXTENSIONS``, ``PROSE_EXTENSIONS``), else by its lines: code when at
least ``CODE_LINE_SHARE`` of its non-blank lines look like code (``looks_like_code``). Code documents are checked
by ``CleaningRules.code()`` (only the ``empty`` check by default) instead of the prose rules.
"""
from __future__ import annotations

import dataclasses
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from megatron_lc.configtools import ConfigError

RULE_ORDER = (
    "empty",
    "punctuation_ratio",
    "ellipsis_paragraphs",
    "no_end_punctuation",
    "abnormal_word_length",
    "repeated_sentences",
    "short_paragraphs",
    "repeated_ngrams",
)

# End-of-sentence marks, English and Chinese. Closing quotes/brackets may follow them ("He left." / 他走了。」).
SENTENCE_END = ".!?。！？…"
CLOSERS = "\"'”’」』）)》"
ELLIPSES = ("...", "…", "。。。")
# A paragraph "ends in punctuation" when its last mark (before closers) is one of these.
END_PUNCT = SENTENCE_END + ";；:："
_CJK = r"\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
_TOKEN_RE = re.compile(rf"[{_CJK}]|[A-Za-z0-9]+")
_CJK_RE = re.compile(rf"[{_CJK}]")
# A sentence ends after a run of end marks (plus closers and horizontal space) or after a newline.
_SENT_RE = re.compile(rf"[^\n{re.escape(SENTENCE_END)}]*(?:[{re.escape(SENTENCE_END)}]+[{re.escape(CLOSERS)}]*[ \t]*|\n|$)")
_WORD_STRIP = "".join(chr(c) for c in range(0x21, 0x7F) if not chr(c).isalnum()) + "。，、；：！？…“”‘’「」『』（）《》【】"


@dataclasses.dataclass
class CleaningRules:
    """Thresholds of the 360Zhinao document rules; set a threshold to None to switch its rule off."""

    max_punctuation_ratio: float | None = 0.25
    """Punctuation/symbol characters over non-space characters. No published value: loose, so prose passes with
    margin (English ~3-6%, Chinese ~10-15%) while symbol soup (menus, tables of ``|`` and ``#``) fails."""
    max_ellipsis_paragraph_ratio: float | None = 0.3
    """Paragraphs ending in an ellipsis over all paragraphs (Gopher: >30% of lines ending with an ellipsis)."""
    max_no_end_punct_ratio: float | None = 0.88
    """Paragraphs not ending in end punctuation over all paragraphs, failing at or above it (FineWeb line_punct_thr
    0.12: fails when <=12% of lines end in punctuation; C4 drops such lines one by one)."""
    min_mean_word_length: float | None = 3.0
    """Mean length of English words/numbers below this fails (Gopher: mean word length outside 3..10)."""
    max_mean_word_length: float | None = 10.0
    """Mean length of English words/numbers above this fails (Gopher)."""
    min_words_for_word_rule: int = 10
    """The word-length rule only looks at documents with at least this many English words/numbers (Chinese text,
    which has few, is judged by the other rules)."""
    max_duplicate_sentence_ratio: float | None = 0.3
    """Sentences that repeat an earlier sentence of the document over all sentences (Gopher duplicate line 0.30)."""
    short_paragraph_length: int = 30
    """A paragraph is short below this many length units; a CJK character counts 2 units, anything else 1, since a
    Chinese character carries about two English characters' worth of text (FineWeb short_line_length 30)."""
    max_short_paragraph_ratio: float | None = 0.67
    """Short paragraphs over all paragraphs at or above this fails (FineWeb short_line_thr 0.67)."""
    max_top_ngram_char_ratio: dict[int, float] | None = dataclasses.field(
        default_factory=lambda: {1: 0.20, 2: 0.20, 3: 0.18})
    """For each n, characters covered by the most frequent repeated n-gram over all token characters. n=2,3 are
    Gopher's top-2/3-gram fractions; n=1 has no published value and reuses 0.20."""

    def __post_init__(self):
        for name in ("max_punctuation_ratio", "max_ellipsis_paragraph_ratio", "max_no_end_punct_ratio",
                     "max_duplicate_sentence_ratio", "max_short_paragraph_ratio"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise ConfigError(f"CleaningRules.{name}={value!r}: a ratio must lie in [0, 1] (or be None to disable)")
        for name in ("min_words_for_word_rule", "short_paragraph_length"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"CleaningRules.{name}={getattr(self, name)!r}: must be a positive integer")
        lo, hi = self.min_mean_word_length, self.max_mean_word_length
        if lo is not None and hi is not None and lo > hi:
            raise ConfigError(f"CleaningRules: min_mean_word_length={lo} exceeds max_mean_word_length={hi}; swap them")
        for n, ratio in (self.max_top_ngram_char_ratio or {}).items():
            if int(n) < 1 or not 0.0 <= ratio <= 1.0:
                raise ConfigError(f"CleaningRules.max_top_ngram_char_ratio[{n!r}]={ratio!r}: need n >= 1 and a "
                                  "ratio in [0, 1]")


    @classmethod
    def code(cls, overrides: dict | None = None) -> CleaningRules:
        """Rules for source code: every prose rule off (only the ``empty`` check), then ``overrides`` (the keys of
        a ``--code-rules`` YAML) on top."""
        off = {f.name: None for f in dataclasses.fields(cls) if f.name.startswith(("max_", "min_mean"))}
        return cls(**{**off, **(overrides or {})})


# ----------------------------------------------------------------------------------------------- source kinds
KINDS = ("code", "prose")
CODE_EXTENSIONS = frozenset(
    ".py .pyi .pyx .c .h .cc .cpp .cxx .hpp .hh .cu .cuh .m .mm .java .kt .scala .go .rs .js .jsx .mjs .ts .tsx .rb "
    ".php .pl .pm .swift .cs .fs .hs .ml .lua .r .jl .sh .bash .zsh .ps1 .bat .sql .css .scss .el .clj .ex .exs .erl "
    ".dart .zig .nim .v .sv .vhd .asm .s .f .f90 .cmake .mk .gradle .toml .ini .cfg .yaml .yml .json .xml".split())
"""File extensions (lower case) whose documents are code."""
PROSE_EXTENSIONS = frozenset(".txt .md .markdown .rst .tex .html .htm .org .adoc .text".split())
"""File extensions (lower case) whose documents are prose (README.md is prose even inside a code source)."""
CODE_LINE_SHARE = 0.5
"""A document without a known extension is code when at least this share of its non-blank lines look like code."""
_CODE_LINE_RE = re.compile(
    r"""^\s*(?:from\s+[\w.]+\s+import\b|import\s+[\w.]+(?:\s+as\s+\w+)?(?:\s*,\s*[\w.]+)*\s*;?\s*$
    |(?:def|class|elif|else|try|except|finally|with|if|for|while|switch|case|return|function|fn|func|struct|enum
    |impl|public|private|protected|static|void|int|char|const|let|var|package|use|namespace)\b.*[:{;(]\s*$
    |\#\s*(?:include|define|ifdef|ifndef|endif|pragma)\b|[#@]|//|/\*|\*/|[)\]}]|>>>\s|\.\.\.\s
    |\w[\w.]*(?:\[[^\]]*\])?\s*[-+*/|&%]?=(?!=)|\w[\w.]*\()""", re.VERBOSE)
_CODE_END_RE = re.compile(r"[{}();\[\]=\\]\s*$")


def looks_like_code(line: str) -> bool:
    """True for a line that reads as source code: an import, a keyword line ending in ``:`` ``{`` ``;`` or ``(``,
    a comment, decorator, doctest prompt or closing bracket, an assignment or call (``x = 1``, ``f(x)``), a line
    ending in a bracket, ``;``, ``=`` or ``\\``, or one indented by a tab or four spaces. Lines of wrapped prose
    (ending in ``,`` or ``:``, starting with ``from`` or ``with``) are not code by themselves."""
    return bool(line.startswith(("\t", "    ")) or _CODE_LINE_RE.match(line) or _CODE_END_RE.search(line))


def code_line_share(text: str) -> float:
    """Share of the non-blank lines of ``text`` that ``looks_like_code`` (0.0 for a text without any)."""
    lines = [line for line in text.split("\n") if line.strip()]
    return sum(map(looks_like_code, lines)) / len(lines) if lines else 0.0


def guess_kind(text: str, path: str | None = None) -> str:
    """``code`` or ``prose`` for one document: by the extension of ``path`` when it is known, else by
    ``code_line_share(text) >= CODE_LINE_SHARE``."""
    if isinstance(path, str):
        ext = "." + path.rsplit(".", 1)[-1].lower() if "." in path.rsplit("/", 1)[-1] else ""
        if ext in CODE_EXTENSIONS:
            return "code"
        if ext in PROSE_EXTENSIONS:
            return "prose"
    return "code" if code_line_share(text) >= CODE_LINE_SHARE else "prose"


@dataclasses.dataclass(frozen=True)
class SourceKinds:
    """Which documents are code and which prose: named sources first, else ``guess_kind`` per document."""

    by_source: dict[str, str] = dataclasses.field(default_factory=dict)
    """Source name -> ``code`` or ``prose`` (from ``--code-sources``, ``--prose-sources``, ``--source-types``)."""
    path_key: str = "path"
    """Record field holding the document's file path, whose extension ``guess_kind`` reads (``--path-key``)."""

    def __post_init__(self):
        bad = {k: v for k, v in self.by_source.items() if v not in KINDS}
        if bad:
            raise ConfigError(f"source types {bad}: each source maps to one of {', '.join(KINDS)} "
                              "(--source-types FILE.yaml)")

    @classmethod
    def from_flags(cls, code_sources: str = "", prose_sources: str = "", types_file: str | None = None,
                   path_key: str = "path") -> SourceKinds:
        """From the ``data clean`` flags: comma-separated source lists and a YAML mapping source -> code|prose.
        A source given two different kinds is a ConfigError listing every such source."""
        from megatron_lc.configtools import load_yaml

        named: dict[str, set[str]] = {}
        entries = [(n.strip(), "code", "--code-sources") for n in code_sources.split(",") if n.strip()]
        entries += [(n.strip(), "prose", "--prose-sources") for n in prose_sources.split(",") if n.strip()]
        if types_file:
            data = load_yaml(types_file) or {}
            bad = {str(k): v for k, v in data.items() if v not in KINDS}
            if bad:
                raise ConfigError(f"--source-types {types_file}: {bad}: each source must map to code or prose")
            entries += [(str(k), v, f"--source-types {types_file}") for k, v in data.items()]
        where: dict[str, list[str]] = {}
        for name, kind, flag in entries:
            named.setdefault(name, set()).add(kind)
            where.setdefault(name, []).append(f"{kind} by {flag}")
        clash = {n: where[n] for n, kinds in named.items() if len(kinds) > 1}
        if clash:
            raise ConfigError("source(s) given both kinds: " + "; ".join(f"{n} ({', '.join(w)})" for n, w in
                                                                         clash.items()) + "; name each source once")
        return cls({n: kinds.pop() for n, kinds in named.items()}, path_key)

    def kind(self, source: str, text: str, extra: dict | None = None) -> str:
        """``code`` or ``prose`` for one document of ``source`` (``extra``: its other record fields)."""
        named = self.by_source.get(source)
        if named is not None:
            return named
        return guess_kind(text, (extra or {}).get(self.path_key))


# ----------------------------------------------------------------------------------------------- text helpers
def paragraphs(text: str) -> list[str]:
    """Non-empty lines of ``text``, stripped (the paragraph unit of the cleaning rules)."""
    return [line.strip() for line in text.split("\n") if line.strip()]


def sentence_pieces(text: str) -> list[str]:
    """Split ``text`` into sentence pieces that concatenate back to ``text`` exactly.

    A piece runs through its end marks, closing quotes and trailing spaces, or through a newline.
    """
    pieces = [m.group(0) for m in _SENT_RE.finditer(text) if m.group(0)]
    assert "".join(pieces) == text
    return pieces


def sentences(text: str) -> list[str]:
    """Stripped, non-empty sentences of ``text``."""
    return [p.strip() for p in sentence_pieces(text) if p.strip()]


def tokens(text: str) -> list[str]:
    """Lower-cased tokens: ASCII letter/digit runs and single CJK characters; punctuation dropped."""
    return _TOKEN_RE.findall(text.lower())


def length_units(text: str) -> int:
    """Characters of ``text`` with each CJK character counted twice (see ``short_paragraph_length``)."""
    return len(text) + len(_CJK_RE.findall(text))


def english_words(text: str) -> list[str]:
    """Whitespace words stripped of surrounding punctuation that are pure ASCII and hold a letter or digit."""
    out = []
    for word in text.split():
        word = word.strip(_WORD_STRIP)
        if word and word.isascii() and any(c.isalnum() for c in word):
            out.append(word)
    return out


def _is_punct(ch: str) -> bool:
    return unicodedata.category(ch)[0] in "PS"


def _ends_with_ellipsis(paragraph: str) -> bool:
    return paragraph.rstrip(CLOSERS).endswith(ELLIPSES)


def _ends_with_punct(paragraph: str) -> bool:
    body = paragraph.rstrip(CLOSERS)
    return bool(body) and body[-1] in END_PUNCT


def _top_ngram_char_ratio(toks: list[str], n: int) -> float:
    """Characters covered by the most frequent n-gram that occurs at least twice, over all token characters."""
    total = sum(len(t) for t in toks)
    if total == 0 or len(toks) < n:
        return 0.0
    counts = Counter(tuple(toks[i:i + n]) for i in range(len(toks) - n + 1))
    gram, count = counts.most_common(1)[0]
    if count < 2:
        return 0.0
    return count * sum(len(t) for t in gram) / total


# ----------------------------------------------------------------------------------------------- rules
def rule_values(text: str, rules: CleaningRules | None = None) -> dict[str, float]:
    """The measured quantity of every rule for ``text`` (for inspection and threshold tuning)."""
    short_length = (rules or CleaningRules()).short_paragraph_length
    paras = paragraphs(text)
    chars = [c for c in text if not c.isspace()]
    words = english_words(text)
    sents = sentences(text)
    toks = tokens(text)
    n_para = max(len(paras), 1)
    return {
        "punctuation_ratio": sum(map(_is_punct, chars)) / max(len(chars), 1),
        "ellipsis_paragraphs": sum(map(_ends_with_ellipsis, paras)) / n_para,
        "no_end_punctuation": sum(not _ends_with_punct(p) for p in paras) / n_para,
        "english_words": float(len(words)),
        "mean_word_length": sum(map(len, words)) / len(words) if words else 0.0,
        "repeated_sentences": (len(sents) - len(set(sents))) / max(len(sents), 1),
        "short_paragraphs": sum(length_units(p) < short_length for p in paras) / n_para,
        **{f"top_{n}gram": _top_ngram_char_ratio(toks, n) for n in (1, 2, 3)},
    }


def first_failed_rule(text: str, rules: CleaningRules | None = None) -> str | None:
    """Name of the first rule (in ``RULE_ORDER``) that ``text`` fails, or None if the document is kept."""
    r = rules or CleaningRules()
    paras = paragraphs(text)
    if not paras:
        return "empty"
    if r.max_punctuation_ratio is not None:
        chars = [c for c in text if not c.isspace()]
        if sum(map(_is_punct, chars)) / len(chars) > r.max_punctuation_ratio:
            return "punctuation_ratio"
    ellipsis_limit, no_end_limit = r.max_ellipsis_paragraph_ratio, r.max_no_end_punct_ratio
    if ellipsis_limit is not None and sum(map(_ends_with_ellipsis, paras)) / len(paras) > ellipsis_limit:
        return "ellipsis_paragraphs"
    if no_end_limit is not None and sum(not _ends_with_punct(p) for p in paras) / len(paras) >= no_end_limit:
        return "no_end_punctuation"
    words = english_words(text)
    if len(words) >= r.min_words_for_word_rule:
        mean = sum(map(len, words)) / len(words)
        if (r.min_mean_word_length is not None and mean < r.min_mean_word_length) or (
                r.max_mean_word_length is not None and mean > r.max_mean_word_length):
            return "abnormal_word_length"
    if r.max_duplicate_sentence_ratio is not None:
        sents = sentences(text)
        if sents and (len(sents) - len(set(sents))) / len(sents) > r.max_duplicate_sentence_ratio:
            return "repeated_sentences"
    if r.max_short_paragraph_ratio is not None:
        short = sum(length_units(p) < r.short_paragraph_length for p in paras)
        if short / len(paras) >= r.max_short_paragraph_ratio:
            return "short_paragraphs"
    if r.max_top_ngram_char_ratio:
        toks = tokens(text)
        for n, limit in sorted(r.max_top_ngram_char_ratio.items()):
            if _top_ngram_char_ratio(toks, n) > limit:
                return "repeated_ngrams"
    return None


# ----------------------------------------------------------------------------------------------- report + stream
@dataclasses.dataclass
class CleaningReport:
    """Documents seen, kept, and removed per rule; every removed document is charged to exactly one rule."""

    total: int = 0
    kept: int = 0
    removed: dict[str, int] = dataclasses.field(default_factory=lambda: {name: 0 for name in RULE_ORDER})

    def add(self, failed_rule: str | None) -> None:
        """Count one document: kept when ``failed_rule`` is None, else charged to that rule."""
        self.total += 1
        if failed_rule is None:
            self.kept += 1
        else:
            self.removed[failed_rule] = self.removed.get(failed_rule, 0) + 1

    def consistent(self) -> bool:
        """True when kept + removed over all rules == total."""
        return self.kept + sum(self.removed.values()) == self.total

    def as_dict(self) -> dict[str, Any]:
        """Plain dict: total, kept, removed (per rule, in rule order)."""
        return {"total": self.total, "kept": self.kept, "removed": dict(self.removed)}

    def format(self) -> str:
        """A text table: one row per rule with its count and share of the input, then kept and total."""
        width = max(map(len, RULE_ORDER + ("kept", "total")))
        share = lambda k: f"{100.0 * k / self.total:6.2f}%" if self.total else "     -"
        rows = [f"{'rule':<{width}}  {'docs':>10}  {'share':>7}"]
        rows += [f"{name:<{width}}  {count:>10}  {share(count)}" for name, count in self.removed.items()]
        rows += [f"{'kept':<{width}}  {self.kept:>10}  {share(self.kept)}", f"{'total':<{width}}  {self.total:>10}"]
        return "\n".join(rows)


def default_text_of(doc: Any) -> str:
    """The text of a document given as a str or as a mapping with a "text" key."""
    if isinstance(doc, str):
        return doc
    if isinstance(doc, dict) and isinstance(doc.get("text"), str):
        return doc["text"]
    raise ConfigError(f"cannot find the text of a {type(doc).__name__} document: pass a str, a dict with a 'text' "
                      "string, or text_of=<function returning the text>")


def clean_documents(docs: Iterable[Any], rules: CleaningRules | None = None, report: CleaningReport | None = None,
                    text_of: Callable[[Any], str] = default_text_of) -> Iterator[Any]:
    """Yield the documents (str or records, unchanged) that pass every rule; count each one in ``report``."""
    rules = rules or CleaningRules()
    for doc in docs:
        failed = first_failed_rule(text_of(doc), rules)
        if report is not None:
            report.add(failed)
        if failed is None:
            yield doc
