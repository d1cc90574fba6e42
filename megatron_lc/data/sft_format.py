"""SFT datasets on disk: chats as token ids plus an answer mask, in two indexed datasets under one prefix.

- ``PREFIX.bin/.idx``: the token ids, one sequence per chat (its ChatML text as ``megatron-lc data sft`` renders
  and tokenizes it); the ``.meta.json`` records ``{"kind": "sft", "answer_mask": "<basename>.answer", ...}``.
- ``PREFIX.answer.bin/.idx``: uint8, the same sequence lengths: 1 where the token belongs to an assistant answer
  (its content and the closing ``<|im_end|>``), 0 elsewhere (system and user turns, each
  ``<|im_start|>assistant\\n`` header, the ``\\n`` after ``<|im_end|>``).

Both are plain Megatron indexed datasets (megatron-core reads either), so the fingerprints, the crash-safe writer
and ``data verify`` apply to each. The mask is written first and the tokens' ``.idx`` last, so a crash while
writing leaves a prefix that does not open as an SFT dataset.

Labels are aligned (DESIGN.md): ``labels[t]`` is the target of position t, so a chat of n tokens gives n positions
whose labels are ``ids[t + 1]`` where ``mask[t + 1]`` and -100 elsewhere (the last position has no target). A chat
therefore never predicts the first token of the next one when chats are packed into one row.
"""
from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np

from ..configtools import ConfigError
from ..ops.cross_entropy import IGNORE_INDEX
from .indexed import IndexedDataset, IndexedDatasetWriter, dataset_prefix
from .samples import fingerprint_of

SFT_KIND = "sft"
"""The ``meta["kind"]`` of an SFT dataset's tokens."""
MASK_SUFFIX = ".answer"
"""The answer mask's prefix is the tokens' prefix plus this."""


class SFTDatasetWriter:
    """Writes an SFT dataset at ``prefix``: ``add(ids, answer_mask)`` per chat, then ``finalize(meta)``; as a
    context manager it finalizes on success and deletes its temporary files on error. ``vocab_size`` chooses the
    token dtype and checks every id (IndexedDatasetWriter)."""

    def __init__(self, prefix: str | os.PathLike, vocab_size: int):
        self.prefix = dataset_prefix(prefix)
        self._tokens = IndexedDatasetWriter(self.prefix, vocab_size=vocab_size)
        self._mask = IndexedDatasetWriter(self.prefix + MASK_SUFFIX, dtype="uint8")
        self.chats = self.tokens = self.answer_tokens = 0

    def add(self, ids, answer_mask, source: str | None = None) -> None:
        """Append one chat: ``ids`` 1-D ints [n], ``answer_mask`` 1-D bools/0-1 ints [n]."""
        ids, mask = np.asarray(ids), np.asarray(answer_mask)
        if ids.shape != mask.shape or ids.ndim != 1:
            raise ValueError(f"{self.prefix}: chat {self.chats}: ids {ids.shape} and answer_mask {mask.shape} must "
                             f"be 1-D of one length")
        self._tokens.add_document(ids, source)
        self._mask.add_document(mask.astype(np.uint8), source)
        self.chats, self.tokens, self.answer_tokens = self.chats + 1, self.tokens + ids.size, \
            self.answer_tokens + int(mask.astype(bool).sum())

    def finalize(self, meta: dict | None = None) -> str:
        """Write both datasets (mask first, tokens' .idx last); ``meta`` joins the tokens' meta. Returns the prefix."""
        self._mask.finalize({"kind": "sft_answer_mask", "tokens": os.path.basename(self.prefix)})
        return self._tokens.finalize({**(meta or {}), "kind": SFT_KIND,
                                      "answer_mask": os.path.basename(self.prefix) + MASK_SUFFIX,
                                      "chats": self.chats, "answer_tokens": self.answer_tokens})

    def abort(self) -> None:
        """Delete the temporary files of both datasets."""
        self._tokens.abort()
        self._mask.abort()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None and not self._tokens.finalized:
            self.finalize()
        elif exc_type is not None:
            self.abort()


def is_sft_dataset(ds: IndexedDataset) -> bool:
    """Whether ``ds`` holds the tokens of an SFT dataset (its meta's kind)."""
    return ds.meta.get("kind") == SFT_KIND


class SFTDataset:
    """Reads an SFT dataset: ``len()`` chats, ``lengths`` int64 [chats], ``get(i) -> (ids int64 [n], mask bool
    [n])``, ``meta``, ``vocab_size``, ``fingerprint()``; ``tokens`` and ``mask`` are the two IndexedDatasets.
    ConfigError when ``path`` is not an SFT dataset (e.g. a pretraining dataset: the fix is `megatron-lc data sft`)
    or its mask does not match its tokens."""

    def __init__(self, path: str | os.PathLike, log: Callable[[str], None] | None = None):
        kwargs = {} if log is None else {"log": log}
        self.tokens = tokens = IndexedDataset(path, **kwargs)
        self.prefix = tokens.prefix
        if not is_sft_dataset(tokens):
            raise ConfigError(f"{self.prefix} is not an SFT dataset (its .meta.json has kind "
                              f"{tokens.meta.get('kind')!r}, not {SFT_KIND!r}): write chats with `megatron-lc data "
                              f"sft CHATS.jsonl --tokenizer ... --out PREFIX`, or train on it as pretraining data")
        mask_prefix = os.path.join(os.path.dirname(self.prefix), tokens.meta.get("answer_mask", ""))
        self.mask = IndexedDataset(mask_prefix, **kwargs)
        if not np.array_equal(self.mask.sequence_lengths, tokens.sequence_lengths):
            raise ConfigError(f"{mask_prefix} does not match {self.prefix}: its {len(self.mask)} sequences have other "
                              f"lengths than the {len(tokens)} chats; write the dataset again with `megatron-lc data "
                              f"sft`")
        self.lengths = tokens.sequence_lengths.astype(np.int64)
        self.meta, self.vocab_size = tokens.meta, tokens.vocab_size

    def __len__(self) -> int:
        return len(self.tokens)

    def get(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids int64 [n], answer mask bool [n]) of chat ``i``."""
        return np.array(self.tokens.get(i), dtype=np.int64), np.array(self.mask.get(i), dtype=bool)

    def fingerprint(self) -> str:
        """A short hash of both datasets' fingerprints (IndexedDataset.fingerprint)."""
        return fingerprint_of("sft-dataset", self.tokens.fingerprint(), self.mask.fingerprint())


def aligned_labels(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Aligned labels int64 [n] of one chat: ``ids[t + 1]`` where ``mask[t + 1]``, else -100; the last is -100."""
    labels = np.full(len(ids), IGNORE_INDEX, dtype=np.int64)
    labels[:-1] = np.where(mask[1:], ids[1:], IGNORE_INDEX)
    return labels


def truncate_left(ids: np.ndarray, mask: np.ndarray, max_len: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The last ``max_len`` tokens of a chat (its context cut from the left), or None when that would cut an answer
    token (the chat cannot fit without losing part of an answer). A chat that fits is returned as it is."""
    cut = len(ids) - max_len
    if cut <= 0:
        return ids, mask
    if mask[:cut + 1].any():  # +1: the first kept token's own label would need the cut one before it
        return None
    return ids[cut:], mask[cut:]
