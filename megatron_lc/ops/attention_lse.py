"""Block attention that returns its log-sum-exp, and its backward: the kernel under ring, all-gather and DCA.

``block_forward(q, k, v, causal, scale) -> (out, lse)`` and ``block_backward(dout, q, k, v, out, lse, causal, scale)
-> (dq, dk, dv)``. Layout ``[B, S, H, D]`` (k/v at the KV-head count, GQA by broadcast); lse is fp32 ``[B, H, S]``.
The backward accepts an ``out``/``lse`` that are not this block's own but the merged ones of a whole ring: it then
returns this block's exact share of the gradient, which is how a ring backward avoids re-running the forward.

Backends (``backend=`` or ``auto``; ``chosen_backend`` says which one ``auto`` takes, first that applies):
- ``cpu_flash``: ``aten._scaled_dot_product_flash_attention_for_cpu`` (+ ``_backward``); takes GQA, fp32 lse.
  Its causal mask is top-left aligned, so ``auto`` uses it only where that equals bottom-right (S_q == S_kv).
- ``flash_attn``: the flash-attn package's ``_flash_attn_forward``/``_backward`` (CUDA, fp16/bf16, when importable;
  native GQA, bottom-right causal).
- ``cuda_flash``: ``aten._scaled_dot_product_flash_attention`` (+ ``_backward``): PyTorch's bundled FlashAttention-2
  (CUDA, fp16/bf16, head_dim <= 256 and a multiple of 8; causal only where S_q == S_kv).
- ``triton``: our FlashAttention-2 kernel (``megatron_lc.kernels.attention``; CUDA, or the Triton interpreter for
  tests): fp16/bf16/fp32, GQA, bottom-right causal for any S_q <= S_kv. ``auto`` takes it for fp32 on CUDA, where
  the aten and flash-attn kernels do not apply.
- ``math``: plain fp32 torch on any device, bottom-right causal, in query chunks of bounded size (the logits of a
  chunk are at most ``MATH_CHUNK_ELEMENTS``); the reference, and the fallback.
"""
from __future__ import annotations

import contextlib
import importlib.util
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


def _flash_attn_module():
    """flash_attn.flash_attn_interface, or None when it is not installed (an optional ``[gpu]`` extra)."""
    global _FLASH_ATTN
    if _FLASH_ATTN is None:
        try:
            from flash_attn import flash_attn_interface
        except ImportError:  # not installed, or built for another torch/CUDA
            flash_attn_interface = False
        _FLASH_ATTN = flash_attn_interface
    return _FLASH_ATTN or None


_FLASH_ATTN = None


def chosen_backend(q: torch.Tensor, k: torch.Tensor, causal: bool) -> str:
    """The backend ``auto`` picks for these shapes, device and dtype."""
    square = not causal or q.shape[1] == k.shape[1]
    if q.device.type == "cpu":
        return "cpu_flash" if square else "math"
    if q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16):
        if _flash_attn_module() is not None:
            return "flash_attn"
        if square and q.shape[-1] <= 256 and q.shape[-1] % 8 == 0:
            return "cuda_flash"
    if q.device.type == "cuda" and q.shape[-1] in (16, 32, 64, 128) and importlib.util.find_spec("triton"):
        return "triton"
    return "math"


# ---- math backend (fp32, any device) ---------------------------------------------------------------------------
def _grouped(q: torch.Tensor, h_kv: int) -> torch.Tensor:
    """[B, S, H, D] -> [B, H_kv, G, S, D] fp32, G = H / H_kv query heads per KV head."""
    b, s, h, d = q.shape
    return q.float().view(b, s, h_kv, h // h_kv, d).permute(0, 2, 3, 1, 4)


def _math_probs(q, k, causal, scale, i=0, j=None):
    """Scaled logits [B, H_kv, G, j - i, S_kv] fp32 of queries i..j, masked bottom-right causal."""
    j = q.shape[1] if j is None else j
    logits = torch.einsum("bngsd,bntd->bngst", _grouped(q[:, i:j], k.shape[2]), k.float().transpose(1, 2)) * scale
    if causal:
        s_q, s_kv = q.shape[1], k.shape[1]
        rows = torch.arange(i, j, device=q.device)[:, None] + (s_kv - s_q)
        logits = logits.masked_fill(torch.arange(s_kv, device=q.device)[None, :] > rows, float("-inf"))
    return logits


MATH_CHUNK_ELEMENTS = 2**26  # logits per query chunk of the math backend: 256 MiB in fp32


def _query_chunks(q: torch.Tensor, s_kv: int) -> list[tuple[int, int]]:
    b, s_q, h, _ = q.shape
    step = max(1, MATH_CHUNK_ELEMENTS // max(1, b * h * s_kv))
    return [(i, min(i + step, s_q)) for i in range(0, s_q, step)]


def _math_forward(q, k, v, causal, scale):
    b, s_q, h, d = q.shape
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(b, h, s_q, dtype=torch.float32, device=q.device)
    vt = v.float().transpose(1, 2)
    for i, j in _query_chunks(q, k.shape[1]):
        logits = _math_probs(q, k, causal, scale, i, j)
        chunk_lse = torch.logsumexp(logits, dim=-1)  # [B, H_kv, G, j - i]
        chunk = torch.einsum("bngst,bntd->bngsd", torch.exp(logits - chunk_lse.unsqueeze(-1)), vt)
        out[:, i:j] = chunk.permute(0, 3, 1, 2, 4).reshape(b, j - i, h, d)
        lse[:, :, i:j] = chunk_lse.reshape(b, h, j - i)
    return out, lse


def _math_backward(dout, q, k, v, out, lse, causal, scale):
    b, s_q, h, d = q.shape
    h_kv = k.shape[2]
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.zeros(k.shape[0], h_kv, k.shape[1], d, dtype=torch.float32, device=k.device)
    dv = torch.zeros_like(dk)
    kt, vt = k.float().transpose(1, 2), v.float().transpose(1, 2)
    lse = lse.float().view(b, h_kv, h // h_kv, s_q, 1)
    for i, j in _query_chunks(q, k.shape[1]):
        p = torch.exp(_math_probs(q, k, causal, scale, i, j) - lse[..., i:j, :])
        do = _grouped(dout[:, i:j], h_kv)
        delta = (do * _grouped(out[:, i:j], h_kv)).sum(-1, keepdim=True)  # rowsum(dO * O) of the given output
        ds = p * (torch.einsum("bngsd,bntd->bngst", do, vt) - delta) * scale
        dq[:, i:j] = torch.einsum("bngst,bntd->bngsd", ds, kt).permute(0, 3, 1, 2, 4).reshape(b, j - i, h, d)
        dk += torch.einsum("bngst,bngsd->bntd", ds, _grouped(q[:, i:j], h_kv))
        dv += torch.einsum("bngst,bngsd->bntd", p, do)
    return dq, dk.transpose(1, 2).to(k.dtype), dv.transpose(1, 2).to(v.dtype)


# ---- CUDA backends --------------------------------------------------------------------------------------------
def _flash_attn_call(fn, **kwargs):
    """Call a flash_attn_interface function with the keyword arguments its installed version takes (the
    signature has changed across 2.x releases: window_size vs window_size_left/right, softcap, rng_state)."""
    import inspect

    params = inspect.signature(fn).parameters
    if "window_size" in params:
        kwargs["window_size"] = (kwargs["window_size_left"], kwargs["window_size_right"])
    return fn(**{name: value for name, value in kwargs.items() if name in params})


def _flash_attn_forward(q, k, v, causal, scale):
    result = _flash_attn_call(_flash_attn_module()._flash_attn_forward, q=q, k=k, v=v, dropout_p=0.0,
                              softmax_scale=scale, causal=causal, window_size_left=-1, window_size_right=-1,
                              softcap=0.0, alibi_slopes=None, return_softmax=False)
    # 2.6+: (out, lse, S_dmask, rng_state); earlier 2.x: (out, q, k, v, out_padded, lse, S_dmask, rng_state)
    out, lse = (result[0], result[1]) if len(result) == 4 else (result[0], result[5])
    return out, lse


def _flash_attn_backward(dout, q, k, v, out, lse, causal, scale):
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    _flash_attn_call(_flash_attn_module()._flash_attn_backward, dout=dout, q=q, k=k, v=v, out=out,
                     softmax_lse=lse.contiguous(), dq=dq, dk=dk, dv=dv, dropout_p=0.0, softmax_scale=scale,
                     causal=causal, window_size_left=-1, window_size_right=-1, softcap=0.0, alibi_slopes=None,
                     deterministic=False, rng_state=None)
    return dq, dk, dv


def _cuda_flash_forward(q, k, v, causal, scale):
    result = _aten._scaled_dot_product_flash_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                       0.0, causal, False, scale=scale)
    return result[0].transpose(1, 2), result[1]


def _cuda_flash_backward(dout, q, k, v, out, lse, causal, scale):
    # No dropout: the RNG state is not read, but the op takes tensors of the forward's kind.
    seed = torch.zeros(2, dtype=torch.uint64, device=q.device)
    offset = torch.zeros((), dtype=torch.uint64, device=q.device)
    dq, dk, dv = _aten._scaled_dot_product_flash_attention_backward(
        dout.transpose(1, 2), q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), out.transpose(1, 2),
        lse.contiguous(), None, None, q.shape[1], k.shape[1], 0.0, causal, seed, offset, scale=scale)
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


def _triton_forward(q, k, v, causal, scale):
    from ..kernels.attention import attention_forward

    return attention_forward(q, k, v, causal, softmax_scale=scale)


def _triton_backward(dout, q, k, v, out, lse, causal, scale):
    from ..kernels.attention import attention_backward

    return attention_backward(dout, q, k, v, out, lse, causal, softmax_scale=scale)


def _cpu_flash_forward(q, k, v, causal, scale):
    out, lse = _aten._scaled_dot_product_flash_attention_for_cpu(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, causal, scale=scale)
    return out.transpose(1, 2), lse


def _cpu_flash_backward(dout, q, k, v, out, lse, causal, scale):
    # The CPU kernel reads lse in its own [B, S, H] memory order, whatever strides it is given.
    native_lse = lse.transpose(1, 2).contiguous().transpose(1, 2)
    dq, dk, dv = _aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout.transpose(1, 2), q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), out.transpose(1, 2),
        native_lse, 0.0, causal, scale=scale)
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


BACKENDS = {  # name -> (forward(q, k, v, causal, scale), backward(dout, q, k, v, out, lse, causal, scale))
    "cpu_flash": (_cpu_flash_forward, _cpu_flash_backward),
    "flash_attn": (_flash_attn_forward, _flash_attn_backward),
    "cuda_flash": (_cuda_flash_forward, _cuda_flash_backward),
    "triton": (_triton_forward, _triton_backward),
    "math": (_math_forward, _math_backward),
}


def _backend(name: str):
    if name not in BACKENDS:
        raise ValueError(f"unknown block attention backend {name!r}: use 'auto' or one of {sorted(BACKENDS)}")
    if name == "flash_attn" and _flash_attn_module() is None:
        raise ValueError("backend 'flash_attn' needs the flash-attn package: pip install 'megatron_lc[gpu]'")
    return BACKENDS[name]


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
    return _backend(backend)[0](q, k, v, causal, scale)


def block_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                   lse: torch.Tensor, *, causal: bool, softmax_scale: float | None = None,
                   backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of block attention. dout/out ``[B, S_q, H, D]``, lse ``[B, H, S_q]`` fp32 -> dq, dk, dv in the
    dtypes and shapes of q, k, v. ``out`` and ``lse`` may be the merged results of several blocks (a ring)."""
    _check(q, k, v, causal)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    backend = chosen_backend(q, k, causal) if backend == "auto" else backend
    _record("bwd", q, k, causal)
    return _backend(backend)[1](dout, q, k, v, out, lse, causal, scale)


def merge_into(out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor) -> None:
    """Fold a block's (out ``[B, S, H, D]``, lse ``[B, H, S]``) into fp32 accumulators (out, lse), in place.

    Overflow-safe: ``lse' = lse - logsigmoid(lse - lse_b)``, ``out' = out - sigmoid(lse_b - lse) * (out - out_b)``
    never exponentiates a large positive number (the ``log(1 + exp(.))`` form gives inf/NaN on long rings).
    """
    w = torch.sigmoid(block_lse - lse).transpose(1, 2).unsqueeze(-1)  # [B, S, H, 1]: the block's weight
    out.lerp_(block_out.to(out.dtype), w)  # out + w * (block_out - out), without a full-size temporary
    lse.sub_(torch.nn.functional.logsigmoid(lse - block_lse))
