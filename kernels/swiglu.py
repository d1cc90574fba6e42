"""Triton SwiGLU activation ``h = silu(gate) * up`` forward and backward.

- ``swiglu(gate, up) -> h``: autograd wrapper for model use; the torch math it reproduces is
  ``megatron_lc.ops.swiglu`` (the reference of its test).

gate, up ``[..., I]`` of one dtype (fp32/bf16/fp16); h has the same shape and dtype. Math is fp32 inside, stored in
the input dtype. The backward recomputes sigmoid/silu from gate instead of saving silu (one tensor less per layer).
The kernels are elementwise over the flattened tensors, so I needs no block-size limit.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import check_inputs

BLOCK = 4096  # elements per program
NUM_WARPS = 8  # 16 elements per thread


# ---- kernels ------------------------------------------------------------------------------------------------------
@triton.jit
def _swiglu_fwd_kernel(G, U, H, n, BLOCK: tl.constexpr):
    # int64 offsets: tokens x intermediate size passes 2^31 at long context
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(H + offs, (g * tl.sigmoid(g) * u).to(H.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(DH, G, U, DG, DU, n, BLOCK: tl.constexpr):
    """dup = dh * silu(g); dgate = dh * up * s * (1 + g * (1 - s)) with s = sigmoid(g), recomputed here."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dh = tl.load(DH + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    tl.store(DU + offs, (dh * g * s).to(DU.dtype.element_ty), mask=mask)
    tl.store(DG + offs, (dh * u * s * (1.0 + g * (1.0 - s))).to(DG.dtype.element_ty), mask=mask)


# ---- launch helpers -----------------------------------------------------------------------------------------------
def _check(gate: torch.Tensor, up: torch.Tensor) -> None:
    if gate.shape != up.shape:
        raise ValueError(f"SwiGLU kernel wants gate and up of one shape [..., I], got {tuple(gate.shape)}, "
                         f"{tuple(up.shape)}")
    check_inputs("SwiGLU", {"gate": gate, "up": up})


def swiglu_forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up ``[..., I]`` -> h ``[..., I]`` in their dtype. Non-contiguous inputs are copied to contiguous."""
    _check(gate, up)
    gate, up = gate.contiguous(), up.contiguous()  # flat indexing needs one dense layout for all three tensors
    h = torch.empty_like(gate)
    n = gate.numel()
    if n > 0:
        _swiglu_fwd_kernel[(triton.cdiv(n, BLOCK),)](gate, up, h, n, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return h


def swiglu_backward(dh: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """dh, gate, up ``[..., I]`` -> (dgate, dup) in gate's dtype."""
    dh, gate, up = dh.contiguous(), gate.contiguous(), up.contiguous()
    dgate, dup = torch.empty_like(gate), torch.empty_like(up)
    n = gate.numel()
    if n > 0:
        _swiglu_bwd_kernel[(triton.cdiv(n, BLOCK),)](dh, gate, up, dgate, dup, n, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return dgate, dup


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        h = swiglu_forward(gate, up)
        ctx.save_for_backward(gate, up)
        return h

    @staticmethod
    def backward(ctx, dh):
        gate, up = ctx.saved_tensors
        return swiglu_backward(dh, gate, up)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` with the Triton kernels; differentiable in gate and up.

    gate, up ``[..., I]``, same dtype (fp32/bf16/fp16); returns h ``[..., I]`` of that dtype, computed in fp32.
    Non-contiguous inputs are copied to a contiguous layout (the kernels index the flattened tensors).
    """
    return SwiGLUFunction.apply(gate, up)

