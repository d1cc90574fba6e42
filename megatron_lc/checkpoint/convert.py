"""Model folders: ours (``step_<N>/``, DCP shards) and HF Qwen2 folders (config.json + safetensors), converted both
ways, and ``load_model`` for either (the one place that tells them apart: ``folder_kind``).

Runs in one process: DCP reads the shards written by any number of ranks into one unsharded model.

What a folder records of its training, for eval and serving: a checkpoint's trainer state holds the run's config
(``data.seq_len``, the training dataset, whose meta sidecar names the tokenizer); ``checkpoint_to_hf`` copies the
tokenizer's files beside the HF weights and writes that record as ``training.json`` (``training_record`` and
``model_tokenizer`` read either kind).
"""
from __future__ import annotations

import dataclasses
import os
import shutil

import torch

from .. import files
from ..configtools import ConfigError
from ..distributed import process_group
from ..model import ModelConfig, Transformer, load_hf, preset_config, save_hf
from . import folders

TRAINING_JSON = "training.json"
"""In an HF folder written by ``checkpoint_to_hf``: {"trained_seq_len", "steps", "source", "tokenizer"}."""
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt")
"""The tokenizer files of an HF folder (those present are copied; transformers and load_tokenizer read them)."""


def folder_kind(path: str, flag: str = "--model") -> str:
    """"checkpoint" (ours: it holds trainer_state.pt) or "hf" (it holds config.json) for folder ``path``; anything
    else is a ConfigError naming ``flag``, the command-line option that gave the path."""
    if not os.path.isdir(path):
        raise ConfigError(f"{flag} {path}: not a folder; give an HF folder (config.json + safetensors) or a "
                          f"checkpoint folder step_<N>/.{folders.nearby_checkpoints(path)}")
    if folders.is_checkpoint(path):
        return "checkpoint"
    if os.path.isfile(os.path.join(path, "config.json")):
        return "hf"
    raise ConfigError(f"{flag} {path}: neither an HF folder (no config.json) nor a checkpoint (no "
                      f"{folders.TRAINER_STATE}).{folders.nearby_checkpoints(path)}")


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


# ---- what a folder records of its training ------------------------------------------------------------------
def run_tokenizer(config: dict) -> tuple[str | None, str]:
    """The tokenizer a run trained with, from its config dict (a checkpoint's trainer state ``config``):
    ``data.train_tokens`` (or the first ``data.train_blend`` dataset) -> that dataset's meta sidecar ``tokenizer``
    (the load_tokenizer spec ``megatron-lc data tokenize --tokenizer`` recorded). Returns (spec, where it was
    found) or (None, why none was)."""
    from ..data.indexed import IndexedDataset

    data = config.get("data") or {}
    dataset = data.get("train_tokens") or next((prefix for _, prefix in data.get("train_blend") or ()), None)
    if not dataset:
        return None, "the checkpoint's config names no training dataset (data.train_tokens)"
    try:
        meta = IndexedDataset(dataset, log=None).meta
    except ConfigError as e:  # moved or deleted since training: the model is still usable with --tokenizer
        return None, f"its training dataset data.train_tokens={dataset} cannot be read ({str(e)[:160]})"
    spec = meta.get("tokenizer")
    if not spec:
        return None, f"the meta of its training dataset {dataset} records no tokenizer"
    if spec != "bytes" and not os.path.exists(spec):
        return None, (f"the meta of its training dataset {dataset} records tokenizer {spec!r}, which does not "
                      f"exist (relative to {os.getcwd()})")
    return spec, f"the tokenizer of its training dataset {dataset}"


def training_record(path: str) -> dict | None:
    """What is recorded of how the model in folder ``path`` was trained: {"trained_seq_len", "steps", "source",
    "tokenizer"?} from a checkpoint's trainer state (``config.data.seq_len``, ``step``; call after ``verify``, as
    load_model does) or from an HF folder's ``training.json``; None when nothing is (an HF folder from elsewhere,
    a weights-only checkpoint converted from one)."""
    if folder_kind(path) == "checkpoint":
        state = folders.read_trainer_state(path)
        data = state["config"].get("data")
        if not data or not data.get("seq_len"):
            return None
        return {"trained_seq_len": int(data["seq_len"]), "steps": state.get("step"), "source": os.path.abspath(path)}
    return files.read_json_object(os.path.join(path, TRAINING_JSON),
                                  "delete it (eval then marks max_position_embeddings instead of the training "
                                  "length) or pass --train-length")


def model_tokenizer(path: str) -> tuple[str | None, str]:
    """The tokenizer of the model in folder ``path`` as a load_tokenizer spec: an HF folder holding tokenizer.json
    or tokenizer.model is its own; one whose ``training.json`` says "bytes" uses bytes; a checkpoint uses its run's
    (``run_tokenizer``). Returns (spec, where it was found) or (None, why none was)."""
    if folder_kind(path) == "checkpoint":
        return run_tokenizer(folders.read_trainer_state(path)["config"])
    if any(os.path.isfile(os.path.join(path, name)) for name in TOKENIZER_FILES[:2]):
        return path, f"the tokenizer files in {path}"
    recorded = (training_record(path) or {}).get("tokenizer")
    if recorded == "bytes":
        return "bytes", f"{os.path.join(path, TRAINING_JSON)}"
    why = f"{path} holds no tokenizer.json or tokenizer.model"
    return None, why + (f" (its {TRAINING_JSON} names {recorded!r}, not copied)" if recorded else "")


def copy_tokenizer(spec: str, out: str) -> list[str]:
    """Copy the files of tokenizer ``spec`` (a load_tokenizer spec: a folder holding tokenizer.json or
    tokenizer.model, an HF tokenizer.json, a sentencepiece .model; "bytes" has none) into folder ``out`` under the
    names transformers and load_tokenizer look for. Returns the names written."""
    if spec == "bytes":
        return []
    if os.path.isdir(spec):
        sources = {name: os.path.join(spec, name) for name in TOKENIZER_FILES}
    elif spec.endswith(".model"):
        sources = {"tokenizer.model": spec}
    else:  # a tokenizer.json: its folder's tokenizer_config.json etc. belong to it only when it has the HF name
        folder = os.path.dirname(os.path.abspath(spec))
        siblings = TOKENIZER_FILES[2:] if os.path.basename(spec) == "tokenizer.json" else ()
        sources = {"tokenizer.json": spec, **{name: os.path.join(folder, name) for name in siblings}}
    written = []
    for name, source in sources.items():
        if os.path.isfile(source):
            shutil.copyfile(source, os.path.join(out, name))  # a new file: the user's umask, as any other file
            written.append(name)
    return written


def checkpoint_to_hf(path: str, out: str, dtype: str | None = None, force: bool = False,
                     tokenizer: str | None = None) -> dict:
    """Write the weights of checkpoint ``path`` as an HF folder transformers loads as Qwen2ForCausalLM, ready to
    serve: beside them the files of ``tokenizer`` (a load_tokenizer spec; default: the run's, ``run_tokenizer``)
    and ``training.json`` (trained_seq_len, steps, source, tokenizer). An existing non-empty ``out`` needs
    ``force`` (check_target). Returns {"record", "files" (names in ``out``), "tokenizer_files", "tokenizer_note"}."""
    check_target(out, "hf", force)
    if tokenizer is not None:  # before the (possibly long) read of the checkpoint
        from ..data.tokenizer import load_tokenizer

        given = load_tokenizer(tokenizer)
    model = checkpoint_model(path)
    if tokenizer is not None and given.vocab_size > model.config.vocab_size:
        raise ConfigError(f"--tokenizer {tokenizer} has {given.vocab_size} ids but the model's vocabulary has "
                          f"{model.config.vocab_size}: give the tokenizer the model was trained with")
    state = folders.read_trainer_state(path)  # verified by checkpoint_model
    spec, note = (tokenizer, "--tokenizer") if tokenizer is not None else run_tokenizer(state["config"])
    save_hf(model, out, dtype=getattr(torch, dtype) if dtype else None)
    copied = copy_tokenizer(spec, out) if spec else []
    seq_len = (state["config"].get("data") or {}).get("seq_len")
    record = {"trained_seq_len": seq_len, "steps": state.get("step"), "source": os.path.abspath(path),
              "tokenizer": spec}
    files.write_json(os.path.join(out, TRAINING_JSON), record)
    return {"record": record, "files": sorted(os.listdir(out)), "tokenizer_files": copied, "tokenizer_note": note}


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
