"""The trainer's samples, built from ``data.*``: packed GPT samples over Megatron indexed datasets (one, or a blend),
or with ``train.task=sft`` packed SFT rows (megatron_lc.data.sft_samples) over SFT datasets.

The format, packing and loader live in ``megatron_lc.data`` (indexed, samples, loader); this module only maps the
config onto them. ``data.train_tokens`` / ``data.val_tokens`` name a dataset by its prefix (``PREFIX.bin`` +
``PREFIX.idx``); the path of either file is accepted too. ``data.train_blend`` ([[weight, prefix], ...]) replaces
``train_tokens`` with several datasets drawn by weight.

Every dataset is checked when it is opened, before the model is built: its files against their fingerprints
(``IndexedDataset``) and its largest token id against the model's vocabulary, so a wrong tokenizer stops the run at
once rather than at the first sample that holds such an id. Before that, ``fit_vocab`` gives a fresh preset model
the vocabulary the data was tokenized with (recorded in its ``.meta.json``), or stops naming the override.
"""
from __future__ import annotations

import os

import torch.distributed as dist

from ..configtools import ConfigError
from ..data.indexed import IndexedDataset
from ..data.samples import BlendedSamples, GPTSamples
from ..data.sft_format import SFTDataset, is_sft_dataset
from ..data.sft_samples import SFTSamples


def _log(message: str) -> None:
    """Print on rank 0 only (torchrun's RANK before the process group exists)."""
    rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))
    if rank == 0:
        print(f"[megatron-lc] {message}", flush=True)


def _check_ids(ds: IndexedDataset, key: str, vocab_size: int, loaded_from: str | None = None) -> None:
    """ConfigError naming ``model.config.vocab_size=N`` unless the token ids of ``ds`` (config key ``key``) fit
    ``vocab_size``; ``loaded_from``: the model.init_from whose vocabulary cannot change."""
    ids = ds.token_id_range()
    if ids is None or (ids[1] < vocab_size and ids[0] >= 0):
        return
    written = f" (written for a {ds.vocab_size}-id vocabulary)" if ds.vocab_size else ""
    if loaded_from:
        fix = (f"a model loaded from weights (model.init_from={loaded_from}) keeps its vocabulary: tokenize the data "
               f"with that model's tokenizer, or train a fresh model (no model.init_from) with "
               f"model.config.vocab_size={max(ids[1] + 1, ds.vocab_size or 0)}")
    else:
        fix = (f"set model.config.vocab_size={max(ids[1] + 1, ds.vocab_size or 0)} or more (a new model), or "
               f"tokenize the data with the tokenizer the model was trained with")
    raise ConfigError(f"{key} {ds.prefix} holds token ids {ids[0]}..{ids[1]}{written}, but the model's vocabulary "
                      f"has {vocab_size} ids (0..{vocab_size - 1}): {fix}")


def open_checked(prefix: str, key: str, vocab_size: int) -> IndexedDataset:
    """Open the dataset ``prefix`` (config key ``key``) and check that its token ids fit ``vocab_size``; notes go to
    rank 0's stdout."""
    ds = IndexedDataset(prefix, log=_log)
    _check_ids(ds, key, vocab_size)
    return ds


def _datasets(d) -> list[tuple[str, str]]:
    """(config key, prefix) of every dataset ``data.*`` names."""
    named = [("data.train_tokens", d.train_tokens)] if d.train_tokens else []
    named += [(f"data.train_blend[{i}]", str(p)) for i, (_, p) in enumerate(d.train_blend or ())]
    return named + ([("data.val_tokens", d.val_tokens)] if d.val_tokens else [])


def check_task(task: str, opened: list[tuple[str, IndexedDataset]]) -> None:
    """ConfigError naming the key and the fix for a dataset of the other kind than ``task`` wants (an SFT dataset
    under train.task=pretrain, a plain one under train.task=sft); ``opened``: (config key, dataset)."""
    for key, ds in opened:
        if task == "sft" and not is_sft_dataset(ds):
            raise ConfigError(f"{key} {ds.prefix} is a pretraining dataset (no answer mask), but train.task=sft: give "
                              f"an SFT dataset written by `megatron-lc data sft CHATS.jsonl --tokenizer ... --out "
                              f"PREFIX`, or set train.task=pretrain")
        if task == "pretrain" and is_sft_dataset(ds):
            raise ConfigError(f"{key} {ds.prefix} is an SFT dataset (chats with an answer mask), but "
                              f"train.task=pretrain would train on every token of it: set train.task=sft (loss on "
                              f"answers only), or give a pretraining dataset of `megatron-lc data tokenize`")


def fit_vocab(cfg) -> None:
    """Fit the model's vocabulary to the data before anything is built (no process group needed). A fresh model
    from model.preset without its own model.config.vocab_size takes the vocabulary the datasets were written for
    (their .meta.json's vocab_size, rounded up to a multiple of parallel.tp), saying so in one line; it is set in
    ``cfg.model.config``, so checkpoints record it and a second call changes nothing. Otherwise (a vocabulary given
    in model.config, a model from model.init_from, data without a recorded vocabulary) the token ids must fit: a
    ConfigError names the override model.config.vocab_size=N. Datasets written for different vocabularies fail."""
    opened = [(key, IndexedDataset(prefix, log=_log)) for key, prefix in _datasets(cfg.data)]
    check_task(cfg.train.task, opened)
    recorded = {key: ds.vocab_size for key, ds in opened if ds.vocab_size}
    if len(set(recorded.values())) > 1:
        listed = ", ".join(f"{key} ({v} ids)" for key, v in recorded.items())
        raise ConfigError(f"the datasets were written for different vocabularies: {listed}; tokenize them all with "
                          f"one tokenizer (`megatron-lc data tokenize --tokenizer ...`)")
    model = cfg.model_config()
    m = cfg.model
    if recorded and m.preset and "vocab_size" not in m.config and not m.init_from:
        key, data_vocab = next(iter(recorded.items()))
        tp = cfg.parallel.tp
        vocab = -(-data_vocab // tp) * tp
        if vocab != model.vocab_size:
            rounded = f" (rounded up to a multiple of parallel.tp={tp})" if vocab != data_vocab else ""
            _log(f"model.config.vocab_size={vocab}{rounded}: {key} was written for a {data_vocab}-id vocabulary (its "
                 f".meta.json), the {m.preset} preset has {model.vocab_size}; this fresh model takes the data's (set "
                 f"model.config.vocab_size to choose another)")
            m.config = {**m.config, "vocab_size": vocab}
            model = cfg.model_config()
    for key, ds in opened:
        _check_ids(ds, key, model.vocab_size, loaded_from=m.init_from)


def _samples(prefix: str, key: str, d, vocab_size: int, shuffle: bool, task: str) -> GPTSamples | SFTSamples:
    ds = open_checked(prefix, key, vocab_size)
    check_task(task, [(key, ds)])
    if task == "sft":  # the packing line (chats, rows, padding share) goes to rank 0's stdout
        sft = SFTDataset(ds.prefix, log=_log)
        return SFTSamples(sft, d.seq_len, seed=d.seed, shuffle=shuffle, packing=d.sft_packing,
                          truncate=d.sft_truncate, pad_id=d.eos_token_id, vocab_size=vocab_size, key=key, log=_log)
    return GPTSamples(ds, d.seq_len, seed=d.seed, shuffle=shuffle, eos_token_id=d.eos_token_id,
                      reset_position_ids=d.reset_position_ids, eod_mask_loss=d.eod_mask_loss, vocab_size=vocab_size)


def train_samples(d, vocab_size: int, task: str = "pretrain") -> GPTSamples | SFTSamples | BlendedSamples:
    """Shuffled training samples of ``data.train_tokens``, or the blend ``data.train_blend`` (every member
    checked); ``task`` (train.task): pretrain (GPTSamples) or sft (SFTSamples)."""
    if d.train_blend:
        return BlendedSamples([_samples(str(p), f"data.train_blend[{i}]", d, vocab_size, True, task)
                               for i, (_, p) in enumerate(d.train_blend)],
                              [float(w) for w, _ in d.train_blend])
    return _samples(d.train_tokens, "data.train_tokens", d, vocab_size, True, task)


def val_samples(d, vocab_size: int, task: str = "pretrain") -> GPTSamples | SFTSamples | None:
    """Validation samples of ``data.val_tokens`` in file order (the same ones every evaluation), or None; an SFT
    dataset under train.task=sft gives the loss on its answer tokens."""
    return _samples(d.val_tokens, "data.val_tokens", d, vocab_size, False, task) if d.val_tokens else None
