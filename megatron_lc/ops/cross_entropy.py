"""Linear + cross-entropy over token chunks: logits for all tokens never exist at once.

At 128K tokens a 151,936-word vocabulary gives 19.5G logits (78 GB in fp32). This torch path walks the tokens in
chunks; for each chunk it computes the logits, the loss and, when gradients are wanted, the gradients of hidden and
weight right away (as Liger's fused linear-CE does), so backward only scales them: three matmuls in all, as plain
cross-entropy, and at most about three ``[chunk, V]`` fp32-sized buffers alive at a time.

The chunk loop (``chunked_loss_sum``) also serves the vocab-parallel loss of tensor parallelism: there each rank
holds a slice of the vocabulary's rows, and a ``row_stats`` hook all-reduces the row max, the sum of exponentials
and the target logit over the TP group.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

IGNORE_INDEX = -100  # labels that take no loss (as F.cross_entropy's default): the one definition in megatron_lc
_CHUNK_BYTES = 256 * 2**20

# (logits [c, V'] fp32, target [c] column index into them, has_target [c] bool) -> (lse [c], target logit [c]) of
# the full rows; it may shift each row of logits in place by a constant, and then returns lse and target logit of
# the shifted rows (the softmax is the same).
RowStats = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


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


def local_row_stats(logits: torch.Tensor, target: torch.Tensor,
                    has_target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``RowStats`` when the logits hold the whole vocabulary: logsumexp ``[c]`` and the target logit ``[c]``."""
    return torch.logsumexp(logits, dim=-1), logits.gather(1, target.unsqueeze(1)).squeeze(1)


def check_loss_inputs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> None:
    """hidden ``[N, H]``, weight ``[V, H]``, labels ``[N]`` with values in [0, V) or IGNORE_INDEX; else ValueError."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden {tuple(hidden.shape)} must be [N, H] and weight {tuple(weight.shape)} [V, H]")
    if labels.shape != hidden.shape[:1]:
        raise ValueError(f"labels {tuple(labels.shape)} must be [N] for hidden {tuple(hidden.shape)}")
    vocab = weight.shape[0]
    bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= vocab))
    if bad.any():
        raise ValueError(f"label {int(labels[bad][0])} is outside the vocabulary [0, {vocab}) "
                         f"and is not the ignore index {IGNORE_INDEX}")


def _chunk_grads(logits: torch.Tensor, lse: torch.Tensor, target: torch.Tensor, has_target: torch.Tensor,
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


def _chunk_loop(hidden, weight, labels, chunk_tokens, vocab_start, row_stats, need_grad):
    """(fp32 loss sum, (grad_hidden, fp32 grad_weight) of the summed loss, or () without ``need_grad``)."""
    v = weight.shape[0]
    loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad_hidden = torch.empty_like(hidden) if need_grad else None
    # fp32 accumulation across chunks: bf16 accumulation of the weight gradient drifts.
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_grad else None
    for start in range(0, hidden.shape[0], chunk_tokens):
        h = hidden[start:start + chunk_tokens]  # [c, H]
        y = labels[start:start + chunk_tokens]  # [c]
        logits = (h @ weight.t()).float()  # [c, V'] fp32: V' = V, or this rank's vocabulary rows
        valid = y != IGNORE_INDEX
        has_target = valid & (y >= vocab_start) & (y < vocab_start + v)  # the target's row is in weight
        target = torch.where(has_target, y - vocab_start, 0)
        lse, target_logit = row_stats(logits, target, has_target)
        loss_sum += ((lse - target_logit) * valid).sum()
        if need_grad:
            _chunk_grads(logits, lse, target, has_target, valid, h, weight,
                         grad_hidden[start:start + chunk_tokens], grad_weight)
        del logits
    return loss_sum, ((grad_hidden, grad_weight) if need_grad else ())


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """The loss sum; its gradients are computed in forward, chunk by chunk, and backward only scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_tokens, vocab_start, row_stats, need_grad):
        loss_sum, grads = _chunk_loop(hidden, weight, labels, chunk_tokens, vocab_start, row_stats, need_grad)
        ctx.save_for_backward(*grads)
        ctx.weight_dtype = weight.dtype
        return loss_sum

    @staticmethod
    def backward(ctx, grad_out):
        scale = grad_out.to(torch.float32)
        grad_hidden, grad_weight = ctx.saved_tensors
        return (grad_hidden * scale.to(grad_hidden.dtype), (grad_weight * scale).to(ctx.weight_dtype),
                None, None, None, None, None)


def chunked_loss_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_tokens: int, *,
                     vocab_start: int = 0, row_stats: RowStats = local_row_stats) -> torch.Tensor:
    """fp32 scalar sum of cross-entropy of ``hidden @ weight.T`` over the tokens, in chunks of ``chunk_tokens``
    (> 0); labels are not validated here (``check_loss_inputs``).

    hidden ``[N, H]`` (fp32/bf16), weight ``[V', H]``: all V vocabulary rows, or (vocab parallel) rows
    ``vocab_start .. vocab_start + V'`` with a ``row_stats`` that reduces over the ranks holding the others; labels
    ``[N]`` int64 global ids. Differentiable in hidden and weight (gradients computed in forward, per chunk)."""
    need_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, labels, chunk_tokens, vocab_start, row_stats, need_grad)


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
    check_loss_inputs(hidden, weight, labels)
    loss_sum = chunked_loss_sum(hidden, weight, labels, chunk_tokens or auto_chunk_tokens(weight.shape[0]))
    return loss_sum, (labels != IGNORE_INDEX).sum()
