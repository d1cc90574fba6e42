"""The ChatML conversation format of Qwen2 chat models, as text: one home for chat (``megatron-lc chat``) and for
formatting SFT conversations (the data side).

A conversation is a list of ``{"role": ..., "content": ...}`` messages. Each message becomes one turn::

    <|im_start|>{role}\\n{content}<|im_end|>\\n

and a prompt that asks the model to answer ends with the generation prompt ``<|im_start|>assistant\\n``. When the
first message is not a system message, Qwen2's template puts a default one first ("You are a helpful assistant.").
This is exactly what transformers renders with Qwen2-Instruct's ``chat_template`` (tests/test_generate_cli.py
checks it against transformers' own renderer). The markers are special tokens of Qwen2's tokenizer and of the
sentencepiece models ``megatron-lc data train-tokenizer`` trains (``CHATML_SPECIALS``), so each encodes to one id.

It lives in ``data`` (not ``model``) because it is text formatting: data knows tokens, not models, and SFT's
formatting must not depend on the model package.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

from ..configtools import ConfigError
from .tokenizer import CHATML_SPECIALS

IM_START, IM_END = CHATML_SPECIALS[1], CHATML_SPECIALS[2]
"""``<|im_start|>`` opens a turn (followed by its role and a newline); ``<|im_end|>`` ends it (and ends a reply)."""
DEFAULT_SYSTEM = "You are a helpful assistant."
"""The system message Qwen2's template inserts when a conversation starts without one."""
GENERATION_PROMPT = f"{IM_START}assistant\n"
"""What a prompt ends with to ask for the assistant's next turn."""


def turn_header(role: str) -> str:
    """The text between ``<|im_start|>`` and a turn's content: ``{role}\\n``. In SFT it takes no loss (the
    ``<|im_start|>assistant\\n`` header is the prompt's end, not the answer)."""
    return f"{role}\n"


TURN_SEP = "\n"
"""The text after each turn's ``<|im_end|>`` (before the next ``<|im_start|>``); it takes no loss in SFT."""


def check_turn(role: str, content: str) -> None:
    """ConfigError unless ``role`` is a non-empty word (no whitespace, no marker) and ``content`` is text without a
    ChatML marker: content holding one would end the turn early or open another (typed in a chat, text posing as
    another role)."""
    if not isinstance(role, str) or not role or "".join(role.split()) != role or "<|" in role:  # split: whitespace
        raise ConfigError(f"chat message role {role!r}: want one word such as 'system', 'user' or 'assistant'")
    if not isinstance(content, str):
        raise ConfigError(f"chat message content of role {role!r} is {type(content).__name__}, not text")
    for marker in (IM_START, IM_END):
        if marker in content:
            raise ConfigError(f"chat message of role {role!r} contains the ChatML marker {marker}, which would "
                              f"end its turn or start another: remove it from the text")


def chatml_turn(role: str, content: str) -> str:
    """One turn ``<|im_start|>{role}\\n{content}<|im_end|>\\n``, checked by ``check_turn`` (ConfigError naming
    the value)."""
    check_turn(role, content)
    return f"{IM_START}{turn_header(role)}{content}{IM_END}{TURN_SEP}"


def chat_turns(messages: Iterable[Mapping[str, str]], default_system: str | None = DEFAULT_SYSTEM
               ) -> list[tuple[str, str]]:
    """(role, content) of every turn ``render_chatml`` writes for ``messages``: ``default_system`` first when there
    are messages and the first is not a system message (None: no system turn added), then each message's. Each
    pair is checked by ``check_turn``; a message that is not a mapping with 'role' and 'content' is a ConfigError."""
    messages = list(messages)
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise ConfigError(f"chat message {i}: want a mapping with 'role' and 'content', got {m!r}")
    turns = [(m["role"], m["content"]) for m in messages]
    if default_system is not None and turns and turns[0][0] != "system":
        turns.insert(0, ("system", default_system))
    for role, content in turns:
        check_turn(role, content)
    return turns


def render_chatml(messages: Iterable[Mapping[str, str]], add_generation_prompt: bool = True,
                  default_system: str | None = DEFAULT_SYSTEM) -> str:
    """The ChatML text of ``messages`` (``{"role", "content"}`` mappings), as Qwen2-Instruct's chat template
    renders it: one ``chatml_turn`` per turn of ``chat_turns(messages, default_system)`` (``default_system`` first
    when the first message is not a system message; None: no system turn), then ``GENERATION_PROMPT`` if
    ``add_generation_prompt``."""
    parts = [chatml_turn(role, content) for role, content in chat_turns(messages, default_system)]
    if add_generation_prompt:
        parts.append(GENERATION_PROMPT)
    return "".join(parts)


def encode_chatml(tokenizer, text: str) -> list[int]:
    """ChatML ``text`` -> ids, each ``<|im_start|>``/``<|im_end|>`` as the tokenizer's single id for it and the text
    between markers encoded piece by piece, as ``chat_data.ChatEncoder`` encodes the chats a model is trained on: a
    prompt at inference (eval qa, chat) gets the ids training saw, whether or not the tokenizer itself would split
    its text at the markers. A tokenizer without the marker tokens (the byte tokenizer) encodes them as the text
    they are."""
    ids_of = {m: tokenizer.token_to_id(m) for m in (IM_START, IM_END)}
    markers = [m for m, i in ids_of.items() if i is not None]
    if not markers:
        return tokenizer.encode(text)
    ids: list[int] = []
    for piece in re.split("(" + "|".join(map(re.escape, markers)) + ")", text):
        if piece in markers:
            ids.append(ids_of[piece])
        elif piece:
            ids.extend(tokenizer.encode(piece))
    return ids


def stop_tokens(tokenizer) -> list[int]:
    """Ids that end a reply: the tokenizer's ``<|im_end|>`` (if it has that token), then its EOS (if any)."""
    ids = [tokenizer.token_to_id(IM_END), tokenizer.eos_token_id]
    return list(dict.fromkeys(i for i in ids if i is not None))


def reply_text(tokenizer, new_ids: Sequence[int], stops: Sequence[int]) -> tuple[str, bool]:
    """(the reply's text, whether it ended) from the generated ids ``new_ids``: up to the first id of ``stops``,
    decoded, and cut at the first ChatML marker written as text (a tokenizer without the marker tokens spells
    ``<|im_end|>`` out; a reply that opens another turn has ended its own). Not ended: it ran out of new tokens."""
    end = next((i for i, t in enumerate(new_ids) if t in stops), None)
    text = tokenizer.decode(list(new_ids[:end]))
    at = [i for i in (text.find(IM_END), text.find(IM_START)) if i >= 0]
    return (text[:min(at)] if at else text), end is not None or bool(at)
