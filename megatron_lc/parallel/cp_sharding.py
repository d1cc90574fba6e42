"""Splitting one sequence over the ranks of a context-parallel group, and putting it back together.

``zigzag`` cuts the sequence into ``2 * cp_size`` equal chunks and gives rank r chunks r and ``2*cp_size-1-r``: under
causal attention early chunks see few keys and late chunks many, so pairing them balances the work. ``contiguous``
gives rank r the r-th of ``cp_size`` equal pieces (what Ulysses wants; unbalanced for a causal ring).
"""
from __future__ import annotations

import torch

from ..ops.cross_entropy import IGNORE_INDEX

LAYOUTS = ("zigzag", "contiguous")


def _pieces(layout: str, cp_size: int) -> int:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown sequence layout {layout!r}: use one of {LAYOUTS}")
    return 2 * cp_size if layout == "zigzag" else cp_size


def chunk_ids(cp_rank: int, cp_size: int, layout: str = "zigzag") -> tuple[int, ...]:
    """Indices of the sequence chunks rank ``cp_rank`` holds, in the order it holds them."""
    _pieces(layout, cp_size)
    if not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank {cp_rank} is outside [0, {cp_size})")
    return (cp_rank, 2 * cp_size - 1 - cp_rank) if layout == "zigzag" else (cp_rank,)


def shard_sequence(x: torch.Tensor, cp_rank: int, cp_size: int, dim: int = 1,
                   layout: str = "zigzag") -> torch.Tensor:
    """This rank's part of ``x`` along ``dim`` (length S -> S / cp_size); a copy only for zigzag's two chunks."""
    pieces = _pieces(layout, cp_size)
    length = x.shape[dim]
    if length % pieces:
        raise ValueError(
            f"sequence length {length} is not divisible by {pieces} ({layout} layout over cp_size={cp_size}): "
            f"pad the batch to a multiple of {pieces} (ContextParallel(pad=True) / pad_batch) or change the length")
    chunks = x.chunk(pieces, dim=dim)
    mine = [chunks[i] for i in chunk_ids(cp_rank, cp_size, layout)]
    return mine[0] if len(mine) == 1 else torch.cat(mine, dim=dim)


def unshard_sequence(shards: list[torch.Tensor], dim: int = 1, layout: str = "zigzag") -> torch.Tensor:
    """Inverse of shard_sequence: every rank's shard, in rank order -> the full sequence along ``dim``."""
    cp_size = len(shards)
    pieces = [None] * _pieces(layout, cp_size)
    for rank, shard in enumerate(shards):
        ids = chunk_ids(rank, cp_size, layout)
        for i, part in zip(ids, shard.chunk(len(ids), dim=dim)):
            pieces[i] = part
    return torch.cat(pieces, dim=dim)


def shard_positions(seq_len: int, cp_rank: int, cp_size: int, layout: str = "zigzag",
                    device: torch.device | str = "cpu") -> torch.Tensor:
    """The global token indices ``[S / cp_size]`` int64 that rank ``cp_rank`` holds."""
    return shard_sequence(torch.arange(seq_len, device=device), cp_rank, cp_size, dim=0, layout=layout)


def pad_batch(batch: dict[str, torch.Tensor], multiple: int, pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Pad every ``[B, S]`` tensor of a batch at the end of the sequence to a multiple of ``multiple``.

    input_ids get ``pad_id``, labels -100 (no loss), position_ids continue counting from the last real position,
    document_ids (when present) one id more than the row's last (the padding is a document of its own, so the ids
    stay non-decreasing).
    Causal attention keeps every real token blind to padding placed after it, so results on real tokens do not
    change. Returns a new dict; tensors already of the right length are returned as they are.
    """
    if "input_ids" not in batch:
        raise KeyError("a batch needs 'input_ids' (and usually 'labels', 'position_ids')")
    b, s = batch["input_ids"].shape
    extra = (-s) % multiple
    if extra == 0:
        return dict(batch)
    out = {}
    for name, t in batch.items():
        if t.shape[:2] != (b, s):
            raise ValueError(f"batch['{name}'] has shape {tuple(t.shape)}; every entry must be [B, S] = {(b, s)}")
        if name == "labels":
            fill = torch.full((b, extra), IGNORE_INDEX, dtype=t.dtype, device=t.device)
        elif name == "position_ids":
            fill = t[:, -1:] + torch.arange(1, extra + 1, dtype=t.dtype, device=t.device)
        elif name == "document_ids":
            fill = (t[:, -1:] + 1).expand(b, extra)
        else:
            fill = torch.full((b, extra), pad_id, dtype=t.dtype, device=t.device)
        out[name] = torch.cat([t, fill], dim=1)
    return out
