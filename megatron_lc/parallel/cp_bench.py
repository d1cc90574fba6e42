"""Per-rank cost of context-parallel attention (forward + backward): time, peak memory, block FLOPs.

Used by ``scripts/bench_cp.py`` and by the memory tests. Call inside an initialised process group.
"""
from __future__ import annotations

import ctypes
import time

import torch
import torch.distributed as dist

from ..ops.attention_lse import record_block_calls
from .ring import allgather_attention, ring_attention
from .sequence import shard_sequence


def status_bytes(key: str) -> int:
    """A ``/proc/self/status`` memory field (VmRSS, VmHWM, ...) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


# Set in the environment of a process before it starts, glibc takes every block of 64 KiB or more from mmap from
# the first allocation on, so freed tensors leave no reusable free space in the heap.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}


def _release_freed_heap() -> None:
    """Make RSS track live CPU tensors: glibc keeps freed blocks below its (adaptive, up to 32 MiB) mmap threshold
    in the heap, where a later allocation reuses them: a peak would be under-counted (resident free pages reused)
    or over-counted (trimmed free pages faulted back in), by up to the heap's free space. Best set before the
    process's first large allocation (``MALLOC_ENV``, or early in ``measure_attention``)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to tune
        return
    libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD: large blocks come from mmap and go back on free
    libc.malloc_trim(0)


class PeakMemory:
    """Peak memory above the start of the ``with`` block: CUDA allocator peak, or on CPU the process's peak RSS
    (VmHWM, reset through /proc/self/clear_refs so earlier peaks do not count; freed heap released first)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            _release_freed_heap()
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.base = status_bytes("VmRSS:")
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
        else:
            self.peak = status_bytes("VmHWM:") - self.base


def measure_attention(seq_len: int, heads: int, kv_heads: int, head_dim: int, mode: str = "ring",
                      layout: str = "zigzag", batch: int = 1, dtype: torch.dtype = torch.float32,
                      device: str = "cpu", group=None, repeats: int = 1, warmup: int = 1) -> dict:
    """Forward + backward of CP attention over ``group`` (default: the world) on this rank's shard of a
    ``[batch, seq_len]`` sequence. Returns seconds and peak_bytes (medians of ``repeats`` runs; ``peak_bytes_runs``
    lists every run's), flops (block matmul FLOPs this rank computed, per
    run) and block_calls. ``warmup`` runs come first, unmeasured: a first call pages in kernel code and thread
    stacks, which RSS would otherwise count as attention memory."""
    dev = torch.device(device)
    if dev.type == "cpu":
        _release_freed_heap()  # before this function's own tensors: they must not leave free heap blocks behind
    group = group or dist.group.WORLD
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    fn = {"ring": ring_attention, "allgather": allgather_attention}[mode]
    g = torch.Generator().manual_seed(0)
    full = [torch.randn(batch, seq_len, h, head_dim, generator=g) for h in (heads, kv_heads, kv_heads, heads)]
    q, k, v, dout = (shard_sequence(t, rank, world, layout=layout).to(dev, dtype) for t in full)
    del full
    q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
    times, peaks, flops, calls = [], [], 0.0, 0
    for _ in range(warmup):
        fn(q, k, v, group, causal=True, layout=layout).backward(dout)
    for i in range(repeats):
        q.grad = k.grad = v.grad = None
        dist.barrier(group)
        with PeakMemory(dev) as mem, record_block_calls() as log:
            start = time.perf_counter()
            out = fn(q, k, v, group, causal=True, layout=layout)
            out.backward(dout)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            times.append(time.perf_counter() - start)
            del out
        peaks.append(mem.peak)
        flops, calls = log.flops, len(log.calls)
    runs = list(peaks)
    times.sort(), peaks.sort()
    return {"rank": rank, "world": world, "seq_len": seq_len, "mode": mode, "layout": layout,
            "seconds": times[len(times) // 2], "peak_bytes": peaks[len(peaks) // 2], "flops": flops,
            "block_calls": calls, "peak_bytes_runs": runs}
