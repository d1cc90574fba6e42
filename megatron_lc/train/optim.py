"""AdamW with weight decay on matrices only, and the learning-rate schedules (as multipliers of the peak lr)."""
from __future__ import annotations

import math

import torch
from torch import nn

from .config import OptimSection, ScheduleSection


def build_optimizer(model: nn.Module, cfg: OptimSection) -> torch.optim.AdamW:
    """AdamW over the model's parameters: weight decay on matrices and embeddings (ndim >= 2), none on norms and
    biases. ``foreach`` is off so DTensor parameters of different meshes never share one fused call."""
    decay, no_decay = [], []
    for param in model.parameters():  # tied weights appear once
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, foreach=False)


def lr_multiplier(step: int, total_steps: int, cfg: ScheduleSection) -> float:
    """Multiplier of the peak lr for the update made at ``step`` (0-based: the first update is step 0).

    warmup: (step + 1) / warmup_steps for the first warmup_steps updates (cosine and warmup_constant);
    cosine: then min_lr_ratio + (1 - min_lr_ratio) * (1 + cos(pi * p)) / 2 with p going 0 -> 1 over the remaining
    updates (the last update is at the floor); constant: 1 throughout."""
    if cfg.kind == "constant":
        return 1.0
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.kind == "warmup_constant":
        return 1.0
    if cfg.kind != "cosine":
        raise ValueError(f"unknown schedule kind {cfg.kind!r}: use cosine, constant or warmup_constant")
    remaining = total_steps - cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, remaining - 1)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, cfg: ScheduleSection):
    """LambdaLR applying ``lr_multiplier``; its state (last_epoch) is what a checkpoint keeps."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, total_steps, cfg))
