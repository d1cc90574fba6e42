"""Synthetic long QA chats (``megatron-lc data synth-qa``): multi-doc and single-doc extractive QA from any
document JSONL, deterministic with a seed; docs/synth-qa.md has the format and the recipe.

- **multi-doc**: documents are drawn at random (each cut to at most ``length / min_docs`` tokens, so a chat holds
  several), shuffled, and rendered one after another as ``Document {i} (title: {title}):\\n{text}`` joined by blank
  lines; the first user message is that context, a blank line and the first question; the other questions follow as
  successive user turns, each answered by one assistant turn. A question's gold text sits at a depth drawn
  uniformly over the context; a share of the questions (``compare_share``) needs two documents (which of two
  numbers is larger: the answer is one of them, verbatim).
- **single-doc**: one long document (a window of it when it is longer than the target), cut into as many equal
  segments as there are questions, one question per segment at a uniform position inside it.

Every answer is a string that occurs verbatim in its source document, so exact match and token F1 score it exactly.
Questions come from a :class:`QAWriter`: :class:`RuleBasedWriter` (built in, needs nothing) or
:class:`OpenAIWriter` (any OpenAI-compatible ``/chat/completions`` endpoint). Whatever a writer returns is checked
here: an answer that is not verbatim in its passage, or a quoted key that is not unique in the context, is
rejected and counted by reason in the report.

A chat's length is its token count as ``megatron-lc data sft`` tokenizes it by default: ChatML with Qwen2's default
system message, without a generation prompt (``chat_template.render_chatml``). Each chat fits its target and is
filled to near it (the report has the histogram of length / target and of gold depths).

The record (one JSON object a line; ``turn`` i is answered by the i-th assistant message; ``gold_docs`` index
``meta.titles``/``meta.sources``, 0-based, while the rendered context numbers documents from 1; ``depth`` is the
position of the gold text's start in the first user message divided by that message's length)::

    {"messages": [{"role": "user", "content": CONTEXT + "\\n\\n" + Q1}, {"role": "assistant", "content": A1}, ...],
     "qa": [{"turn": 0, "question": Q1, "answers": [A1], "gold_docs": [2], "depth": 0.37}, ...],
     "meta": {"kind": "multi-doc", "seed": S, "length_tokens": N, "target_tokens": T, "titles": [...],
              "sources": ["file.jsonl:12", ...]}}
"""
from __future__ import annotations

import json
import os
import random
import re
import time
import urllib.error
import urllib.request
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from ..configtools import ConfigError
from .chat_template import IM_END, IM_START, render_chatml
from .documents import ReadReport, iter_documents

KINDS = ("multi-doc", "single-doc")
SEPARATOR = "\n\n"
"""Between two documents of the context, and between the context and the first question."""
DEPTH_BINS = 10
LENGTH_BINS = 10


def document_header(number: int, title: str) -> str:
    """The line that opens document ``number`` (1-based) of a context."""
    return f"Document {number} (title: {title}):\n"


@dataclass(frozen=True)
class QAPair:
    """One question a writer asks about a passage. ``answer`` must occur verbatim in the passage; ``start`` is its
    offset there (None: its first occurrence); ``key``: text the question quotes from the passage, which must occur
    exactly once in the whole context for the question to have one answer (None: no such check); ``value``: the
    answer's number, for questions that compare two values (None: not a number)."""

    question: str
    answer: str
    start: int | None = None
    key: str | None = None
    value: float | None = None


class QAWriter(ABC):
    """Writes questions about a passage of a document. Subclass it to plug in another question writer (an LLM,
    rules of your own); the generator checks and counts whatever it returns."""

    name = "writer"

    @abstractmethod
    def write(self, passage: str, title: str, rng: random.Random) -> list[QAPair]:
        """(question, answer) candidates about ``passage`` (a piece of the document titled ``title``), best first
        or in any order: the generator picks the one nearest the depth it wants among those that pass its checks.
        ``rng`` is the only randomness allowed, so a seed gives the same data."""

    def compare(self, a: QAPair, title_a: str, b: QAPair, title_b: str) -> tuple[str, str] | None:
        """A (question, answer) that needs both ``a`` and ``b`` (numeric pairs, ``value`` set, from two documents),
        whose answer is one of their answers verbatim; None when this writer has none (the generator then asks a
        one-document question instead and counts it)."""
        return None


# ---- the rule-based writer ------------------------------------------------------------------------------------
_WORD = re.compile(r"\S+")
_EDGE_PUNCT = "\"'`.,;:!?()[]{}<>*"
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


class RuleBasedWriter(QAWriter):
    """Copy questions over real text, no model needed: ``which N words come right after "<phrase>"?`` (the answer:
    the next 1-3 words, verbatim) and ``which number comes right after "<phrase>"?`` when the next word is a number.
    The quoted phrase (``phrase_words`` words of one line) is the key: it must be unique in the context, so exactly
    one span answers. Every document holds words (and most numbers), so a distractor always holds answers of the
    same type and copying words from the wrong document scores nothing; with the gold document removed the phrase is
    absent and the question cannot be answered. Two numbers make a compare question (the larger one)."""

    name = "rule"

    def __init__(self, phrase_words: int = 5, answer_words: tuple[int, int] = (1, 3)):
        if phrase_words < 1 or not 1 <= answer_words[0] <= answer_words[1]:
            raise ConfigError(f"RuleBasedWriter: phrase_words {phrase_words} must be >= 1 and answer_words "
                              f"{answer_words} a range (lo, hi) with 1 <= lo <= hi")
        self.phrase_words, self.answer_words = phrase_words, answer_words

    def write(self, passage: str, title: str, rng: random.Random) -> list[QAPair]:
        """Every copy question of ``passage``: one per word that follows ``phrase_words`` words on its line."""
        out, offset, p = [], 0, self.phrase_words
        for line in passage.split("\n"):
            words = list(_WORD.finditer(line))
            for i in range(p, len(words)):
                pair = self._pair(line, words, i, offset, title, rng)
                if pair is not None:
                    out.append(pair)
            offset += len(line) + 1
        return out

    def _pair(self, line: str, words: list, i: int, offset: int, title: str, rng: random.Random) -> QAPair | None:
        phrase_words = words[i - self.phrase_words:i]
        if sum(any(c.isalpha() for c in w.group()) for w in phrase_words) < min(2, self.phrase_words):
            return None  # a key of symbols says nothing
        phrase = line[phrase_words[0].start():phrase_words[-1].end()]
        first = words[i].group().strip(_EDGE_PUNCT)
        if _NUMBER.fullmatch(first):
            start = words[i].start() + words[i].group().index(first)
            return QAPair(f'In document "{title}", which number comes right after "{phrase}"?', first,
                          offset + start, phrase, float(first))
        n = min(rng.randint(*self.answer_words), len(words) - i)
        span = line[words[i].start():words[i + n - 1].end()]
        answer = span.strip(_EDGE_PUNCT)
        if not answer or not all(any(c.isalnum() for c in w.group()) for w in words[i:i + n]):
            return None
        start = words[i].start() + span.index(answer)
        what = "word comes" if n == 1 else f"{n} words come"
        return QAPair(f'In document "{title}", which {what} right after "{phrase}"?', answer, offset + start,
                      phrase)

    def compare(self, a: QAPair, title_a: str, b: QAPair, title_b: str) -> tuple[str, str] | None:
        """``Which number is larger: the one right after "<a>" in document "A", or ... "<b>" in "B"?``; None on a
        tie (no single answer)."""
        if a.value is None or b.value is None or a.value == b.value or a.key is None or b.key is None:
            return None
        question = (f'Which number is larger: the one right after "{a.key}" in document "{title_a}", or the one '
                    f'right after "{b.key}" in document "{title_b}"?')
        return question, (a if a.value > b.value else b).answer


# ---- an LLM writer --------------------------------------------------------------------------------------------
class OpenAIWriter(QAWriter):
    """Questions written by a chat model behind an OpenAI-compatible endpoint (``POST {base_url}/chat/completions``,
    urllib only). The model is asked for a JSON list of ``{"question", "answer"}`` with answers copied verbatim;
    the generator rejects (and counts) every answer that is not. A reply that is not such a list counts as
    ``writer_error``; an endpoint that cannot be reached is a ConfigError naming ``--api-base``."""

    name = "openai"
    SYSTEM = ("You write reading-comprehension questions about a passage. Reply with only a JSON list of objects "
              '{"question": ..., "answer": ...}. Each answer must be copied character for character from the passage '
              "(a name, number or short phrase of at most 8 words); each question must be answerable from the "
              "passage alone and name the document by its title.")

    def __init__(self, base_url: str, model: str, api_key: str | None = None, questions: int = 3,
                 timeout: float = 120.0, opener: Callable | None = None):
        if not base_url.startswith(("http://", "https://")):
            raise ConfigError(f"--api-base {base_url!r}: want an http(s) URL such as http://localhost:8000/v1")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.api_key, self.questions, self.timeout = model, api_key, questions, timeout
        self._open = opener or urllib.request.urlopen

    def request(self, passage: str, title: str) -> urllib.request.Request:
        """The HTTP request asking for ``questions`` questions about ``passage``."""
        user = (f'A passage of the document titled "{title}":\n\n{passage}\n\nWrite {self.questions} questions '
                f"whose answers are copied verbatim from it.")
        body = {"model": self.model, "temperature": 0.0,
                "messages": [{"role": "system", "content": self.SYSTEM}, {"role": "user", "content": user}]}
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return urllib.request.Request(self.url, data=json.dumps(body).encode(), headers=headers, method="POST")

    @staticmethod
    def parse(body: bytes) -> list[QAPair]:
        """QAPairs of a chat-completions response body; ValueError when it holds no JSON list of question/answer
        objects (a fenced ```json block is accepted)."""
        try:
            content = json.loads(body)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise ValueError(f"not a chat-completions response ({type(e).__name__}: {e})") from None
        lo, hi = content.find("["), content.rfind("]")
        try:
            items = json.loads(content[lo:hi + 1]) if lo >= 0 else None
        except ValueError:
            items = None
        if not isinstance(items, list):
            raise ValueError(f"the reply holds no JSON list: {content[:80]!r}")
        return [QAPair(str(x["question"]), str(x["answer"])) for x in items
                if isinstance(x, dict) and "question" in x and "answer" in x]

    def write(self, passage: str, title: str, rng: random.Random) -> list[QAPair]:
        try:
            with self._open(self.request(passage, title), timeout=self.timeout) as response:
                return self.parse(response.read())
        except urllib.error.HTTPError as e:
            raise ConfigError(f"{self.url}: HTTP {e.code} {e.reason}; check --api-base, --api-model and the key "
                              f"in --api-key-env") from None
        except urllib.error.URLError as e:
            raise ConfigError(f"{self.url}: cannot reach it ({e.reason}); check --api-base and that the server "
                              f"is up") from None


# ---- documents -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PoolDoc:
    """A document that can go into a context: its ``text``, ``title`` and where it came from (``file:line``)."""

    text: str
    title: str
    where: str


def load_pool(inputs: Iterable[str], text_key: str = "text", source_key: str = "source", title_key: str = "title",
              on_error: str = "skip", read: ReadReport | None = None) -> tuple[list[PoolDoc], Counter]:
    """The documents of ``inputs`` (``iter_documents``) that can go into a chat, and the count of those left out
    by reason (blank text, a ChatML marker in the text). A title is the record's ``title_key`` field, else its
    ``path``, else ``{source} #{n}`` (n: its number in the input, from 1), not a line of its own text: a
    question's quoted phrase must occur once in the context, headers included."""
    pool, skipped = [], Counter()
    for doc in iter_documents(inputs, text_key, source_key, on_error=on_error, report=read):
        if not doc.text.strip():
            skipped["blank text"] += 1
            continue
        if IM_START in doc.text or IM_END in doc.text:
            skipped["ChatML marker in the text"] += 1
            continue
        title = doc.extra.get(title_key) or doc.extra.get("path")
        if not isinstance(title, str) or not title.strip():
            title = f"{doc.source} #{len(pool) + sum(skipped.values()) + 1}"
        title = " ".join(title.replace('"', "'").split())  # one line; questions quote it in double quotes
        pool.append(PoolDoc(doc.text, title, doc.where))
    if not pool:
        raise ConfigError(f"no usable document in {', '.join(inputs)} (left out: {dict(skipped)}); check "
                          f"--text-key")
    return pool, skipped


def parse_lengths(text: str) -> list[int]:
    """``"4096,32K"`` -> ``[4096, 32768]`` (K = 1024); ConfigError naming ``--length`` on a bad entry."""
    out = []
    for part in text.split(","):
        part = part.strip()
        scale = 1024 if part[-1:] in ("k", "K") else 1
        try:
            value = int(part[:-1] if scale > 1 else part) * scale
        except ValueError:
            raise ConfigError(f"--length {text!r}: {part!r} is not a token count (e.g. 4096 or 32K)") from None
        if value < 64:
            raise ConfigError(f"--length {part}: a chat needs at least 64 tokens")
        out.append(value)
    return out


def parse_range(text: str, flag: str) -> tuple[int, int]:
    """``"1-3"`` -> ``(1, 3)``, ``"2"`` -> ``(2, 2)``; ConfigError naming ``flag`` unless 1 <= lo <= hi."""
    lo, _, hi = text.partition("-")
    try:
        pair = (int(lo), int(hi or lo))
    except ValueError:
        raise ConfigError(f"{flag} {text!r}: want LO-HI such as 1-3, or one count") from None
    if not 1 <= pair[0] <= pair[1]:
        raise ConfigError(f"{flag} {text!r}: want 1 <= LO <= HI")
    return pair


class _NoRoom(ConfigError):
    """No document fits the context budget left after the reserve for the questions."""


# ---- the generator ----------------------------------------------------------------------------------------------
@dataclass
class SynthConfig:
    """What to generate (``megatron-lc data synth-qa`` flags)."""

    kind: str = "multi-doc"
    """multi-doc (several documents, shuffled) or single-doc (segments of one long document)."""
    questions: int = 3
    """Questions (user/assistant turn pairs) per chat."""
    min_docs: int = 4
    """multi-doc: each document takes at most length / min_docs tokens (longer ones are cut), so a chat holds at
    least this many when the corpus has them."""
    compare_share: float = 0.25
    """multi-doc: the share of questions that need two documents (compare two numbers)."""
    passage_chars: int = 1500
    """Characters of text around the chosen depth that the writer sees."""
    seed: int = 0
    """Seeds every draw: the same seed, inputs and tokenizer give byte-identical output."""

    def check(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"--kind {self.kind!r}: want one of {', '.join(KINDS)}")
        for flag, value, lo in (("--questions", self.questions, 1), ("--min-docs", self.min_docs, 1),
                                ("--passage-chars", self.passage_chars, 100)):
            if value < lo:
                raise ConfigError(f"{flag} {value}: want at least {lo}")
        if not 0.0 <= self.compare_share <= 1.0:
            raise ConfigError(f"--compare-share {self.compare_share}: want a share in [0, 1]")


@dataclass
class _Block:
    """A document in a context: pool index, the text kept (a window of the document) and where it starts in the
    first user message (set once the blocks are laid out)."""

    doc: int
    text: str
    offset: int = 0
    """Where the text starts in the first user message."""
    head: int = 0
    """Where the block (its header) starts there."""


@dataclass
class Stats:
    """Counts of one generation, for the report."""

    chats: int = 0
    lengths: dict = field(default_factory=dict)
    """target -> [chat token counts]."""
    depths: list = field(default_factory=list)
    by_type: Counter = field(default_factory=Counter)
    rejected: Counter = field(default_factory=Counter)
    """Candidate questions left out, by reason (not verbatim, key not unique, repeated, writer error, ...)."""
    fewer_questions: int = 0
    """Chats that got fewer questions than asked (no usable fact found at the drawn depths)."""
    truncated_docs: int = 0
    redrawn: int = 0
    """Contexts drawn again because no question could be asked about them."""


_TYPICAL_QUESTION = 'In document "a title of some words", which 2 words come right after "five words of the text"?'


class Generator:
    """Builds synthetic QA chats from ``pool`` with ``writer``, counting tokens with ``tokenizer``
    (``megatron_lc.data.tokenizer.Tokenizer``). ``chat(target, index)`` is a pure function of the seed, target and
    index, so any subset of chats can be regenerated."""

    TRIES = 8

    def __init__(self, pool: list[PoolDoc], tokenizer, writer: QAWriter, cfg: SynthConfig):
        cfg.check()
        self.pool, self.tok, self.writer, self.cfg = pool, tokenizer, writer, cfg
        self.stats = Stats()
        self._doc_tokens: dict[int, int] = {}
        typical = [{"role": "user", "content": _TYPICAL_QUESTION}, {"role": "assistant", "content": "two words"}]
        self._reserve = self.chat_tokens(typical * cfg.questions)

    # -- token counting
    def count(self, text: str) -> int:
        """Tokens of ``text`` with this generator's tokenizer."""
        return len(self.tok.encode(text))

    def chat_tokens(self, messages: list[dict]) -> int:
        """Tokens of a chat as ``data sft`` renders it by default (ChatML, default system, no generation prompt)."""
        return self.count(render_chatml(messages, add_generation_prompt=False))

    def fit(self, text: str, max_tokens: int) -> str:
        """The longest prefix of ``text`` that ends at a word boundary and has at most ``max_tokens`` tokens."""
        if max_tokens <= 0:
            return ""
        head = text[:max_tokens * 16]  # no token is longer than 16 characters in practice: the rest cannot fit
        ids = self.tok.encode(head)
        if len(ids) <= max_tokens:
            if len(head) == len(text):
                return text
            ids = self.tok.encode(text)
            if len(ids) <= max_tokens:
                return text
        prefix = self.tok.decode(ids[:max_tokens])
        if not text.startswith(prefix):  # a tokenizer that normalises text: fall back to the character share
            prefix = text[:len(text) * max_tokens // len(ids)]
        while prefix:
            cut = max(prefix.rfind(" "), prefix.rfind("\n"))
            prefix = prefix[:cut].rstrip() if cut > 0 else ""
            if self.count(prefix) <= max_tokens:
                return prefix
        return ""

    # -- one chat
    def chat(self, target: int, index: int) -> dict:
        """Chat ``index`` of length ``target`` tokens: the record described in the module docstring."""
        rng = random.Random(f"synth-qa:{self.cfg.seed}:{self.cfg.kind}:{target}:{index}")
        self._target = target
        reserve = self._reserve  # tokens for the system turn, the questions and answers: first a guess, then measured
        best = None  # (tokens, record, counts, blocks) of the longest try within the target
        for _ in range(self.TRIES):
            state = rng.getstate()
            try:
                blocks = self._blocks(target - reserve, rng)
            except _NoRoom:
                if reserve == 0:
                    raise
                reserve //= 2  # the guess left no room for a document (short questions, a short target)
                rng.setstate(state)
                continue
            record, counts = self._questions(blocks, rng)
            if not record["qa"]:  # no usable fact in these documents: draw others (the rng has moved on)
                self.stats.redrawn += 1
                continue
            n = self.chat_tokens(record["messages"])
            if n <= target:
                if best is None or n > best[0]:
                    best = (n, record, counts, blocks)
                short = target - n
                if short <= max(32, target // 20) or reserve == 0:  # filled to near the target
                    break
                reserve = max(0, reserve - short + 16)  # the guess was too big (short questions): fill the rest
            else:
                reserve += n - target + 16
            rng.setstate(state)
        if best is None:
            raise ConfigError(f"chat {index} of --length {target}: no chat with a question within its target after "
                              f"{self.TRIES} tries: use a longer --length or fewer --questions, or documents with "
                              f"more text")
        n, record, counts, blocks = best
        st = self.stats
        st.chats += 1
        st.lengths.setdefault(target, []).append(n)
        st.depths.extend(q["depth"] for q in record["qa"])
        st.by_type.update(counts["types"])
        st.rejected.update(counts["rejected"])
        st.fewer_questions += len(record["qa"]) < self.cfg.questions
        st.truncated_docs += sum(len(b.text) < len(self.pool[b.doc].text) for b in blocks)
        record["meta"] = {"kind": self.cfg.kind, "seed": self.cfg.seed, "length_tokens": n, "target_tokens": target,
                          "titles": [self.pool[b.doc].title for b in blocks],
                          "sources": [self.pool[b.doc].where for b in blocks]}
        return record

    def _doc_token_count(self, i: int) -> int:
        if i not in self._doc_tokens:
            self._doc_tokens[i] = self.count(self.pool[i].text)
        return self._doc_tokens[i]

    def _blocks(self, budget: int, rng: random.Random) -> list[_Block]:
        """The documents of one context, shuffled, their rendered tokens summing to at most ``budget``."""
        if self.cfg.kind == "single-doc":
            return [self._single_block(budget, rng)]
        blocks, used, titles, cap = [], 0, set(), max(1, budget // self.cfg.min_docs)
        sep = self.count(SEPARATOR)
        for _ in range(4 * len(self.pool) + 16):  # draws, repeats included; ends when the budget is filled
            j = rng.randrange(len(self.pool))
            doc = self.pool[j]
            if doc.title in titles:  # one title per context, so a question's title names one document
                continue
            remaining = budget - used - sep
            if remaining < 32:  # filled
                break
            room = min(cap, remaining) - self.count(document_header(len(blocks) + 1, doc.title))
            if room < 16:  # a title too long for the room left: another document may fit
                continue
            text = self.fit(doc.text, room)
            if not text.strip():
                continue
            blocks.append(_Block(j, text))
            titles.add(doc.title)
            used += self.count(document_header(len(blocks), doc.title) + text) + sep
        if not blocks:
            raise _NoRoom(f"no document fits a context of {budget} tokens: use a longer --length")
        rng.shuffle(blocks)
        return blocks

    def _single_block(self, budget: int, rng: random.Random) -> _Block:
        """A window of one document filling ``budget`` tokens (its header included), from a long enough
        document."""
        header = self.count(document_header(1, "x" * 8))
        need = int(0.9 * (budget - header))
        long_enough = [i for i, d in enumerate(self.pool) if len(d.text) >= need]  # chars >= tokens: a pre-filter
        rng.shuffle(long_enough)
        for j in long_enough[:64]:
            doc = self.pool[j]
            room = budget - self.count(document_header(1, doc.title))
            n = self._doc_token_count(j)
            if n < need:
                continue
            start = 0
            if n > room:  # a window at a random line start, as long as the budget
                start = rng.randrange(0, max(1, len(doc.text) - len(doc.text) * room // n))
                start = doc.text.find("\n", start) + 1 if start else 0
            return _Block(j, self.fit(doc.text[start:], room))
        longest = max(self.pool, key=lambda d: len(d.text))
        raise ConfigError(f"--kind single-doc --length {self._target}: no document of at least {need} tokens (the longest "
                          f"is {self.count(longest.text)} tokens, {longest.where}); use a smaller --length, longer "
                          f"documents, or --kind multi-doc")

    def _questions(self, blocks: list[_Block], rng: random.Random) -> tuple[dict, dict]:
        """Lay out the context, then ask ``questions`` questions at uniform depths; the record and its counts."""
        parts, offset = [], 0
        for k, b in enumerate(blocks):
            head = document_header(k + 1, self.pool[b.doc].title)
            b.head, b.offset = offset, offset + len(head)
            parts.append(head + b.text)
            offset += len(head) + len(b.text) + len(SEPARATOR)
        context = SEPARATOR.join(parts)
        counts = {"types": Counter(), "rejected": Counter()}
        asked, qa = set(), []
        q = self.cfg.questions
        for i in range(q):
            for _ in range(6):  # a few depths before giving up on this question
                if self.cfg.kind == "single-doc":  # segment i of q
                    pos = int((i + rng.random()) / q * len(blocks[0].text))
                    found = self._single(blocks, 0, pos, context, asked, rng, counts, (i / q, (i + 1) / q))
                elif len(blocks) > 1 and rng.random() < self.cfg.compare_share:
                    found = self._compare(blocks, context, asked, rng, counts)
                else:
                    k, pos = self._at_depth(blocks, rng.random() * len(context))
                    found = self._single(blocks, k, pos, context, asked, rng, counts)
                if found is not None:
                    qa.append(found)
                    break
        first = context + SEPARATOR + (qa[0][0] if qa else "")
        messages, records = [], []
        for turn, (question, answer, gold, start, kind) in enumerate(qa):
            messages.append({"role": "user", "content": first if turn == 0 else question})
            messages.append({"role": "assistant", "content": answer})
            records.append({"turn": turn, "question": question, "answers": [answer], "gold_docs": gold,
                            "depth": round(start / len(first), 6)})
            counts["types"][kind] += 1
        return {"messages": messages, "qa": records}, counts

    @staticmethod
    def _at_depth(blocks: list[_Block], pos: float) -> tuple[int, int]:
        """(block, offset in its text) of character ``pos`` of the context (a header maps to its text's start)."""
        k = 0
        while k + 1 < len(blocks) and blocks[k + 1].head <= pos:
            k += 1
        return k, min(max(0, int(pos) - blocks[k].offset), max(0, len(blocks[k].text) - 1))

    def _candidates(self, block: _Block, pos: int, rng: random.Random, counts: dict, span: tuple[int, int] | None,
                    chars: int) -> list[tuple[int, QAPair]]:
        """The writer's checked pairs for the passage around ``pos`` (inside ``span`` of the text when given),
        as (absolute offset in the block's text, pair), nearest to ``pos`` first."""
        lo, hi = span if span is not None else (0, len(block.text))
        a = max(lo, min(pos - chars // 2, hi - chars))
        passage = block.text[a:min(hi, a + chars)]
        try:
            pairs = self.writer.write(passage, self.pool[block.doc].title, rng)
        except ValueError as e:  # a reply the writer could not read: counted, and the next depth is tried
            counts["rejected"][f"writer error: {str(e)[:60]}"] += 1
            return []
        out = []
        for pair in pairs:
            start = passage.find(pair.answer) if pair.start is None else pair.start
            if not pair.answer.strip() or start < 0 or passage[start:start + len(pair.answer)] != pair.answer:
                counts["rejected"]["answer not verbatim in the passage"] += 1
            elif any(m in pair.question or m in pair.answer for m in (IM_START, IM_END)):
                counts["rejected"]["ChatML marker in the question or answer"] += 1
            else:
                out.append((a + start, pair))
        out.sort(key=lambda c: abs(c[0] - pos))
        return out

    def _accept(self, pair: QAPair, context: str, asked: set, counts: dict) -> bool:
        """Whether a checked pair can be asked in this chat: its key unique in the context, neither the pair nor
        its key asked before."""
        if pair.key is not None and context.count(pair.key) != 1:
            counts["rejected"]["quoted key not unique in the context"] += 1
            return False
        if (pair.question, pair.answer) in asked or (pair.key is not None and ("key", pair.key) in asked):
            counts["rejected"]["asked before in the chat"] += 1
            return False
        return True

    @staticmethod
    def _mark_asked(asked: set, *pairs: QAPair) -> None:
        for pair in pairs:
            asked.add((pair.question, pair.answer))
            if pair.key is not None:
                asked.add(("key", pair.key))

    def _single(self, blocks, k, pos, context, asked, rng, counts, segment=None):
        """A one-document question near ``pos`` of block ``k``: (question, answer, gold_docs, start, type)."""
        block = blocks[k]
        span = None if segment is None else (int(segment[0] * len(block.text)), int(segment[1] * len(block.text)))
        for start, pair in self._candidates(block, pos, rng, counts, span, self.cfg.passage_chars):
            if self._accept(pair, context, asked, counts):
                self._mark_asked(asked, pair)
                kind = "number" if pair.value is not None else "words"
                return pair.question, pair.answer, [k], block.offset + start, kind
        return None

    def _compare(self, blocks, context, asked, rng, counts):
        """A question that needs two documents (their numbers compared): the numbers nearest a uniform depth in
        the first two documents that have one, starting at the document at that depth and going on in random order;
        None (counted) if fewer than two have one."""
        if type(self.writer).compare is QAWriter.compare:
            counts["rejected"]["compare: the writer asks none"] += 1
            return None
        k_a, pos = self._at_depth(blocks, rng.random() * len(context))
        others = [k for k in range(len(blocks)) if k != k_a]
        rng.shuffle(others)
        found = []
        for k, p in [(k_a, pos)] + [(k, rng.randrange(max(1, len(blocks[k].text)))) for k in others]:
            numbers = [(s, c) for s, c in self._candidates(blocks[k], p, rng, counts, None, 8 * self.cfg.passage_chars)
                       if c.value is not None and self._accept(c, context, asked, counts)]
            if numbers:
                found.append((k, *numbers[0]))
            if len(found) == 2:
                break
        if len(found) < 2:
            counts["rejected"]["compare: fewer than two documents with a usable number"] += 1
            return None
        (ka, sa, a), (kb, sb, b) = found
        made = self.writer.compare(a, self.pool[blocks[ka].doc].title, b, self.pool[blocks[kb].doc].title)
        if made is None:
            counts["rejected"]["compare: the writer made none (a tie)"] += 1
            return None
        question, answer = made
        if answer not in (a.answer, b.answer):
            counts["rejected"]["compare: answer is neither value"] += 1
            return None
        gold = (ka, sa) if answer == a.answer else (kb, sb)
        other = kb if gold[0] == ka else ka
        self._mark_asked(asked, a, b)
        return question, answer, [gold[0], other], blocks[gold[0]].offset + gold[1], "compare"


# ---- the no-evidence control -----------------------------------------------------------------------------------
def without_documents(record: dict, drop: Iterable[int]) -> list[dict]:
    """The messages of ``record`` (a synth-qa chat) with documents ``drop`` (indexes of ``meta.titles``) taken out
    of the context and the others renumbered from 1, as if they had been drawn alone. The control of a QA eval: a
    model that answers from the context cannot answer a question whose gold documents are gone. ValueError when
    the first user message is not laid out as this module writes it (a header per title, in order)."""
    titles, first = record["meta"]["titles"], record["messages"][0]["content"]
    heads, at = [], 0
    for number, title in enumerate(titles, 1):
        at = first.find(document_header(number, title), at)
        if at < 0:
            raise ValueError(f"the context has no header {document_header(number, title)!r}: not a synth-qa chat")
        heads.append(at)
    question_at = first.rfind(SEPARATOR + record["qa"][0]["question"]) if record["qa"] else len(first)
    if question_at < heads[-1]:
        raise ValueError("the first question is not after the documents: not a synth-qa chat")
    ends = [h - len(SEPARATOR) for h in heads[1:]] + [question_at]
    drop = set(drop)
    kept = [(titles[k], first[heads[k] + len(document_header(k + 1, titles[k])):ends[k]])
            for k in range(len(titles)) if k not in drop]
    context = SEPARATOR.join(document_header(n, title) + text for n, (title, text) in enumerate(kept, 1))
    messages = [dict(m) for m in record["messages"]]
    messages[0]["content"] = context + first[question_at:]
    return messages


# ---- the stage ----------------------------------------------------------------------------------------------
def histogram(values: list[float], lo: float, hi: float, bins: int) -> dict:
    """``{"edges": [bins + 1 floats], "counts": [bins ints]}`` of ``values`` over [lo, hi] (hi falls in the last
    bin)."""
    counts = [0] * bins
    for v in values:
        counts[min(bins - 1, max(0, int((v - lo) / (hi - lo) * bins)))] += 1
    return {"edges": [round(lo + (hi - lo) * i / bins, 6) for i in range(bins + 1)], "counts": counts}


def generate(pool: list[PoolDoc], tokenizer, writer: QAWriter, cfg: SynthConfig, lengths: list[int], num: int,
             out: str, log: Callable[[str], None] = print) -> dict:
    """Write ``num`` chats per target in ``lengths`` to ``out`` (JSONL, written whole or not at all), and the
    report beside it (``OUT.report.json``); returns the report."""
    if num < 1:
        raise ConfigError(f"--num {num}: want at least one chat")
    gen, t0 = Generator(pool, tokenizer, writer, cfg), time.perf_counter()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = f"{out}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            for target in lengths:
                for i in range(num):
                    f.write(json.dumps(gen.chat(target, i), ensure_ascii=False) + "\n")
                    if (i + 1) % max(1, num // 10) == 0 or i + 1 == num:
                        rate = gen.stats.chats / (time.perf_counter() - t0)
                        log(f"  --length {target}: {i + 1}/{num} chats ({rate:.1f} chats/s)")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    st = gen.stats
    report = {"output": out, "kind": cfg.kind, "seed": cfg.seed, "writer": writer.name, "chats": st.chats,
              "questions": sum(st.by_type.values()), "question_types": dict(sorted(st.by_type.items())),
              "rejected": dict(sorted(st.rejected.items())), "fewer_questions_than_asked": st.fewer_questions,
              "truncated_documents": st.truncated_docs, "contexts_redrawn": st.redrawn,
              "lengths": {str(t): {"chats": len(v), "min": min(v), "mean": round(sum(v) / len(v), 1), "max": max(v),
                                   "length_over_target": histogram([n / t for n in v], 0.0, 1.0, LENGTH_BINS)}
                          for t, v in st.lengths.items()},
              "depth": histogram(st.depths, 0.0, 1.0, DEPTH_BINS), "seconds": round(time.perf_counter() - t0, 2)}
    return report


def format_report(report: dict) -> str:
    """The report as lines of text with bar histograms."""
    types = ", ".join(f"{k} {v}" for k, v in report["question_types"].items())
    lines = [f"{report['chats']:,} {report['kind']} chats, {report['questions']:,} questions ({types}); writer "
             f"{report['writer']}, seed {report['seed']}, {report['seconds']:.1f} s"]
    if report["fewer_questions_than_asked"]:
        lines.append(f"  {report['fewer_questions_than_asked']} chats got fewer questions than --questions (no "
                     f"usable fact at the drawn depths)")
    for reason, n in report["rejected"].items():
        lines.append(f"  rejected {n:,} candidate questions: {reason}")
    for target, row in report["lengths"].items():
        lines.append(f"--length {target}: {row['chats']} chats, tokens min {row['min']} mean {row['mean']} max "
                     f"{row['max']}; length / target:")
        lines += _bars(row["length_over_target"])
    lines.append("gold depth in the first user message:")
    lines += _bars(report["depth"])
    return "\n".join(lines)


def _bars(hist: dict) -> list[str]:
    top = max(hist["counts"]) or 1
    edges = hist["edges"]
    return [f"  {edges[i]:.1f}-{edges[i + 1]:.1f} {c:6d} {'#' * round(40 * c / top)}"
            for i, c in enumerate(hist["counts"])]
