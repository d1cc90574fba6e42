"""Ulysses sequence parallelism: all-to-all from sequence-sharded to head-sharded attention and back.

Each of the W ranks holds a contiguous 1/W of the sequence with all heads; one all-to-all gives every rank the whole
sequence for H/W heads, attention runs locally (or through ``inner``: a ring over another group, for the hybrid
2-D mode), and the inverse all-to-all returns the output to sequence sharding. Two all-to-alls per direction
instead of a ring of P2P steps: cheap on fast intra-node links, but the degree is limited by the head count.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

from .. import ops


def _all_to_all(x: torch.Tensor, group: dist.ProcessGroup, to_heads: bool) -> torch.Tensor:
    """to_heads: ``[B, S, H, D]`` (this rank's tokens, all heads) -> ``[B, W*S, H/W, D]`` (all tokens, this rank's
    heads); else the inverse. The pack before and the unpack after the collective are copies: all_to_all_single
    splits dim 0, and the destination layout interleaves what arrives from each rank."""
    world = dist.get_world_size(group)
    if to_heads:
        b, s, h, d = x.shape
        send = x.reshape(b, s, world, h // world, d).permute(2, 0, 1, 3, 4).contiguous()  # [W, B, S, H/W, D]
    else:
        b, ws, hw, d = x.shape
        send = x.reshape(b, world, ws // world, hw, d).permute(1, 0, 2, 3, 4).contiguous()  # [W, B, S, H/W, D]
    received = torch.empty_like(send)  # [W (source rank), B, S, H/W, D]
    dist.all_to_all_single(received, send, group=group)
    if to_heads:  # source rank = which piece of the sequence
        return received.permute(1, 0, 2, 3, 4).reshape(b, world * s, h // world, d)
    return received.permute(1, 2, 0, 3, 4).reshape(b, ws // world, world * hw, d)  # source rank = head group


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, to_heads):
        ctx.group, ctx.to_heads = group, to_heads
        return _all_to_all(x, group, to_heads)

    @staticmethod
    def backward(ctx, grad):
        return _all_to_all(grad.contiguous(), ctx.group, not ctx.to_heads), None, None


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: dist.ProcessGroup, *,
                      causal: bool = True, softmax_scale: float | None = None,
                      inner: Callable[..., torch.Tensor] | None = None) -> torch.Tensor:
    """Sequence-parallel attention over ``group``. q ``[B, S_local, H, D]``, k/v ``[B, S_local, H_kv, D]``: this
    rank's contiguous piece of the sequence (rank j holds tokens [j*S_local, (j+1)*S_local)) -> ``[B, S_local, H, D]``.

    ``inner(q, k, v, causal=..., softmax_scale=...)`` attends the whole sequence for this rank's heads (default:
    ``megatron_lc.ops.attention``). KV heads are scattered when W divides H_kv, else each is repeated only W/H_kv
    times (never up to H), so each rank gets the one KV head its query heads use.
    """
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"ulysses attention wants q [B, S_local, H, D] and k, v [B, S_local, H_kv, D]; got q "
                         f"{tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    world = dist.get_world_size(group)
    heads, kv_heads = q.shape[2], k.shape[2]
    if heads % world:
        raise ValueError(f"Ulysses degree {world} does not divide the {heads} query heads: use a degree among "
                         f"{[d for d in range(1, heads + 1) if heads % d == 0]}, or ring attention")
    if kv_heads % world:
        if world % kv_heads or heads % kv_heads:
            raise ValueError(f"Ulysses degree {world} and {kv_heads} KV heads: one must divide the other")
        k = k.repeat_interleave(world // kv_heads, dim=2)
        v = v.repeat_interleave(world // kv_heads, dim=2)
    inner = inner or ops.attention
    out = inner(_AllToAll.apply(q, group, True), _AllToAll.apply(k, group, True), _AllToAll.apply(v, group, True),
                causal=causal, softmax_scale=softmax_scale)
    return _AllToAll.apply(out, group, False)
