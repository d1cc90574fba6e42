"""Triton flash attention (FlashAttention-2 structure) that returns its log-sum-exp, and its backward.

Same contract as ``megatron_lc.ops.attention_lse.block_forward`` / ``block_backward`` (the ``math`` backend is the
reference), plus global block offsets for ring steps and Dual Chunk Attention:

- ``attention_forward(q, k, v, causal, softmax_scale=None, q_offset=None, kv_offset=0, ...) -> (out, lse)``
- ``attention_backward(dout, q, k, v, out, lse, causal, softmax_scale=None, q_offset=None, kv_offset=0, ...)
  -> (dq, dk, dv)``
- ``flash_attention(q, k, v, causal=True, softmax_scale=None) -> out``: autograd wrapper for model use.

Layout ``[B, S, H, D]`` read through strides (no transposed copies); k/v ``[B, S_kv, H_kv, D]`` at the KV-head
count, query head h reads KV head ``h // (H / H_kv)``; lse ``[B, H, S_q]`` fp32, natural log of the scaled logits.

Causality uses global positions: query i (of this tensor) sees key j iff ``q_offset + i >= kv_offset + j``.
``q_offset=None`` means ``S_kv - S_q`` (with ``kv_offset=0``): bottom-right alignment, the block attention default,
where the last query sees the last key. ``q_offset=0, kv_offset=0`` gives top-left alignment. Only the difference
``q_offset - kv_offset`` matters. A query row that sees no key at all gets out 0 and lse -inf (it then merges as
a zero-weight block), and the backward gives it zero gradient.

The backward takes ``out`` and ``lse`` that may be the merged results of several key blocks (a ring): it computes
delta = rowsum(dout * out) from the given out and P = exp(S * scale - lse) from the given lse, never recomputing
lse, so it returns this block's exact share of the gradient.

Structure (FlashAttention-2): the forward runs one program per (query block, batch * head) over key blocks with an
online softmax in fp32 (exp2 of log2-scaled logits); key blocks that are in range and fully visible run without a
mask, the few on the causal diagonal or the S_kv edge with it, and fully masked ones are skipped. The backward runs
a delta = rowsum(dout * out) kernel, then one kernel per (key block, batch * KV head) for dk/dv (looping over the
query heads of its GQA group and over query blocks, so no atomics) and one per (query block, batch * head) for dq.
Batch/head/sequence offsets are int64. fp32 inputs use IEEE dots (no TF32). Default tiles per kernel are the
spill-free ones for sm_90 (see ``_TILES_16BIT``), not yet timed or autotuned; ``block_m``/``block_n`` override them.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._utils import check_inputs

LOG2E = 1.4426950408889634  # exp(x) = exp2(x * log2(e)): exp2 is the native instruction
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)


# ---- kernels ------------------------------------------------------------------------------------------------------
@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    # fp32 inputs: full-precision products (the default would be TF32 on GPUs); 16-bit inputs: the default.
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, sks, skd, svs, svd, offs_m, offs_d, lo, hi, S_kv, DIFF, qk_scale,
               MASKED: tl.constexpr, CAUSAL: tl.constexpr, IEEE: tl.constexpr, BLOCK_N: tl.constexpr):
    """Online softmax over key blocks [lo, hi): MASKED applies the key-bounds (and, if CAUSAL, causal) mask."""
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        n_valid = cols < S_kv
        kt = tl.load(k_base + cols.to(tl.int64)[None, :] * sks + offs_d[:, None] * skd,
                     mask=n_valid[None, :], other=0.0)  # [HEAD_DIM, BLOCK_N]
        s = _dot(q, kt, IEEE) * qk_scale  # log2-scaled logits
        if MASKED:
            keep = n_valid[None, :]
            if CAUSAL:
                keep = keep & (offs_m[:, None] + DIFF >= cols[None, :])
            s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with no visible key so far has m_new = -inf; subtract 0 instead so exp2 gives 0, not NaN.
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_sub[:, None])
        alpha = tl.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + cols.to(tl.int64)[:, None] * svs + offs_d[None, :] * svd,
                    mask=n_valid[:, None], other=0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _key_ranges(start_m, S_kv, DIFF, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(mid, hi) for the query block at start_m: key blocks [0, mid) are in range and fully visible (no mask),
    [mid, hi) need the causal / bounds mask, and blocks past hi are fully masked (skipped)."""
    if CAUSAL:
        hi = tl.maximum(tl.minimum(S_kv, start_m + BLOCK_M + DIFF), 0)
        mid = tl.minimum(tl.maximum(start_m + DIFF + 1, 0), S_kv) // BLOCK_N * BLOCK_N
    else:
        hi = S_kv
        mid = S_kv // BLOCK_N * BLOCK_N
    return mid, hi


@triton.jit
def _fwd_kernel(Q, K, V, Out, Lse,
                sqb, sqs, sqh, sqd, skb, sks, skh, skd, svb, svs, svh, svd, sob, sos, soh, sod,
                H, GROUP, S_q, S_kv, DIFF, qk_scale,
                CAUSAL: tl.constexpr, IEEE: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    off_bh = tl.program_id(1)
    off_b = (off_bh // H).to(tl.int64)  # int64: batch/head offsets of B * S * H * D elements can pass 2^31
    off_h = (off_bh % H).to(tl.int64)
    off_hkv = off_h // GROUP

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    m_valid = offs_m < S_q

    q_ptrs = Q + off_b * sqb + off_h * sqh + offs_m.to(tl.int64)[:, None] * sqs + offs_d[None, :] * sqd
    q = tl.load(q_ptrs, mask=m_valid[:, None], other=0.0)
    k_base = K + off_b * skb + off_hkv * skh
    v_base = V + off_b * svb + off_hkv * svh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max of the log2-scaled logits
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of exp2(logit - m_i)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    # Key blocks [0, mid) are in range and fully visible to every row of this query block: no mask there.
    # Blocks [mid, hi) need the causal / bounds mask; blocks past hi are fully masked and skipped.
    mid, hi = _key_ranges(start_m, S_kv, DIFF, CAUSAL, BLOCK_M, BLOCK_N)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, sks, skd, svs, svd, offs_m, offs_d, 0, mid,
                               S_kv, DIFF, qk_scale, False, CAUSAL, IEEE, BLOCK_N)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, sks, skd, svs, svd, offs_m, offs_d, mid, hi,
                               S_kv, DIFF, qk_scale, True, CAUSAL, IEEE, BLOCK_N)

    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    acc = acc / l_safe[:, None]
    lse = tl.where(seen, (m_i + tl.log2(l_safe)) / 1.4426950408889634, float("-inf"))  # back to natural log
    o_ptrs = Out + off_b * sob + off_h * soh + offs_m.to(tl.int64)[:, None] * sos + offs_d[None, :] * sod
    tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=m_valid[:, None])
    tl.store(Lse + off_bh.to(tl.int64) * S_q + offs_m, lse, mask=m_valid)


@triton.jit
def _bwd_preprocess_kernel(Out, DO, Delta,
                           sob, sos, soh, sod, sdb, sds, sdh, sdd,
                           H, S_q, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr):
    """delta[b, h, i] = sum_d dout * out (fp32), from the given (possibly merged) out."""
    start_m = tl.program_id(0) * BLOCK_M
    off_bh = tl.program_id(1)
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    m_valid = offs_m < S_q
    rows = offs_m.to(tl.int64)[:, None]
    o = tl.load(Out + off_b * sob + off_h * soh + rows * sos + offs_d[None, :] * sod, mask=m_valid[:, None],
                other=0.0).to(tl.float32)
    do = tl.load(DO + off_b * sdb + off_h * sdh + rows * sds + offs_d[None, :] * sdd, mask=m_valid[:, None],
                 other=0.0).to(tl.float32)
    tl.store(Delta + off_bh.to(tl.int64) * S_q + offs_m, tl.sum(o * do, 1), mask=m_valid)


@triton.jit
def _dkdv_inner(dk, dv, k, v, q_base, do_base, Lse, Delta, row_base, sqs, sqd, sds, sdd, offs_n, offs_d, lo, hi,
                S_q, DIFF, qk_scale, MASKED: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr):
    """dk, dv of one key block from query blocks [lo, hi) of one query head; MASKED applies the causal mask."""
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_valid = offs_m < S_q
        rows = offs_m.to(tl.int64)[:, None]
        q = tl.load(q_base + rows * sqs + offs_d[None, :] * sqd, mask=m_valid[:, None], other=0.0)
        do = tl.load(do_base + rows * sds + offs_d[None, :] * sdd, mask=m_valid[:, None], other=0.0)
        # Rows past S_q and rows that saw no key at all (lse -inf) get +inf, so their P is exactly 0.
        lse = tl.load(Lse + row_base + offs_m, mask=m_valid, other=float("inf"))
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
        delta = tl.load(Delta + row_base + offs_m, mask=m_valid, other=0.0)
        st = _dot(k, tl.trans(q), IEEE) * qk_scale  # [BLOCK_N, BLOCK_M]: log2-scaled logits, transposed
        pt = tl.exp2(st - lse2[None, :])
        if MASKED:
            pt = tl.where(offs_m[None, :] + DIFF >= offs_n[:, None], pt, 0.0)
        dv += _dot(pt.to(do.dtype), do, IEEE)
        dpt = _dot(v, tl.trans(do), IEEE)  # [BLOCK_N, BLOCK_M]
        dst = pt * (dpt - delta[None, :])
        dk += _dot(dst.to(q.dtype), q, IEEE)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, Lse, Delta, DK, DV,
                     sqb, sqs, sqh, sqd, skb, sks, skh, skd, svb, svs, svh, svd, sdb, sds, sdh, sdd,
                     sdkb, sdks, sdkh, sdkd, sdvb, sdvs, sdvh, sdvd,
                     H, H_kv, GROUP, S_q, S_kv, DIFF, qk_scale, sm_scale,
                     CAUSAL: tl.constexpr, IEEE: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr):
    """One program per (key block, batch * KV head): loops over the GROUP query heads of the KV head and over
    query blocks, so dk/dv of a GQA group are summed in registers, without atomics."""
    start_n = tl.program_id(0) * BLOCK_N
    off_bhkv = tl.program_id(1)
    off_b = (off_bhkv // H_kv).to(tl.int64)
    off_hkv = (off_bhkv % H_kv).to(tl.int64)

    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    n_valid = offs_n < S_kv
    cols = offs_n.to(tl.int64)[:, None]
    k = tl.load(K + off_b * skb + off_hkv * skh + cols * sks + offs_d[None, :] * skd, mask=n_valid[:, None],
                other=0.0)  # [BLOCK_N, HEAD_DIM]
    v = tl.load(V + off_b * svb + off_hkv * svh + cols * svs + offs_d[None, :] * svd, mask=n_valid[:, None],
                other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)

    # Query blocks before lo see none of this key block: skipped. Blocks [lo, mid) straddle the causal boundary
    # and are masked; from mid on every query sees every key of the block. No bounds mask is needed: rows past
    # S_q get lse +inf (P = 0), and key rows past S_kv are never stored.
    if CAUSAL:
        lo = tl.maximum(start_n - DIFF, 0) // BLOCK_M * BLOCK_M
        mid = tl.minimum((tl.maximum(start_n + BLOCK_N - 1 - DIFF, 0) + BLOCK_M - 1) // BLOCK_M * BLOCK_M, S_q)
    else:
        lo = 0
        mid = 0
    for g in range(GROUP):
        off_h = off_hkv * GROUP + g
        q_base = Q + off_b * sqb + off_h * sqh
        do_base = DO + off_b * sdb + off_h * sdh
        row_base = (off_b * H + off_h) * S_q
        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, Lse, Delta, row_base, sqs, sqd, sds, sdd, offs_n,
                             offs_d, lo, mid, S_q, DIFF, qk_scale, True, IEEE, BLOCK_M)
        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, Lse, Delta, row_base, sqs, sqd, sds, sdd, offs_n,
                             offs_d, mid, S_q, S_q, DIFF, qk_scale, False, IEEE, BLOCK_M)
    dk = dk * sm_scale
    tl.store(DK + off_b * sdkb + off_hkv * sdkh + cols * sdks + offs_d[None, :] * sdkd,
             dk.to(DK.dtype.element_ty), mask=n_valid[:, None])
    tl.store(DV + off_b * sdvb + off_hkv * sdvh + cols * sdvs + offs_d[None, :] * sdvd,
             dv.to(DV.dtype.element_ty), mask=n_valid[:, None])


@triton.jit
def _dq_inner(dq, q, do, lse2, delta, k_base, v_base, sks, skd, svs, svd, offs_m, offs_d, lo, hi, S_kv, DIFF, qk_scale,
              MASKED: tl.constexpr, CAUSAL: tl.constexpr, IEEE: tl.constexpr, BLOCK_N: tl.constexpr):
    """dq of one query block from key blocks [lo, hi); MASKED applies the key-bounds (and causal) mask."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_valid = offs_n < S_kv
        cols = offs_n.to(tl.int64)[None, :]
        kt = tl.load(k_base + cols * sks + offs_d[:, None] * skd, mask=n_valid[None, :], other=0.0)
        vt = tl.load(v_base + cols * svs + offs_d[:, None] * svd, mask=n_valid[None, :], other=0.0)
        s = _dot(q, kt, IEEE) * qk_scale
        p = tl.exp2(s - lse2[:, None])
        if MASKED:
            keep = n_valid[None, :]
            if CAUSAL:
                keep = keep & (offs_m[:, None] + DIFF >= offs_n[None, :])
            p = tl.where(keep, p, 0.0)
        dp = _dot(do, vt, IEEE)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(kt.dtype), tl.trans(kt), IEEE)
    return dq


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, Lse, Delta, DQ,
                   sqb, sqs, sqh, sqd, skb, sks, skh, skd, svb, svs, svh, svd, sdb, sds, sdh, sdd,
                   sdqb, sdqs, sdqh, sdqd,
                   H, GROUP, S_q, S_kv, DIFF, qk_scale, sm_scale,
                   CAUSAL: tl.constexpr, IEEE: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr):
    """One program per (query block, batch * head): loops over key blocks like the forward."""
    start_m = tl.program_id(0) * BLOCK_M
    off_bh = tl.program_id(1)
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    off_hkv = off_h // GROUP

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    m_valid = offs_m < S_q
    rows = offs_m.to(tl.int64)[:, None]
    q = tl.load(Q + off_b * sqb + off_h * sqh + rows * sqs + offs_d[None, :] * sqd, mask=m_valid[:, None],
                other=0.0)
    do = tl.load(DO + off_b * sdb + off_h * sdh + rows * sds + offs_d[None, :] * sdd, mask=m_valid[:, None],
                 other=0.0)
    lse = tl.load(Lse + off_bh.to(tl.int64) * S_q + offs_m, mask=m_valid, other=float("inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    delta = tl.load(Delta + off_bh.to(tl.int64) * S_q + offs_m, mask=m_valid, other=0.0)
    k_base = K + off_b * skb + off_hkv * skh
    v_base = V + off_b * svb + off_hkv * svh
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    # As in the forward: [0, mid) unmasked, [mid, hi) masked, the rest skipped.
    mid, hi = _key_ranges(start_m, S_kv, DIFF, CAUSAL, BLOCK_M, BLOCK_N)
    dq = _dq_inner(dq, q, do, lse2, delta, k_base, v_base, sks, skd, svs, svd, offs_m, offs_d, 0, mid, S_kv, DIFF,
                   qk_scale, False, CAUSAL, IEEE, BLOCK_N)
    dq = _dq_inner(dq, q, do, lse2, delta, k_base, v_base, sks, skd, svs, svd, offs_m, offs_d, mid, hi, S_kv, DIFF,
                   qk_scale, True, CAUSAL, IEEE, BLOCK_N)
    dq = dq * sm_scale
    tl.store(DQ + off_b * sdqb + off_h * sdqh + rows * sdqs + offs_d[None, :] * sdqd,
             dq.to(DQ.dtype.element_ty), mask=m_valid[:, None])


# ---- host side ----------------------------------------------------------------------------------------------------
def _check(q, k, v, causal, q_offset, kv_offset):
    """Validate shapes/dtypes; returns DIFF = q_offset - kv_offset, all the causal mask needs."""
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"attention wants q [B, S_q, H, D] and k, v [B, S_kv, H_kv, D] with equal B and D, got q "
                         f"{tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    d = q.shape[3]
    if d not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head_dim {d} is not supported by the Triton attention kernel: use one of "
                         f"{SUPPORTED_HEAD_DIMS} (or the block attention in megatron_lc.ops.attention_lse)")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads {q.shape[2]} are not divisible by key/value heads {k.shape[2]}")
    check_inputs("attention", {"q": q, "k": k, "v": v})
    if min(q.shape[1], k.shape[1]) == 0 or q.shape[0] == 0 or q.shape[2] == 0:
        raise ValueError(f"empty attention input: q {tuple(q.shape)}, k {tuple(k.shape)}")
    if q_offset is None:
        if causal and q.shape[1] > k.shape[1]:
            raise ValueError(f"bottom-right causal attention with more queries ({q.shape[1]}) than keys "
                             f"({k.shape[1]}): pass q_offset/kv_offset to place the blocks explicitly")
        q_offset = k.shape[1] - q.shape[1]
    return int(q_offset) - int(kv_offset)


# Default (BLOCK_M, BLOCK_N, num_warps) per kernel for 16-bit inputs, by head_dim. Chosen without a GPU as the
# configurations that compile for sm_90 (triton 3.9) without register spills; not yet timed or autotuned.
_TILES_16BIT = {
    64: {"fwd": (128, 64, 8), "dkdv": (32, 64, 8), "dq": (64, 32, 8)},
    128: {"fwd": (128, 32, 8), "dkdv": (32, 32, 8), "dq": (64, 32, 8)},
}
_TILES_FP32 = {"fwd": (32, 32, 8), "dkdv": (32, 32, 8), "dq": (32, 32, 8)}  # fp32 is the exactness path


def _launch_params(q, block_m, block_n, kernel):
    """(BLOCK_M, BLOCK_N, launch kwargs) of one kernel ("fwd", "dkdv", "dq"): the given block sizes if any,
    else the per-kernel defaults above."""
    if q.dtype == torch.float32:
        dm, dn, warps = _TILES_FP32[kernel]
    else:
        dm, dn, warps = _TILES_16BIT[128 if q.shape[3] > 64 else 64][kernel]
    if block_m is not None or block_n is not None:
        warps = 4 if q.shape[3] <= 64 else 8
    block_m = dm if block_m is None else block_m
    block_n = dn if block_n is None else block_n
    for name, block in (("block_m", block_m), ("block_n", block_n)):
        if block < 16 or block & (block - 1):
            raise ValueError(f"{name}={block} must be a power of two >= 16 (tl.dot needs tiles of at least 16)")
    return block_m, block_n, {"num_warps": warps, "num_stages": 2}


def _scales(q, softmax_scale):
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    return float(scale), float(scale) * LOG2E


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                      softmax_scale: float | None = None, q_offset: int | None = None, kv_offset: int = 0, *,
                      block_m: int | None = None, block_n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q ``[B, S_q, H, D]`` over k, v ``[B, S_kv, H_kv, D]`` (fp16/bf16/fp32, any strides).

    Returns out ``[B, S_q, H, D]`` in q.dtype and lse ``[B, H, S_q]`` fp32 (natural log of the scaled logits).
    Causal masking uses global positions ``q_offset + i >= kv_offset + j``; ``q_offset=None`` is bottom-right.
    """
    diff = _check(q, k, v, causal, q_offset, kv_offset)
    qk_scale = _scales(q, softmax_scale)[1]
    b, s_q, h, d = q.shape
    s_kv, h_kv = k.shape[1], k.shape[2]
    block_m, block_n, params = _launch_params(q, block_m, block_n, "fwd")
    out = torch.empty_like(q)
    lse = torch.empty(b, h, s_q, dtype=torch.float32, device=q.device)
    grid = (triton.cdiv(s_q, block_m), b * h)
    _fwd_kernel[grid](q, k, v, out, lse, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
                      h, h // h_kv, s_q, s_kv, diff, qk_scale,
                      CAUSAL=bool(causal), IEEE=q.dtype == torch.float32,
                      BLOCK_M=block_m, BLOCK_N=block_n, HEAD_DIM=d, **params)
    return out, lse


def attention_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                       lse: torch.Tensor, causal: bool, softmax_scale: float | None = None,
                       q_offset: int | None = None, kv_offset: int = 0, *,
                       block_m: int | None = None,
                       block_n: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``attention_forward``. dout/out ``[B, S_q, H, D]``, lse ``[B, H, S_q]`` fp32 -> dq, dk, dv in
    the dtypes and shapes of q, k, v (dk/dv at the KV-head count, summed over each GQA group).

    ``out``/``lse`` may be the merged results of several key blocks (ring attention): they are used as given.
    """
    diff = _check(q, k, v, causal, q_offset, kv_offset)
    b, s_q, h, d = q.shape
    s_kv, h_kv = k.shape[1], k.shape[2]
    if dout.shape != q.shape or out.shape != q.shape or tuple(lse.shape) != (b, h, s_q):
        raise ValueError(f"attention_backward wants dout and out of q's shape {tuple(q.shape)} and lse "
                         f"{(b, h, s_q)}, got dout {tuple(dout.shape)}, out {tuple(out.shape)}, lse {tuple(lse.shape)}")
    scale, qk_scale = _scales(q, softmax_scale)
    dkdv_m, dkdv_n, dkdv_params = _launch_params(q, block_m, block_n, "dkdv")
    dq_m, dq_n, dq_params = _launch_params(q, block_m, block_n, "dq")
    ieee = q.dtype == torch.float32
    lse = lse.float().contiguous()  # the kernels index lse/delta as [B * H, S_q]
    dout = dout.to(q.dtype)  # the dots take operands of one dtype

    delta = torch.empty(b, h, s_q, dtype=torch.float32, device=q.device)
    _bwd_preprocess_kernel[(triton.cdiv(s_q, 64), b * h)](
        out, dout, delta, *out.stride(), *dout.stride(), h, s_q, BLOCK_M=64, HEAD_DIM=d)

    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    strides = (*q.stride(), *k.stride(), *v.stride(), *dout.stride())
    _bwd_dkdv_kernel[(triton.cdiv(s_kv, dkdv_n), b * h_kv)](
        q, k, v, dout, lse, delta, dk, dv, *strides, *dk.stride(), *dv.stride(),
        h, h_kv, h // h_kv, s_q, s_kv, diff, qk_scale, scale,
        CAUSAL=bool(causal), IEEE=ieee, BLOCK_M=dkdv_m, BLOCK_N=dkdv_n, HEAD_DIM=d, **dkdv_params)
    _bwd_dq_kernel[(triton.cdiv(s_q, dq_m), b * h)](
        q, k, v, dout, lse, delta, dq, *strides, *dq.stride(),
        h, h // h_kv, s_q, s_kv, diff, qk_scale, scale,
        CAUSAL=bool(causal), IEEE=ieee, BLOCK_M=dq_m, BLOCK_N=dq_n, HEAD_DIM=d, **dq_params)
    return dq, dk, dv


class FlashAttentionFunction(torch.autograd.Function):
    """Autograd wrapper: saves q, k, v, out and lse; the backward runs ``attention_backward``."""

    @staticmethod
    def forward(ctx, q, k, v, causal, softmax_scale, q_offset, kv_offset, block_m, block_n):
        out, lse = attention_forward(q, k, v, causal, softmax_scale, q_offset, kv_offset,
                                     block_m=block_m, block_n=block_n)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (causal, softmax_scale, q_offset, kv_offset)
        ctx.blocks = {"block_m": block_m, "block_n": block_n}
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = attention_backward(dout, q, k, v, out, lse, *ctx.args, **ctx.blocks)
        return dq, dk, dv, None, None, None, None, None, None


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                    softmax_scale: float | None = None, *, q_offset: int | None = None, kv_offset: int = 0,
                    block_m: int | None = None, block_n: int | None = None) -> torch.Tensor:
    """Differentiable attention out ``[B, S_q, H, D]`` of q ``[B, S_q, H, D]`` over k, v ``[B, S_kv, H_kv, D]``."""
    return FlashAttentionFunction.apply(q, k, v, causal, softmax_scale, q_offset, kv_offset, block_m, block_n)
