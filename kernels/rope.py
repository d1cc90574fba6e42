"""Triton rotary position embedding: q and k rotated in one launch, NeoX half-split layout (Qwen2/HF).

Same result as the torch ``megatron_lc.ops.rotary.apply_rotary_qk`` (the reference of its test):

- ``rope_qk(q, k, cos, sin) -> (q_rot, k_rot)``: cos/sin already gathered, ``[B, S, D/2]`` (fp32).
- ``rope_qk_from_table(q, k, cos_table, sin_table, position_ids) -> (q_rot, k_rot)``: fp32 tables ``[P, D/2]``
  (``RotaryEmbedding.table``) and ``position_ids [B, S]`` (int64/int32, any values in [0, P): zigzag shards,
  packed documents, DCA) gathered inside the kernel, so the ``[B, S, D/2]`` cos/sin are never materialized.

q ``[B, S, H, D]``, k ``[B, S, H_kv, D]`` (GQA: any head counts), fp32/bf16/fp16, D even and <= 256; outputs are new
contiguous tensors of the input shape and dtype. Inputs (q, k, cos, sin, tables, position ids, and the incoming
gradients in the backward) are read through their strides: no contiguous copies, transposed/sliced views work.

Numerics follow the reference op by op: cos/sin are cast to x.dtype, each product and the sum are rounded to
x.dtype (products of two 16-bit values are exact in fp32, so fp32 arithmetic with a rounding after each op gives
the same bits as torch's 16-bit ops; fp fusion is off so fp32 gets no fma either). Angles are never computed in the kernel: only table values are read, which
were built from float64 angles (an fp32 ``position * inv_freq`` is off by ~1e-2 rad at position 1M).

Backward: the inverse rotation, dx1 = g1*cos + g2*sin, dx2 = g2*cos - g1*sin, i.e. the same kernel with sin
negated (a constexpr flag, no negated copy). cos/sin/tables are constants and get no gradient.

Launch: one program per token row (b, s), grid ``(B*S,)``; it loads the row's cos/sin once and rotates all H query
heads and H_kv key heads in head blocks. Row, position and table offsets are int64 (B*S*H*D passes 2^31 at ~1M
tokens).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import check_inputs

MAX_HEAD_DIM = 256


# ---- kernel -------------------------------------------------------------------------------------------------------
@triton.jit
def _round(x, OUT, EMULATE_RTNE: tl.constexpr):
    """fp32 x rounded to OUT's element dtype, returned as fp32. EMULATE_RTNE (interpreter + bf16 only): the Triton
    interpreter truncates fp32 -> bf16, so round to nearest even on the bits first (finite values); the cast is
    then exact. Compiled kernels round to nearest even natively."""
    if EMULATE_RTNE:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(OUT.dtype.element_ty).to(tl.float32)


@triton.jit
def _rotate_heads(X, Y, x_row, y_row, sxh, sxd, syh, syd, n_heads, c, s, offs_h, offs_d, d_mask,
                  HALF: tl.constexpr, BLOCK_H: tl.constexpr, EMULATE_RTNE: tl.constexpr):
    """Rotate heads [0, n_heads) of one token row: y1 = x1*c - x2*s, y2 = x2*c + x1*s, rounded op by op."""
    dt = Y.dtype.element_ty
    for h0 in range(0, n_heads, BLOCK_H):
        heads = h0 + offs_h
        mask = (heads < n_heads)[:, None] & d_mask[None, :]
        x_head = X + x_row + heads[:, None].to(tl.int64) * sxh
        x1 = tl.load(x_head + offs_d[None, :].to(tl.int64) * sxd, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_head + (offs_d[None, :] + HALF).to(tl.int64) * sxd, mask=mask, other=0.0).to(tl.float32)
        # round each product to x.dtype like torch's x1 * cos (exact in fp32 for 16-bit inputs), then the sum
        a = _round(x1 * c, Y, EMULATE_RTNE)
        b = _round(x2 * s, Y, EMULATE_RTNE)
        e = _round(x2 * c, Y, EMULATE_RTNE)
        f = _round(x1 * s, Y, EMULATE_RTNE)
        y_head = Y + y_row + heads[:, None].to(tl.int64) * syh
        tl.store(y_head + offs_d[None, :].to(tl.int64) * syd, _round(a - b, Y, EMULATE_RTNE).to(dt), mask=mask)
        tl.store(y_head + (offs_d[None, :] + HALF).to(tl.int64) * syd, _round(e + f, Y, EMULATE_RTNE).to(dt),
                 mask=mask)


@triton.jit
def _rope_qk_kernel(Q, K, QO, KO, COS, SIN, POS,
                    S, H, H_KV,
                    sqb, sqs, sqh, sqd, skb, sks, skh, skd,
                    sqob, sqos, sqoh, sqod, skob, skos, skoh, skod,
                    scb, scs, scd, ssb, sss, ssd, spb, sps,
                    HALF: tl.constexpr, FROM_TABLE: tl.constexpr, NEG_SIN: tl.constexpr,
                    EMULATE_RTNE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """One token row (b, s) per program. FROM_TABLE: COS/SIN are tables [P, D/2] (row stride scb/ssb, scs/sss
    unused) gathered at POS[b, s]; otherwise COS/SIN are [B, S, D/2]. NEG_SIN: rotate by -angle (backward)."""
    row = tl.program_id(0).to(tl.int64)
    b = row // S
    s_idx = row % S
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HALF
    offs_h = tl.arange(0, BLOCK_H)

    if FROM_TABLE:
        pos = tl.load(POS + b * spb + s_idx * sps).to(tl.int64)
        cos_off = pos * scb
        sin_off = pos * ssb
    else:
        cos_off = b * scb + s_idx * scs
        sin_off = b * ssb + s_idx * sss
    # cast to x.dtype first, as the reference does, then compute in fp32
    c = _round(tl.load(COS + cos_off + offs_d.to(tl.int64) * scd, mask=d_mask, other=0.0).to(tl.float32), QO,
               EMULATE_RTNE)
    s = _round(tl.load(SIN + sin_off + offs_d.to(tl.int64) * ssd, mask=d_mask, other=0.0).to(tl.float32), QO,
               EMULATE_RTNE)
    if NEG_SIN:
        s = -s
    c = c[None, :]
    s = s[None, :]

    _rotate_heads(Q, QO, b * sqb + s_idx * sqs, b * sqob + s_idx * sqos, sqh, sqd, sqoh, sqod, H,
                  c, s, offs_h, offs_d, d_mask, HALF, BLOCK_H, EMULATE_RTNE)
    _rotate_heads(K, KO, b * skb + s_idx * sks, b * skob + s_idx * skos, skh, skd, skoh, skod, H_KV,
                  c, s, offs_h, offs_d, d_mask, HALF, BLOCK_H, EMULATE_RTNE)


# ---- host side ----------------------------------------------------------------------------------------------------
def _check_qk(q: torch.Tensor, k: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"rope wants q [B, S, H, D] and k [B, S, H_kv, D] with equal B, S and D, got q "
                         f"{tuple(q.shape)}, k {tuple(k.shape)}")
    d = q.shape[3]
    if d % 2 or d > MAX_HEAD_DIM or d == 0:
        raise ValueError(f"head_dim {d} is not supported by the Triton rope kernel: it must be even and in "
                         f"[2, {MAX_HEAD_DIM}] (use megatron_lc.ops.rotary.apply_rotary_qk otherwise)")
    check_inputs("rope", {"q": q, "k": k}, dtype_error=TypeError)


def _check_cs(name: str, t: torch.Tensor, shape: tuple, device: torch.device) -> None:
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor (fp32 from RotaryEmbedding), got {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, q/k on {device}: move it to {device}")


def _launch(q, k, cos, sin, pos, neg_sin: bool):
    """Rotate q, k (any strides) into new contiguous tensors; pos None: cos/sin [B, S, D/2], else tables [P, D/2]."""
    bsz, seq, h, d = q.shape
    h_kv = k.shape[2]
    half = d // 2
    qo = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    ko = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if bsz * seq == 0 or (h == 0 and h_kv == 0):
        return qo, ko
    block_d = triton.next_power_of_2(half)
    # a [BLOCK_H, BLOCK_D] tile of each half: cap it at 2048 elements (16 KB fp32 for the pair of halves)
    block_h = max(1, min(triton.next_power_of_2(max(h, h_kv)), 2048 // block_d))
    if pos is None:
        table_strides = (cos.stride(0), cos.stride(1), cos.stride(2), sin.stride(0), sin.stride(1), sin.stride(2))
        pos_arg, pos_strides = cos, (0, 0)  # unused pointer
    else:
        table_strides = (cos.stride(0), 0, cos.stride(1), sin.stride(0), 0, sin.stride(1))
        pos_arg, pos_strides = pos, (pos.stride(0), pos.stride(1))
    _rope_qk_kernel[(bsz * seq,)](
        q, k, qo, ko, cos, sin, pos_arg,
        seq, h, h_kv,
        *q.stride(), *k.stride(), *qo.stride(), *ko.stride(),
        *table_strides, *pos_strides,
        HALF=half, FROM_TABLE=pos is not None, NEG_SIN=neg_sin, BLOCK_H=block_h, BLOCK_D=block_d,
        EMULATE_RTNE=q.dtype == torch.bfloat16 and q.device.type != "cuda",  # CPU means the interpreter
        num_warps=4 if block_h * block_d <= 1024 else 8,
        enable_fp_fusion=False,  # fp32: x1*c - x2*s as two roundings like torch, not one fma
    )
    return qo, ko


class RopeQKFunction(torch.autograd.Function):
    """autograd for ``rope_qk``/``rope_qk_from_table``: backward rotates (dq_rot, dk_rot) by -angle in one launch."""

    @staticmethod
    def forward(ctx, q, k, cos, sin, pos):
        q_rot, k_rot = _launch(q, k, cos, sin, pos, neg_sin=False)
        ctx.save_for_backward(cos, sin, pos)
        ctx.has_pos = pos is not None
        ctx.q_meta = (q.shape, q.dtype, q.device)
        ctx.k_meta = (k.shape, k.dtype, k.device)
        return q_rot, k_rot

    @staticmethod
    def backward(ctx, dq_rot, dk_rot):
        cos, sin, pos = ctx.saved_tensors
        if dq_rot is None:
            dq_rot = torch.zeros(ctx.q_meta[0], dtype=ctx.q_meta[1], device=ctx.q_meta[2])
        if dk_rot is None:
            dk_rot = torch.zeros(ctx.k_meta[0], dtype=ctx.k_meta[1], device=ctx.k_meta[2])
        dq, dk = _launch(dq_rot, dk_rot, cos, sin, pos if ctx.has_pos else None, neg_sin=True)
        return dq, dk, None, None, None


def rope_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
            sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q ``[B, S, H, D]`` and k ``[B, S, H_kv, D]`` (fp32/bf16/fp16, any strides) by cos, sin
    ``[B, S, D/2]`` (fp32, e.g. ``RotaryEmbedding(position_ids)``; broadcast views with stride 0 are fine) in one
    launch. Returns contiguous (q_rot, k_rot) in q's dtype; differentiable in q and k."""
    _check_qk(q, k)
    shape = (q.shape[0], q.shape[1], q.shape[3] // 2)
    _check_cs("cos", cos, shape, q.device)
    _check_cs("sin", sin, shape, q.device)
    return RopeQKFunction.apply(q, k, cos, sin, None)


def rope_qk_from_table(q: torch.Tensor, k: torch.Tensor, cos_table: torch.Tensor, sin_table: torch.Tensor,
                       position_ids: torch.Tensor, check_positions: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Like ``rope_qk`` but gathers cos/sin rows inside the kernel: tables ``[P, D/2]`` fp32
    (``RotaryEmbedding.table``), ``position_ids [B, S]`` int64/int32 with values in [0, P) in any order.

    ``check_positions`` validates the range on the host (one device sync); pass False when the caller already
    knows it (e.g. the tables came from ``RotaryEmbedding.table(max_pos + 1)``): an out-of-range id reads out of
    bounds."""
    _check_qk(q, k)
    half = q.shape[3] // 2
    if cos_table.dim() != 2 or cos_table.shape[1] != half:
        raise ValueError(f"cos_table must be [P, {half}] for head_dim {q.shape[3]}, got {tuple(cos_table.shape)}")
    _check_cs("cos_table", cos_table, tuple(cos_table.shape), q.device)
    _check_cs("sin_table", sin_table, tuple(cos_table.shape), q.device)
    if position_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"position_ids must be int64 or int32, got {position_ids.dtype}")
    if tuple(position_ids.shape) != tuple(q.shape[:2]):
        raise ValueError(f"position_ids must be [B, S] = {tuple(q.shape[:2])}, got {tuple(position_ids.shape)}")
    if position_ids.device != q.device:
        raise ValueError(f"position_ids is on {position_ids.device}, q/k on {q.device}: move it to {q.device}")
    if check_positions and position_ids.numel():
        lo, hi = (int(t) for t in position_ids.aminmax())
        if lo < 0 or hi >= cos_table.shape[0]:
            raise ValueError(f"position_ids must be in [0, {cos_table.shape[0]}) for a table of "
                             f"{cos_table.shape[0]} rows, got [{lo}, {hi}]: build the table with "
                             f"RotaryEmbedding.table({hi + 1}, device)")
    return RopeQKFunction.apply(q, k, cos_table, sin_table, position_ids)

