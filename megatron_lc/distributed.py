"""Process groups: the one place that starts and ends them (torchrun's, spawned ranks', or a one-process group).

Every collective of a group started here times out after ``timeout_s``, so a rank that died or took another path
ends the run with an error instead of a hang. The default (30 minutes) is longer than the slowest legitimate wait
between two collectives (the first step of a compiled model, a large checkpoint written to a slow disk) and
short enough that a hung job ends within the hour.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 1800.0


def backend(device_type: str) -> str:
    """The collective backend for a device type: nccl on cuda, gloo otherwise."""
    return "nccl" if device_type == "cuda" else "gloo"


def under_torchrun() -> bool:
    """Whether torchrun (or any launcher setting RANK and WORLD_SIZE) started this process."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_process_group(device_type: str = "cpu", *, timeout_s: float = DEFAULT_TIMEOUT_S,
                       init_method: str | None = None, rank: int | None = None,
                       world_size: int | None = None) -> bool:
    """Start the default process group unless one exists: spawned ranks' when ``init_method`` is given (e.g.
    ``tcp://127.0.0.1:PORT``, with ``rank`` and ``world_size``), else torchrun's (from the environment) unless
    ``world_size=1`` asks for a process of its own, else a one-process group on an in-memory store. On cuda the
    rank's device (``rank``, or LOCAL_RANK under torchrun) becomes current first. Returns whether it started the
    group: the caller then ends it with ``destroy_process_group`` (a process exiting with live gloo threads
    aborts)."""
    if dist.is_initialized():
        return False
    if init_method is not None:
        if rank is None or world_size is None:
            raise ValueError(f"init_method={init_method!r} needs rank and world_size")
        kwargs, local_rank = {"init_method": init_method, "rank": rank, "world_size": world_size}, rank
    elif under_torchrun() and world_size != 1:
        kwargs, local_rank = {}, int(os.environ.get("LOCAL_RANK", "0"))
    else:
        kwargs, local_rank = {"store": dist.HashStore(), "rank": 0, "world_size": 1}, None
    if device_type == "cuda" and local_rank is not None:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend(device_type), timeout=timedelta(seconds=timeout_s), **kwargs)
    return True


def destroy_process_group(owned: bool = True, *, barrier: bool = True) -> None:
    """End the default group if ``owned`` (``init_process_group`` returned True) and still live; with ``barrier``,
    after every rank got here (a rank leaving early can abort the others' shutdown)."""
    if owned and dist.is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()


@contextmanager
def process_group(device_type: str = "cpu", **kwargs) -> Iterator[bool]:
    """``init_process_group(device_type, **kwargs)`` for a ``with`` block, which gets whether it started the group;
    a group it started ends on exit (after a barrier, unless the block raised: the other ranks may never come)."""
    owned = init_process_group(device_type, **kwargs)
    try:
        yield owned
    except BaseException:
        destroy_process_group(owned, barrier=False)
        raise
    destroy_process_group(owned)
