"""SwiGLU in torch: the implementation behind ``MLP.act_fn`` (the Triton kernel is ``kernels/swiglu.py``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up``, both ``[..., I]`` of one dtype; returns ``[..., I]`` of that dtype."""
    return F.silu(gate) * up
