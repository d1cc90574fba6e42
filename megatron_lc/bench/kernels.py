"""``megatron-lc bench kernels``: each op's implementations (torch eager, torch.compile, our Triton kernels) timed
forward and forward+backward at our presets' sizes.

Reports the median time, achieved GB/s and percent of the device's measured copy bandwidth for the memory-bound
ops (rmsnorm, swiglu, rope), TFLOP/s for linear cross-entropy and attention, and the peak memory above the inputs;
writes ``kernels.md`` (a Markdown table), ``kernels.json`` and ``kernels.png`` under --out. ``--smoke`` runs one
small shape per op, without torch.compile (about 20 s of compiling per kernel on 2 CPU cores), for CI; on CPU that
is one bar per op, so no chart is drawn (the output says so; the table has the numbers).

Each op is one entry of ``BENCHES`` (as Liger-Kernel's benchmark builder): its shapes, how to make its inputs,
the scalar its backward starts from, and its memory traffic or matmul FLOPs. Adding an op is adding an entry.
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

from ..memory import PeakMemory
from ..ops import dispatch


@dataclass(frozen=True)
class OpBench:
    """How to benchmark one op. ``shapes(smoke)``: size dicts; ``label(shape)``: the table's shape column;
    ``make(shape, rand, device)``: the inputs (``rand(*dims)`` gives a random tensor in the bench dtype that requires
    grad); ``loss(fn, inputs)``: a scalar of the op's output to run backward from; ``traffic(shape, element_size)``:
    bytes moved by (forward, backward) for memory-bound ops; ``flops(shape)``: matmul FLOPs of one forward for
    compute-bound ops (a backward counts twice that)."""

    shapes: Callable[[bool], list[dict]]
    label: Callable[[dict], str]
    make: Callable[..., tuple]
    loss: Callable[[Callable, tuple], torch.Tensor]
    traffic: Callable[[dict, int], tuple[float, float]] | None = None
    flops: Callable[[dict], float] | None = None


def _tokens(smoke: bool) -> list[int]:
    return [64] if smoke else [4096, 32768]  # smoke: the interpreter runs every program instance in Python


def _hidden(smoke: bool) -> list[int]:
    return [64] if smoke else [896, 1536, 3584]


def _sum(fn: Callable, inputs: tuple) -> torch.Tensor:
    return fn(*inputs).float().sum()


def _rope_loss(fn: Callable, inputs: tuple) -> torch.Tensor:
    q, k = fn(*inputs)
    return q.float().sum() + k.float().sum()


def _rope_shapes(smoke: bool) -> list[dict]:
    heads, kv_heads, d = (4, 2, 16) if smoke else (28, 4, 128)
    return [{"t": t, "heads": heads, "kv_heads": kv_heads, "d": d} for t in _tokens(smoke)]


def _rope_traffic(s: dict, size: int) -> tuple[float, float]:
    qk = s["t"] * (s["heads"] + s["kv_heads"]) * s["d"]
    one = 2 * qk * size + s["t"] * s["d"] * 4  # read and write q, k; read the fp32 cos/sin tables
    return one, one


def _rope_make(s: dict, rand: Callable, device: torch.device) -> tuple:
    t, d = s["t"], s["d"]
    return (rand(1, t, s["heads"], d), rand(1, t, s["kv_heads"], d), torch.randn(1, t, d // 2, device=device),
            torch.randn(1, t, d // 2, device=device))


def _swiglu_width(h: int) -> int:
    return h * 11 // 2 // 64 * 64 or 64  # SwiGLU width ~5.5 x hidden, as Qwen2


def _lce_shapes(smoke: bool) -> list[dict]:
    return [{"t": t, "h": 64 if smoke else 1536, "vocab": 1003 if smoke else 151936} for t in _tokens(smoke)]


def _lce_make(s: dict, rand: Callable, device: torch.device) -> tuple:
    return (rand(s["t"], s["h"]), rand(s["vocab"], s["h"], scale=0.02),
            torch.randint(0, s["vocab"], (s["t"],), device=device))


def _attention_shapes(smoke: bool) -> list[dict]:
    heads, d = (4, 32) if smoke else (16, 128)
    return [{"s": t, "heads": heads, "d": d} for t in _tokens(smoke)]


BENCHES: dict[str, OpBench] = {
    "rmsnorm": OpBench(
        shapes=lambda smoke: [{"t": t, "h": h} for t in _tokens(smoke) for h in _hidden(smoke)],
        label=lambda s: f"{s['t']}x{s['h']}",
        make=lambda s, rand, device: (rand(s["t"], s["h"]), rand(s["h"]), 1e-6),
        loss=_sum,
        traffic=lambda s, size: (2 * s["t"] * s["h"] * size, 3 * s["t"] * s["h"] * size)),
    "swiglu": OpBench(
        shapes=lambda smoke: [{"t": t, "i": _swiglu_width(h)} for t in _tokens(smoke) for h in _hidden(smoke)],
        label=lambda s: f"{s['t']}x{s['i']}",
        make=lambda s, rand, device: (rand(s["t"], s["i"]), rand(s["t"], s["i"])),
        loss=_sum,
        traffic=lambda s, size: (3 * s["t"] * s["i"] * size, 5 * s["t"] * s["i"] * size)),
    "rope": OpBench(
        shapes=_rope_shapes,
        label=lambda s: f"{s['t']}x{s['heads']}+{s['kv_heads']}x{s['d']}",
        make=_rope_make,
        loss=_rope_loss,
        traffic=_rope_traffic),
    "linear_cross_entropy": OpBench(
        shapes=_lce_shapes,
        label=lambda s: f"{s['t']}x{s['h']}x{s['vocab']}",
        make=_lce_make,
        loss=lambda fn, inputs: fn(*inputs)[0],  # (loss, ...): the loss
        flops=lambda s: 2.0 * s["t"] * s["h"] * s["vocab"]),
    "attention": OpBench(
        shapes=_attention_shapes,
        label=lambda s: f"S{s['s']}xH{s['heads']}xD{s['d']}",
        make=lambda s, rand, device: tuple(rand(1, s["s"], s["heads"], s["d"]) for _ in range(3)),
        loss=lambda fn, inputs: fn(*inputs, causal=True).float().sum(),
        flops=lambda s: 2.0 * 2 * s["s"] * s["s"] * s["heads"] * s["d"] / 2),  # QK^T and PV, causal half
}


def implementations(op: str, device: torch.device, smoke: bool) -> dict[str, Callable]:
    """The implementations of ``op`` that run on ``device``: torch, torch.compile (not with ``smoke``), ours."""
    impls = {"torch": dispatch._torch_impl(op)}
    if not smoke:
        impls["torch.compile"] = torch.compile(dispatch._torch_impl(op))
    if dispatch._triton_runs_on(device):
        try:
            impls["triton (ours)"] = dispatch._triton_impl(op)
        except ImportError:  # that kernel has not landed
            pass
    return impls


def _sync(device: torch.device) -> None:
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


def _peak_extra_gib(fn: Callable, device: torch.device) -> float | None:
    """GiB allocated by ``fn`` above what was live before it; None on CPU (RSS is too coarse for one op)."""
    if device.type != "cuda":
        return None
    with PeakMemory(device) as mem:
        fn()
    return mem.peak / 2**30


def copy_bandwidth(device: torch.device) -> float:
    """Measured device copy bandwidth in bytes/s (read + write of a 256 MiB buffer; 16 MiB on CPU)."""
    n = (256 if device.type == "cuda" else 16) * 2**20 // 4
    x, y = torch.randn(n, device=device), torch.empty(n, device=device)
    seconds = _time(lambda: y.copy_(x), device, repeats=10)
    return 2 * n * 4 / seconds


def _row(op: str, bench: OpBench, shape: dict, name: str, fn: Callable, device: torch.device, dtype: torch.dtype,
         repeats: int, bandwidth: float) -> dict:
    """Time one implementation at one shape: a row of the table."""

    def rand(*dims, grad=True, scale=1.0):
        return (torch.randn(*dims, device=device) * scale).to(dtype).requires_grad_(grad)

    inputs = bench.make(shape, rand, device)

    def both():
        for t in inputs:
            if isinstance(t, torch.Tensor):
                t.grad = None
        bench.loss(fn, inputs).backward()

    with torch.no_grad():
        t_fwd = _time(lambda: bench.loss(fn, inputs), device, repeats)
    t_both = _time(both, device, repeats)
    row = {"op": op, "shape": bench.label(shape), "impl": name, "fwd_ms": 1e3 * t_fwd, "fwd_bwd_ms": 1e3 * t_both,
           "peak_extra_gib": _peak_extra_gib(both, device)}
    if bench.traffic is not None:
        fwd, bwd = bench.traffic(shape, torch.tensor([], dtype=dtype).element_size())
        row["fwd_GBps"] = fwd / t_fwd / 1e9
        row["fwd_bwd_GBps"] = (fwd + bwd) / t_both / 1e9
        row["pct_copy_bw"] = 100 * (fwd + bwd) / t_both / bandwidth
    if bench.flops is not None:
        row["fwd_bwd_TFLOPs"] = 3 * bench.flops(shape) / t_both / 1e12
    return row


def run(device: torch.device, dtype: torch.dtype, smoke: bool, repeats: int,
        bandwidth: float | None = None) -> list[dict]:
    """Time every implementation of every op of ``BENCHES`` at its shapes; returns one row per (shape, impl)."""
    bandwidth = bandwidth or copy_bandwidth(device)
    return [_row(op, bench, shape, name, fn, device, dtype, repeats, bandwidth)
            for op, bench in BENCHES.items() for shape in bench.shapes(smoke)
            for name, fn in implementations(op, device, smoke).items()]


def to_markdown(rows: list[dict], header: str) -> str:
    """The table of ``rows`` (one per op, shape and implementation) under ``header``."""
    cols = ["op", "shape", "impl", "fwd_ms", "fwd_bwd_ms", "fwd_bwd_GBps", "pct_copy_bw", "fwd_bwd_TFLOPs",
            "peak_extra_gib"]
    lines = [header, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [r.get(c) for c in cols]
        lines.append("| " + " | ".join("" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v)
                                       for v in cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: str):
    """One panel per op: a bar of median fwd+bwd ms per (shape, implementation), the axis from zero; saved as PNG
    at ``path``. Returns the matplotlib Figure (closed), or None, drawing nothing, when every panel would hold one
    bar (nothing to compare: e.g. ``--smoke`` on CPU, one shape and only torch per op)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = sorted({r["op"] for r in rows})
    if all(sum(r["op"] == op for r in rows) <= 1 for op in ops):
        return None
    fig, axes = plt.subplots(1, len(ops), figsize=(4 * len(ops), 3.5), squeeze=False)
    for ax, op in zip(axes[0], ops):
        sel = [r for r in rows if r["op"] == op]
        labels = [f"{r['shape']}\n{r['impl']}" for r in sel]
        ax.barh(range(len(sel)), [r["fwd_bwd_ms"] for r in sel])
        ax.set_yticks(range(len(sel)), labels, fontsize=6)
        ax.set_xlim(left=0)
        ax.set_xlabel("fwd+bwd ms (median)")
        ax.set_title(op)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return fig


def add_kernels_args(p: argparse.ArgumentParser) -> None:
    """The flags of ``megatron-lc bench kernels``."""
    p.add_argument("--smoke", action="store_true", help="one small shape per op, no torch.compile (CI)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per case (default 20; 2 with --smoke)")
    p.add_argument("--out", default="runs/bench_kernels",
                   help="folder for kernels.md, kernels.json, kernels.png (default: %(default)s)")


def run_kernels(args: argparse.Namespace) -> int:
    """``megatron-lc bench kernels``: run every case, print the table, write kernels.md/json/png."""
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    repeats = args.repeats or (2 if args.smoke else 20)
    bandwidth = copy_bandwidth(device)
    rows = run(device, dtype, args.smoke, repeats, bandwidth)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    header = (f"Kernels on {name}, {dtype}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}, median of "
              f"{repeats}; copy bandwidth {bandwidth / 1e9:.0f} GB/s")
    os.makedirs(args.out, exist_ok=True)
    table = to_markdown(rows, header)
    with open(os.path.join(args.out, "kernels.md"), "w") as f:
        f.write(table)
    with open(os.path.join(args.out, "kernels.json"), "w") as f:
        json.dump({"header": header, "rows": rows}, f, indent=1)
    print(table)
    if plot(rows, os.path.join(args.out, "kernels.png")) is None:
        print("no kernels.png: every op has one bar (one shape, one implementation), nothing to compare; the table "
              "above has the numbers (without --smoke, or on CUDA with the Triton kernels, the chart is drawn)")
    return 0
