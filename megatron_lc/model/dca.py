"""Dual Chunk Attention (DCA): training-free length extrapolation, as Qwen2 uses with YaRN to reach 131K and more.

With chunk period ``C = chunk_size - local_size``, keys sit at position ``j % C`` (what the KV cache stores) and a
query at absolute position i takes one of three positions by where the key is (../shared/specs/positions.md):
- same chunk: ``i % C``, causal (``intra``);
- the chunk before: ``min(i % C + C, chunk_size)``, all keys visible (``succ``);
- any earlier chunk: ``min(2C - 1, chunk_size)``, all keys visible (``inter``).
Every relative distance then lies in [0, chunk_size], the range the model was trained on. The three attentions
return their log-sum-exp and merge in fp32 into one softmax over all keys. Inference only (prefill and KV-cache
decode), for contiguous positions.
"""
from __future__ import annotations

from typing import Any

import torch

from ..ops.attention_lse import block_forward, merge_into

ROLES = ("key", "intra", "succ", "inter")  # the leading dim of the cos/sin the attention layers receive


def check_dca(dca: dict[str, Any] | None) -> dict[str, int] | None:
    """Validate ``{chunk_size, local_size}`` (HF ``dual_chunk_attention_config`` keys; others are kept) and return
    it, or None. Raises ValueError naming the bad value."""
    if dca is None:
        return None
    if not isinstance(dca, dict) or "chunk_size" not in dca or "local_size" not in dca:
        raise ValueError(f"model.dual_chunk_attention needs chunk_size and local_size, e.g. {{chunk_size: 24576, "
                         f"local_size: 2048}}; got {dca!r}")
    chunk, local = dca["chunk_size"], dca["local_size"]
    for name, value in (("chunk_size", chunk), ("local_size", local)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"model.dual_chunk_attention {name} must be a positive integer, got {value!r}")
    if local >= chunk:
        raise ValueError(f"model.dual_chunk_attention local_size={local} must be smaller than chunk_size={chunk} "
                         f"(the chunk period is chunk_size - local_size)")
    return dict(dca)


def role_positions(positions: torch.Tensor, chunk_size: int, local_size: int) -> torch.Tensor:
    """Absolute positions ``[B, S]`` int64 -> ``[4, B, S]`` int64: the position of the keys and of the queries in
    their intra, succ and inter roles (ROLES order)."""
    period = chunk_size - local_size
    local = positions % period
    return torch.stack([local, local, (local + period).clamp(max=chunk_size),
                        torch.full_like(positions, min(2 * period - 1, chunk_size))])


def relative_positions(seq_len: int, chunk_size: int, local_size: int) -> torch.Tensor:
    """The DCA distance (query position - key position) of every causal pair, ``[S, S]`` int64, -1 above the
    diagonal: what the three-part attention computes, as one matrix (for tests and docs)."""
    pos = role_positions(torch.arange(seq_len).unsqueeze(0), chunk_size, local_size)[:, 0]  # [4, S]
    period = chunk_size - local_size
    chunk = torch.arange(seq_len) // period
    gap = chunk.unsqueeze(1) - chunk.unsqueeze(0)  # query chunk - key chunk
    query = torch.where(gap == 0, pos[1].unsqueeze(1), torch.where(gap == 1, pos[2].unsqueeze(1), pos[3].unsqueeze(1)))
    distance = query - pos[0].unsqueeze(0)
    causal = torch.arange(seq_len).unsqueeze(1) >= torch.arange(seq_len).unsqueeze(0)
    return torch.where(causal, distance, torch.full_like(distance, -1))


def dca_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, chunk_size: int, local_size: int,
                  softmax_scale: float | None = None) -> torch.Tensor:
    """Causal DCA of queries at absolute positions ``start .. start+S-1`` over keys ``0 .. start+S-1``.

    q: ``[3, B, S, H, D]``, the queries rotated at their intra, succ and inter positions; k, v: ``[B, start+S, H_kv,
    D]``, keys rotated at ``j % C`` (the KV cache holds them so). Returns ``[B, S, H, D]`` in q.dtype.
    """
    period = chunk_size - local_size
    s = q.shape[2]
    if k.shape[1] != start + s:
        raise ValueError(f"DCA wants the keys of every position up to the last query: {start + s}, got {k.shape[1]}")
    out = torch.empty(q.shape[1:], dtype=torch.float32, device=q.device)
    lse = torch.empty(q.shape[1], q.shape[3], s, dtype=torch.float32, device=q.device)
    first = start // period
    for n in range(first, (start + s - 1) // period + 1):
        a, b = max(start, n * period), min(start + s, (n + 1) * period)  # this chunk's queries, absolute
        rows = slice(a - start, b - start)
        # (role, key range, causal): intra is bottom-right aligned, so query i sees keys up to i
        parts = [(0, n * period, b, True)]
        if n >= 1:
            parts.append((1, (n - 1) * period, n * period, False))
        if n >= 2:
            parts.append((2, 0, (n - 1) * period, False))
        for i, (role, lo, hi, causal) in enumerate(parts):
            block_out, block_lse = block_forward(q[role, :, rows], k[:, lo:hi], v[:, lo:hi], causal=causal,
                                                 softmax_scale=softmax_scale)
            if i == 0:
                out[:, rows], lse[:, :, rows] = block_out, block_lse
            else:
                merge_into(out[:, rows], lse[:, :, rows], block_out, block_lse)
    return out.to(q.dtype)
