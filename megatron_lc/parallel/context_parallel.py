"""ContextParallel: the transform that spreads one sequence over a context-parallel group.

It does two things and nothing else (the model is not rewritten):
1. ``shard_batch(batch)``: every CP rank of a data-parallel replica receives the same full sample from the
   loader; this checks once that the ranks agree on its shapes, pads the end if asked (-100 labels), and gives each
   rank its part of input_ids, labels and position_ids (each token keeps its true position).
2. ``apply(model)``: swaps the model's attention function for an exact context-parallel one.

Modes: ``ring`` and ``allgather`` (zigzag layout by default, balanced for causal attention), ``ulysses``
(contiguous layout, all-to-all over heads), and ``hybrid``: Ulysses inside (e.g. within a node) and a zigzag ring
across, over a 2-D mesh ``(ring, ulysses)``. The loss stays (sum, count) per rank; the trainer all-reduces it.
"""
from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from .ring import allgather_attention, ring_attention
from .cp_sharding import pad_batch, shard_sequence

MODES = ("ring", "allgather", "ulysses", "hybrid")


def sequence_layout(mode: str, layout: str) -> str:
    """The layout of the outer sharding level: hybrid's ring is always zigzag, Ulysses always contiguous."""
    return {"ulysses": "contiguous", "hybrid": "zigzag"}.get(mode, layout)


class ContextParallel:
    """Shard batches along the sequence and make attention exact across the ranks of ``mesh``.

    mesh: the CP sub-mesh; 1-D for ring/allgather/ulysses, 2-D ``(ring, ulysses)`` for hybrid (dimension 0 is the
    ring, dimension 1 the Ulysses group, which should be the faster links). ``layout`` applies to ring/allgather.
    ``pad=True`` pads sequences at the end to a multiple of ``pad_multiple`` instead of failing: by default what the
    layout needs (``multiple()``); parallelize raises it to ``ParallelDims.seq_len_divisor`` (times tp, as sequence
    parallelism splits each shard again).
    """

    def __init__(self, mesh: DeviceMesh, mode: str = "ring", layout: str = "zigzag", pad: bool = False,
                 pad_id: int = 0):
        if mode not in MODES:
            raise ValueError(f"unknown context-parallel mode {mode!r}: use one of {MODES}")
        if mode == "hybrid" and mesh.ndim != 2:
            raise ValueError(f"hybrid context parallelism needs a 2-D (ring, ulysses) mesh, got {mesh.ndim}-D")
        if mode != "hybrid" and mesh.ndim != 1:
            raise ValueError(f"{mode} context parallelism needs a 1-D mesh, got {mesh.ndim}-D (use mode='hybrid')")
        if layout not in ("zigzag", "contiguous"):
            raise ValueError(f"unknown layout {layout!r}: use 'zigzag' or 'contiguous'")
        self.mesh, self.mode, self.pad, self.pad_id = mesh, mode, pad, pad_id
        self.layout = sequence_layout(mode, layout)
        self.group = mesh.get_group(0) if mesh.ndim == 1 else None
        self.size = mesh.size()
        if mode == "hybrid":
            self.ring_group, self.ulysses_group = mesh.get_group(0), mesh.get_group(1)
        self.attention = self._make_attention()
        self.pad_multiple = self.multiple()

    # ---- sharding -------------------------------------------------------------------------------------------------
    def _coordinates(self) -> list[tuple[int, int, str]]:
        """(rank, size, layout) of each sharding level, outermost first."""
        if self.mode == "hybrid":
            ring_rank, uly_rank = self.mesh.get_local_rank(0), self.mesh.get_local_rank(1)
            return [(ring_rank, self.mesh.size(0), "zigzag"), (uly_rank, self.mesh.size(1), "contiguous")]
        return [(self.mesh.get_local_rank(0), self.size, self.layout)]

    def multiple(self) -> int:
        """The sequence length must be a multiple of this."""
        m = 1
        for _, size, layout in self._coordinates():
            m *= 2 * size if layout == "zigzag" else size
        return m

    def shard(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's part of ``x`` along ``dim`` (no padding, no checks across ranks)."""
        for rank, size, layout in self._coordinates():
            x = shard_sequence(x, rank, size, dim=dim, layout=layout)
        return x

    def _check_same_shapes(self, batch: dict[str, torch.Tensor]) -> None:
        """Every rank raises the same error if the CP ranks' batch shapes differ (a few small all-gathers per batch).

        One all-gather per mesh dimension, carrying a "mismatch seen" flag from the dimensions before: on a 2-D mesh
        every rank shares a group with every other rank's group, so a mismatch anywhere reaches every rank, and
        all ranks run the same collectives before raising (no hang).
        """
        names = sorted(batch)
        shape = [d for n in names for d in batch[n].shape[:2]]
        mismatch = 0
        for dim in range(self.mesh.ndim):
            group, size = self.mesh.get_group(dim), self.mesh.size(dim)
            # fixed-size message: a different number of entries must not make the all-gather itself fail
            if len(shape) > 32:
                raise ValueError(f"a batch has {len(names)} entries; at most 16 are supported")
            message = [mismatch] + shape + [-1] * (32 - len(shape))
            # On the mesh's device: NCCL groups take CUDA tensors only.
            mine = torch.tensor(message, dtype=torch.int64, device=self.mesh.device_type)
            gathered = [torch.empty_like(mine) for _ in range(size)]
            dist.all_gather(gathered, mine, group=group)
            mismatch = int(any(g[0] for g in gathered) or any(not torch.equal(g[1:], mine[1:]) for g in gathered))
        if mismatch:
            raise ValueError(f"context-parallel ranks got batches of different shapes or keys (this rank: [B, S] of "
                             f"{names} = {shape}); every CP rank of a data-parallel replica must get the same sample")

    def shard_batch(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Full ``[B, S]`` batch (input_ids, labels, position_ids, ...) -> this rank's ``[B, S / cp]`` batch.

        position_ids default to 0..S-1 before sharding, so every token keeps its true position; padding (pad=True,
        ``cp_sharding.pad_batch``) gets ``document_ids`` of its own (the row's last id + 1).
        """
        if "input_ids" not in batch:
            raise KeyError("a batch needs 'input_ids' (and usually 'labels', 'position_ids')")
        batch = dict(batch)
        b, s = batch["input_ids"].shape
        if "position_ids" not in batch:
            batch["position_ids"] = torch.arange(s, device=batch["input_ids"].device).expand(b, s)
        self._check_same_shapes(batch)
        if self.pad:
            batch = pad_batch(batch, self.pad_multiple, self.pad_id)
        elif s % self.multiple():
            raise ValueError(f"sequence length {s} is not divisible by {self.multiple()} ({self.mode} over "
                             f"{self.size} ranks): pad the batch (ContextParallel(pad=True), which adds -100 labels "
                             f"at the end) or use a length that divides")
        return {name: self.shard(t) for name, t in batch.items()}

    # ---- attention ----------------------------------------------------------------------------------------------
    def _make_attention(self):
        if self.mode == "ring":
            fn = functools.partial(ring_attention, group=self.group, layout=self.layout)
        elif self.mode == "allgather":
            fn = functools.partial(allgather_attention, group=self.group, layout=self.layout)
        elif self.mode == "ulysses":
            from .ulysses import ulysses_attention

            fn = functools.partial(ulysses_attention, group=self.group)
        else:
            from .ulysses import ulysses_attention

            inner = functools.partial(ring_attention, group=self.ring_group, layout="zigzag")
            fn = functools.partial(ulysses_attention, group=self.ulysses_group, inner=inner)

        def cp_attention(q, k, v, *, causal=True, softmax_scale=None):
            return fn(q, k, v, causal=causal, softmax_scale=softmax_scale)

        return cp_attention

    def apply(self, model) -> None:
        """Route the model's attention through this CP group; validates head counts for Ulysses first."""
        if self.mode in ("ulysses", "hybrid"):
            degree = self.size if self.mode == "ulysses" else self.mesh.size(1)
            # The heads this rank's attention sees: H/tp under tensor parallelism, read off the (sharded) q/k rows.
            attn = model.layers[0].attn
            heads, kv_heads = ((p.weight.to_local() if isinstance(p.weight, DTensor) else p.weight).shape[0]
                               // attn.head_dim for p in (attn.q_proj, attn.k_proj))
            if heads % degree:
                raise ValueError(f"Ulysses degree {degree} does not divide num_heads={heads}: pick a degree among "
                                 f"{[d for d in range(1, heads + 1) if heads % d == 0]} or use mode='ring'")
            if kv_heads % degree and degree % kv_heads:
                raise ValueError(f"Ulysses degree {degree} and num_kv_heads={kv_heads}: one must divide the other")
        model.set_attention(self.attention)
        model.rope.global_max_position = self._global_max_position

    def _global_max_position(self, local_max: int) -> int:
        """The largest position id over the group's shards (dynamic NTK scales by the whole sequence's length)."""
        t = torch.tensor([local_max], dtype=torch.int64, device=self.mesh.device_type)
        for dim in range(self.mesh.ndim):  # hybrid: over the ring, then the Ulysses dimension
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.mesh.get_group(dim))
        return int(t.item())
