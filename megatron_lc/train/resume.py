"""A resume with a changed config: what differs from the checkpoint's, what is applied, what is refused.

The trainer prints every key that differs from the checkpoint's stored config (``trainer_state["config"]``):

- applied: the optimizer's hyper-parameters (optim.*), the schedule (schedule.*), train.steps (above the
  checkpoint's step), eval.*, logging.*, checkpoint.every/keep, and how the work is spread and run (parallel.*,
  kernels, activation checkpointing, micro-batch size under the same global batch...). The optimizer and scheduler
  state dicts loaded from the checkpoint carry the old lr (each param group's lr and initial_lr, the scheduler's
  base_lrs), so ``apply`` sets them from the new config explicitly.
- refused: what fixes the weights or the data order: the model's shape (model.config fields, but the memory
  tiling ones), data.seq_len / seed, train.seed and train.dtype. The fix is a fresh run from the checkpoint's
  weights (``model.init_from``), which may change anything. The training data (data.train_tokens / train_blend)
  may move to another path, but the loader refuses other data: it compares the checkpoint's data fingerprint.
- the global batch (tokens per optimizer step: a new dp size with the same micro-batch, a new
  data.global_batch_tokens) is refused unless ``checkpoint.allow_batch_change=true``.

A weights-only checkpoint (``has_optimizer`` False, e.g. converted from HF) is a warm start, not a resume: the
trainer does not call this module for it.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

from ..checkpoint import folders as ckpt
from ..configtools import ConfigError
from ..distributed import on_rank0
from .config import ModelSection, TrainConfig

# Keys that fix the weights or the data order: a resume must keep them.
FIXED = ("data.seq_len", "data.seed", "train.seed", "train.dtype", "train.task", "data.sft_packing", "data.sft_truncate")
# Paths whose content the loader checks against the checkpoint's data fingerprint (a moved dataset may resume).
CHECKED_BY_CONTENT = ("data.train_tokens", "data.train_blend")
# ModelConfig fields that change only how memory is tiled, never a weight or a result.
MODEL_TILING = ("loss_chunk_tokens", "mlp_tile_tokens")
# Keys that say how to start, not what the run is (model.preset and model.config are compared as the built model).
NOT_COMPARED = ("checkpoint.resume", "checkpoint.overwrite", "checkpoint.allow_batch_change", "model.init_from",
                "model.preset", "model.config")


def _flat(data: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict) and not prefix:  # sections; their dict values (model.config...) stay whole
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = json.loads(json.dumps(value))  # tuples and lists compare equal
    return out


def _model_fields(model_section: dict) -> dict[str, Any]:
    built = ModelSection(**model_section).build()
    return {f"model.config.{k}": json.loads(json.dumps(v)) for k, v in dataclasses.asdict(built).items()}


def global_batch_tokens(state: dict) -> int | None:
    """Tokens per optimizer step of the run that wrote trainer ``state`` (stored since run ids; before, derived
    from tokens_seen / step), or None when unknown (step 0)."""
    if state.get("global_batch_tokens"):
        return int(state["global_batch_tokens"])
    return int(state["tokens_seen"]) // int(state["step"]) if state.get("step") else None


def changes(cfg: TrainConfig, state: dict) -> list[tuple[str, Any, Any, bool]]:
    """(key, checkpoint's value, new value, allowed) for each key of ``cfg`` that differs from the config stored
    in trainer ``state``; keys the stored config lacks (added to the code since) are not compared."""
    old, new = _flat(state["config"]), _flat(cfg.to_dict())
    out = [(k, old[k], v, k not in FIXED) for k, v in new.items()
           if k in old and k not in NOT_COMPARED and old[k] != v]
    old_model, new_model = _model_fields(state["config"]["model"]), _model_fields(cfg.to_dict()["model"])
    out += [(k, old_model.get(k), v, k.rpartition(".")[2] in MODEL_TILING) for k, v in new_model.items()
            if old_model.get(k) != v]
    return out


def check(cfg: TrainConfig, state: dict, path: str, batch_tokens: int) -> list[str]:
    """Refuse a resume from checkpoint ``path`` (trainer ``state``) that cannot continue with ``cfg`` (ConfigError
    naming the keys and the fix); return the lines that report what changed and is applied. ``batch_tokens``: the
    new run's tokens per optimizer step."""
    step = int(state["step"])
    if cfg.train.steps <= step:
        raise ConfigError(f"train.steps={cfg.train.steps} is at or below step {step} of checkpoint {path}: the run "
                          f"already got there. Raise train.steps above {step} to train on (the schedule then spans "
                          f"the new total)")
    found = changes(cfg, state)
    refused = [(k, a, b) for k, a, b, ok in found if not ok]
    if refused:
        listed = ", ".join(f"{k} ({a!r} -> {b!r})" for k, a, b in refused)
        raise ConfigError(f"cannot resume from {path} with a changed {listed}: these fix the weights or the data "
                          f"order. Set them back to the checkpoint's values, or start a fresh run from its weights "
                          f"(checkpoint.resume=none model.init_from={path} checkpoint.dir=<a new folder>)")
    lines = [f"  {k}: {a!r} -> {b!r} (applied" + (": the loader checks that it holds the same data)"
                                                 if k in CHECKED_BY_CONTENT else ")") for k, a, b, _ in found]
    old_batch = global_batch_tokens(state)
    if old_batch is not None and old_batch != batch_tokens:
        if not cfg.checkpoint.allow_batch_change:
            raise ConfigError(
                f"the global batch changed since checkpoint {path}: {old_batch} tokens per optimizer step then, "
                f"{batch_tokens} now (data.seq_len x data.micro_batch_size x data-parallel size x accumulation). "
                f"Keep it (data.global_batch_tokens={old_batch} holds it on any dp size that divides it), or set "
                f"checkpoint.allow_batch_change=true to continue with the new one")
        lines.append(f"  global batch: {old_batch} -> {batch_tokens} tokens per step (applied: "
                     f"checkpoint.allow_batch_change=true; the data continues at the next unseen sample)")
    if lines:
        lines.insert(0, f"[megatron-lc] config changes since {path} (checkpoint -> now):")
    return lines


def finished_run(cfg: TrainConfig) -> str | None:
    """The checkpoint that already ends the run ``cfg`` asks for, or None; collective. Only under
    checkpoint.resume=auto (a requeued job, a torchrun restart after the last save): the newest complete checkpoint
    holds a resumable state whose step is its own train.steps and cfg's, and its files verify. Anything else (no
    checkpoint, an unreadable or corrupt one, other steps) is None and left to the normal resume, which falls back
    past corrupt checkpoints or names the problem."""
    c = cfg.checkpoint
    if c.resume != "auto" or not c.dir:
        return None

    def look():
        path = ckpt.latest_checkpoint(c.dir)
        try:
            state = ckpt.read_trainer_state(path) if path else None
        except ckpt.CheckpointError:
            return None
        if not state or not state.get("has_optimizer"):
            return None
        ends = int(state["step"]) == int(state["config"]["train"]["steps"]) == cfg.train.steps
        return path if ends else None

    path = on_rank0(look)
    if path is None:
        return None
    try:
        ckpt.verify(path)
    except ckpt.CorruptCheckpoint:
        return None
    return path


def optimizer_hparams(optimizer) -> list[dict]:
    """Each param group's hyper-parameters as the new config built them (lr, initial_lr, betas, eps,
    weight_decay...): taken before a checkpoint's optimizer state overwrites them."""
    return [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]


def apply(optimizer, scheduler, hparams: list[dict]) -> None:
    """After loading a checkpoint's optimizer and scheduler state: put back the new config's hyper-parameters
    (``hparams`` from ``optimizer_hparams``), the scheduler's base lrs, and the lr of the next step under the new
    schedule at the checkpoint's step (what an uninterrupted run with this config would use)."""
    for group, hp in zip(optimizer.param_groups, hparams, strict=True):
        group.update(hp)
    scheduler.base_lrs = [hp["initial_lr"] for hp in hparams]
    lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)]
    for group, lr in zip(optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    scheduler._last_lr = lrs  # what get_last_lr() (the logged train/lr) reports until the next scheduler.step()
