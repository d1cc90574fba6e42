"""megatron_lc.memory: the CPU peak (VmHWM) sees a big allocation and its reset, and PeakMemory measures a block."""
import os

import pytest
import torch

from megatron_lc import memory


def test_peak_memory_cpu_sees_a_big_allocation():
    cpu = torch.device("cpu")
    memory.reset_peak_memory(cpu)
    before = memory.peak_memory_bytes(cpu)
    x = torch.ones(64 * 2**20, dtype=torch.uint8)  # 64 MiB, touched so it is resident
    assert memory.peak_memory_bytes(cpu) >= before + 60 * 2**20
    del x
    if memory.reset_peak_memory(cpu):  # freed, and the peak reset: back below
        assert memory.peak_memory_bytes(cpu) < before + 60 * 2**20


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc peak-RSS reset")
def test_peak_memory_block_counts_a_transient_and_not_what_came_before():
    big = torch.ones(96 * 2**20, dtype=torch.uint8)
    del big  # an earlier peak: must not count
    with memory.PeakMemory(torch.device("cpu")) as mem:
        x = torch.ones(32 * 2**20, dtype=torch.uint8)
        del x
    assert 30 * 2**20 <= mem.peak < 80 * 2**20, mem.peak / 2**20
    assert mem.peak_abs == mem.base + mem.peak
