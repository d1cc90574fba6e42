"""Block attention that returns its log-sum-exp, and its backward: the kernel under ring, all-gather and DCA.

``block_forward(q, k, v, causal, scale) -> (out, lse)`` and ``block_backward(dout, q, k, v, out, lse, causal, scale)
-> (dq, dk, dv)``. Layout ``[B, S, H, D]`` (k/v at the KV-head count, GQA by broadcast); lse is fp32 ``[B, H, S]``.
The backward accepts an ``out``/``lse`` that are not this block's own but the merged ones of a whole ring: it then
returns this block's exact share of the gradient, which is how a ring backward avoids re-running the forward.

Backends (``backend=`` or ``auto``; ``chosen_backend`` says which one ``auto`` takes):
- ``cpu_flash``: ``aten._scaled_dot_product_flash_attention_for_cpu`` (+ ``_backward``); takes GQA, fp32 lse.
  Its causal mask is top-left aligned, so ``auto`` uses it only where that equals bottom-right (S_q == S_kv).
- ``math``: plain fp32 torch on any device, bottom-right causal; the reference, and the fallback.
CUDA flash/cuDNN and Triton backends are added behind the same two functions.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch

_aten = torch.ops.aten


@dataclass
class BlockCallLog:
    """Block-kernel calls made while recording: (kind, S_q, S_kv, causal) and the matmul FLOPs they cost."""

    calls: list[tuple[str, int, int, bool]] = field(default_factory=list)
    flops: float = 0.0


_logs: list[BlockCallLog] = []


@contextlib.contextmanager
def record_block_calls():
    """Record every block_forward/block_backward call in this process (for load-balance checks and benchmarks)."""
    log = BlockCallLog()
    _logs.append(log)
    try:
        yield log
    finally:
        _logs.remove(log)


def _record(kind: str, q: torch.Tensor, k: torch.Tensor, causal: bool) -> None:
    if not _logs:
        return
    b, s_q, h, d = q.shape
    s_kv = k.shape[1]
    # Visible (query, key) pairs: all, or the bottom-right causal part (query i sees s_kv - s_q + i + 1 keys).
    pairs = s_q * (s_kv - s_q) + s_q * (s_q + 1) / 2 if causal else s_q * s_kv
    matmuls = 2 if kind == "fwd" else 5  # fwd: QK^T, PV; bwd: QK^T (recompute), dP, dV, dQ, dK
    for log in _logs:
        log.calls.append((kind, s_q, s_kv, causal))
        log.flops += 2.0 * b * h * d * pairs * matmuls


def _check(q, k, v, causal):
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4 or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"block attention wants q [B, S, H, D] and k, v [B, S_kv, H_kv, D], got q "
                         f"{tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads {q.shape[2]} are not divisible by key/value heads {k.shape[2]}")
    if causal and q.shape[1] > k.shape[1]:
        raise ValueError(f"causal block with more queries ({q.shape[1]}) than keys ({k.shape[1]})")


def chosen_backend(q: torch.Tensor, k: torch.Tensor, causal: bool) -> str:
    """The backend ``auto`` picks for these shapes, device and dtype."""
    if q.device.type == "cpu" and (not causal or q.shape[1] == k.shape[1]):
        return "cpu_flash"
    return "math"


# ---- math backend (fp32, any device) ---------------------------------------------------------------------------
def _grouped(q: torch.Tensor, h_kv: int) -> torch.Tensor:
    """[B, S, H, D] -> [B, H_kv, G, S, D] fp32, G = H / H_kv query heads per KV head."""
    b, s, h, d = q.shape
    return q.float().view(b, s, h_kv, h // h_kv, d).permute(0, 2, 3, 1, 4)


def _math_probs(q, k, causal, scale):
    """Scaled logits [B, H_kv, G, S_q, S_kv] fp32, masked bottom-right causal."""
    logits = torch.einsum("bngsd,bntd->bngst", _grouped(q, k.shape[2]), k.float().transpose(1, 2)) * scale
    if causal:
        s_q, s_kv = q.shape[1], k.shape[1]
        keep = torch.arange(s_kv, device=q.device)[None, :] <= torch.arange(s_q, device=q.device)[:, None] + (s_kv - s_q)
        logits = logits.masked_fill(~keep, float("-inf"))
    return logits


def _math_forward(q, k, v, causal, scale):
    b, s_q, h, d = q.shape
    logits = _math_probs(q, k, causal, scale)
    lse = torch.logsumexp(logits, dim=-1)  # [B, H_kv, G, S_q]
    out = torch.einsum("bngst,bntd->bngsd", torch.exp(logits - lse.unsqueeze(-1)), v.float().transpose(1, 2))
    out = out.permute(0, 3, 1, 2, 4).reshape(b, s_q, h, d).to(q.dtype)
    return out, lse.reshape(b, h, s_q).contiguous()


def _math_backward(dout, q, k, v, out, lse, causal, scale):
    b, s_q, h, d = q.shape
    h_kv = k.shape[2]
    p = torch.exp(_math_probs(q, k, causal, scale) - lse.float().view(b, h_kv, h // h_kv, s_q, 1))
    do = _grouped(dout, h_kv)
    delta = (do * _grouped(out, h_kv)).sum(-1, keepdim=True)  # rowsum(dO * O) of the (possibly global) output
    dp = torch.einsum("bngsd,bntd->bngst", do, v.float().transpose(1, 2))
    ds = p * (dp - delta) * scale
    dq = torch.einsum("bngst,bntd->bngsd", ds, k.float().transpose(1, 2))
    dk = torch.einsum("bngst,bngsd->bntd", ds, _grouped(q, h_kv))
    dv = torch.einsum("bngst,bngsd->bntd", p, do)
    dq = dq.permute(0, 3, 1, 2, 4).reshape(b, s_q, h, d)
    return dq.to(q.dtype), dk.transpose(1, 2).to(k.dtype), dv.transpose(1, 2).to(v.dtype)


# ---- public -------------------------------------------------------------------------------------------------------
def block_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
                  softmax_scale: float | None = None, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q ``[B, S_q, H, D]`` over k/v ``[B, S_kv, H_kv, D]`` (bottom-right causal if ``causal``).

    Returns out ``[B, S_q, H, D]`` in q.dtype and lse ``[B, H, S_q]`` fp32 (natural log, of the scaled logits).
    """
    _check(q, k, v, causal)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    backend = chosen_backend(q, k, causal) if backend == "auto" else backend
    _record("fwd", q, k, causal)
    if backend == "cpu_flash":
        out, lse = _aten._scaled_dot_product_flash_attention_for_cpu(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, causal, scale=scale)
        return out.transpose(1, 2), lse
    if backend == "math":
        return _math_forward(q, k, v, causal, scale)
    raise ValueError(f"unknown block attention backend {backend!r}: use 'auto', 'cpu_flash' or 'math'")


def block_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                   lse: torch.Tensor, *, causal: bool, softmax_scale: float | None = None,
                   backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of block attention. dout/out ``[B, S_q, H, D]``, lse ``[B, H, S_q]`` fp32 -> dq, dk, dv in the
    dtypes and shapes of q, k, v. ``out`` and ``lse`` may be the merged results of several blocks (a ring)."""
    _check(q, k, v, causal)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    backend = chosen_backend(q, k, causal) if backend == "auto" else backend
    _record("bwd", q, k, causal)
    if backend == "cpu_flash":
        # The CPU kernel reads lse in its own [B, S, H] memory order, whatever strides it is given.
        native_lse = lse.transpose(1, 2).contiguous().transpose(1, 2)
        dq, dk, dv = _aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout.transpose(1, 2), q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), out.transpose(1, 2),
            native_lse, 0.0, causal, scale=scale)
        return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)
    if backend == "math":
        return _math_backward(dout, q, k, v, out, lse, causal, scale)
    raise ValueError(f"unknown block attention backend {backend!r}: use 'auto', 'cpu_flash' or 'math'")


def merge_into(out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor) -> None:
    """Fold a block's (out ``[B, S, H, D]``, lse ``[B, H, S]``) into fp32 accumulators (out, lse), in place.

    Overflow-safe: ``lse' = lse - logsigmoid(lse - lse_b)``, ``out' = out - sigmoid(lse_b - lse) * (out - out_b)``
    never exponentiates a large positive number (the ``log(1 + exp(.))`` form gives inf/NaN on long rings).
    """
    w = torch.sigmoid(block_lse - lse).transpose(1, 2).unsqueeze(-1)  # [B, S, H, 1]: the block's weight
    out.lerp_(block_out.to(out.dtype), w)  # out + w * (block_out - out), without a full-size temporary
    lse.sub_(torch.nn.functional.logsigmoid(lse - block_lse))
