"""What a run says about itself on rank 0: the start summary (model, mesh, global batch, length, run folder, resume
point, evaluation, resolved config), warnings about the config, the ``saved step_N`` lines and the end summary.

The lines are built here from plain values and printed by the trainer, so a reader finds every message of a run in
one place and tests can check them without a process group.
"""
from __future__ import annotations

import os

from ..model.config import ModelConfig
from .config import TrainConfig, to_yaml

PREFIX = "[megatron-lc]"
RUN_CONFIG = "run_config.yaml"  # the resolved config of the run's latest start, in its run folder


def run_folder(cfg: TrainConfig) -> str | None:
    """The folder a run writes to (checkpoint.dir, else logging.dir), None when it writes nowhere."""
    return cfg.checkpoint.dir or cfg.logging.dir or None


def write_run_config(cfg: TrainConfig) -> str | None:
    """Write the resolved config as ``run_config.yaml`` in the run folder (rank 0; atomically) and return its path,
    or None when the run has no folder."""
    from ..files import write_atomic

    folder = run_folder(cfg)
    if folder is None:
        return None
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, RUN_CONFIG)
    write_atomic(path, to_yaml(cfg))
    return path


def batch_lines(cfg: TrainConfig, dp: int, micro: int, accumulation: int) -> list[str]:
    """The global batch in sequences and tokens per optimizer step, how it is made (``micro`` samples per
    micro-batch, ``accumulation`` micro-batches per step), and, when data.global_batch_tokens does not fix it, that
    the data-parallel size scales it."""
    d = cfg.data
    sequences = micro * dp * accumulation
    tokens = sequences * d.seq_len
    steps = "step" if accumulation == 1 else "steps"
    lowered = f"; data.micro_batch_size={d.micro_batch_size} lowered to {micro} to divide it" \
        if micro != d.micro_batch_size else ""
    line = (f"{PREFIX} global batch: {sequences} sequence{'s' if sequences > 1 else ''} x {d.seq_len} tokens = "
            f"{tokens:,} tokens per step (micro-batch {micro} x dp {dp} x {accumulation} accumulation {steps}"
            f"{lowered})")
    if d.global_batch_tokens:
        return [line + f"; fixed by data.global_batch_tokens={d.global_batch_tokens}, whatever the layout"]
    line += "; data.global_batch_tokens is not set"
    if dp == 1:
        return [line + f": another layout (dp > 1) would multiply it; set data.global_batch_tokens={tokens} to keep it"]
    one = tokens // dp
    return [line + f", so the batch is dp={dp} x the {one:,} tokens of one replica and changes with the layout; set "
                   f"data.global_batch_tokens={one} to train the one-process batch, or ={tokens} to keep this one "
                   f"on any layout"]


def seq_len_warning(cfg: TrainConfig, model: ModelConfig) -> str | None:
    """A warning when data.seq_len exceeds the length the model's positions are set up for (max_position_embeddings,
    times the RoPE scaling factor when there is one), naming both numbers and the keys that change it; else None."""
    scaling = model.rope_scaling or {}
    factor = float(scaling.get("factor", 1.0)) if scaling.get("rope_type", "default") != "default" else 1.0
    limit = int(model.max_position_embeddings * factor)
    if cfg.data.seq_len <= limit:
        return None
    scaled = f" x rope_scaling factor {factor:g} = {limit}" if factor != 1.0 else ""
    need = cfg.data.seq_len / model.max_position_embeddings
    return (f"{PREFIX} warning: data.seq_len={cfg.data.seq_len} is above the model's max_position_embeddings="
            f"{model.max_position_embeddings}{scaled}: training goes on, but positions past {limit} are beyond what "
            f"the model's config says it handles. Set model.config.max_position_embeddings={cfg.data.seq_len} (a "
            f"model trained at this length), or extend it with RoPE scaling, e.g. model.config.rope_scaling="
            f"'{{rope_type: yarn, factor: {need:g}}}', or lower data.seq_len")


def start_lines(cfg: TrainConfig, model: ModelConfig, sizes: dict[str, int], world: int, batch: tuple[int, int],
                resume_point: str, config_path: str | None) -> list[str]:
    """The start summary: parameters, mesh, global batch, sequence length, run folder, resume point, evaluation,
    the resolved config's path. ``sizes``: {dp_replicate, dp_shard, cp, tp}; ``batch``: (samples per micro-batch,
    micro-batches per step); ``resume_point``: a phrase."""
    name = f"the {cfg.model.preset} preset" if cfg.model.preset else "model.config"
    if cfg.model.init_from:
        name += f", weights from {cfg.model.init_from}"
    dp = sizes["dp_replicate"] * sizes["dp_shard"]
    params = (f"{PREFIX} model: {model.num_params():,} parameters ({name}; vocab {model.vocab_size}, "
              f"{model.num_layers} layers, hidden {model.hidden_size})")
    mesh = (f"{PREFIX} mesh: {world} process{'es' if world > 1 else ''} = dp {dp} (dp_replicate "
            f"{sizes['dp_replicate']} x dp_shard {sizes['dp_shard']}) x cp {sizes['cp']} x tp {sizes['tp']}")
    task = " of SFT (train.task=sft: loss on answer tokens only)" if cfg.train.task == "sft" else ""
    length = (f"{PREFIX} sequence length: {cfg.data.seq_len} tokens (data.seq_len); {cfg.train.steps} steps{task} "
              f"(train.steps)")
    lines = [params, mesh, *batch_lines(cfg, dp, *batch), length]
    folder = run_folder(cfg)
    if folder is None:
        lines.append(f"{PREFIX} run folder: none (no checkpoint.dir or logging.dir): no checkpoint, metrics file or "
                     f"resolved config is written")
    else:
        c = cfg.checkpoint
        saves = (f"checkpoints every {c.every} steps and at the end" if c.every else "a checkpoint at the end") \
            if c.dir else "no checkpoints (no checkpoint.dir)"
        lines.append(f"{PREFIX} run folder: {folder} ({saves}, keep {c.keep})")
    lines.append(f"{PREFIX} resume point: {resume_point}")
    every = cfg.eval_every()
    if every:
        why = " (eval.every not set: max(1, train.steps // 10))" if cfg.eval.every is None else " (eval.every)"
        when = "every step" if every == 1 else f"every {every} steps"
        lines.append(f"{PREFIX} eval: val loss on data.val_tokens {when}{why} and at the last step, "
                     f"{cfg.eval.batches} micro-batches per replica")
    else:
        lines.append(f"{PREFIX} eval: none ({'eval.every=0' if cfg.data.val_tokens else 'no data.val_tokens'})")
    if config_path:
        lines.append(f"{PREFIX} resolved config: {config_path}")
    warning = seq_len_warning(cfg, model)
    return lines + ([warning] if warning else [])


def end_lines(history: list[dict[str, float]], first_step: int, last_step: int, tokens: tuple[int, int],
              seconds: float, saved: list[str]) -> list[str]:
    """The end summary: steps, tokens (``tokens``: seen at this run's start and at its end), wall time, final and
    best val loss, the checkpoints this run wrote."""
    from .metrics import format_duration

    losses = [h["train/loss"] for h in history if h.get("train/loss") is not None]
    vals = [(h["step"], h["val/loss"]) for h in history if "val/loss" in h]
    lines = [f"{PREFIX} done: {last_step - first_step} steps this run (step {first_step} -> {last_step}), "
             f"{tokens[1] - tokens[0]:,} tokens this run ({tokens[1]:,} in all), {format_duration(seconds)}"
             + (f"; final train loss {losses[-1]:.4f}" if losses else "")]
    if vals:
        best = min(vals, key=lambda sv: sv[1])
        lines.append(f"{PREFIX} val loss: final {vals[-1][1]:.4f} (step {vals[-1][0]}), best {best[1]:.4f} "
                     f"(step {best[0]})")
    else:
        lines.append(f"{PREFIX} val loss: none evaluated")
    lines.append(f"{PREFIX} checkpoints written: {', '.join(saved) if saved else 'none'}")
    return lines
