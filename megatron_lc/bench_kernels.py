"""``megatron-lc bench kernels``: each op's implementations (torch eager, torch.compile, our Triton kernels,
Liger-Kernel when importable) timed forward and forward+backward at our presets' sizes.

Reports the median time, achieved GB/s and percent of the device's measured copy bandwidth for the memory-bound
ops (rmsnorm, swiglu, rope), TFLOP/s for linear cross-entropy and attention, and the peak memory above the inputs;
writes ``kernels.md`` (a Markdown table), ``kernels.json`` and ``kernels.png`` under --out. ``--smoke`` runs one
small shape per op, without torch.compile (about 20 s of compiling per kernel on 2 CPU cores), for CI.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .ops import dispatch


@dataclass
class Case:
    op: str
    shape: str
    make: Callable[[], tuple]  # -> inputs (the float ones require grad)
    bytes_fwd: float  # memory traffic of one forward (memory-bound ops), 0 if not reported
    bytes_bwd: float
    flops_fwd: float  # matmul FLOPs of one forward (compute-bound ops), 0 if not reported


def _cases(device: torch.device, dtype: torch.dtype, smoke: bool) -> list[Case]:
    size = torch.tensor([], dtype=dtype).element_size()
    tokens = [256] if smoke else [4096, 32768]
    hidden = [64] if smoke else [896, 1536, 3584]
    cases = []

    def rand(*shape, grad=True, scale=1.0):
        t = (torch.randn(*shape, device=device) * scale).to(dtype)
        return t.requires_grad_(grad)

    for t in tokens:
        for h in hidden:
            n = t * h
            cases.append(Case("rmsnorm", f"{t}x{h}", lambda t=t, h=h: (rand(t, h), rand(h), 1e-6),
                              2 * n * size, 3 * n * size, 0))
            i = h * 11 // 2 // 64 * 64 or 64  # SwiGLU width ~5.5 x hidden, as Qwen2
            m = t * i
            cases.append(Case("swiglu", f"{t}x{i}", lambda t=t, i=i: (rand(t, i), rand(t, i)),
                              3 * m * size, 5 * m * size, 0))
        heads, kv_heads, d = (4, 2, 16) if smoke else (28, 4, 128)
        qk = t * (heads + kv_heads) * d
        cases.append(Case("rope", f"{t}x{heads}+{kv_heads}x{d}", lambda t=t, heads=heads, kv_heads=kv_heads, d=d: (
            rand(1, t, heads, d), rand(1, t, kv_heads, d), torch.randn(1, t, d // 2, device=device),
            torch.randn(1, t, d // 2, device=device)), 2 * qk * size + t * d * 4, 2 * qk * size + t * d * 4, 0))
        vocab = 1003 if smoke else 151936
        h = hidden[0] if smoke else 1536
        cases.append(Case("linear_cross_entropy", f"{t}x{h}x{vocab}", lambda t=t, h=h, vocab=vocab: (
            rand(t, h), rand(vocab, h, scale=0.02), torch.randint(0, vocab, (t,), device=device)),
            0, 0, 2.0 * t * h * vocab))
        s, ah, ad = (t, 4, 32) if smoke else (t, 16, 128)
        cases.append(Case("attention", f"S{s}xH{ah}xD{ad}", lambda s=s, ah=ah, ad=ad: (
            rand(1, s, ah, ad), rand(1, s, ah, ad), rand(1, s, ah, ad)), 0, 0, 2.0 * 2 * s * s * ah * ad / 2))
    return cases


def _call(op: str, fn: Callable, inputs: tuple):
    if op == "rope":
        q, k = fn(*inputs)
        return (q.float().sum() + k.float().sum())
    if op == "linear_cross_entropy":
        loss, _ = fn(*inputs)
        return loss
    if op == "attention":
        return fn(*inputs, causal=True).float().sum()
    return fn(*inputs).float().sum()


def _implementations(op: str, device: torch.device, smoke: bool) -> dict[str, Callable]:
    impls = {"torch": dispatch._torch_impl(op)}
    if not smoke:
        impls["torch.compile"] = torch.compile(dispatch._torch_impl(op))
    if dispatch._triton_runs_on(device):
        try:
            impls["triton (ours)"] = dispatch._triton_impl(op)
        except ImportError:  # that kernel has not landed
            pass
    return impls


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable, device: torch.device, repeats: int) -> float:
    fn()  # warm-up: compilation, autotuning, caches
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _peak_extra(fn: Callable, device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    _sync(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    _sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**30


def copy_bandwidth(device: torch.device) -> float:
    """Measured device copy bandwidth in bytes/s (read + write of a 256 MiB buffer; 16 MiB on CPU)."""
    n = (256 if device.type == "cuda" else 16) * 2**20 // 4
    x, y = torch.randn(n, device=device), torch.empty(n, device=device)
    seconds = _time(lambda: y.copy_(x), device, repeats=10)
    return 2 * n * 4 / seconds


def run(device: torch.device, dtype: torch.dtype, smoke: bool, repeats: int) -> list[dict]:
    """Time every implementation of every case; returns one row per (case, implementation)."""
    bandwidth = copy_bandwidth(device)
    rows = []
    for case in _cases(device, dtype, smoke):
        for name, fn in _implementations(case.op, device, smoke).items():
            inputs = case.make()
            forward = lambda: _call(case.op, fn, inputs)  # noqa: E731

            def both():
                for t in inputs:
                    if isinstance(t, torch.Tensor):
                        t.grad = None
                _call(case.op, fn, inputs).backward()

            with torch.no_grad():
                t_fwd = _time(forward, device, repeats)
            t_both = _time(both, device, repeats)
            row = {"op": case.op, "shape": case.shape, "impl": name, "fwd_ms": 1e3 * t_fwd,
                   "fwd_bwd_ms": 1e3 * t_both, "peak_extra_gib": _peak_extra(both, device)}
            if case.bytes_fwd:
                row["fwd_GBps"] = case.bytes_fwd / t_fwd / 1e9
                row["fwd_bwd_GBps"] = (case.bytes_fwd + case.bytes_bwd) / t_both / 1e9
                row["pct_copy_bw"] = 100 * (case.bytes_fwd + case.bytes_bwd) / t_both / bandwidth
            if case.flops_fwd:
                row["fwd_bwd_TFLOPs"] = 3 * case.flops_fwd / t_both / 1e12
            rows.append(row)
    return rows


def to_markdown(rows: list[dict], header: str) -> str:
    cols = ["op", "shape", "impl", "fwd_ms", "fwd_bwd_ms", "fwd_bwd_GBps", "pct_copy_bw", "fwd_bwd_TFLOPs",
            "peak_extra_gib"]
    lines = [header, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [r.get(c) for c in cols]
        lines.append("| " + " | ".join("" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v)
                                       for v in cells) + " |")
    return "\n".join(lines) + "\n"


def _plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = sorted({r["op"] for r in rows})
    fig, axes = plt.subplots(1, len(ops), figsize=(4 * len(ops), 3.5), squeeze=False)
    for ax, op in zip(axes[0], ops):
        sel = [r for r in rows if r["op"] == op]
        labels = [f"{r['shape']}\n{r['impl']}" for r in sel]
        ax.barh(range(len(sel)), [r["fwd_bwd_ms"] for r in sel])
        ax.set_yticks(range(len(sel)), labels, fontsize=6)
        ax.set_xlabel("fwd+bwd ms (median)")
        ax.set_title(op)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def add_bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--smoke", action="store_true", help="one small shape per op, no torch.compile (CI)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per case (default 20; 2 with --smoke)")
    p.add_argument("--out", default="runs/bench_kernels")


def run_bench(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    repeats = args.repeats or (2 if args.smoke else 20)
    rows = run(device, dtype, args.smoke, repeats)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    header = (f"Kernels on {name}, {dtype}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}, median of "
              f"{repeats}; copy bandwidth {copy_bandwidth(device) / 1e9:.0f} GB/s")
    os.makedirs(args.out, exist_ok=True)
    table = to_markdown(rows, header)
    with open(os.path.join(args.out, "kernels.md"), "w") as f:
        f.write(table)
    with open(os.path.join(args.out, "kernels.json"), "w") as f:
        json.dump({"header": header, "rows": rows}, f, indent=1)
    _plot(rows, os.path.join(args.out, "kernels.png"))
    print(table)
    return 0
