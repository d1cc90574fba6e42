"""Linear + cross-entropy over token chunks: logits for all tokens never exist at once.

At 128K tokens a 151,936-word vocabulary gives 19.5G logits (78 GB in fp32). This torch path walks the tokens in
chunks; for each chunk it computes the logits, the loss and, when gradients are wanted, the gradients of hidden and
weight right away (as Liger's fused linear-CE does), so backward only scales them: three matmuls in all, as plain
cross-entropy, and at most about three ``[chunk, V]`` fp32-sized buffers alive at a time.
"""
from __future__ import annotations

import torch

IGNORE_INDEX = -100
_CHUNK_BYTES = 256 * 2**20


def tokens_per_chunk(width: int, minimum: int = 16, budget_bytes: int = _CHUNK_BYTES) -> int:
    """Largest power of two (at least ``minimum``) with ``tokens x width x 4 B <= budget_bytes``: the token chunk
    whose fp32 ``[tokens, width]`` intermediate stays within the budget (256 MiB by default)."""
    chunk = minimum
    while chunk * 2 * width * 4 <= budget_bytes:
        chunk *= 2
    return chunk


def auto_chunk_tokens(vocab_size: int) -> int:
    """Largest power of two with ``chunk x vocab x 4 B <= 256 MiB`` (at least 16)."""
    return tokens_per_chunk(vocab_size)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_tokens, need_grad):
        n, _v = hidden.shape[0], weight.shape[0]
        loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_grad else None
        # fp32 accumulation across chunks: bf16 accumulation of the weight gradient drifts.
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_grad else None
        for start in range(0, n, chunk_tokens):
            h = hidden[start:start + chunk_tokens]  # [c, H]
            y = labels[start:start + chunk_tokens]  # [c]
            logits = (h @ weight.t()).float()  # [c, V] fp32
            valid = y != IGNORE_INDEX
            safe_y = torch.where(valid, y, 0)
            lse = torch.logsumexp(logits, dim=-1)  # [c]
            target_logit = logits.gather(1, safe_y.unsqueeze(1)).squeeze(1)
            loss_sum += ((lse - target_logit) * valid).sum()
            if need_grad:
                chunk_grads(logits, lse, safe_y, torch.ones_like(valid), valid, h, weight,
                            grad_hidden[start:start + chunk_tokens], grad_weight)
            del logits
        if need_grad:
            ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return loss_sum

    @staticmethod
    def backward(ctx, grad_out):
        return (*scaled_grads(ctx, grad_out), None, None, None)


def chunk_grads(logits: torch.Tensor, lse: torch.Tensor, target: torch.Tensor, has_target: torch.Tensor,
                valid: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, grad_hidden: torch.Tensor,
                grad_weight: torch.Tensor) -> None:
    """Gradients of one token chunk of the summed cross-entropy, computed in place of ``logits``.

    logits ``[c, V']`` fp32 (all or a vocab shard of the columns), lse ``[c]`` of the full row, target ``[c]`` a
    column index into these logits, has_target ``[c]`` bool: whether the target column is among them (vocab
    parallel), valid ``[c]`` bool: rows that count. d(loss)/d(logits) = softmax - onehot(target), 0 on invalid rows;
    writes ``grad_hidden [c, H] = grad_logits @ weight`` and adds ``grad_logits^T h`` to the fp32 ``grad_weight``."""
    grad_logits = logits.sub_(lse.unsqueeze(1)).exp_()
    grad_logits.scatter_add_(1, target.unsqueeze(1), -has_target.to(grad_logits.dtype).unsqueeze(1))
    grad_logits.mul_(valid.unsqueeze(1))
    grad_logits = grad_logits.to(h.dtype)
    grad_hidden.copy_(grad_logits @ weight)
    if grad_logits.dtype == torch.float32:
        grad_weight.addmm_(grad_logits.t(), h)
    else:  # fp32 accumulation across chunks: bf16 accumulation of the weight gradient drifts
        grad_weight += (grad_logits.t() @ h).float()


def scaled_grads(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward of a loss whose forward saved (grad_hidden, fp32 grad_weight): scale both by the upstream grad."""
    grad_hidden, grad_weight = ctx.saved_tensors
    scale = grad_out.to(torch.float32)
    return grad_hidden * scale.to(grad_hidden.dtype), (grad_weight * scale).to(ctx.weight_dtype)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_tokens: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum and count of cross-entropy of ``hidden @ weight.T`` against aligned labels, computed in token chunks.

    hidden ``[N, H]`` (fp32/bf16), weight ``[V, H]``, labels ``[N]`` int64 with -100 ignored.
    Returns (loss sum fp32 scalar, count of target tokens int64 scalar). Gradients equal plain cross-entropy's.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden {tuple(hidden.shape)} must be [N, H] and weight {tuple(weight.shape)} [V, H]")
    if labels.shape != hidden.shape[:1]:
        raise ValueError(f"labels {tuple(labels.shape)} must be [N] for hidden {tuple(hidden.shape)}")
    bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= weight.shape[0]))
    if bad.any():
        raise ValueError(f"label {int(labels[bad][0])} is outside the vocabulary [0, {weight.shape[0]}) "
                         f"and is not the ignore index {IGNORE_INDEX}")
    chunk_tokens = chunk_tokens or auto_chunk_tokens(weight.shape[0])
    need_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    loss_sum = _ChunkedLinearCrossEntropy.apply(hidden, weight, labels, chunk_tokens, need_grad)
    count = (labels != IGNORE_INDEX).sum()
    return loss_sum, count
