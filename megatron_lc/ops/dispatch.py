"""Which implementation computes each of the model's ops: torch, or our Triton kernels (``megatron_lc.kernels``).

The model calls its ops through hooks (``RMSNorm.norm_fn``, ``MLP.act_fn``, ``Attention.rope_fn``,
``Attention.attn_fn``, ``Transformer.loss_fn``), whose defaults are the torch implementations. ``apply_kernels``
is the one place that swaps them, per op: ``auto`` picks, for the device, the fastest implementation available
(Triton on CUDA for the memory-bound ops and the fused loss; torch SDPA, i.e. cuDNN/flash, for attention; torch on
CPU), and returns what it chose so the trainer can say so.
"""
from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable

import torch
from torch import nn

from .attention import attention
from .cross_entropy import linear_cross_entropy
from .rms_norm import rms_norm
from .rotary import apply_rotary_qk
from .swiglu import swiglu

OPS = ("rmsnorm", "swiglu", "rope", "linear_cross_entropy", "attention")
CHOICES = ("auto", "torch", "triton")


def _triton_runs_on(device: torch.device) -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def _torch_impl(op: str) -> Callable:
    return {"rmsnorm": rms_norm, "swiglu": swiglu, "rope": apply_rotary_qk,
            "linear_cross_entropy": linear_cross_entropy, "attention": attention}[op]


def _triton_impl(op: str) -> Callable:
    if op == "rmsnorm":
        from ..kernels.rmsnorm import rmsnorm
        return rmsnorm
    if op == "swiglu":
        from ..kernels.swiglu import swiglu
        return swiglu
    if op == "rope":
        from ..kernels.rope import rope_qk
        return rope_qk
    if op == "linear_cross_entropy":
        from ..kernels.linear_cross_entropy import linear_cross_entropy
        return linear_cross_entropy
    from ..kernels.attention import flash_attention
    return flash_attention


def resolve(op: str, choice: str, device: torch.device) -> str:
    """The implementation (``torch`` or ``triton``) that ``choice`` means for ``op`` on ``device``."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}: one of {', '.join(OPS)}")
    if choice not in CHOICES:
        raise ValueError(f"kernels for {op} must be one of {', '.join(CHOICES)}, got {choice!r}")
    if choice == "auto":
        # Attention: SDPA's cuDNN/flash kernels unless ours is measured faster (not yet: see docs/benchmarks.md).
        if op == "attention" or device.type != "cuda" or not _triton_runs_on(device):
            return "torch"
        return "triton"
    if choice == "triton" and not _triton_runs_on(device):
        raise ValueError(f"kernels.{op}=triton needs triton and a CUDA device (or TRITON_INTERPRET=1 to run the "
                         f"kernels slowly in Triton's interpreter, for tests); device is {device.type}. Use torch or "
                         f"auto")
    return choice


def apply_kernels(model: nn.Module, kernels: str | dict[str, str] = "auto",
                  device: torch.device | str | None = None, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """Point the model's op hooks at the chosen implementations, in place; returns {op: implementation}.

    kernels: one choice for every op, or {op: choice} (ops not named get ``auto``). ``skip``: ops left as they are
    (e.g. what tensor parallelism or context parallelism replaces). Call before parallelize swaps attention/loss."""
    if isinstance(kernels, str):
        kernels = {op: kernels for op in OPS}
    unknown = set(kernels) - set(OPS)
    if unknown:
        raise ValueError(f"unknown op(s) {sorted(unknown)} in kernels: ops are {', '.join(OPS)}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    chosen = {}
    for op in OPS:
        if op in skip:
            continue
        name = resolve(op, kernels.get(op, "auto"), device)
        fn = _torch_impl(op) if name == "torch" else _triton_impl(op)
        chosen[op] = name
        for module in model.modules():
            if op == "rmsnorm" and hasattr(module, "norm_fn"):
                module.norm_fn = fn
            elif op == "swiglu" and hasattr(module, "act_fn"):
                module.act_fn = fn
            elif op == "rope" and hasattr(module, "rope_fn"):
                module.rope_fn = fn
            elif op == "attention" and hasattr(module, "attn_fn"):
                module.attn_fn = fn
            elif op == "linear_cross_entropy" and hasattr(module, "loss_fn"):
                module.loss_fn = fn
    return chosen
