"""Process groups: the one place that starts and ends them (torchrun's, spawned ranks', or a one-process group).

Every collective of a group started here times out after ``timeout_s``, so a rank that died or took another path
ends the run with an error instead of a hang. The default (30 minutes) is longer than the slowest legitimate wait
between two collectives (the first step of a compiled model, a large checkpoint written to a slow disk) and
short enough that a hung job ends within the hour. The trainer passes ``parallel.timeout_s`` and applies it to every
group it builds (``set_timeouts``: DeviceMesh groups take torch's default otherwise); ``timeout_errors`` turns a
collective that timed out into an error naming that key; ``launcher_watchdog`` ends a torchrun worker whose agent
died (its workers would otherwise train on, or hang, holding the run folder).
"""
from __future__ import annotations

import json
import os
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from .configtools import ConfigError

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


# ---- timeouts ------------------------------------------------------------------------------------------------------
class CollectiveTimeout(RuntimeError):
    """A collective waited longer than the configured timeout; the message names the setting and the seconds."""


def set_timeouts(timeout_s: float) -> int:
    """Give every process group of this process (the default one and each DeviceMesh group) a ``timeout_s``
    collective timeout; returns how many. DeviceMesh builds its groups with torch's default (30 min on gloo, 10 on
    nccl), not the default group's, so a configured timeout holds only once this has run after the meshes exist."""
    from torch.distributed import distributed_c10d as c10d

    groups = list(c10d._world.pg_map)  # every group this process belongs to (torch keeps no public list)
    for group in groups:
        c10d._set_pg_timeout(timedelta(seconds=timeout_s), group)
    return len(groups)


def _is_timeout(error: BaseException) -> bool:
    text = str(error).lower()  # gloo: "Timed out waiting 2000ms for recv"; nccl: "collective operation timeout"
    return isinstance(error, RuntimeError) and ("timed out" in text or "operation timeout" in text)


@contextmanager
def timeout_errors(key: str, timeout_s: float) -> Iterator[None]:
    """Re-raise a collective's timeout inside the block as CollectiveTimeout naming config ``key`` and its
    ``timeout_s`` (torch's own message names only milliseconds and a C++ file)."""
    try:
        yield
    except CollectiveTimeout:
        raise
    except RuntimeError as e:
        if not _is_timeout(e):
            raise
        rank = dist.get_rank() if dist.is_initialized() else 0
        raise CollectiveTimeout(
            f"rank {rank}: a collective waited longer than {key}={timeout_s:g} s for the other ranks, so the run "
            f"stops: one of them stalled or died (see its log). Raise {key} if a step legitimately takes longer "
            f"(a first compiled step, a checkpoint on a slow disk). torch said: {str(e).splitlines()[0][:300]}"
        ) from e


# ---- broadcasting small decisions ----------------------------------------------------------------------------------
def broadcast_json(obj: Any = None, src: int = 0) -> Any:
    """``obj`` of rank ``src`` (anything JSON can hold) on every rank; collective, on the default group. JSON, not
    pickle: what a rank receives is data, never code."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    payload = json.dumps(obj).encode() if dist.get_rank() == src else b""
    size = torch.tensor([len(payload)], dtype=torch.int64, device=device)
    dist.broadcast(size, src)
    data = torch.zeros(int(size.item()), dtype=torch.uint8, device=device)
    if dist.get_rank() == src:
        data.copy_(torch.frombuffer(bytearray(payload), dtype=torch.uint8))
    dist.broadcast(data, src)
    return json.loads(data.cpu().numpy().tobytes().decode())


def on_rank0(fn: Callable[[], Any]) -> Any:
    """``fn()`` run on rank 0 only (a decision over shared files), its JSON result on every rank; collective. When
    it raises, every rank raises (rank 0 its own exception, the others a ConfigError or RuntimeError with its
    message), so no rank goes on alone into a collective the others never reach."""
    outcome, failure = None, None
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            outcome = {"result": fn()}
        except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
            outcome, failure = {"error": str(e), "config": isinstance(e, ConfigError)}, e
    outcome = broadcast_json(outcome)
    if "error" in outcome:
        if failure is not None:
            raise failure
        raise (ConfigError if outcome["config"] else RuntimeError)(f"rank 0: {outcome['error']}")
    return outcome["result"]


# ---- a worker whose launcher died ----------------------------------------------------------------------------------
EXIT_LAUNCHER_GONE = 1


def launcher_gone(parent_pid: int, store: tuple[str, int] | None) -> str | None:
    """Why this torchrun worker is orphaned (None: it is not): its parent, the agent, is no longer ``parent_pid``,
    or the agent's rendezvous store at ``store`` (host, port; None: not checked) refuses connections."""
    if os.getppid() != parent_pid:
        return f"its torchrun agent (pid {parent_pid}) is gone"
    if store is not None:
        try:  # a bare connection: a store client would retry for its whole timeout, logging each try
            socket.create_connection(store, timeout=5).close()
        except OSError as e:
            return f"the rendezvous store {store[0]}:{store[1]} does not answer ({e})"
    return None


def _exit_orphaned(reason: str) -> None:
    sys.stderr.write(f"[megatron-lc] rank {os.environ.get('RANK')}: {reason}; this worker exits (a new launch "
                     f"continues with --resume auto)\n")
    sys.stderr.flush()
    os._exit(EXIT_LAUNCHER_GONE)


@contextmanager
def launcher_watchdog(timeout_s: float, *, poll_s: float = 1.0,
                      on_gone: Callable[[str], None] = _exit_orphaned) -> Iterator[None]:
    """Under torchrun, a daemon thread that ends this worker (``on_gone(reason)``: a line on stderr, then
    ``os._exit(EXIT_LAUNCHER_GONE)``) once the agent that started it died: its parent pid changed (checked every
    ``poll_s``) or the agent's store failed twice in a row (checked every ``timeout_s / 8``, at most each minute, so
    a dead agent is noticed within ``timeout_s``). Elsewhere it does nothing. What a dead agent leaves cannot be
    finished anyway: a checkpoint being written stays incomplete, and ``--resume auto`` skips it."""
    if not (under_torchrun() and "TORCHELASTIC_RUN_ID" in os.environ):
        yield
        return
    parent = os.getppid()
    store = (os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])) if "MASTER_PORT" in os.environ else None
    store_every = max(1, round(min(60.0, timeout_s / 8) / poll_s))  # in polls
    stop = threading.Event()

    def watch() -> None:
        polls, store_failures = 0, 0
        while not stop.wait(poll_s):
            polls += 1
            reason = launcher_gone(parent, store if polls % store_every == 0 else None)
            if reason and reason.startswith("the rendezvous store"):
                store_failures += 1
                reason = reason if store_failures >= 2 else None
            elif polls % store_every == 0:
                store_failures = 0
            if reason and not stop.is_set():
                on_gone(reason)
                return

    thread = threading.Thread(target=watch, name="megatron-lc-launcher-watchdog", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
