"""The trainer's samples, built from ``data.*``: packed GPT samples over Megatron indexed datasets (one, or a blend).

The format, packing and loader live in ``megatron_lc.data`` (indexed, samples, loader); this module only maps the
config onto them. ``data.train_tokens`` / ``data.val_tokens`` name a dataset by its prefix (``PREFIX.bin`` +
``PREFIX.idx``); the path of either file is accepted too. ``data.train_blend`` ([[weight, prefix], ...]) replaces
``train_tokens`` with several datasets drawn by weight.
"""
from __future__ import annotations

from ..data.samples import BlendedSamples, GPTSamples


def _samples(prefix: str, d, vocab_size: int, shuffle: bool) -> GPTSamples:
    return GPTSamples(prefix, d.seq_len, seed=d.seed, shuffle=shuffle, eos_token_id=d.eos_token_id,
                      reset_position_ids=d.reset_position_ids, eod_mask_loss=d.eod_mask_loss, vocab_size=vocab_size)


def train_samples(d, vocab_size: int) -> GPTSamples | BlendedSamples:
    """Shuffled training samples of ``data.train_tokens``, or the blend ``data.train_blend``."""
    if d.train_blend:
        return BlendedSamples([_samples(str(p), d, vocab_size, True) for _, p in d.train_blend],
                              [float(w) for w, _ in d.train_blend])
    return _samples(d.train_tokens, d, vocab_size, True)


def val_samples(d, vocab_size: int) -> GPTSamples | None:
    """Validation samples of ``data.val_tokens`` in file order (the same ones every evaluation), or None."""
    return _samples(d.val_tokens, d, vocab_size, False) if d.val_tokens else None
