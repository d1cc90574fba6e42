"""The tokenizer interface evaluation needs: ``encode(str) -> list[int]``, ``decode(list[int]) -> str``.

Two implementations for now: the demo's ByteTokenizer (no file needed) and an HF ``tokenizer.json`` read with the
``tokenizers`` library (shipped with transformers). The data-pipeline issue adds sentencepiece behind the same
interface; nothing in eval/ depends on which one it gets.
"""
from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Protocol

from ..configtools import ConfigError


class Tokenizer(Protocol):
    eos_token_id: int | None
    """Id that ends a generated answer (None: generation stops only at max_new_tokens)."""

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...


class Bytes:
    """UTF-8 bytes as ids 0..255 with the demo's specials (BOS 256, EOS 257, PAD 258): ``megatron_lc.demo``."""

    def __init__(self):
        from ..demo import ByteTokenizer

        self._tok = ByteTokenizer()
        self.eos_token_id = ByteTokenizer.EOS
        self.vocab_size = ByteTokenizer.vocab_size

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(ids)


class HFTokenizerFile:
    """An HF ``tokenizer.json``; encode adds no special tokens (prompts are plain text), decode skips them."""

    def __init__(self, path: str, eos_token_id: int | None = None):
        try:
            from tokenizers import Tokenizer as _Tok
        except ImportError as e:  # pragma: no cover - transformers depends on tokenizers
            raise ConfigError("reading tokenizer.json needs the 'tokenizers' package (pip install tokenizers)") from e
        self._tok = _Tok.from_file(path)
        self.eos_token_id = eos_token_id
        self.vocab_size = self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


def load_tokenizer(path: str | None, eos_token_id: int | None = None) -> Tokenizer:
    """``None`` or ``"bytes"`` -> the byte tokenizer; a path to ``tokenizer.json`` (or a folder holding one) -> that
    tokenizer, with ``eos_token_id`` (e.g. from the model's config.json) ending generation."""
    if path is None or path == "bytes":
        return Bytes()
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(path):
        raise ConfigError(f"--tokenizer {path}: no such file; give an HF tokenizer.json (or its folder), or 'bytes' "
                          f"for the demo's byte tokenizer")
    return HFTokenizerFile(path, eos_token_id)
