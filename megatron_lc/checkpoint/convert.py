"""Model folders: ours (``step_<N>/``, DCP shards) and HF Qwen2 folders (config.json + safetensors), converted both
ways, and ``load_model`` for either (the one place that tells them apart: ``folder_kind``).

Runs in one process: DCP reads the shards written by any number of ranks into one unsharded model.
"""
from __future__ import annotations

import dataclasses
import os

import torch

from ..configtools import ConfigError
from ..distributed import process_group
from ..model import ModelConfig, Transformer, load_hf, preset_config, save_hf
from . import folders


def folder_kind(path: str, flag: str = "--model") -> str:
    """"checkpoint" (ours: it holds trainer_state.pt) or "hf" (it holds config.json) for folder ``path``; anything
    else is a ConfigError naming ``flag``, the command-line option that gave the path."""
    if not os.path.isdir(path):
        raise ConfigError(f"{flag} {path}: not a folder; give an HF folder (config.json + safetensors) or a "
                          f"checkpoint folder step_<N>/")
    if folders.is_checkpoint(path):
        return "checkpoint"
    if os.path.isfile(os.path.join(path, "config.json")):
        return "hf"
    raise ConfigError(f"{flag} {path}: neither an HF folder (no config.json) nor a checkpoint (no "
                      f"{folders.TRAINER_STATE})")


def _model_config(section: dict) -> ModelConfig:
    """The ModelConfig of a run config's ``model`` section as a checkpoint stores it (preset and/or fields)."""
    if section.get("preset") is None:
        return ModelConfig.from_dict(dict(section["config"]), where="model.config")
    return dataclasses.replace(preset_config(section["preset"]), **section.get("config", {}))


def checkpoint_model(path: str, **config_overrides) -> Transformer:
    """The model of checkpoint ``path`` (complete, any world size it was saved with), unsharded, fp32, on CPU;
    ``config_overrides`` replace ModelConfig fields (e.g. ``rope_scaling``), as in ``load_hf``. Verifies the
    checkpoint's manifest before reading anything (folders.verify). Collective when a process group exists (every
    rank reads the whole model); otherwise it runs in a one-process group of its own."""
    with process_group():
        folders.verify(path)
        state = folders.read_trainer_state(path)
        config = dataclasses.replace(_model_config(state["config"]["model"]), **config_overrides)
        with torch.device("meta"):
            model = Transformer(config)
        model.to_empty(device="cpu")  # every value is overwritten by the load
        folders.load(path, model, None, verified=True)
    return model


def load_model(path: str, dtype: str = "float32", device: str = "cpu", overrides: dict | None = None,
               flag: str = "--model") -> Transformer:
    """Transformer from an HF folder or a ``step_<N>/`` checkpoint folder, in ``dtype`` on ``device``, eval mode;
    ``overrides`` replace ModelConfig fields (positions given on the command line). A bad folder is a
    ConfigError naming ``flag``."""
    overrides = overrides or {}
    if folder_kind(path, flag) == "checkpoint":
        model = checkpoint_model(path, **overrides)
    else:
        model = load_hf(path, dtype=torch.float32, **overrides)
    return model.to(device=device, dtype=getattr(torch, dtype)).eval()


def check_target(out: str, kind: str, force: bool = False, flag: str = "--to") -> None:
    """Refuse to write a ``kind`` ("hf" or "checkpoint") folder at ``out`` over something we did not write: an
    existing non-empty folder is a ConfigError naming ``flag`` and ``--force``, except (for a checkpoint) a
    half-written checkpoint of ours, which its save replaces."""
    if force or not os.path.exists(out):
        return
    if not os.path.isdir(out):
        raise ConfigError(f"{flag} {out}: is a file, not a folder; choose a new folder")
    if not os.listdir(out) or (kind == "checkpoint" and folders.is_half_written(out)):
        return
    what = "a checkpoint" if folders.is_checkpoint(out) else "files"
    raise ConfigError(f"{flag} {out}: the folder already holds {what} ({', '.join(sorted(os.listdir(out))[:5])}"
                      f"{' ...' if len(os.listdir(out)) > 5 else ''}); refusing to write over it. Give a new or "
                      f"empty folder, or add --force to write there anyway (files of the same names are replaced, "
                      f"other files are kept)")


def checkpoint_to_hf(path: str, out: str, dtype: str | None = None, force: bool = False) -> None:
    """Write the weights of checkpoint ``path`` as an HF folder transformers loads as Qwen2ForCausalLM; an existing
    non-empty ``out`` needs ``force`` (check_target)."""
    check_target(out, "hf", force)
    save_hf(checkpoint_model(path), out, dtype=getattr(torch, dtype) if dtype else None)


def hf_to_checkpoint(hf_path: str, out: str, force: bool = False, allow_nonfinite: bool = False) -> None:
    """Write an HF Qwen2 folder as a weights-only checkpoint folder ``out`` (e.g. runs/x/step_0): a run resumed
    from it starts at step 0 with these weights and a fresh optimizer. ``out`` must be new, empty or a half-written
    checkpoint of ours unless ``force`` (check_target); ``allow_nonfinite`` lets NaN/inf weights through load_hf."""
    check_target(out, "checkpoint", force)
    model = load_hf(hf_path, dtype=torch.float32, allow_nonfinite=allow_nonfinite)
    state = {"step": 0, "skipped": 0, "tokens_seen": 0,
             "config": {"model": {"preset": None, "config": model.config.to_dict(), "init_from": None}}}
    with process_group():
        folders.save(out, model, None, state, force=force)
