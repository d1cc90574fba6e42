"""Collectives with autograd and torch-version shims, over an explicit process group (never a global one)."""
from __future__ import annotations

import torch
import torch.distributed as dist


def all_gather_into(out: torch.Tensor, x: torch.Tensor, group: dist.ProcessGroup) -> None:
    """Concatenate every rank's ``x`` along dim 0 into ``out`` (``[W * x.shape[0], ...]``), in rank order."""
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.13
    fn(out, x.contiguous(), group=group)


def reduce_scatter_into(out: torch.Tensor, x: torch.Tensor, group: dist.ProcessGroup) -> None:
    """Sum ``x`` (``[W * n, ...]``) over ranks and keep this rank's ``n`` rows of dim 0 in ``out``."""
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    fn(out, x.contiguous(), group=group)
