"""Per-rank time and peak memory of context-parallel attention (forward + backward) vs CP degree and length.

    python scripts/bench_cp.py --cp 1 2 4 8 --seq-len 4096 8192 --mode ring --out runs/bench_cp

Spawns CP processes on this machine (gloo on CPU; NCCL with one GPU per rank when --device cuda), measures
``megatron_lc.parallel.cp_bench.measure_attention`` on every rank, prints a table (max over ranks), and writes
``bench_cp.json`` and ``bench_cp.png`` (time and memory vs CP degree, one line per length) under --out.
"""
from __future__ import annotations

import argparse
import json
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_lc.parallel.cp_bench import MALLOC_ENV


def _worker(rank, world, port, cfg, queue):
    device = cfg["device"]
    if device == "cuda":
        torch.cuda.set_device(rank)
    else:
        torch.set_num_threads(max(1, cfg["threads"] // world))
    dist.init_process_group("nccl" if device == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=world)
    from megatron_lc.parallel.cp_bench import measure_attention

    try:
        result = measure_attention(cfg["seq_len"], cfg["heads"], cfg["kv_heads"], cfg["head_dim"], mode=cfg["mode"],
                                   layout=cfg["layout"], dtype=getattr(torch, cfg["dtype"]),
                                   device=f"cuda:{rank}" if device == "cuda" else "cpu", repeats=cfg["repeats"])
        queue.put(result)
    finally:
        dist.destroy_process_group()


def run_one(world: int, cfg: dict) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MALLOC_ENV)  # the spawned ranks inherit it: exact CPU peak RSS (see cp_bench)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, world, port, cfg, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=cfg["timeout"]) for _ in range(world)]
    for p in procs:
        p.join()
    return sorted(results, key=lambda r: r["rank"])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    p.add_argument("--out", default="runs/bench_cp")
    args = p.parse_args(argv)
    for n in args.seq_len:
        for w in args.cp:
            if n % (2 * w):
                p.error(f"--seq-len {n} is not divisible by 2 x CP {w}")
    cfg = {k: getattr(args, k) for k in ("mode", "layout", "heads", "kv_heads", "head_dim", "dtype", "device",
                                         "threads", "repeats", "timeout")}
    rows = []
    print(f"{'S':>8} {'CP':>3} {'ms/rank (max)':>14} {'peak MiB/rank (max)':>20} {'vs CP=1':>8} {'GFLOP/rank':>11} "
          f"{'FLOP spread':>11}")
    for n in args.seq_len:
        base = None
        for w in args.cp:
            res = run_one(w, {**cfg, "seq_len": n})
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
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: wrote bench_cp.json only (pip install matplotlib for the PNG)")
        return
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
    fig.savefig(os.path.join(args.out, "bench_cp.png"), dpi=120)
    print(f"wrote {args.out}/bench_cp.json and bench_cp.png")


if __name__ == "__main__":
    main()
