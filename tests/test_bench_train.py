"""`megatron-lc bench train`: the CPU smoke run (ours and HF, every case in its own process), the max-length
search, one rank of a CP ring simulated on one device (the same block-kernel calls as a real gloo rank), and the
flag errors. The whole file runs in about a minute on 2 CPU cores."""
import json
import math
import os

import pytest
import torch
from dist_utils import run_distributed

from megatron_lc.bench.train import find_max_len
from megatron_lc.cli import main
from megatron_lc.configtools import ConfigError


def test_bench_train_smoke_on_cpu(tmp_path, capsys):
    out = tmp_path / "bench"
    # one length (each contender x length is a worker process); several lengths: test_bench_train_find_max_len_on_cpu
    assert main(["bench", "train", "--preset", "tiny", "--seq-len", "256", "--layers", "2", "--device", "cpu",
                 "--contenders", "ours,hf", "--warmup", "0", "--repeats", "1", "--optimizer",
                 "--out", str(out)]) == 0
    report = json.loads((out / "train.json").read_text())
    rows = report["rows"]
    assert {(r["contender"], r["seq_len"]) for r in rows} == {("ours", 256), ("hf", 256)}
    for r in rows:
        assert r["status"] == "ok", r
        assert r["tokens_per_second"] > 0 and r["step_ms"] > 0 and r["peak_abs_gib"] > 0, r
        assert r["peak_extra_gib"] > 0 and r["layers"] == 2 and math.isfinite(r["loss"]), r
        assert r["optimizer_gib"] > 0 and r["optimizer"] is True, r  # AdamW state is counted
    table = (out / "train.md").read_text()
    assert "| contender | S | layers | tokens/s |" in table and "AdamW" in table
    assert (out / "train.png").stat().st_size > 0
    assert "| ours | 256 | 2 |" in capsys.readouterr().out


def test_bench_train_reports_skipped_contenders(tmp_path, capsys):
    # hf-liger never runs on CPU (Triton kernels); asked for, it is skipped with the reason, not an error.
    assert main(["bench", "train", "--preset", "tiny", "--seq-len", "64", "--device", "cpu", "--contenders",
                 "ours,hf-liger", "--warmup", "0", "--repeats", "1", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "train.json").read_text())
    assert set(report["skipped"]) == {"hf-liger"} and [r["contender"] for r in report["rows"]] == ["ours"]
    assert "skipping hf-liger" in capsys.readouterr().out


def test_find_max_len_doubles_then_bisects():
    limit = 5000
    best, tried = find_max_len(lambda s: s <= limit, start=1024, granularity=256)
    assert best == 4864
    assert tried == [(1024, True), (2048, True), (4096, True), (8192, False), (6144, False), (5120, False),
                     (4608, True), (4864, True)]
    # Lengths stay multiples of what the layout needs (CP=3 zigzag: 6); the answer is within the granularity.
    best, tried = find_max_len(lambda s: s <= limit, start=1200, granularity=100, multiple=6)
    assert all(s % 6 == 0 for s, _ in tried) and limit - 100 < best <= limit
    assert find_max_len(lambda s: False, start=512, granularity=64) == (None, [(512, False)])
    assert find_max_len(lambda s: True, start=512, granularity=64, max_len=4096)[0] == 4096
    with pytest.raises(ConfigError, match="multiple of 4"):
        find_max_len(lambda s: True, start=130, granularity=64, multiple=4)


def test_bench_train_find_max_len_on_cpu(tmp_path):
    common = ["bench", "train", "--preset", "tiny", "--device", "cpu", "--contenders", "ours", "--find-max-len"]
    # A budget below the Python process itself: the first length does not fit (the worker stops itself at once).
    assert main([*common, "--seq-len", "128", "--memory-budget-gib", "0.05", "--out", str(tmp_path / "a")]) == 0
    report = json.loads((tmp_path / "a" / "train.json").read_text())
    assert report["max_len"] == {"ours": None} and report["rows"][0]["status"] == "over_budget"
    # A roomy budget, capped by --max-seq-len: doubling stops at the cap.
    assert main([*common, "--seq-len", "128", "--memory-budget-gib", "16", "--max-seq-len", "256",
                 "--out", str(tmp_path / "b")]) == 0
    report = json.loads((tmp_path / "b" / "train.json").read_text())
    assert report["max_len"] == {"ours": 256}
    assert [(r["seq_len"], r["status"]) for r in report["rows"]] == [(128, "ok"), (256, "ok")]
    assert "Longest S that fits" in (tmp_path / "b" / "train.md").read_text()


# ---- one rank of a CP ring on one device ----------------------------------------------------------------------------
SEQ, WORLD = 96, 3  # zigzag: 6 chunks of 16 tokens, each rank holds 32


def _tiny():
    from megatron_lc.model import Transformer, preset_config

    torch.manual_seed(0)
    return Transformer(preset_config("tiny"), seed=0)


def _step_calls(model, rank, world):
    """Forward + backward of rank ``rank``'s shard; (block calls in order, loss)."""
    from megatron_lc.bench.train_worker import make_batch
    from megatron_lc.ops.attention_lse import record_block_calls
    from megatron_lc.parallel.simulated_ring import shard_batch_for_rank

    tokens, labels = make_batch(model.config, 1, SEQ, torch.device("cpu"))
    local = shard_batch_for_rank({"input_ids": tokens, "labels": labels}, rank, world)
    with record_block_calls() as log:
        loss = model(local["input_ids"], position_ids=local["position_ids"], labels=local["labels"])
        loss.backward()
    return log.calls, loss.item()


def _real_rank(rank, world):
    import functools

    import torch.distributed as dist

    from megatron_lc.parallel.ring import ring_attention

    model = _tiny()
    fn = functools.partial(ring_attention, group=dist.group.WORLD, layout="zigzag")
    model.set_attention(lambda q, k, v, *, causal=True, softmax_scale=None: fn(q, k, v, causal=causal,
                                                                               softmax_scale=softmax_scale))
    return _step_calls(model, rank, world)


def test_simulated_ring_rank_makes_the_block_calls_of_a_real_rank():
    from megatron_lc.parallel.simulated_ring import simulated_ring_attention

    real = run_distributed(_real_rank, WORLD)
    for rank in range(WORLD):
        model = _tiny()
        model.set_attention(simulated_ring_attention(rank, WORLD))
        calls, loss = _step_calls(model, rank, WORLD)
        assert calls == real[rank][0], (rank, calls, real[rank][0])
        assert math.isfinite(loss) and loss > 0
    # Per layer: WORLD forward blocks, and backward blocks (the off-diagonal ones in query pieces) on every rank.
    layers = _tiny().config.num_layers
    assert sum(kind == "fwd" for kind, *_ in real[0][0]) == WORLD * layers


def _attention_peak(rank, world, cp, simulated):
    """Peak memory (bytes, median of 3) of ring attention fwd + bwd on rank 0 of a CP=``cp`` ring at S = 2048
    (Qwen2-0.5B heads): over the real gloo group, or simulated on this process alone."""
    import torch.distributed as dist

    from megatron_lc.memory import PeakMemory, release_freed_heap
    from megatron_lc.parallel.ring import ring_attention
    from megatron_lc.parallel.cp_sharding import shard_sequence
    from megatron_lc.parallel.simulated_ring import SimulatedRing

    release_freed_heap()
    group = SimulatedRing(0, cp) if simulated else dist.group.WORLD
    g = torch.Generator().manual_seed(0)
    full = [torch.randn(1, 2048, h, 64, generator=g) for h in (14, 2, 2, 14)]
    q, k, v, dout = (shard_sequence(t, rank, cp) for t in full)
    del full
    q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
    ring_attention(q, k, v, group).backward(dout)  # warm-up: pages in code and thread stacks
    peaks = []
    for _ in range(3):
        q.grad = k.grad = v.grad = None
        with PeakMemory(torch.device("cpu")) as mem:
            ring_attention(q, k, v, group).backward(dout)
        peaks.append(mem.peak)
    return sorted(peaks)[1]


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc peak-RSS reset")
def test_simulated_ring_rank_holds_the_memory_of_a_real_rank(monkeypatch):
    from megatron_lc.memory import MALLOC_ENV

    for key, value in MALLOC_ENV.items():  # inherited by the spawned processes: RSS tracks live tensors
        monkeypatch.setenv(key, value)
    real = run_distributed(_attention_peak, 4, 4, False)[0]
    simulated = run_distributed(_attention_peak, 1, 4, True)[0]
    print(f"ring rank 0 of CP=4, S=2048: real {real / 2**20:.2f} MiB, simulated {simulated / 2**20:.2f} MiB")
    assert real > 2 * 2**20, real  # the measurement sees the attention's tensors (q alone is 1.75 MiB here)
    assert abs(simulated - real) <= 0.1 * real, (simulated / 2**20, real / 2**20)


def test_bench_train_cp_rank_of(tmp_path):
    assert main(["bench", "train", "--preset", "tiny", "--seq-len", "256", "--device", "cpu", "--cp-rank-of", "4",
                 "--warmup", "0", "--repeats", "1", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "train.json").read_text())
    (row,) = report["rows"]
    assert row["contender"] == "ours" and row["status"] == "ok" and row["local_seq_len"] == 64
    assert row["cp_chunks"] == [0, 7] and math.isfinite(row["loss"])
    assert set(report["skipped"]) >= {"hf"}  # HF has no context parallelism
    assert "0 of 4 (64 tok)" in (tmp_path / "train.md").read_text()


@pytest.mark.parametrize("argv, flag", [
    (["--layers", "0"], "--layers"),
    (["--preset", "qwen2-05b"], "--preset"),
    (["--seq-len", "100", "--cp-rank-of", "4"], "--seq-len"),
    (["--contenders", "ours,deepspeed"], "--contenders"),
    (["--find-max-len"], "--memory-budget-gib"),
])
def test_bad_flags_fail_naming_the_flag(tmp_path, capsys, argv, flag):
    with pytest.raises(SystemExit) as e:
        main(["bench", "train", "--device", "cpu", "--preset", "tiny", "--out", str(tmp_path), *argv])
    assert e.value.code == 2
    assert flag in capsys.readouterr().err
