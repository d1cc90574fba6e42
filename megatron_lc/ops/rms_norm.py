"""RMSNorm in torch: the implementation behind ``RMSNorm.norm_fn`` (the Triton kernel is ``kernels/rmsnorm.py``)."""
from __future__ import annotations

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x / rms(x) * weight`` over the last dim, statistics in fp32, cast back to x.dtype before the weight (as
    HF Qwen2). x ``[..., H]``, weight ``[H]``; returns ``[..., H]`` of ``promote_types(weight, x)``."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)
