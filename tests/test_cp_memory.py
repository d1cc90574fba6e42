"""Per-rank memory of ring attention (forward + backward) falls with the CP degree.

Peak RSS above the process baseline, in fresh processes (one per rank), at the same total length for CP 1, 4 and 8.
Attention geometry of Qwen2-0.5B (14 query heads, 2 KV heads, head_dim 64; Qwen2-7B has the same GQA ratio 7).
"""
import os

import pytest

from dist_utils import run_distributed

SHAPE = dict(seq_len=8192, heads=14, kv_heads=2, head_dim=64)  # q: 28 MiB fp32 at CP=1


def _measure(rank, world):
    from megatron_lc.bench.cp import measure_attention

    return measure_attention(mode="ring", repeats=1, **SHAPE)  # peaks agree run to run; the warmup run pages code in


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc peak-RSS reset")
def test_ring_attention_memory_per_rank_shrinks_with_cp(monkeypatch):
    from megatron_lc.memory import MALLOC_ENV

    for key, value in MALLOC_ENV.items():  # inherited by the spawned ranks: RSS tracks live tensors exactly
        monkeypatch.setenv(key, value)
    peak = {}
    for world in (1, 4, 8):
        results = run_distributed(_measure, world, timeout=600)
        peak[world] = max(r["peak_bytes"] for r in results)  # the worst rank
    ratios = {w: round(peak[w] / peak[1], 3) for w in peak}
    print({w: f"{p / 2**20:.1f} MiB" for w, p in peak.items()}, ratios)
    assert peak[1] > 2 * 28 * 2**20, peak  # out and dq at least: the measurement sees the attention's memory
    assert ratios[4] <= 0.55, ratios
    assert ratios[8] <= 0.30, ratios
