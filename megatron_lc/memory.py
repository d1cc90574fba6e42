"""Peak memory, the one place it is measured: CUDA's allocator peak, or on CPU the process's peak resident set.

- CUDA: ``torch.cuda.max_memory_allocated`` (tensors only), reset by ``reset_peak_memory_stats``.
- CPU: ``VmHWM`` of ``/proc/self/status`` (the whole process: Python, libraries and tensors), reset to the current
  ``VmRSS`` by writing "5" to ``/proc/self/clear_refs`` (Linux). For RSS to track live tensors, glibc must return
  freed blocks to the system: start the measured process with ``MALLOC_ENV`` (or call ``release_freed_heap`` before
  its first large allocation).

The trainer logs ``peak_memory_bytes``; the benchmarks and memory tests measure a block of code with ``PeakMemory``.
"""
from __future__ import annotations

import ctypes
import gc

import torch

# Set in the environment of a process before it starts, glibc takes every block of 64 KiB or more from mmap from
# the first allocation on, so freed tensors leave no reusable free space in the heap.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}


def status_bytes(key: str) -> int:
    """A ``/proc/self/status`` memory field (``"VmRSS:"``, ``"VmHWM:"``, ...) in bytes (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024  # reported in kB
    raise KeyError(key)


def release_freed_heap() -> None:
    """Make RSS track live CPU tensors: glibc keeps freed blocks below its (adaptive, up to 32 MiB) mmap threshold
    in the heap, where a later allocation reuses them: a peak would be under-counted (resident free pages reused)
    or over-counted (trimmed free pages faulted back in), by up to the heap's free space. Best set before the
    process's first large allocation (``MALLOC_ENV``, or early in the measured function)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to tune
        return
    libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD: large blocks come from mmap and go back on free
    libc.malloc_trim(0)


def current_memory_bytes(device: torch.device) -> int:
    """Memory in use now, in bytes: allocated tensors on CUDA; the process's resident set (VmRSS) on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    return status_bytes("VmRSS:")


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory in bytes since the last reset_peak_memory: allocated tensors on CUDA; the whole process's
    resident set (VmHWM: Python, libraries and tensors) on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    if device.type != "cpu":
        raise ValueError(f"peak_memory_bytes supports cuda and cpu devices, got {device}")
    try:
        return status_bytes("VmHWM:")
    except (OSError, KeyError):
        pass
    import resource  # no /proc (macOS): the lifetime peak, in bytes there

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def reset_peak_memory(device: torch.device) -> bool:
    """Start a new peak for peak_memory_bytes; returns False where that is impossible (CPU without a writable
    /proc/self/clear_refs: the peak then runs from process start)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux: "5" resets VmHWM to the current resident set
        return True
    except OSError:
        return False


class PeakMemory:
    """Memory of the ``with`` block on ``device``: ``base`` (bytes in use at its start), ``peak_abs`` (the peak
    during it) and ``peak`` (``peak_abs - base``). CUDA: allocator counts, after a synchronize at both ends. CPU:
    RSS, after a garbage collection and the freed heap's release, with VmHWM reset so earlier peaks do not count."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.base = self.peak_abs = self.peak = 0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __enter__(self) -> PeakMemory:
        gc.collect()  # garbage of earlier code must not count as this block's baseline
        self._sync()
        if self.device.type == "cpu":
            release_freed_heap()
        if not reset_peak_memory(self.device):
            raise OSError("PeakMemory on CPU needs a writable /proc/self/clear_refs (Linux) to reset the peak RSS")
        self.base = current_memory_bytes(self.device)
        return self

    def __exit__(self, *exc) -> None:
        self._sync()
        self.peak_abs = peak_memory_bytes(self.device)
        self.peak = self.peak_abs - self.base
