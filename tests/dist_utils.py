"""Run a function on N gloo processes on CPU (or nccl ones on GPUs), collect each rank's result; a hang or crash fails.

Usage: ``results = run_distributed(fn, world_size, *args)`` where ``fn(rank, world_size, *args)`` is a module-level
function (picklable) that may use ``torch.distributed`` (the default group is initialised with gloo) and returns
anything picklable (tensors are fine). Results come back in rank order. An exception on any rank is re-raised in
the test with that rank's traceback; ranks still running after ``timeout`` seconds are killed and the test fails.

Ranks are forked from a forkserver that has imported torch, torch.distributed and our packages once (``_PRELOAD``):
a spawned rank spends 3-4 s of CPU importing them, and the suite starts a few hundred ranks. The server itself never
initialises a process group or runs an op, so each rank starts as clean as a spawned one; the caller's environment
is replayed into it. Settings that only take effect at process start (glibc's ``MALLOC_*``, set by the memory
tests) need a real new process: with any of them in the environment, ranks are spawned.
"""
from __future__ import annotations

import os
import socket
import sys
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_PRELOAD = ["torch", "torch.distributed", "torch.distributed.tensor", "torch.distributed.checkpoint",
            "torch.distributed.fsdp", "numpy", "megatron_lc.model", "megatron_lc.parallel.parallelize",
            "megatron_lc.parallel.ring", "megatron_lc.train.trainer", "dist_utils"]


def _context():
    """forkserver (preloaded), or spawn when the environment holds settings read only at process start."""
    if any(key.startswith("MALLOC_") for key in os.environ) or "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)  # used when the server starts (the first call), ignored after
    return ctx


def _redirect(fd: int, path: str) -> None:
    """Point file descriptor ``fd`` at a new file ``path`` (the rank's stdout or stderr)."""
    target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(target, fd)
    os.close(target)


def _worker(rank, world_size, port, out_dir, threads, backend, fn, args, environ=None):
    # a forked rank's stdout/stderr are the forkserver's, not the test's (pytest's capfd): write them to files the
    # parent replays into its own after the run
    _redirect(1, os.path.join(out_dir, f"rank{rank}.stdout"))
    _redirect(2, os.path.join(out_dir, f"rank{rank}.stderr"))
    if environ is not None:  # the caller's environment now, not the forkserver's at its start
        os.environ.clear()
        os.environ.update(environ)
    torch.set_num_threads(threads)
    path = os.path.join(out_dir, f"rank{rank}.pt")
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        torch.save({"ok": True, "result": _to_cpu(result)}, path)
    except BaseException:  # noqa: BLE001 - every failure must reach the parent, with its traceback
        torch.save({"ok": False, "error": traceback.format_exc()}, path)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()


def _replay_output(out_dir: str, world_size: int) -> None:
    """Write each rank's captured stdout/stderr (rank order) to this process's fds 1 and 2."""
    sys.stdout.flush()
    sys.stderr.flush()
    for rank in range(world_size):
        for fd, name in ((1, "stdout"), (2, "stderr")):
            path = os.path.join(out_dir, f"rank{rank}.{name}")
            if os.path.exists(path):
                with open(path, "rb") as f:
                    data = f.read()
                while data:  # os.write may write less than asked
                    data = data[os.write(fd, data):]


def _to_cpu(x):
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    if isinstance(x, dict):
        return {k: _to_cpu(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_to_cpu(v) for v in x)
    return x


def run_distributed(fn, world_size: int, *args, timeout: float = 180.0, threads: int = 1,
                    backend: str = "gloo") -> list:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` processes (gloo on CPU, or nccl with GPU ``rank`` per
    process); return the results in rank order (tensors moved to the CPU)."""
    ctx = _context()
    port = _free_port()
    environ = dict(os.environ)
    with tempfile.TemporaryDirectory() as out_dir:
        procs = [ctx.Process(target=_worker, args=(r, world_size, port, out_dir, threads, backend, fn, args, environ),
                             daemon=True) for r in range(world_size)]
        for p in procs:
            p.start()
        import time

        deadline = time.monotonic() + timeout
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        _replay_output(out_dir, world_size)
        outcomes = []
        for r in range(world_size):
            path = os.path.join(out_dir, f"rank{r}.pt")
            outcomes.append(torch.load(path, weights_only=False) if os.path.exists(path) else None)
    errors = [f"rank {r}:\n{o['error']}" for r, o in enumerate(outcomes) if o is not None and not o["ok"]]
    if errors:
        raise AssertionError("\n".join(errors))
    if hung:
        raise AssertionError(f"ranks {hung} still running after {timeout} s (a hang); killed")
    missing = [r for r, o in enumerate(outcomes) if o is None]
    if missing:
        raise AssertionError(f"ranks {missing} died without a result (exit codes "
                             f"{[procs[r].exitcode for r in missing]})")
    return [o["result"] for o in outcomes]
