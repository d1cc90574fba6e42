"""A conversation with a model in the ChatML format (``megatron-lc chat``), one reply at a time.

Each turn renders the whole conversation (system turn, the turns kept so far, the new user message, the generation
prompt) with ``megatron_lc.data.chat_template.render_chatml``, encodes it and continues it with
``megatron_lc.model.generate``. A reply ends at ``<|im_end|>``: the tokenizer's id for it when it has one (Qwen2's
tokenizers, our sentencepiece models), with its EOS beside it; otherwise (the byte tokenizer) at the EOS, and the
text is cut at the first ChatML marker. The prompt plus ``max_new_tokens`` must fit the model's
``max_position_embeddings``: the oldest turns (a user message and its reply) are dropped until it does, and the
session says so.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from ..configtools import ConfigError
from ..data.chat_template import DEFAULT_SYSTEM, encode_chatml, render_chatml, reply_text, stop_tokens
from ..model import Transformer, generate


class ChatSession:
    """The conversation so far and how to continue it. ``history``: the user and assistant messages kept, oldest
    first (the system turn is ``system``, always first); ``notes``: what the last ``reply`` had to tell the user
    (turns dropped to fit), for the caller to show."""

    def __init__(self, model: Transformer, tokenizer, *, system: str = DEFAULT_SYSTEM, max_new_tokens: int = 256,
                 temperature: float = 0.7, top_p: float = 0.8, generator: torch.Generator | None = None):
        self.model, self.tokenizer, self.system = model, tokenizer, system
        self.max_new_tokens, self.temperature, self.top_p, self.generator = (max_new_tokens, temperature, top_p,
                                                                              generator)
        self.max_positions = model.config.max_position_embeddings
        if max_new_tokens >= self.max_positions:
            raise ConfigError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in the model's "
                              f"{self.max_positions} positions (max_position_embeddings): give fewer")
        self.stops = stop_tokens(tokenizer)
        self.history: list[dict[str, str]] = []
        self.notes: list[str] = []
        self.prompt_text()  # a --system text holding a ChatML marker fails here, before the first message

    def messages(self, user: str | None = None, history: list[dict[str, str]] | None = None) -> list[dict[str, str]]:
        """The system message, the history (default: the kept one) and, if given, a new user message, as
        render_chatml takes them."""
        new = [] if user is None else [{"role": "user", "content": user}]
        return [{"role": "system", "content": self.system}, *(self.history if history is None else history), *new]

    def prompt_text(self, user: str | None = None, history: list[dict[str, str]] | None = None) -> str:
        """The ChatML prompt of ``messages(user, history)``, ending with the generation prompt."""
        return render_chatml(self.messages(user, history), add_generation_prompt=True, default_system=None)

    def reset(self) -> None:
        """Forget every turn (the system message stays)."""
        self.history.clear()

    def _fit(self, user: str) -> tuple[list[int], int]:
        """(prompt ids for ``user``'s message, how many of the oldest turns must go so that prompt +
        max_new_tokens fit the model's positions); a message too long even alone is a ConfigError."""
        budget = self.max_positions - self.max_new_tokens
        for dropped in range(len(self.history) // 2 + 1):
            ids = encode_chatml(self.tokenizer, self.prompt_text(user, self.history[2 * dropped:]))
            if len(ids) <= budget:
                return ids, dropped
        raise ConfigError(f"this message makes a prompt of {len(ids)} tokens even without earlier turns; with "
                          f"--max-new-tokens {self.max_new_tokens} the model's {self.max_positions} positions leave "
                          f"{budget}: shorten it, or give a smaller --max-new-tokens")

    def reply(self, user: str) -> str:
        """Answer the user message ``user``: its turn and the reply join ``history``. A message holding a ChatML
        marker, or too long to fit, is a ConfigError and leaves the conversation as it was."""
        self.notes = []
        ids, dropped = self._fit(user)  # before any change: a refused message leaves the conversation as it was
        if dropped:
            del self.history[:2 * dropped]  # a turn: a user message and the reply to it
            self.notes.append(f"dropped the oldest {dropped} turn{'s' * (dropped > 1)} to fit the model's "
                              f"{self.max_positions} positions ({len(ids)}-token prompt + --max-new-tokens "
                              f"{self.max_new_tokens}); {len(self.history) // 2} kept")
        device = next(self.model.parameters()).device
        out = generate(self.model, torch.tensor([ids], dtype=torch.int64, device=device), self.max_new_tokens,
                       temperature=self.temperature, top_p=self.top_p, eos_token_id=self.stops,
                       generator=self.generator)
        text, _ = reply_text(self.tokenizer, out[0, len(ids):].tolist(), self.stops)
        self.history += [{"role": "user", "content": user}, {"role": "assistant", "content": text}]
        return text


QUIT, RESET = ("/quit", "/exit"), "/reset"


def chat_loop(session: ChatSession, read_line: Callable[[str], str], write: Callable[[str], None],
              note: Callable[[str], None], prompt: str = "") -> int:
    """Read user messages with ``read_line(prompt)`` (``input``: raises EOFError at the end) until end of input or
    ``/quit``; ``/reset`` starts the conversation afresh. Each reply goes to ``write``, anything else the user
    should know (dropped turns, a message refused) to ``note``. Returns the number of replies."""
    replies = 0
    while True:
        try:
            line = read_line(prompt)
        except EOFError:
            break
        text = line.strip()
        if not text:
            continue
        if text in QUIT:
            break
        if text == RESET:
            session.reset()
            note("(conversation cleared)")
            continue
        try:
            answer = session.reply(text)
        except ConfigError as e:
            note(f"({e})")
            continue
        for message in session.notes:
            note(f"({message})")
        write(answer)
        replies += 1
    return replies
