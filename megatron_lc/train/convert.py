"""Conversion between our checkpoints (``step_<N>/``, DCP shards) and HF Qwen2 folders (config.json + safetensors).

Runs in one process: DCP reads the shards written by any number of ranks into one unsharded model.
"""
from __future__ import annotations

import dataclasses

import os

import torch
import torch.distributed as dist

from ..model import Transformer, load_hf, save_hf
from . import checkpoint as ckpt
from .config import ModelSection


def is_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "trainer_state.pt"))


def _one_process_group() -> None:
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


def checkpoint_model(path: str, **config_overrides) -> Transformer:
    """The model of checkpoint ``path`` (complete, any world size it was saved with), unsharded, fp32, on CPU;
    ``config_overrides`` replace ModelConfig fields (e.g. ``rope_scaling``), as in ``load_hf``."""
    state = ckpt.read_trainer_state(path)
    config = dataclasses.replace(ModelSection(**state["config"]["model"]).build(), **config_overrides)
    _one_process_group()
    with torch.device("meta"):
        model = Transformer(config)
    model.to_empty(device="cpu")  # every value is overwritten by the load
    ckpt.load(path, model, None)
    return model


def checkpoint_to_hf(path: str, out: str, dtype: str | None = None) -> None:
    """Write the weights of checkpoint ``path`` as an HF folder transformers loads as Qwen2ForCausalLM."""
    save_hf(checkpoint_model(path), out, dtype=getattr(torch, dtype) if dtype else None)


def hf_to_checkpoint(hf_path: str, out: str) -> None:
    """Write an HF Qwen2 folder as a weights-only checkpoint folder ``out`` (e.g. runs/x/step_0): a run resumed
    from it starts at step 0 with these weights and a fresh optimizer."""
    model = load_hf(hf_path, dtype=torch.float32)
    _one_process_group()
    state = {"step": 0, "skipped": 0, "tokens_seen": 0,
             "config": {"model": {"preset": None, "config": model.config.to_dict(), "init_from": None}}}
    ckpt.save(out, model, None, state)
