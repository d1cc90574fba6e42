"""One rank of a context-parallel ring, run on one device without the other ranks.

``megatron-lc bench train --cp-rank-of N`` measures the per-GPU cost of a sequence spread over N GPUs on one GPU:
the model sees rank r's zigzag shard (chunks r and 2N-1-r of the global sequence, with their true position ids)
and every attention layer runs the real ``ring_attention`` schedule of ring.py (N forward steps, N backward steps,
each step's visible part, the lse merges, the fp32 dK/dV accumulators that travel). Only the transfer is replaced:
a block "received" from the previous rank is a copy of the block this rank sends, written into the ring's own
receive buffers (the same ping-pong buffers a real transfer fills). Every kernel call then has the shapes of the
real rank's, and every buffer the real rank holds is held here, so compute and memory per rank are exact; the
values differ (they are this rank's K/V, not its neighbours'), which changes no shape, time or byte.

The copy costs one device-to-device copy of a K/V block (and of the dK/dV accumulators in backward) per step,
where a real ring overlaps its transfer with the step's compute: small next to the attention block itself.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .cp_sharding import shard_sequence
from .ring import RingComm, ring_attention


class _LocalComm(RingComm):
    """The ring's communicator with the transfer replaced by a local copy (the stand-in for the neighbour's block).
    Keeps RingComm's bookkeeping (buffers held until wait, ping-pong recycling), so the memory is the real one."""

    def _connect(self) -> None:  # no peers: the "previous rank" is this process
        self.next = self.prev = None

    def _transfer(self, receive: list[torch.Tensor]) -> list:
        for sent, arriving in zip(self.sending, receive):
            arriving.copy_(sent)
        return []  # nothing to wait for


@dataclass(frozen=True)
class SimulatedRing:
    """Stands in for the process group of a CP ring in ``ring_attention``: rank ``rank`` of ``world`` ranks."""

    rank: int
    world: int

    def __post_init__(self):
        if not (isinstance(self.world, int) and self.world >= 2):
            raise ValueError(f"a simulated ring needs world >= 2 ranks, got {self.world!r}")
        if not (isinstance(self.rank, int) and 0 <= self.rank < self.world):
            raise ValueError(f"rank must be in [0, {self.world}), got {self.rank!r}")

    def ring_comm(self, tag: int) -> RingComm:
        """The communicator ``ring_attention`` uses for one kind of traffic (K/V or dK/dV)."""
        return _LocalComm(self, tag)


def simulated_ring_attention(rank: int, world: int, layout: str = "zigzag"):
    """An attention function for ``Transformer.set_attention``: ``fn(q, k, v, *, causal, softmax_scale=None)``
    with q ``[B, S/world, H, D]``, k/v ``[B, S/world, H_kv, D]`` (rank ``rank``'s shard in ``layout``) ->
    ``[B, S/world, H, D]``, running the ring schedule of rank ``rank`` of a ``world``-rank ring."""
    fn = functools.partial(ring_attention, group=SimulatedRing(rank, world), layout=layout)

    def attention(q, k, v, *, causal=True, softmax_scale=None):
        return fn(q, k, v, causal=causal, softmax_scale=softmax_scale)

    return attention


def shard_batch_for_rank(batch: dict[str, torch.Tensor], rank: int, world: int,
                         layout: str = "zigzag") -> dict[str, torch.Tensor]:
    """Rank ``rank``'s part of a full ``[B, S]`` batch (input_ids, labels, ...), as ContextParallel.shard_batch
    gives it, with ``position_ids`` (int64, the true positions) added when missing. S must divide by 2 x world
    (zigzag) or world (contiguous)."""
    b, s = batch["input_ids"].shape
    batch = dict(batch)
    batch.setdefault("position_ids", torch.arange(s, device=batch["input_ids"].device).expand(b, s))
    return {name: shard_sequence(t, rank, world, dim=1, layout=layout) for name, t in batch.items()}
