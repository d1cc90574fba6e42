"""Ulysses sequence parallelism: all-to-all from sequence-sharded to head-sharded attention and back.

Each of the W ranks holds a contiguous 1/W of the sequence with all heads; one all-to-all gives every rank the whole
sequence for H/W heads, attention runs locally (or through ``inner``: a ring over another group, for the hybrid
2-D mode), and the inverse all-to-all returns the output to sequence sharding. One collective per direction for
q, k and v together (and one for the output) instead of a ring of P2P steps: cheap on fast intra-node links, but
the degree is limited by the head count.

Layout of a message: ``all_to_all_single`` splits dim 0 of a contiguous tensor across ranks, so what goes to rank j
is slot j of a ``[W, B, S_local, heads_per_rank, D]`` buffer. Going to heads, slot j holds this rank's tokens for
rank j's heads; what arrives in slot j came from rank j, i.e. holds sequence piece j, so flattening (source rank,
S_local) gives the full sequence in global order.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from .. import ops


def _kv_plan(heads: int, kv_heads: int, world: int) -> tuple[int, int]:
    """(KV heads per rank, replicas per KV head) for a Ulysses degree ``world``; ValueError if impossible."""
    if heads % world:
        divisors = [d for d in range(1, heads + 1) if heads % d == 0]
        raise ValueError(f"Ulysses degree W={world} does not divide the H={heads} query heads: use a Ulysses/CP "
                         f"degree that divides the heads (one of {divisors}), or ring attention")
    if kv_heads % world == 0:
        return kv_heads // world, 1
    if world % kv_heads == 0:
        # Rank j's query heads [j*H/W, (j+1)*H/W) all use KV head j // (W/H_kv) (query head h uses KV head
        # h // (H/H_kv), and H/W divides H/H_kv), so W/H_kv copies of each KV head, one per rank, suffice:
        # never H copies.
        return 1, world // kv_heads
    raise ValueError(f"Ulysses degree W={world} and H_kv={kv_heads} KV heads: one must divide the other (KV heads "
                     f"are scattered when W divides H_kv, replicated W/H_kv times when H_kv divides W); use such a "
                     f"degree, or ring attention, which never splits heads")


def _pack_to_heads(x: torch.Tensor, dst: torch.Tensor, world: int, replicas: int) -> None:
    """Write ``x`` ``[B, S, H_x, D]`` into ``dst`` ``[W, B, S, H_x*replicas/W, D]`` (slot j: rank j's heads)."""
    b, s, h, d = x.shape
    if replicas == 1:
        dst.copy_(x.unflatten(2, (world, h // world)).permute(2, 0, 1, 3, 4))
    else:  # slot j = kv * replicas + i gets KV head kv: broadcast in the copy, no repeat_interleave buffer
        dst.view(h, replicas, b, s, 1, d).copy_(x.permute(2, 0, 1, 3)[:, None, :, :, None, :])


def _unpack_from_heads(recv: torch.Tensor, heads: int, replicas: int) -> torch.Tensor:
    """Inverse of :func:`_pack_to_heads` for gradients: ``[W, B, S, h, D]`` -> ``[B, S, heads, D]``; replicas of a
    KV head are summed (each rank's copy got gradient only from that rank's query heads)."""
    _, b, s, _, d = recv.shape
    if replicas == 1:  # a copy: the destination interleaves heads from every source rank
        return recv.permute(1, 2, 0, 3, 4).reshape(b, s, heads, d)
    return recv.view(heads, replicas, b, s, d).sum(1).permute(1, 2, 0, 3)


def _gather_sequence(recv: torch.Tensor) -> torch.Tensor:
    """``[W (source rank), B, S, h, D]`` -> ``[B, W*S, h, D]``: a view for B == 1, else a copy (batch is outermost
    in the result, source rank outermost in the buffer)."""
    world, b, s, h, d = recv.shape
    return recv.transpose(0, 1).reshape(b, world * s, h, d)


class _SeqToHeads(torch.autograd.Function):
    """q, k, v sequence-sharded with all heads -> full sequence with this rank's heads, in one all-to-all."""

    @staticmethod
    def forward(ctx, q, k, v, group, replicas):
        world = dist.get_world_size(group)
        b, s, h, d = q.shape
        hq, hkv = h // world, k.shape[2] * replicas // world
        # The pack is the one unavoidable copy of this direction: rank must be outermost for all_to_all_single.
        send = q.new_empty(world, b, s, hq + 2 * hkv, d)
        _pack_to_heads(q, send[..., :hq, :], world, 1)
        _pack_to_heads(k, send[..., hq:hq + hkv, :], world, replicas)
        _pack_to_heads(v, send[..., hq + hkv:, :], world, replicas)
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=group)
        ctx.group, ctx.replicas, ctx.heads = group, replicas, (h, k.shape[2])
        # Head slices of one buffer (strided like a fused qkv projection's output): no copy per tensor.
        full = _gather_sequence(recv)
        return full[:, :, :hq], full[:, :, hq:hq + hkv], full[:, :, hq + hkv:]

    @staticmethod
    def backward(ctx, dq, dk, dv):
        world = dist.get_world_size(ctx.group)
        b, ws, hq, d = dq.shape
        hkv = dk.shape[2]
        # Inverse message: slot j = the gradient of sequence piece j (rank j's tokens) for our heads.
        send = dq.new_empty(world, b, ws // world, hq + 2 * hkv, d)
        for grad, lo, hi in ((dq, 0, hq), (dk, hq, hq + hkv), (dv, hq + hkv, hq + 2 * hkv)):
            send[..., lo:hi, :].copy_(grad.unflatten(1, (world, ws // world)).transpose(0, 1))
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=ctx.group)
        h, h_kv = ctx.heads
        return (_unpack_from_heads(recv[..., :hq, :], h, 1),
                _unpack_from_heads(recv[..., hq:hq + hkv, :], h_kv, ctx.replicas),
                _unpack_from_heads(recv[..., hq + hkv:, :], h_kv, ctx.replicas), None, None)


def _heads_to_seq(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """``[B, W*S, h, D]`` (all tokens, this rank's heads) -> ``[B, S, W*h, D]`` (this rank's tokens, all heads)."""
    world = dist.get_world_size(group)
    b, ws, h, d = x.shape
    # Copy in: rank outermost (kernels' outputs are [B, H, S, D] underneath, so this copy is needed even for B == 1).
    send = x.unflatten(1, (world, ws // world)).transpose(0, 1).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    # Copy out: slot j holds head group j, which must end up inside the head dim next to the other groups.
    return recv.permute(1, 2, 0, 3, 4).reshape(b, ws // world, world * h, d)


def _seq_to_heads(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Inverse of :func:`_heads_to_seq` (its backward): ``[B, S, W*h, D]`` -> ``[B, W*S, h, D]``."""
    world = dist.get_world_size(group)
    send = x.unflatten(2, (world, x.shape[2] // world)).permute(2, 0, 1, 3, 4).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return _gather_sequence(recv)


class _HeadsToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _heads_to_seq(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _seq_to_heads(grad, ctx.group), None


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: dist.ProcessGroup, *,
                      causal: bool = True, softmax_scale: float | None = None,
                      inner: Callable[..., torch.Tensor] | None = None) -> torch.Tensor:
    """Sequence-parallel (DeepSpeed-Ulysses) attention over the W ranks of ``group``; differentiable in q, k, v.

    Args:
        q: ``[B, S_local, H, D]``, this rank's contiguous piece of the sequence (rank j of ``group`` holds tokens
            ``[j*S_local, (j+1)*S_local)``), fp32 or bf16. H must be divisible by W.
        k, v: ``[B, S_local, H_kv, D]``, same dtype; H divisible by H_kv, and W dividing H_kv (KV heads are
            scattered like query heads) or H_kv dividing W (each KV head is replicated W/H_kv times, never to H).
        group: the Ulysses process group (every rank of it must call with the same shapes).
        causal, softmax_scale: as in ``megatron_lc.ops.attention`` (scale defaults to D ** -0.5).
        inner: called exactly as ``inner(q, k, v, causal=causal, softmax_scale=softmax_scale)`` with q
            ``[B, W*S_local, H/W, D]`` and k/v ``[B, W*S_local, H_kv/W or 1, D]`` (the full sequence of this rank's
            heads, strided views with unit stride in D) and must return ``[B, W*S_local, H/W, D]``; default
            ``megatron_lc.ops.attention``. The hybrid mode passes ring attention over a second group here.

    Returns:
        ``[B, S_local, H, D]`` in q.dtype: this rank's tokens of full (causal or not) attention over the sequence.

    Raises:
        ValueError: bad shapes or head counts, on every rank and before any communication, so no rank hangs.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"ulysses attention wants 4-D q [B, S_local, H, D] and k, v [B, S_local, H_kv, D]; got "
                         f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"ulysses attention wants q [B, S_local, H, D] and k, v [B, S_local, H_kv, D] with the "
                         f"same B, S_local and D; got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads H={q.shape[2]} are not divisible by KV heads H_kv={k.shape[2]}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype (they travel in one message); got {q.dtype}, {k.dtype}, "
                         f"{v.dtype}")
    if group is None:
        raise ValueError("pass the Ulysses process group explicitly (e.g. mesh['cp'].get_group())")
    world = dist.get_world_size(group)
    _, replicas = _kv_plan(q.shape[2], k.shape[2], world)
    inner = inner or ops.attention
    if world == 1:
        return inner(q, k, v, causal=causal, softmax_scale=softmax_scale)
    q_h, k_h, v_h = _SeqToHeads.apply(q, k, v, group, replicas)
    out = inner(q_h, k_h, v_h, causal=causal, softmax_scale=softmax_scale)
    return _HeadsToSeq.apply(out, group)
