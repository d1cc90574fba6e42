"""``megatron-lc bench cp``: per-rank time and peak memory of context-parallel attention (forward + backward) vs
CP degree and sequence length.

    megatron-lc bench cp --cp 1 2 4 8 --seq-len 4096 8192 --mode ring --out runs/bench_cp

Spawns CP processes on this machine (gloo on CPU; NCCL with one GPU per rank when --device cuda), runs
``measure_attention`` on every rank, prints a table (max over ranks), and writes ``bench_cp.json`` and
``bench_cp.png`` (time and memory vs CP degree, one line per length) under --out. ``measure_attention`` is also what
the CP memory tests call inside their own process groups.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ..configtools import ConfigError
from ..distributed import process_group
from ..memory import MALLOC_ENV, PeakMemory, release_freed_heap
from ..ops.attention_lse import record_block_calls
from ..parallel.cp_sharding import shard_sequence
from ..parallel.ring import allgather_attention, ring_attention


def measure_attention(seq_len: int, heads: int, kv_heads: int, head_dim: int, mode: str = "ring",
                      layout: str = "zigzag", batch: int = 1, dtype: torch.dtype = torch.float32,
                      device: str = "cpu", group=None, repeats: int = 1, warmup: int = 1) -> dict:
    """Forward + backward of CP attention over ``group`` (default: the world; call inside an initialised process
    group) on this rank's shard of a ``[batch, seq_len]`` sequence, q ``[B, S/CP, heads, head_dim]``, k and v
    ``[B, S/CP, kv_heads, head_dim]``. Returns seconds and peak_bytes (medians of ``repeats`` runs;
    ``peak_bytes_runs`` lists every run's), flops (block matmul FLOPs this rank computed, per run) and block_calls.
    ``warmup`` runs come first, unmeasured: a first call pages in kernel code and thread stacks, which RSS would
    otherwise count as attention memory."""
    dev = torch.device(device)
    if dev.type == "cpu":
        release_freed_heap()  # before this function's own tensors: they must not leave free heap blocks behind
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
    for _ in range(repeats):
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


def _worker(rank: int, world: int, port: int, cfg: dict, queue) -> None:
    """One spawned rank: join the group, measure, put the result on ``queue``."""
    device = cfg["device"]
    if device != "cuda":
        torch.set_num_threads(max(1, cfg["threads"] // world))
    with process_group(device, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world):
        result = measure_attention(cfg["seq_len"], cfg["heads"], cfg["kv_heads"], cfg["head_dim"], mode=cfg["mode"],
                                   layout=cfg["layout"], dtype=getattr(torch, cfg["dtype"]),
                                   device=f"cuda:{rank}" if device == "cuda" else "cpu", repeats=cfg["repeats"])
        queue.put(result)


def run_world(world: int, cfg: dict) -> list[dict]:
    """``measure_attention`` on ``world`` fresh processes (one per CP rank); their results, by rank."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MALLOC_ENV)  # the spawned ranks inherit it: exact CPU peak RSS (see megatron_lc.memory)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, world, port, cfg, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=cfg["timeout"]) for _ in range(world)]
    for p in procs:
        p.join()
    return sorted(results, key=lambda r: r["rank"])


def _plot(rows: list[dict], args: argparse.Namespace, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 4))
    for n in args.seq_len:
        sel = [r for r in rows if r["seq_len"] == n]
        ax_t.plot([r["cp"] for r in sel], [1e3 * r["seconds"] for r in sel], marker="o", label=f"S={n}")
        ax_m.plot([r["cp"] for r in sel], [r["peak_bytes"] / 2**20 for r in sel], marker="o", label=f"S={n}")
    for ax, label in ((ax_t, "fwd+bwd ms per rank"), (ax_m, "peak MiB per rank")):
        ax.set_xlabel("CP degree")
        ax.set_ylabel(label)
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{args.mode} attention, {args.heads}/{args.kv_heads} heads x {args.head_dim}, {args.dtype}, "
                 f"{args.device}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_cp_args(p: argparse.ArgumentParser) -> None:
    """The flags of ``megatron-lc bench cp``."""
    p.add_argument("--cp", type=int, nargs="+", default=[1, 2, 4, 8], help="CP degrees (processes)")
    p.add_argument("--seq-len", type=int, nargs="+", default=[4096, 8192], help="total sequence lengths")
    p.add_argument("--mode", choices=["ring", "allgather"], default="ring")
    p.add_argument("--layout", choices=["zigzag", "contiguous"], default="zigzag")
    p.add_argument("--heads", type=int, default=14, help="query heads (default: Qwen2-0.5B's 14)")
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads shared by all ranks")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--out", default="runs/bench_cp",
                   help="folder for bench_cp.json and bench_cp.png (default: %(default)s)")


def run_cp(args: argparse.Namespace) -> int:
    """``megatron-lc bench cp``: every (S, CP) in fresh processes; prints the table, writes bench_cp.json/png."""
    for n in args.seq_len:
        for w in args.cp:
            if n % (2 * w):
                raise ConfigError(f"--seq-len {n} is not divisible by 2 x CP {w}")
    cfg = {k: getattr(args, k) for k in ("mode", "layout", "heads", "kv_heads", "head_dim", "dtype", "device",
                                         "threads", "repeats", "timeout")}
    rows = []
    print(f"{'S':>8} {'CP':>3} {'ms/rank (max)':>14} {'peak MiB/rank (max)':>20} {'vs CP=1':>8} {'GFLOP/rank':>11} "
          f"{'FLOP spread':>11}")
    for n in args.seq_len:
        base = None
        for w in args.cp:
            res = run_world(w, {**cfg, "seq_len": n})
            peak = max(r["peak_bytes"] for r in res)
            flops = [r["flops"] for r in res]
            base = base if base is not None else peak
            row = {"seq_len": n, "cp": w, "seconds": max(r["seconds"] for r in res), "peak_bytes": peak,
                   "peak_vs_first": peak / base, "flops": flops, "per_rank": res}
            rows.append(row)
            print(f"{n:>8} {w:>3} {1e3 * row['seconds']:>14.1f} {peak / 2**20:>20.1f} {peak / base:>8.2f} "
                  f"{max(flops) / 1e9:>11.2f} {max(flops) / max(min(flops), 1):>11.3f}")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_cp.json"), "w") as f:
        json.dump({"config": cfg, "rows": rows}, f, indent=1)
    _plot(rows, args, os.path.join(args.out, "bench_cp.png"))
    return 0
