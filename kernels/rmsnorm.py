"""Triton RMSNorm (HF Qwen2 order) forward and backward.

- ``rmsnorm(x, weight, eps) -> y``: autograd wrapper for model use.

It reproduces the torch math of ``megatron_lc.ops.rms_norm`` (the reference of its test):
``y = weight * (x.float() * rsqrt(mean(x.float()**2, -1) + eps)).to(x.dtype)``.

x ``[..., H]`` and weight ``[H]`` in fp32/bf16/fp16 (any mix); y has torch's promoted dtype of (weight, x), e.g.
fp32 weight * bf16 x -> fp32. Statistics are fp32; the forward stores rstd ``[rows]`` fp32 for the backward.
The backward gives dx (x.dtype) and dweight (weight.dtype); dweight is reduced without atomics: each program sums
a block of rows into its own row of a ``[programs, H]`` fp32 buffer, which torch then sums.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import check_inputs

MAX_BLOCK = 65536  # one row per program in registers; beyond this the kernel would need a loop over H


# ---- kernels ------------------------------------------------------------------------------------------------------
@triton.jit
def _rmsnorm_fwd_kernel(X, W, Y, Rstd, stride_x, stride_y, H, eps, BLOCK: tl.constexpr):
    """One program per row: y = w * cast_x(x * rstd), product in fp32, stored in Y's dtype."""
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride can pass 2^31 at long context
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / H + eps)  # masked columns are 0: they do not bias the mean
    # Cast the normalised value to x's dtype before the weight (as the torch code); the fp32 product of two values
    # of at most 16-bit precision is exact, so storing it rounds once, like torch's multiply.
    n = (x * rstd).to(X.dtype.element_ty).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (n * w).to(Y.dtype.element_ty), mask=mask)
    tl.store(Rstd + row, rstd)


@triton.jit
def _rmsnorm_bwd_kernel(DY, X, W, Rstd, DX, DWpart, stride_dy, stride_x, stride_dx, n_rows, H, rows_per_program,
                        BLOCK: tl.constexpr):
    """Each program walks rows [pid * rows_per_program, ...): dx per row, and its dweight partial sum in fp32.

    With n = x * rstd and g = dy * w: dx = rstd * (g - n * mean(g * n)); dweight = sum_rows dy * cast_x(n).
    """
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    # Row pointers start at an int64 offset (row * stride can pass 2^31) and then advance by one stride per row.
    r0 = row_start.to(tl.int64)
    x_ptr, dy_ptr, dx_ptr, rstd_ptr = X + r0 * stride_x, DY + r0 * stride_dy, DX + r0 * stride_dx, Rstd + r0
    for _ in range(row_start, row_end):
        x = tl.load(x_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr)
        n = x * rstd
        g = dy * w
        dx = rstd * (g - n * (tl.sum(g * n, axis=0) / H))
        tl.store(dx_ptr + cols, dx.to(DX.dtype.element_ty), mask=mask)
        dw += dy * n.to(X.dtype.element_ty).to(tl.float32)  # the forward multiplied w by n cast to x's dtype
        x_ptr += stride_x
        dy_ptr += stride_dy
        dx_ptr += stride_dx
        rstd_ptr += 1
    tl.store(DWpart + pid.to(tl.int64) * H + cols, dw, mask=mask)


# ---- launch helpers -----------------------------------------------------------------------------------------------
def _settings(h: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for hidden size h: the whole row in one block, more warps for longer rows."""
    block = triton.next_power_of_2(h)
    if block > MAX_BLOCK:
        raise ValueError(f"hidden size {h} exceeds the RMSNorm kernel's maximum of {MAX_BLOCK}: use the torch "
                         f"megatron_lc.ops.rms_norm for it")
    num_warps = 32 if block >= 32768 else 16 if block >= 8192 else 8 if block >= 2048 else 4
    return block, num_warps


def _rows(t: torch.Tensor, h: int) -> torch.Tensor:
    """``[..., H]`` as ``[rows, H]`` with unit column stride (a view when possible, else a contiguous copy)."""
    t2 = t.reshape(-1, h)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _check(x: torch.Tensor, weight: torch.Tensor) -> None:
    check_inputs("RMSNorm", {"x": x, "weight": weight}, same_dtype=False)  # fp32 weight * bf16 x is fine
    if weight.dim() != 1 or x.dim() == 0 or x.shape[-1] != weight.shape[0]:
        raise ValueError(f"RMSNorm kernel wants x [..., H] and weight [H], got x {tuple(x.shape)}, "
                         f"weight {tuple(weight.shape)}")


def _num_programs(device: torch.device, n_rows: int) -> int:
    """Backward programs: a few per SM, so the [programs, H] dweight buffer stays small."""
    if device.type == "cuda":
        target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 4  # interpreter: few programs run fastest
    return max(1, min(n_rows, target))


def rmsnorm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x ``[..., H]``, weight ``[H]`` -> (y ``[..., H]`` of promote_types(weight, x), rstd ``[rows]`` fp32)."""
    _check(x, weight)
    h = x.shape[-1]
    x2 = _rows(x, h)
    n_rows = x2.shape[0]
    y = torch.empty((n_rows, h), dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    if n_rows > 0:
        block, num_warps = _settings(h)
        _rmsnorm_fwd_kernel[(n_rows,)](x2, weight.contiguous(), y, rstd, x2.stride(0), y.stride(0), h, eps,
                                       BLOCK=block, num_warps=num_warps)
    return y.view(*x.shape[:-1], h), rstd


def rmsnorm_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                     rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """dy ``[..., H]`` (y's shape), x, weight, rstd from the forward -> (dx like x, dweight like weight)."""
    h = x.shape[-1]
    x2, dy2 = _rows(x, h), _rows(dy, h)
    n_rows = x2.shape[0]
    dx = torch.empty((n_rows, h), dtype=x.dtype, device=x.device)
    if n_rows == 0:
        return dx.view(x.shape), torch.zeros_like(weight)
    block, num_warps = _settings(h)
    programs = _num_programs(x.device, n_rows)
    rows_per_program = triton.cdiv(n_rows, programs)
    dw_part = torch.empty((programs, h), dtype=torch.float32, device=x.device)
    _rmsnorm_bwd_kernel[(programs,)](dy2, x2, weight.contiguous(), rstd, dx, dw_part, dy2.stride(0), x2.stride(0),
                                     dx.stride(0), n_rows, h, rows_per_program, BLOCK=block, num_warps=num_warps)
    return dx.view(x.shape), dw_part.sum(0).to(weight.dtype)


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        y, rstd = rmsnorm_forward(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        dx, dw = rmsnorm_backward(dy, x, weight, rstd)
        return dx, (dw if ctx.needs_input_grad[1] else None), None


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim with the Triton kernels; differentiable in x and weight.

    x ``[..., H]`` and weight ``[H]``, each fp32/bf16/fp16; returns y ``[..., H]`` of
    ``torch.promote_types(weight.dtype, x.dtype)`` (as ``megatron_lc.ops.rms_norm``). Inputs whose last dim is not
    contiguous are copied to a contiguous layout; H is limited to 65536.
    """
    return RMSNormFunction.apply(x, weight, eps)

