"""Exact attention over a sequence sharded across a context-parallel group: ring and all-gather variants.

Both take this rank's shard (zigzag or contiguous layout, see cp_sharding.py) of q ``[B, S_local, H, D]`` and k/v
``[B, S_local, H_kv, D]`` and return this rank's shard of the output ``[B, S_local, H, D]``.

- ``ring_attention``: K/V blocks travel around the ring with asynchronous P2P, the next transfer overlapping the
  current block's compute; partial outputs merge by log-sum-exp in fp32. Backward is its own ring: dK/dV
  accumulators (fp32) travel with K/V, and every block's share of the gradient comes from the global output and
  lse saved by forward, so the forward is never re-run. Each step computes only the visible part of a block.
- ``allgather_attention`` (Llama-3 style): K/V are all-gathered once, each rank attends its queries to the keys
  they can see; backward re-gathers K/V (nothing full-length is kept between forward and backward) and
  reduce-scatters dK/dV. Fewer, larger messages.
K/V always travel at the KV-head count: GQA heads are never repeated. ``group`` may also be a stand-in with
``rank``, ``world`` and ``ring_comm(tag)`` (simulated_ring.py: one rank of a ring measured on one device).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..ops.attention_lse import block_backward, block_forward, merge_into
from .comm import all_gather_into, reduce_scatter_into
from .cp_sharding import chunk_ids

_KV_TAG, _GRAD_TAG = 11, 12
_ALL = slice(None)
_BACKWARD_QUERY_PIECES = 4  # the backward's off-diagonal blocks run a quarter of the local queries at a time


class RingComm:
    """Send to the next rank of the group and receive from the previous one, asynchronously (as ring-flash-attn's
    ``utils.RingComm``): ``start`` posts the sends and receives, ``wait`` completes them.

    Buffers ping-pong: a block we received and have sent on (``start(..., recycle=True)``) receives the block after
    next. Two buffers per tensor then serve the whole ring, where fresh ones would cost a third: the old block is
    alive until its send completes, and gloo holds a sent tensor until the next send. ``group``: the ring's
    process group; ``tag``: the P2P tag that keeps this communicator's traffic (K/V, or dK/dV) apart.
    """

    def __init__(self, group: dist.ProcessGroup, tag: int):
        self.group, self.tag = group, tag
        self.requests: list = []
        self.sending: list[torch.Tensor] = []
        self.recycle = False
        self.spare: list[torch.Tensor] | None = None
        self._connect()

    def _connect(self) -> None:
        rank, world = dist.get_rank(self.group), dist.get_world_size(self.group)
        self.next = dist.get_global_rank(self.group, (rank + 1) % world)
        self.prev = dist.get_global_rank(self.group, (rank - 1) % world)

    def start(self, tensors: list[torch.Tensor], recycle: bool) -> list[torch.Tensor]:
        """Start sending ``tensors``; return the buffers the previous rank's tensors arrive in (valid after wait).
        ``recycle``: the caller will not touch ``tensors`` after wait(), so they may receive a later block."""
        self.sending = [t.contiguous() for t in tensors]  # kept alive until wait(): the transfer reads them
        spare, self.spare = self.spare, None
        if spare is None or any((r.shape, r.dtype) != (t.shape, t.dtype) for r, t in zip(spare, self.sending)):
            spare = [torch.empty_like(t) for t in self.sending]
        self.requests, self.recycle = self._transfer(spare), recycle
        return spare

    def _transfer(self, receive: list[torch.Tensor]) -> list:
        """Start sending ``self.sending`` to the next rank and receiving into ``receive``; returns the requests."""
        ops = []
        for t, r in zip(self.sending, receive):
            ops.append(dist.P2POp(dist.isend, t, self.next, self.group, self.tag))
            ops.append(dist.P2POp(dist.irecv, r, self.prev, self.group, self.tag))
        return dist.batch_isend_irecv(ops)

    def wait(self) -> None:
        """Block until the started transfer is done: the buffers ``start`` returned then hold the arrived tensors."""
        for request in self.requests:
            request.wait()
        self.spare = self.sending if self.recycle else None
        self.requests, self.sending = [], []


def _rank_world(group) -> tuple[int, int]:
    """(rank, size) of the ring: a process group, or a stand-in that has ``rank``, ``world`` and ``ring_comm(tag)``
    (``simulated_ring.SimulatedRing``: one rank of a ring measured on one device)."""
    if hasattr(group, "ring_comm"):
        return group.rank, group.world
    return dist.get_rank(group), dist.get_world_size(group)


def _comm(group, tag: int) -> RingComm:
    return group.ring_comm(tag) if hasattr(group, "ring_comm") else RingComm(group, tag)


def _visible_part(step: int, rank: int, world: int, s_local: int, causal: bool, layout: str):
    """(query slice, key slice, causal) of the block a rank computes at ring step ``step``, or None to skip.

    At step i a rank holds the K/V of rank ``src = rank - i``. Contiguous: src < rank is fully visible, src > rank
    is in the future. Zigzag (rank r holds chunks r and 2W-1-r): for src < r, both query chunks see the first key
    chunk (src) and neither sees the second (2W-1-src > 2W-1-r); for src > r only the second query chunk (2W-1-r)
    sees anything, and it sees both key chunks. Every step but the diagonal is half the work of a full block.
    """
    src = (rank - step) % world
    if not causal:
        return _ALL, _ALL, False
    if src == rank:
        return _ALL, _ALL, True
    if layout == "contiguous":
        return (_ALL, _ALL, False) if src < rank else None
    half = s_local // 2
    if src < rank:
        return _ALL, slice(0, half), False
    return slice(half, None), _ALL, False


def _query_pieces(qs: slice, s_local: int, pieces: int) -> list[slice]:
    """Split the query slice ``qs`` of a shard of ``s_local`` tokens into slices of at most s_local / pieces."""
    start, stop, _ = qs.indices(s_local)
    size = max(1, -(-s_local // pieces))
    return [slice(a, min(a + size, stop)) for a in range(start, stop, size)]


def _check_inputs(q, k, v, group, layout):
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"context-parallel attention wants q [B, S_local, H, D] and k, v [B, S_local, H_kv, D] "
                         f"with the same B, S_local, D; got q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads {q.shape[2]} are not divisible by key/value heads {k.shape[2]}")
    if layout not in ("zigzag", "contiguous"):
        raise ValueError(f"unknown layout {layout!r}: use 'zigzag' or 'contiguous'")
    if layout == "zigzag" and q.shape[1] % 2:
        raise ValueError(f"zigzag shards hold two equal chunks, but S_local = {q.shape[1]} is odd")
    if group is None:
        raise ValueError("pass the context-parallel process group explicitly (e.g. mesh['cp'].get_group())")


def _ring_forward(q, k, v, group, causal, layout, scale):
    rank, world = _rank_world(group)
    s = q.shape[1]
    out = lse = None
    comm = _comm(group, _KV_TAG)
    cur_k, cur_v = k, v
    for step in range(world):
        if step + 1 < world:  # step 0 sends the caller's k, v: never recycled
            next_k, next_v = comm.start([cur_k, cur_v], recycle=step > 0)
        part = _visible_part(step, rank, world, s, causal, layout)
        if part is not None:
            qs, ks, block_causal = part
            block_out, block_lse = block_forward(q[:, qs], cur_k[:, ks], cur_v[:, ks], causal=block_causal,
                                                 softmax_scale=scale)
            if step == 0:  # the diagonal block covers every local query: it becomes the fp32 accumulators
                out, lse = block_out.float(), block_lse  # no copy for fp32 inputs
            else:
                merge_into(out[:, qs], lse[:, :, qs], block_out, block_lse)
            del block_out, block_lse  # not held into the next step's kernel call
        if step + 1 < world:
            comm.wait()
            cur_k, cur_v = next_k, next_v
    return out.to(q.dtype), lse


def _ring_backward(dout, q, k, v, out, lse, group, causal, layout, scale):
    rank, world = _rank_world(group)
    s = q.shape[1]
    dq = None
    kv_comm, grad_comm = _comm(group, _KV_TAG), _comm(group, _GRAD_TAG)
    cur_k, cur_v = k, v
    arrived = None  # fp32 dK/dV accumulators of the K/V block we hold, from the ranks it visited before
    for step in range(world):
        if step + 1 < world:
            next_k, next_v = kv_comm.start([cur_k, cur_v], recycle=step > 0)
        part = _visible_part(step, rank, world, s, causal, layout)
        grads = None
        if part is not None:
            qs, ks, block_causal = part
            # Off the diagonal, take the queries a quarter of the shard at a time: the kernel's dq for a piece is a
            # transient, so smaller pieces lower the backward's peak; the FLOPs are the same. (Step 0, the
            # diagonal, must cover every query: its dq starts the accumulator.)
            pieces = [qs] if dq is None else _query_pieces(qs, s, _BACKWARD_QUERY_PIECES)
            for piece in pieces:
                bdq, bdk, bdv = block_backward(dout[:, piece], q[:, piece], cur_k[:, ks], cur_v[:, ks],
                                               out[:, piece], lse[:, :, piece], causal=block_causal,
                                               softmax_scale=scale)
                if dq is None:  # step 0, the diagonal: covers every local query
                    dq = bdq.float()
                else:
                    dq[:, piece] += bdq
                del bdq
                if grads is None:
                    grads = [ks, bdk.float(), bdv.float()]  # no copy for fp32 inputs
                else:
                    grads[1] += bdk
                    grads[2] += bdv
                del bdk, bdv
        if arrived is None and grads is not None and grads[0] == _ALL:
            arrived, grads = grads[1:], None  # step 0 covers this block's every key: its grads start the sums
        elif arrived is None:
            arrived = [torch.zeros(k.shape, dtype=torch.float32, device=k.device),
                       torch.zeros(v.shape, dtype=torch.float32, device=v.device)]
        else:
            grad_comm.wait()
        if grads is not None:  # add in place into the buffers that travel on: no per-step full-size temporaries
            ks, bdk, bdv = grads
            arrived[0][:, ks] += bdk
            arrived[1][:, ks] += bdv
            del grads, bdk, bdv
        if world > 1:
            arrived = grad_comm.start(arrived, recycle=True)
        if step + 1 < world:
            kv_comm.wait()
            cur_k, cur_v = next_k, next_v
    grad_comm.wait()  # after a full lap, our own K/V's accumulators come home (nothing to wait for alone)
    return dq.to(q.dtype), arrived[0].to(k.dtype), arrived[1].to(v.dtype)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group, causal, layout, scale):
        out, lse = _ring_forward(q, k, v, group, causal, layout, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (group, causal, layout, scale)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _ring_backward(dout.contiguous(), q, k, v, out, lse, *ctx.args)
        return dq, dk, dv, None, None, None, None


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: dist.ProcessGroup, *,
                   causal: bool = True, layout: str = "zigzag", softmax_scale: float | None = None) -> torch.Tensor:
    """Ring attention over the CP ``group``. q ``[B, S_local, H, D]``, k/v ``[B, S_local, H_kv, D]`` (this rank's
    shard in ``layout``), fp32 or bf16 -> ``[B, S_local, H, D]`` in q.dtype. Differentiable in q, k, v."""
    _check_inputs(q, k, v, group, layout)
    return _RingAttention.apply(q, k, v, group, causal, layout, softmax_scale)


# ---- all-gather variant ------------------------------------------------------------------------------------------
def _gather_full(x: torch.Tensor, group, layout: str) -> torch.Tensor:
    """Every rank's shard ``[B, S_local, ...]`` -> the full sequence ``[B, S, ...]`` in global order."""
    world = dist.get_world_size(group)
    gathered = torch.empty((world * x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    all_gather_into(gathered, x, group)
    shards = gathered.chunk(world, dim=0)
    pieces = {}
    for rank, shard in enumerate(shards):
        ids = chunk_ids(rank, world, layout)
        pieces.update(zip(ids, shard.chunk(len(ids), dim=1)))
    return torch.cat([pieces[i] for i in sorted(pieces)], dim=1)


def _scatter_sum(full: torch.Tensor, group, layout: str) -> torch.Tensor:
    """Sum ``full [B, S, ...]`` over ranks and return this rank's shard ``[B, S_local, ...]`` (reduce-scatter)."""
    world = dist.get_world_size(group)
    n = 2 * world if layout == "zigzag" else world
    pieces = full.chunk(n, dim=1)
    # rank-major: rank r's shard (its chunks, in its order) at rows [r*B, (r+1)*B)
    stacked = torch.cat([torch.cat([pieces[i] for i in chunk_ids(r, world, layout)], dim=1) for r in range(world)])
    out = torch.empty((full.shape[0], full.shape[1] // world) + tuple(full.shape[2:]), dtype=full.dtype,
                      device=full.device)
    reduce_scatter_into(out, stacked, group)
    return out


def _allgather_parts(rank, world, s_local, causal, layout):
    """[(query slice, key range (start, end), causal)] blocks a rank computes against the full K/V."""
    if not causal:
        return [(_ALL, (0, None), False)]
    ids = chunk_ids(rank, world, layout)
    c = s_local // len(ids)
    parts = []
    for j, chunk in enumerate(ids):
        qs = slice(j * c, (j + 1) * c)
        parts.append((qs, (chunk * c, (chunk + 1) * c), True))  # its own chunk: the diagonal, causal
        if chunk > 0:
            parts.append((qs, (0, chunk * c), False))  # every earlier chunk: fully visible
    return parts


class _AllGatherAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group, causal, layout, scale):
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        full_k, full_v = _gather_full(k, group, layout), _gather_full(v, group, layout)
        out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
        lse = torch.empty(q.shape[0], q.shape[2], q.shape[1], dtype=torch.float32, device=q.device)
        started = set()
        for qs, (a, b), block_causal in _allgather_parts(rank, world, q.shape[1], causal, layout):
            block_out, block_lse = block_forward(q[:, qs], full_k[:, a:b], full_v[:, a:b], causal=block_causal,
                                                 softmax_scale=scale)
            key = (qs.start, qs.stop)
            if key in started:
                merge_into(out[:, qs], lse[:, :, qs], block_out, block_lse)
            else:
                out[:, qs] = block_out
                lse[:, :, qs] = block_lse
                started.add(key)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (group, causal, layout, scale)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        group, causal, layout, scale = ctx.args
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        full_k, full_v = _gather_full(k, group, layout), _gather_full(v, group, layout)
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        dk = torch.zeros(full_k.shape, dtype=torch.float32, device=k.device)
        dv = torch.zeros(full_v.shape, dtype=torch.float32, device=v.device)
        dout = dout.contiguous()
        for qs, (a, b), block_causal in _allgather_parts(rank, world, q.shape[1], causal, layout):
            bdq, bdk, bdv = block_backward(dout[:, qs], q[:, qs], full_k[:, a:b], full_v[:, a:b], out[:, qs],
                                           lse[:, :, qs], causal=block_causal, softmax_scale=scale)
            dq[:, qs] += bdq
            dk[:, a:b] += bdk
            dv[:, a:b] += bdv
        dk, dv = _scatter_sum(dk, group, layout), _scatter_sum(dv, group, layout)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def allgather_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: dist.ProcessGroup, *,
                        causal: bool = True, layout: str = "zigzag",
                        softmax_scale: float | None = None) -> torch.Tensor:
    """All-gather context-parallel attention; same contract as ``ring_attention``."""
    _check_inputs(q, k, v, group, layout)
    return _AllGatherAttention.apply(q, k, v, group, causal, layout, softmax_scale)
