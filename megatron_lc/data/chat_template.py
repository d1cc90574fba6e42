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

from collections.abc import Iterable, Mapping

from ..configtools import ConfigError
from .tokenizer import CHATML_SPECIALS

IM_START, IM_END = CHATML_SPECIALS[1], CHATML_SPECIALS[2]
"""``<|im_start|>`` opens a turn (followed by its role and a newline); ``<|im_end|>`` ends it (and ends a reply)."""
DEFAULT_SYSTEM = "You are a helpful assistant."
"""The system message Qwen2's template inserts when a conversation starts without one."""
GENERATION_PROMPT = f"{IM_START}assistant\n"
"""What a prompt ends with to ask for the assistant's next turn."""


def chatml_turn(role: str, content: str) -> str:
    """One turn ``<|im_start|>{role}\\n{content}<|im_end|>\\n``. A role must be a non-empty word (no whitespace,
    no marker); content holding a ChatML marker would end the turn early or open another (typed in a chat, text
    posing as another role), so both are a ConfigError naming the value."""
    if not isinstance(role, str) or not role or any(c.isspace() for c in role) or "<|" in role:
        raise ConfigError(f"chat message role {role!r}: want one word such as 'system', 'user' or 'assistant'")
    if not isinstance(content, str):
        raise ConfigError(f"chat message content of role {role!r} is {type(content).__name__}, not text")
    for marker in (IM_START, IM_END):
        if marker in content:
            raise ConfigError(f"chat message of role {role!r} contains the ChatML marker {marker}, which would "
                              f"end its turn or start another: remove it from the text")
    return f"{IM_START}{role}\n{content}{IM_END}\n"


def render_chatml(messages: Iterable[Mapping[str, str]], add_generation_prompt: bool = True,
                  default_system: str | None = DEFAULT_SYSTEM) -> str:
    """The ChatML text of ``messages`` (``{"role", "content"}`` mappings), as Qwen2-Instruct's chat template
    renders it: ``default_system`` first when there are messages and the first is not a system message (None: no
    system turn),
    then one ``chatml_turn`` per message, then ``GENERATION_PROMPT`` if ``add_generation_prompt``."""
    messages = list(messages)
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise ConfigError(f"chat message {i}: want a mapping with 'role' and 'content', got {m!r}")
    parts = []
    if default_system is not None and messages and messages[0]["role"] != "system":
        parts.append(chatml_turn("system", default_system))
    parts.extend(chatml_turn(m["role"], m["content"]) for m in messages)
    if add_generation_prompt:
        parts.append(GENERATION_PROMPT)
    return "".join(parts)
