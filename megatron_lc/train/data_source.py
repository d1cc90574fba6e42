"""Training samples from a memory-mapped token file, and the loader that deals them to data-parallel replicas.

A token file is a flat little-endian array of token ids (uint16 when the vocabulary fits, else uint32), as written
by ``write_token_file`` (the data pipeline writes the same format). ``TokenFileSamples`` cuts it into windows of
``seq_len + 1`` tokens (window w starts at token ``w * seq_len``), visited in a seeded random order per epoch; a
sample is ``input_ids = window[:-1]``, ``labels = window[1:]`` (aligned labels), positions ``0..seq_len-1``.

``Loader`` is global: its state is the number of samples the whole world has consumed and the seed, so a run
resumed on another number of replicas continues with exactly the next samples. Every CP/TP rank of a replica gets
the same full sample; ContextParallel shards it.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from ..configtools import ConfigError


def token_dtype(vocab_size: int, name: str = "auto") -> np.dtype:
    """numpy dtype of a token file: ``name`` (uint16 | uint32), or for ``auto`` the smallest that holds the vocab."""
    if name == "auto":
        return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)
    if name not in ("uint16", "uint32"):
        raise ConfigError(f"token dtype must be auto, uint16 or uint32, got {name!r}")
    if name == "uint16" and vocab_size > 2**16:
        raise ConfigError(f"a vocabulary of {vocab_size} does not fit uint16 token files: use uint32")
    return np.dtype(name)


def write_token_file(path: str | os.PathLike, tokens, dtype: np.dtype) -> None:
    """Write token ids (any int sequence or array) as a flat ``dtype`` array; fails if an id does not fit."""
    array = np.asarray(tokens, dtype=np.int64)
    if array.size and (array.min() < 0 or array.max() > np.iinfo(dtype).max):
        raise ValueError(f"token ids must be in [0, {np.iinfo(dtype).max}] for {dtype}, got range "
                         f"[{array.min()}, {array.max()}]")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    array.astype(dtype).tofile(path)


class TokenFileSamples:
    """Fixed-length samples of a token file: ``sample(i)`` -> dict of int64 ``[seq_len]`` tensors (input_ids,
    labels, position_ids). Sample i is window ``order(i // n)[i % n]`` of the n windows: every window once per
    epoch, in an order seeded by (seed, epoch). ``shuffle=False`` visits windows in file order (validation)."""

    def __init__(self, path: str | os.PathLike, seq_len: int, vocab_size: int, dtype: str = "auto", seed: int = 0,
                 shuffle: bool = True):
        if not os.path.isfile(path):
            raise ConfigError(f"token file not found: {path}")
        self.dtype = token_dtype(vocab_size, dtype)
        size = os.path.getsize(path)
        if size % self.dtype.itemsize:
            raise ConfigError(f"{path}: {size} bytes is not a whole number of {self.dtype} tokens; is data.token_dtype "
                              f"right?")
        self.tokens = np.memmap(path, dtype=self.dtype, mode="r")
        self.path, self.seq_len, self.vocab_size, self.seed, self.shuffle = str(path), seq_len, vocab_size, seed, shuffle
        self.num_windows = (len(self.tokens) - 1) // seq_len
        if self.num_windows < 1:
            raise ConfigError(f"{path} holds {len(self.tokens)} tokens, fewer than one sample of seq_len + 1 = "
                              f"{seq_len + 1}: use more data or a shorter data.seq_len")
        self._epoch, self._order = -1, None

    def _window(self, index: int) -> int:
        if not self.shuffle:
            return index % self.num_windows
        epoch = index // self.num_windows
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._order = epoch, torch.randperm(self.num_windows, generator=gen)
        return int(self._order[index % self.num_windows])

    def sample(self, index: int) -> dict[str, torch.Tensor]:
        start = self._window(index) * self.seq_len
        window = torch.from_numpy(self.tokens[start:start + self.seq_len + 1].astype(np.int64))
        if int(window.max()) >= self.vocab_size:
            raise ValueError(f"{self.path}: token id {int(window.max())} at or after offset {start} is outside the "
                             f"model's vocabulary of {self.vocab_size}")
        return {"input_ids": window[:-1], "labels": window[1:], "position_ids": torch.arange(self.seq_len)}


class Loader:
    """Deals micro-batches of ``micro_batch_size`` samples to each of ``dp_size`` replicas.

    Each call of ``next()`` advances the world by ``micro_batch_size x dp_size`` samples; replica ``dp_rank`` takes
    its slice. ``state_dict()`` = {consumed, seed} is global, so it reshards to any dp_size."""

    def __init__(self, samples: TokenFileSamples, micro_batch_size: int, dp_size: int, dp_rank: int):
        self.samples, self.micro_batch_size, self.dp_size, self.dp_rank = samples, micro_batch_size, dp_size, dp_rank
        self.consumed = 0

    def next(self) -> dict[str, torch.Tensor]:
        """This replica's next micro-batch: dict of int64 ``[micro_batch_size, seq_len]``."""
        first = self.consumed + self.dp_rank * self.micro_batch_size
        rows = [self.samples.sample(first + i) for i in range(self.micro_batch_size)]
        self.consumed += self.micro_batch_size * self.dp_size
        return {key: torch.stack([r[key] for r in rows]) for key in rows[0]}

    def state_dict(self) -> dict[str, int]:
        return {"consumed": self.consumed, "seed": self.samples.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["seed"] != self.samples.seed:
            raise ConfigError(f"the checkpoint's data seed is {state['seed']} but data.seed is {self.samples.seed}: "
                              f"resume with the same data.seed (or start a new run)")
        self.consumed = int(state["consumed"])
