"""The trainer's samples, built from ``data.*``: packed GPT samples over Megatron indexed datasets (one, or a blend).

The format, packing and loader live in ``megatron_lc.data`` (indexed, samples, loader); this module only maps the
config onto them. ``data.train_tokens`` / ``data.val_tokens`` name a dataset by its prefix (``PREFIX.bin`` +
``PREFIX.idx``); the path of either file is accepted too. ``data.train_blend`` ([[weight, prefix], ...]) replaces
``train_tokens`` with several datasets drawn by weight.

Every dataset is checked when it is opened, before the model is built: its files against their fingerprints
(``IndexedDataset``) and its largest token id against the model's vocabulary, so a wrong tokenizer stops the run at
once rather than at the first sample that holds such an id.
"""
from __future__ import annotations

import torch.distributed as dist

from ..configtools import ConfigError
from ..data.indexed import IndexedDataset
from ..data.samples import BlendedSamples, GPTSamples


def _log(message: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"[megatron-lc] {message}", flush=True)


def open_checked(prefix: str, key: str, vocab_size: int) -> IndexedDataset:
    """Open the dataset ``prefix`` (config key ``key``) and check that its token ids fit ``vocab_size``; notes go to
    rank 0's stdout."""
    ds = IndexedDataset(prefix, log=_log)
    ids = ds.token_id_range()
    if ids is not None and (ids[1] >= vocab_size or ids[0] < 0):
        raise ConfigError(f"{key} {ds.prefix} holds token ids {ids[0]}..{ids[1]}, but the model's vocabulary has "
                          f"{vocab_size} ids (0..{vocab_size - 1}): set model.config.vocab_size={ids[1] + 1} or "
                          f"more (a new model), or tokenize the data with the tokenizer the model was trained with")
    return ds


def _samples(prefix: str, key: str, d, vocab_size: int, shuffle: bool) -> GPTSamples:
    return GPTSamples(open_checked(prefix, key, vocab_size), d.seq_len, seed=d.seed, shuffle=shuffle,
                      eos_token_id=d.eos_token_id, reset_position_ids=d.reset_position_ids,
                      eod_mask_loss=d.eod_mask_loss, vocab_size=vocab_size)


def train_samples(d, vocab_size: int) -> GPTSamples | BlendedSamples:
    """Shuffled training samples of ``data.train_tokens``, or the blend ``data.train_blend`` (every member checked)."""
    if d.train_blend:
        return BlendedSamples([_samples(str(p), f"data.train_blend[{i}]", d, vocab_size, True)
                               for i, (_, p) in enumerate(d.train_blend)],
                              [float(w) for w, _ in d.train_blend])
    return _samples(d.train_tokens, "data.train_tokens", d, vocab_size, True)


def val_samples(d, vocab_size: int) -> GPTSamples | None:
    """Validation samples of ``data.val_tokens`` in file order (the same ones every evaluation), or None."""
    return _samples(d.val_tokens, "data.val_tokens", d, vocab_size, False) if d.val_tokens else None
