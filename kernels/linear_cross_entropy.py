"""Triton fused linear + cross-entropy: the ``[N, V]`` logits never exist at once.

- ``linear_cross_entropy(hidden, weight, labels, chunk_tokens=0, z_loss=0.0, ignore_index=-100)
  -> (loss_sum, count)``

hidden ``[N, H]`` and weight ``[V, H]`` in fp32/bf16/fp16 (same dtype), labels ``[N]`` int64 with ``ignore_index``
(-100, as ``F.cross_entropy``) ignored.
loss_sum (fp32 scalar) = sum over counted tokens of ``lse - logit[label]`` (+ ``z_loss * lse^2``), count int64.

Structure (as Liger's fused linear-CE and our torch path ``megatron_lc.ops.cross_entropy``): per chunk of
``chunk`` tokens, torch computes ``logits = h @ W^T`` (cuBLAS, in the input dtype); one Triton program per row walks
the vocabulary in blocks for the online max / logsumexp and the target logit, writes the row's loss, then walks it
again writing ``d loss / d logits = softmax * (1 + 2 z lse) - onehot`` (0 on ignored rows) in place over the logits;
torch then gives ``grad_hidden[chunk] = grad_logits @ W`` and adds ``grad_logits^T @ h`` to an fp32 ``grad_weight``.
Backward only scales the stored gradients by the upstream gradient.

Peak extra memory (beyond inputs): ``chunk * V * itemsize`` (logits / grad buffer, in place) + ``chunk * 4`` (row
losses) + ``N * H * itemsize`` (grad_hidden) + ``V * H * 4`` (fp32 grad_weight) + for bf16/fp16 a transient
``V * H * (itemsize + 4)`` (the chunk's weight gradient before it is added in fp32). ``chunk`` by default is the
largest power of two with ``chunk * V * itemsize <= 256 MiB`` (see ``auto_chunk_tokens``).
Non-contiguous hidden/weight are copied to contiguous explicitly (one copy of the input).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import check_inputs

CHUNK_BYTES = 256 * 2**20  # bound of the [chunk, V] logits buffer chosen by auto_chunk_tokens
BLOCK_V = 1024  # vocab columns per loop step of one program


# ---- kernel -------------------------------------------------------------------------------------------------------
@triton.jit
def _ce_rows_kernel(Logits, Labels, Loss, stride_row, V, z_loss, ignore_index,
                    BLOCK: tl.constexpr, HAS_Z: tl.constexpr, WRITE_GRAD: tl.constexpr):
    """One program per row of a ``[c, V]`` logits chunk: row loss (fp32) to Loss, grad_logits in place (opt.)."""
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride passes 2^31 at 128K x 151936
    base = Logits + row * stride_row
    label = tl.load(Labels + row)
    valid = label != ignore_index
    safe_label = tl.where(valid, label, 0)
    cols = tl.arange(0, BLOCK)

    # Pass 1: online max and sum of exp over the vocabulary, all in fp32.
    m = -float("inf")
    d = 0.0
    for start in range(0, V, BLOCK):
        offs = start + cols
        x = tl.load(base + offs, mask=offs < V, other=-float("inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    lse = m + tl.log(d)
    target = tl.load(base + safe_label).to(tl.float32)  # read before pass 2 overwrites it
    loss = lse - target
    scale = 1.0
    if HAS_Z:
        loss += z_loss * lse * lse
        scale = 1.0 + 2.0 * z_loss * lse  # d(z lse^2)/dx = 2 z lse softmax
    tl.store(Loss + row, tl.where(valid, loss, 0.0))

    # Pass 2: grad_logits = softmax * scale - onehot(label), zero on ignored rows, written over the logits.
    if WRITE_GRAD:
        keep = tl.where(valid, 1.0, 0.0)
        for start in range(0, V, BLOCK):
            offs = start + cols
            mask = offs < V
            x = tl.load(base + offs, mask=mask, other=0.0).to(tl.float32)
            g = tl.exp(x - lse) * scale - tl.where(offs == safe_label, 1.0, 0.0)
            tl.store(base + offs, (g * keep).to(Logits.dtype.element_ty), mask=mask)


# ---- host ---------------------------------------------------------------------------------------------------------
def auto_chunk_tokens(vocab_size: int, dtype: torch.dtype = torch.float32, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Largest power of two with ``chunk x vocab x itemsize <= chunk_bytes`` (at least 16)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    chunk = 16
    while chunk * 2 * vocab_size * itemsize <= chunk_bytes:
        chunk *= 2
    return chunk


def _check(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden {tuple(hidden.shape)} must be [N, H] and weight {tuple(weight.shape)} [V, H]")
    if labels.shape != hidden.shape[:1]:
        raise ValueError(f"labels {tuple(labels.shape)} must be [N] for hidden {tuple(hidden.shape)}")
    check_inputs("linear cross-entropy", {"hidden": hidden, "weight": weight},
                 hint="; cast them first (e.g. weight.to(hidden.dtype))")
    if labels.dtype != torch.int64:
        raise ValueError(f"labels must be int64, got {labels.dtype}; use labels.long()")
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= weight.shape[0]))
    if bad.any():
        raise ValueError(f"label {int(labels[bad][0])} is outside the vocabulary [0, {weight.shape[0]}) "
                         f"and is not the ignore index {ignore_index}")


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_tokens, z_loss, ignore_index, need_grad):
        n = hidden.shape[0]
        v = weight.shape[0]
        loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_grad else None
        # fp32 accumulation across chunks: bf16 accumulation of the weight gradient drifts.
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_grad else None
        row_loss = torch.empty(min(chunk_tokens, n), dtype=torch.float32, device=hidden.device)
        for start in range(0, n, chunk_tokens):
            h = hidden[start:start + chunk_tokens]  # [c, H]
            y = labels[start:start + chunk_tokens].contiguous()  # [c]
            c = h.shape[0]
            logits = h @ weight.t()  # [c, V] input dtype, becomes grad_logits in place
            _ce_rows_kernel[(c,)](logits, y, row_loss, logits.stride(0), v, float(z_loss), ignore_index,
                                  BLOCK=BLOCK_V, HAS_Z=z_loss > 0, WRITE_GRAD=need_grad)
            loss_sum += row_loss[:c].sum()
            if need_grad:
                torch.mm(logits, weight, out=grad_hidden[start:start + c])
                if logits.dtype == torch.float32:
                    grad_weight.addmm_(logits.t(), h)
                else:  # chunk product in the input dtype (cuBLAS accumulates in fp32), summed over chunks in fp32
                    grad_weight += (logits.t() @ h).float()
            del logits
        if need_grad:
            ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return loss_sum

    @staticmethod
    def backward(ctx, grad_out):
        grad_hidden, grad_weight = ctx.saved_tensors
        scale = grad_out.to(torch.float32)
        dh = grad_hidden * scale.to(grad_hidden.dtype) if ctx.needs_input_grad[0] else None
        dw = (grad_weight * scale).to(ctx.weight_dtype) if ctx.needs_input_grad[1] else None
        return dh, dw, None, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_tokens: int = 0,
                         z_loss: float = 0.0, ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum and count of cross-entropy of ``hidden @ weight.T`` against labels, fused in token chunks.

    hidden ``[N, H]``, weight ``[V, H]`` (both fp32, bf16 or fp16), labels ``[N]`` int64 (``ignore_index`` ignored).
    chunk_tokens: tokens per chunk (0: ``auto_chunk_tokens``); z_loss > 0 adds ``z_loss * lse^2`` per token.
    Returns (loss sum fp32 scalar, count int64 scalar); gradients equal plain cross-entropy's.
    Non-contiguous hidden/weight are made contiguous (a copy).
    """
    _check(hidden, weight, labels, ignore_index)
    if chunk_tokens < 0:
        raise ValueError(f"chunk_tokens must be >= 0 (0 = automatic), got {chunk_tokens}")
    if z_loss < 0:
        raise ValueError(f"z_loss must be >= 0, got {z_loss}")
    chunk_tokens = chunk_tokens or auto_chunk_tokens(weight.shape[0], hidden.dtype)
    need_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    count = (labels != ignore_index).sum()
    if hidden.shape[0] == 0:
        return (hidden.sum() * 0.0 + weight.sum() * 0.0).float(), count
    loss_sum = _FusedLinearCrossEntropy.apply(hidden.contiguous(), weight.contiguous(), labels, chunk_tokens,
                                              float(z_loss), ignore_index, need_grad)
    return loss_sum, count

