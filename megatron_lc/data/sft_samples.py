"""Fixed-length SFT samples: chats of an SFT dataset (sft_format.py) packed whole into rows of ``seq_len`` tokens.

A chat of n tokens takes n positions of a row: its ids as ``input_ids`` and ``aligned_labels`` as ``labels`` (the
last is -100, so a chat never predicts the first token of the chat after it). Chats are never split across rows.
Three packings (``data.sft_packing``):

- ``naive``: chats concatenated into a row; attention crosses them and positions run 0..seq_len-1 over the row
  (360Zhinao's choice for long SFT).
- ``reset``: as naive, but positions restart at 0 at each chat.
- ``pad``: one chat per row (positions from 0), the rest of the row padding.

naive and reset place chats greedily, best fit decreasing (TRL's ``bfd``): longest chat first, each into the row
whose free space fits it most tightly, else a new row (``pack_bfd``). The rows end in padding: input id
``pad_id``, label -100, positions counting on. Every row carries ``document_ids`` (0 for its first chat, 1 for the
next, ..., the padding one more), non-decreasing, so a document-masking attention can find the boundaries.

The packing depends only on the dataset, ``seq_len``, the packing and the truncation, not on the seed: epoch e
serves the same rows in the order ``RandomState([seed, e]).permutation(rows)``, so every chat is served exactly once
per epoch and the sample stream is endless (as GPTSamples). A chat longer than ``seq_len`` is a ConfigError naming
it, or with ``truncate="left"`` keeps its last ``seq_len`` tokens (sft_format.truncate_left: never an answer
token; a chat that cannot be cut so is a ConfigError naming it), counted in ``stats``.
"""
from __future__ import annotations

import bisect
from collections import OrderedDict
from collections.abc import Callable

import numpy as np
import torch

from ..configtools import ConfigError
from ..ops.cross_entropy import IGNORE_INDEX
from .samples import fingerprint_of
from .sft_format import SFTDataset, aligned_labels, truncate_left

PACKINGS = ("naive", "reset", "pad")
TRUNCATIONS = ("none", "left")
_TOO_LONG_FIX = ("write the dataset with `megatron-lc data sft --max-tokens N` (or `--truncate left`), set "
                 "data.sft_truncate=left (cuts the context from the left, never an answer), or raise data.seq_len")


def pack_bfd(lengths, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """Best-fit-decreasing packing of items of ``lengths`` (ints in [1, capacity]) into bins of ``capacity``.

    Returns (order int64 [items]: item indices bin by bin, starts int64 [bins + 1]: bin b holds
    ``order[starts[b]:starts[b + 1]]``). Longest first (ties by index), each into the bin with the least free
    space that fits it (ties: the oldest bin), else a new bin; deterministic."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size and (lengths.min() < 1 or lengths.max() > capacity):
        raise ValueError(f"pack_bfd: lengths must be in [1, {capacity}], got {lengths.min()}..{lengths.max()}")
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free space, bin) of bins not full, sorted: best fit = first that fits
    smallest = int(lengths.min()) if lengths.size else 1  # a bin with less space left can take no item
    for item in np.argsort(-lengths, kind="stable"):
        n = int(lengths[item])
        at = bisect.bisect_left(free, (n, -1))
        if at < len(free):
            space, b = free.pop(at)
        else:
            space, b = capacity, len(bins)
            bins.append([])
        bins[b].append(int(item))
        if space - n >= smallest:
            bisect.insort(free, (space - n, b))
    order = np.array([i for items in bins for i in items], dtype=np.int64)
    starts = np.cumsum([0] + [len(items) for items in bins], dtype=np.int64)
    return order, starts


class SFTSamples:
    """Packed rows of an SFT dataset (an SFTDataset or its prefix) for the Loader.

    ``sample(i)`` -> {input_ids, labels, position_ids, document_ids} int64 ``[seq_len]``; ``identity()`` ->
    {seed, seq_len, fingerprint}. ``packing``: naive | reset | pad; ``truncate``: none (a chat longer than
    seq_len is an error) | left. ``pad_id``: the input id of padding (default: the dataset meta's pad_token_id,
    else its eos_token_id). ``shuffle=False`` serves the rows in packing order (validation). ``vocab_size`` checks
    every served id. ``stats`` holds the counts of the packing; ``log`` (if given) gets one line with them.
    """

    def __init__(self, dataset: SFTDataset | str, seq_len: int, seed: int = 0, shuffle: bool = True, *,
                 packing: str = "naive", truncate: str = "none", pad_id: int | None = None,
                 vocab_size: int | None = None, key: str = "data.train_tokens",
                 log: Callable[[str], None] | None = None):
        self.dataset = dataset if isinstance(dataset, SFTDataset) else SFTDataset(dataset)
        if packing not in PACKINGS:
            raise ConfigError(f"data.sft_packing must be one of {', '.join(PACKINGS)}; got {packing!r}")
        if truncate not in TRUNCATIONS:
            raise ConfigError(f"data.sft_truncate must be one of {', '.join(TRUNCATIONS)}; got {truncate!r}")
        if seq_len < 1:
            raise ConfigError(f"seq_len must be >= 1, got {seq_len}")
        if not 0 <= seed < 2**32:
            raise ConfigError(f"the data seed must be in [0, 2**32), got {seed}")
        self.seq_len, self.seed, self.shuffle, self.vocab_size = seq_len, seed, shuffle, vocab_size
        self.packing, self.truncate, self.key = packing, truncate, key
        prefix = self.dataset.prefix
        lengths = self.dataset.lengths.copy()
        self.truncated = self._check_lengths(lengths)  # also shortens the truncated chats' lengths in place
        nonempty = np.flatnonzero(lengths > 0)
        if nonempty.size == 0:
            raise ConfigError(f"{key} {prefix} holds no chat with tokens: write chats with `megatron-lc data sft`")
        if packing == "pad":
            order, starts = nonempty, np.arange(nonempty.size + 1, dtype=np.int64)
        else:
            order, starts = pack_bfd(lengths[nonempty], seq_len)
            order = nonempty[order]
        self.order, self.starts = order, starts
        self.rows_per_epoch = len(starts) - 1
        tokens = int(lengths.sum())
        padding = self.rows_per_epoch * seq_len - tokens
        if pad_id is None:
            pad_id = self.dataset.meta.get("pad_token_id", self.dataset.meta.get("eos_token_id"))
        if pad_id is None and padding:
            raise ConfigError(f"{key} {prefix}: its rows need {padding} padding tokens but the dataset meta has no "
                              f"pad_token_id or eos_token_id: give data.eos_token_id (the padding's input id)")
        if pad_id is not None and vocab_size is not None and not 0 <= pad_id < vocab_size:
            raise ConfigError(f"{key} {prefix}: padding id {pad_id} is outside the model's vocabulary of "
                              f"{vocab_size}: give data.eos_token_id (a padding id below {vocab_size})")
        self.pad_id = 0 if pad_id is None else int(pad_id)  # unused: no row has padding
        self.stats = {"chats": len(lengths), "empty_chats": len(lengths) - int(nonempty.size),
                      "rows": self.rows_per_epoch, "tokens": tokens, "padding_tokens": padding,
                      "padding_share": padding / (self.rows_per_epoch * seq_len),
                      "truncated_chats": len(self.truncated),
                      "truncated_tokens": int(sum(int(self.dataset.lengths[c]) - seq_len for c in self.truncated))}
        if log is not None:
            log(self.describe())
        self._epochs: OrderedDict[int, np.ndarray] = OrderedDict()

    def _check_lengths(self, lengths: np.ndarray) -> set[int]:
        """The chats longer than seq_len, each checked to fit after a left cut (truncate=left; their ``lengths``
        become seq_len), else a ConfigError naming them."""
        long = np.flatnonzero(lengths > self.seq_len)
        if long.size == 0:
            return set()
        prefix = self.dataset.prefix
        if self.truncate == "none":
            listed = ", ".join(f"chat {c} ({lengths[c]} tokens)" for c in long[:5])
            more = f" and {long.size - 5} more" if long.size > 5 else ""
            raise ConfigError(f"{self.key} {prefix}: {long.size} chats are longer than data.seq_len={self.seq_len}: "
                              f"{listed}{more}; {_TOO_LONG_FIX}")
        for c in long:
            if truncate_left(*self.dataset.get(int(c)), self.seq_len) is None:
                raise ConfigError(f"{self.key} {prefix}: chat {c} ({lengths[c]} tokens) cannot be cut to "
                                  f"data.seq_len={self.seq_len} tokens from the left without losing answer tokens "
                                  f"(an answer starts within its first {lengths[c] - self.seq_len + 1} tokens): "
                                  f"raise data.seq_len, or drop or shorten it (`megatron-lc data sft --max-tokens "
                                  f"N` reports and drops such chats)")
        lengths[long] = self.seq_len
        return {int(c) for c in long}

    def describe(self) -> str:
        """One line: chats, rows, padding share, truncations."""
        s = self.stats
        line = (f"{self.key} {self.dataset.prefix}: {s['chats']:,} chats -> {s['rows']:,} rows of {self.seq_len} "
                f"tokens (data.sft_packing={self.packing}"
                f"{', one chat per row' if self.packing == 'pad' else ', best-fit decreasing'}); padding "
                f"{100 * s['padding_share']:.1f}% ({s['padding_tokens']:,} of {s['rows'] * self.seq_len:,} tokens)")
        if s["truncated_chats"]:
            line += (f"; {s['truncated_chats']:,} chats cut from the left to seq_len (data.sft_truncate=left, "
                     f"{s['truncated_tokens']:,} context tokens dropped)")
        if s["empty_chats"]:
            line += f"; {s['empty_chats']:,} empty chats (no tokens) skipped"
        return line

    def row_chats(self, row: int) -> np.ndarray:
        """The chat indices (int64) packed into row ``row`` of the packing, in row order."""
        return self.order[self.starts[row]:self.starts[row + 1]]

    def _shuffle(self, epoch: int) -> np.ndarray:
        if epoch not in self._epochs:
            n = self.rows_per_epoch
            self._epochs[epoch] = (np.random.RandomState([self.seed, epoch]).permutation(n).astype(np.int64)
                                   if self.shuffle else np.arange(n, dtype=np.int64))
            if len(self._epochs) > 2:  # a micro-batch spans at most two epochs
                self._epochs.popitem(last=False)
        return self._epochs[epoch]

    def row_of(self, index: int) -> int:
        """The packed row that global sample ``index`` serves."""
        if index < 0:
            raise IndexError(f"sample index must be >= 0, got {index}")
        epoch, k = divmod(index, self.rows_per_epoch)
        return int(self._shuffle(epoch)[k])

    def sample(self, index: int) -> dict[str, torch.Tensor]:
        """Global sample ``index`` as a dict of int64 ``[seq_len]`` tensors (see the module docstring)."""
        ids, labels, positions, docs = [], [], [], []
        for d, c in enumerate(self.row_chats(self.row_of(index))):
            chat_ids, mask = self.dataset.get(int(c))
            if int(c) in self.truncated:
                chat_ids, mask = truncate_left(chat_ids, mask, self.seq_len)
            ids.append(chat_ids)
            labels.append(aligned_labels(chat_ids, mask))
            positions.append(np.arange(len(chat_ids), dtype=np.int64))
            docs.append(np.full(len(chat_ids), d, dtype=np.int64))
        used = sum(len(x) for x in ids)
        pad = self.seq_len - used
        ids.append(np.full(pad, self.pad_id, dtype=np.int64))
        labels.append(np.full(pad, IGNORE_INDEX, dtype=np.int64))
        docs.append(np.full(pad, len(docs), dtype=np.int64))  # the padding is a document of its own
        positions.append(np.arange(pad, dtype=np.int64) + len(positions[-1]))  # counting on after the last chat
        out = {"input_ids": np.concatenate(ids), "labels": np.concatenate(labels),
               "position_ids": (np.arange(self.seq_len, dtype=np.int64) if self.packing == "naive"
                                else np.concatenate(positions)),
               "document_ids": np.concatenate(docs)}
        if self.vocab_size is not None and used and int(out["input_ids"].max()) >= self.vocab_size:
            raise ValueError(f"{self.dataset.prefix}: sample {index} holds token id {int(out['input_ids'].max())}, "
                             f"outside the model's vocabulary of {self.vocab_size}")
        return {k: torch.from_numpy(v) for k, v in out.items()}

    def fingerprint(self) -> str:
        """What fixes the samples besides the seed: the dataset's fingerprint, seq_len, shuffle, packing,
        truncation and padding id."""
        return fingerprint_of("sft", self.dataset.fingerprint(), self.seq_len, self.shuffle, self.packing, self.truncate,
                     self.pad_id)

    def identity(self) -> dict:
        """{seed, seq_len, fingerprint}: the loader stores it to refuse resuming on other data."""
        return {"seed": self.seed, "seq_len": self.seq_len, "fingerprint": self.fingerprint()}
