"""Chats in: JSONL records of OpenAI ``messages`` or ShareGPT ``conversations``, checked, rendered as ChatML and
tokenized with an answer mask; ``build_sft_dataset`` writes them as an SFT dataset (sft_format.py).

Input forms (one JSON object per line, ``.jsonl`` or ``.jsonl.gz``; other keys of a record or a turn are ignored):

- OpenAI: ``{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}``
- ShareGPT: ``{"conversations": [{"from": "system"|"human"|"gpt", "value": "..."}, ...]}``

A chat is an optional system turn, then user and assistant turns alternating, starting with user and ending with
assistant. Every other record is reported with its ``file:line`` and one of the ``BAD_RECORD_KINDS`` (bad JSON, an
unknown role, turns out of order, no assistant turn, content that is not text, ...), never silently dropped; the
read's line accounting is a ``documents.ReadReport`` (``documents`` there counts good chats).

Tokens (``ChatEncoder``): the text between ChatML markers (``role\\ncontent`` of each turn, the ``\\n`` between
turns) is tokenized by the tokenizer and the ids of ``<|im_start|>`` / ``<|im_end|>`` are put in between, so the
markers are single ids whatever the tokenizer does with text. This is how HF tokenizers with ChatML added tokens
and sentencepiece models with them as user-defined symbols encode the rendered text too (tests/test_sft_chat.py
checks both). The answer mask is 1 on each assistant turn's content tokens and its ``<|im_end|>``, 0 on everything
else (system and user turns, each ``<|im_start|>assistant\\n`` header, the ``\\n`` after ``<|im_end|>``), which
is transformers' ``return_assistant_tokens_mask`` with a ``{% generation %}`` block around content and
``<|im_end|>``: a token that straddles the header and the content counts as content, as there.
"""
from __future__ import annotations

import gzip
import json
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

from ..configtools import ConfigError
from .chat_template import (
    DEFAULT_SYSTEM,
    IM_END,
    IM_START,
    TURN_SEP,
    chat_turns,
    check_turn,
    encode_chatml,
    render_chatml,
    turn_header,
)
from .documents import ON_ERROR, ReadReport, expand_inputs, raw_lines

SHAREGPT_ROLES = {"system": "system", "human": "user", "gpt": "assistant"}
"""ShareGPT ``from`` values and the ChatML roles they become."""
ROLES = ("system", "user", "assistant")
BAD_RECORD_KINDS = ("unreadable", "not UTF-8", "bad JSON", "not an object", "no turns field", "bad turn",
                    "unknown role", "non-text content", "ChatML marker in content", "no assistant turn",
                    "turns out of order")
"""The reasons a record is not a chat; each dropped record is counted under one of them."""
TOO_LONG_ANSWER_CUT = "too long: cutting it to --max-tokens would cut an answer"
"""The drop reason of a chat over ``--max-tokens`` that ``--truncate left`` cannot shorten without losing answer."""
TRUNCATE = ("left",)


class BadRecord(ValueError):
    """A record that is not a chat: ``kind`` (one of BAD_RECORD_KINDS) and a detail message."""

    def __init__(self, kind: str, detail: str):
        super().__init__(f"{kind}: {detail}")
        self.kind = kind


@dataclass(frozen=True)
class Chat:
    """One checked chat: ``messages`` (``{"role", "content"}`` dicts, roles as ChatML names them) and where it came
    from (``file:line``)."""

    messages: list
    where: str


@dataclass
class Drops:
    """Records or chats left out, per reason: how many and the first ``max_listed`` ``file:line: detail``."""

    by_reason: dict = field(default_factory=dict)
    max_listed: int = 5

    def add(self, reason: str, where: str, detail: str = "") -> None:
        row = self.by_reason.setdefault(reason, {"count": 0, "first": []})
        row["count"] += 1
        if len(row["first"]) < self.max_listed:
            row["first"].append(f"{where}: {detail}" if detail else where)

    @property
    def total(self) -> int:
        return sum(row["count"] for row in self.by_reason.values())

    def as_dict(self) -> dict:
        return {"total": self.total, "by_reason": self.by_reason}


def parse_chat(record) -> list[dict]:
    """The messages (``{"role", "content"}``, ChatML roles) of one decoded JSON record in OpenAI or ShareGPT form;
    BadRecord naming the problem (kind and detail) when it is not a chat as the module docstring describes."""
    if not isinstance(record, dict):
        raise BadRecord("not an object", f"a JSON {type(record).__name__}")
    forms = [key for key in ("messages", "conversations") if key in record]
    if len(forms) != 1:
        detail = "both 'messages' and 'conversations'" if forms else \
            f"neither 'messages' nor 'conversations' (keys: {', '.join(list(record)[:8])})"
        raise BadRecord("no turns field", detail)
    turns = record[forms[0]]
    if not isinstance(turns, list):
        raise BadRecord("no turns field", f"'{forms[0]}' is a {type(turns).__name__}, not a list")
    role_key, content_key = ("role", "content") if forms[0] == "messages" else ("from", "value")
    names = dict(zip(ROLES, ROLES)) if forms[0] == "messages" else SHAREGPT_ROLES
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or role_key not in turn or content_key not in turn:
            raise BadRecord("bad turn", f"turn {i} is not an object with '{role_key}' and '{content_key}': "
                                        f"{str(turn)[:80]}")
        role, content = turn[role_key], turn[content_key]
        if not isinstance(role, str) or role not in names:
            raise BadRecord("unknown role", f"turn {i} has {role_key} {role!r}; known: {', '.join(names)}")
        if not isinstance(content, str):
            raise BadRecord("non-text content", f"turn {i} ({role}) has {content_key} of type "
                                                f"{type(content).__name__}, not a string")
        try:
            check_turn(names[role], content)
        except ConfigError as e:  # the only thing left for it to find: a ChatML marker in the text
            raise BadRecord("ChatML marker in content", f"turn {i}: {e}") from None
        messages.append({"role": names[role], "content": content})
    _check_order([m["role"] for m in messages])
    return messages


def _check_order(roles: list[str]) -> None:
    if "assistant" not in roles:
        raise BadRecord("no assistant turn", f"roles {roles}: nothing to learn from")
    body = roles[1:] if roles[0] == "system" else roles
    want = ["user", "assistant"] * ((len(body) + 1) // 2)
    if body != want[:len(body)] or len(body) % 2:
        raise BadRecord("turns out of order", f"roles {roles}: want an optional system turn first, then user and "
                                              f"assistant alternating, starting with user and ending with assistant")


def _numbered_lines(path: str) -> Iterator[tuple[int, bytes | None, str | None]]:
    """(line number, raw bytes, None) per line of ``path``; at a truncated or damaged gzip stream one last
    (line number, None, reason): the rest of the file is lost."""
    number = 0
    try:
        for number, raw in raw_lines(path):
            yield number, raw, None
    except (EOFError, OSError, gzip.BadGzipFile) as e:
        yield number + 1, None, f"unreadable from here on ({type(e).__name__}: {e})"


def _decode(raw: bytes):
    try:
        return json.loads(raw)
    except UnicodeDecodeError as e:
        raise BadRecord("not UTF-8", f"{e.reason} at byte {e.start}") from None
    except json.JSONDecodeError as e:
        raise BadRecord("bad JSON", f"{e.msg} at column {e.colno}") from None


def chat_files(paths: Iterable[str]) -> list[str]:
    """The JSONL files of ``paths`` (documents.expand_inputs: folders searched); ConfigError for a missing path or
    a file that is not ``.jsonl`` / ``.jsonl.gz`` (chats are one JSON object per line)."""
    files = expand_inputs(paths)
    for path in files:
        if not path.endswith((".jsonl", ".jsonl.gz")):
            raise ConfigError(f"input {path}: chats are read from .jsonl or .jsonl.gz files (one chat per line)")
    return files


def iter_chats(paths: Iterable[str], on_error: str = "skip", read: ReadReport | None = None,
               drops: Drops | None = None) -> Iterator[Chat]:
    """Stream the chats of ``paths`` (JSONL / JSONL.gz files or folders), in file order. ``read`` counts lines
    (``documents`` = good chats, ``corrupt`` = bad records, ``unreadable`` = files cut short); ``drops`` gets each
    bad record under its kind. ``on_error="fail"`` raises ConfigError at the first bad record instead."""
    if on_error not in ON_ERROR:
        raise ConfigError(f"--on-error {on_error!r}: use one of {', '.join(ON_ERROR)}")
    read = read if read is not None else ReadReport()
    drops = drops if drops is not None else Drops()
    for path in chat_files(paths):
        read.files += 1
        for number, raw, lost in _numbered_lines(path):
            where = f"{path}:{number}"
            read.lines += 1
            try:
                if lost is not None:
                    read.unreadable.append(f"{where}: {lost}")
                    raise BadRecord("unreadable", lost)
                read.bytes_read += len(raw) + 1
                if not raw.strip():
                    read.blank += 1
                    continue
                messages = parse_chat(_decode(raw))
            except BadRecord as e:
                if on_error == "fail":
                    raise ConfigError(f"{where}: {e} (pass --on-error skip to report such records and go on)") \
                        from None
                read.add_corrupt(where, str(e))
                drops.add(e.kind, where, str(e).split(": ", 1)[1])
                continue
            read.documents += 1
            yield Chat(messages, where)


def chatml_ids(tokenizer) -> tuple[int, int]:
    """(``<|im_start|>`` id, ``<|im_end|>`` id) of ``tokenizer``; ConfigError naming the tokenizer when it lacks
    either (the byte tokenizer has none: ChatML needs them as single ids)."""
    ids = tuple(tokenizer.token_to_id(marker) for marker in (IM_START, IM_END))
    missing = [marker for marker, i in zip((IM_START, IM_END), ids) if i is None]
    if missing:
        raise ConfigError(f"tokenizer {tokenizer.name} has no {' or '.join(missing)} token, and ChatML needs each "
                          f"marker as one id: use a sentencepiece model from `megatron-lc data train-tokenizer` "
                          f"(it adds {IM_START} and {IM_END}) or an HF tokenizer.json that has them (Qwen2's); "
                          f"the byte tokenizer has no ChatML ids")
    return ids


class ChatEncoder:
    """Chats -> (ids int64 [n], answer mask bool [n]) with ``tokenizer`` (a data.tokenizer Tokenizer), as the
    module docstring describes. ``default_system``: the system turn of chats without one (None: none);
    ``last_turn_only``: only the last assistant turn carries loss."""

    def __init__(self, tokenizer, default_system: str | None = DEFAULT_SYSTEM, last_turn_only: bool = False):
        self.tokenizer, self.default_system, self.last_turn_only = tokenizer, default_system, last_turn_only
        self.im_start, self.im_end = chatml_ids(tokenizer)
        if default_system is not None:
            check_turn("system", default_system)  # a marker in --system fails before any work
        self.sep = tokenizer.encode(TURN_SEP)
        self.header_ids: dict[str, list[int]] = {}
        header = turn_header("assistant")
        back = tokenizer.decode(tokenizer.encode(header))
        if back != header:  # _header_tokens finds where an answer starts by decoding
            raise ConfigError(f"tokenizer {tokenizer.name} does not decode its tokens back to their text "
                              f"(decode(encode({header!r})) gives {back!r}), so the answer mask cannot tell where an "
                              f"answer starts: use a tokenizer with a decoder (a tokenizer.json with one, a "
                              f"sentencepiece model)")

    def encode(self, messages: list[dict]) -> tuple[np.ndarray, np.ndarray]:
        """(ids int64 [n], answer mask bool [n]) of one chat's messages."""
        return self.encode_many([messages])[0]

    def prompt_ids(self, messages: list[dict]) -> np.ndarray:
        """ids int64 [n] of ``render_chatml(messages, add_generation_prompt=True)`` (the chat so far, then
        ``<|im_start|>assistant\\n``), markers as single ids (``chat_template.encode_chatml``, the same ids as
        ``encode``): what a model continues to answer (eval, chat)."""
        text = render_chatml(messages, add_generation_prompt=True, default_system=self.default_system)
        return np.array(encode_chatml(self.tokenizer, text), dtype=np.int64)

    def encode_many(self, chats: list[list[dict]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """``encode`` of each chat; the texts of all their turns go to the tokenizer's batch encoder at once."""
        turns = [chat_turns(messages, self.default_system) for messages in chats]
        texts = [turn_header(role) + content for chat in turns for role, content in chat]
        pieces = iter(self.tokenizer.encode_batch(texts))
        out = []
        for chat in turns:
            last = max(i for i, (role, _) in enumerate(chat) if role == "assistant")
            ids, mask = [], []
            for i, (role, _) in enumerate(chat):
                body = next(pieces)
                answer = role == "assistant" and (i == last or not self.last_turn_only)
                head = self._header_tokens(role, body) if answer else len(body)
                ids += [self.im_start, *body, self.im_end, *self.sep]
                # <|im_start|> and the header: no loss; content and <|im_end|>: loss if an answer; the \n: none
                mask += [False] * (1 + head) + [answer] * (len(body) - head + 1) + [False] * len(self.sep)
            out.append((np.array(ids, dtype=np.int64), np.array(mask, dtype=bool)))
        return out

    def _header_tokens(self, role: str, body: list[int]) -> int:
        """How many leading tokens of a turn's ``role\\ncontent`` ids lie wholly in the header ``role\\n``: the
        largest k whose first k tokens decode to a prefix of the header (a token reaching into the content is
        content, as in transformers' assistant mask)."""
        header = turn_header(role)
        own = self.header_ids.get(role)
        if own is None:
            own = self.header_ids[role] = self.tokenizer.encode(header)
        if body[:len(own)] == own:  # the usual case: the header's own tokens, which decode to exactly the header
            return len(own)
        k = 0
        while k < len(body):
            text = self.tokenizer.decode(body[:k + 1])
            if len(text) > len(header) or not header.startswith(text):
                break
            k += 1
            if len(text) == len(header):
                break
        return k


def length_histogram(lengths: Iterable[int]) -> dict[str, int]:
    """Counts of ``lengths`` per power-of-two bucket, ``{"<=64": n, "<=128": n, ...}`` from the smallest bucket
    holding one up to the largest (empty buckets between are kept, so the keys read as an axis)."""
    lengths = np.asarray(list(lengths), dtype=np.int64)
    if lengths.size == 0:
        return {}
    tops = 2 ** np.ceil(np.log2(np.maximum(lengths, 1))).astype(np.int64)
    return {f"<={top}": int((tops == top).sum()) for top in 2 ** np.arange(int(np.log2(tops.min())),
                                                                          int(np.log2(tops.max())) + 1)}


def check_sft_options(max_tokens: int | None, truncate: str | None) -> None:
    """ConfigError naming the flag for a bad ``--max-tokens`` / ``--truncate`` pair."""
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)
                                   or max_tokens < 2):
        raise ConfigError(f"--max-tokens {max_tokens!r}: want an int >= 2 (the training seq_len: a chat of n "
                          f"tokens fills n positions)")
    if truncate is not None and truncate not in TRUNCATE:
        raise ConfigError(f"--truncate {truncate!r}: use one of {', '.join(TRUNCATE)}")
    if truncate is not None and max_tokens is None:
        raise ConfigError(f"--truncate {truncate} needs --max-tokens N (the length to cut chats to)")


def build_sft_dataset(inputs: list[str], tokenizer: str, out_prefix: str, *, max_tokens: int | None = None,
                      truncate: str | None = None, last_turn_only: bool = False,
                      default_system: str | None = DEFAULT_SYSTEM, on_error: str = "skip", progress: bool = True,
                      batch_chats: int = 256) -> dict:
    """Read the chats of ``inputs``, encode them (ChatEncoder) with ``tokenizer`` (a load_tokenizer spec) and write
    them as an SFT dataset at ``out_prefix`` (sft_format.SFTDatasetWriter); returns the report (also in the
    dataset's meta): read counts, chats written, tokens, answer tokens, truncated, too long, dropped per reason
    with the first few ``file:line``, a length histogram of the written chats.

    A chat over ``max_tokens`` is a ConfigError naming it (nothing is written), or with ``truncate="left"`` is cut
    from the left of its context (sft_format.truncate_left); one whose answer that would cut is dropped under
    ``TOO_LONG_ANSWER_CUT``. No chat written at all is a ConfigError."""
    from .pipeline import progress_bar  # the tokenize stage's progress bar (tqdm: count and rate)
    from .sft_format import SFTDatasetWriter, truncate_left
    from .tokenizer import load_tokenizer

    check_sft_options(max_tokens, truncate)
    chat_files(inputs)  # a missing or unsupported input fails before the tokenizer loads
    tok = load_tokenizer(tokenizer)
    encoder = ChatEncoder(tok, default_system, last_turn_only)
    read, drops = ReadReport(), Drops()
    lengths: list[int] = []
    truncated = too_long = 0
    t0 = time.perf_counter()
    bar = progress_bar(None, "chat", "sft", progress)
    chats = iter_chats(inputs, on_error, read, drops)
    with SFTDatasetWriter(out_prefix, vocab_size=tok.vocab_size) as writer:
        try:
            for batch in _chunks(chats, batch_chats):
                for chat, (ids, mask) in zip(batch, encoder.encode_many([c.messages for c in batch])):
                    if max_tokens is not None and len(ids) > max_tokens:
                        if truncate is None:
                            raise ConfigError(f"{chat.where}: this chat has {len(ids)} tokens, over --max-tokens "
                                              f"{max_tokens}: raise --max-tokens, or pass --truncate left to cut "
                                              f"its context from the left (answers are kept); nothing was written")
                        too_long += 1
                        cut = truncate_left(ids, mask, max_tokens)
                        if cut is None:
                            drops.add(TOO_LONG_ANSWER_CUT, chat.where, f"{len(ids)} tokens")
                            continue
                        ids, mask = cut
                        truncated += 1
                    writer.add(ids, mask)
                    lengths.append(len(ids))
                bar.update(len(batch))
        finally:
            bar.close()
        seconds = time.perf_counter() - t0
        if writer.chats == 0:
            raise ConfigError(f"no chat of {', '.join(inputs)} was written ({read.format()}; dropped "
                              f"{drops.total}: {', '.join(drops.by_reason) or 'none'}): nothing to write")
        report = {"chats_read": read.documents, "written": writer.chats, "tokens": writer.tokens,
                  "answer_tokens": writer.answer_tokens, "truncated": truncated, "too_long": too_long,
                  "dropped": drops.as_dict(), "length_histogram": length_histogram(lengths),
                  "max_length": max(lengths), "seconds": round(seconds, 3),
                  "chats_per_s": round(read.documents / max(seconds, 1e-9), 1),
                  "options": {"max_tokens": max_tokens, "truncate": truncate, "last_turn_only": last_turn_only,
                              "default_system": default_system},
                  "tokenizer": tokenizer, "vocab_size": tok.vocab_size, "eos_token_id": tok.eos_token_id,
                  "pad_token_id": tok.pad_token_id,
                  "im_start_id": encoder.im_start, "im_end_id": encoder.im_end, "read": read.as_dict()}
        report["prefix"] = writer.finalize(report)
    return report


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch
