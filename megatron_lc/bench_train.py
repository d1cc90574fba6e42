"""``megatron-lc bench train``: one training step of a preset at given sequence lengths, ours against HF transformers
(+ gradient checkpointing) and HF + Liger-Kernel (when importable and on CUDA), on the same machine in one run.

Each (contender, S) runs in a fresh subprocess (``python -m megatron_lc.bench_train --worker SPEC``, one JSON line
out), so peaks do not leak from case to case and an out-of-memory kills only that case. Per case: tokens/s (median
of ``--repeats`` steps after ``--warmup``), peak memory and MFU (the trainer's formula: ``train_flops_per_token``,
``peak_flops_per_second``, ``mfu`` of megatron_lc.train.metrics; none on CPU unless MEGATRON_LC_PEAK_FLOPS is set).

Memory accounting (same as the anchors: the model's weights + grads are reported on their own):
- ``static_gib``: weights + gradients (+ AdamW state with ``--optimizer``), counted from the tensors.
- ``peak_abs_gib``: CUDA ``max_memory_allocated`` over the steps; CPU the process's peak RSS (VmHWM).
- ``peak_extra_gib``: the peak above weights + grads (+ optimizer): activations and transients. CUDA: peak - bytes
  allocated before the first step - grads - optimizer state; CPU: peak RSS - RSS right before the first step - grads
  - optimizer state (the worker runs with ``MALLOC_MMAP_THRESHOLD_=65536`` so freed tensors leave the RSS).

``--find-max-len`` doubles S from the first ``--seq-len`` until a step no longer fits (CUDA: out of memory; CPU:
peak RSS above ``--memory-budget-gib``), then bisects to ``--granularity`` tokens, per contender.
``--cp-rank-of N`` measures one rank of a CP=N zigzag ring on one device (parallel/simulated_ring.py).

Writes ``train.md`` (the table), ``train.json`` (every number) and ``train.png`` (tokens/s and memory vs S).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import torch

from .configtools import ConfigError
from .model.config import ModelConfig, preset_config
from .parallel.cp_bench import MALLOC_ENV, status_bytes  # MALLOC_ENV: every CPU worker's environment

CONTENDERS = ("ours", "hf", "hf-liger")
RESULT_PREFIX = "BENCH_TRAIN_RESULT "
GIB = 2**30
# Variables that would make a worker join the caller's torchrun job instead of making its own one-process group.
_DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
             "TORCHELASTIC_RUN_ID", "GROUP_RANK")


# ---- configuration -------------------------------------------------------------------------------------------------
def load_model_config(preset: str, layers: int | None = None) -> ModelConfig:
    """The ModelConfig of a preset name (tiny, demo, qwen2-0.5b, qwen2-1.5b, qwen2-7b: equal to configs/models/*.yaml)
    or of a YAML path, with ``num_layers`` replaced by ``layers`` (a reduced-depth probe) when given."""
    if os.path.isfile(preset) or preset.endswith((".yaml", ".yml")):
        try:
            config = ModelConfig.from_yaml(preset)
        except ConfigError as e:
            raise ConfigError(f"--preset {preset}: {e}") from None
    else:
        try:
            config = preset_config(preset)
        except ConfigError as e:
            raise ConfigError(f"--preset: {e}, or a path to a model YAML (configs/models/*.yaml)") from None
    if layers is not None:
        if not (isinstance(layers, int) and layers >= 1):
            raise ConfigError(f"--layers must be a positive number of Transformer blocks, got {layers!r}")
        config = dataclasses.replace(config, num_layers=layers)
    return config


def contender_status(name: str, device: torch.device, cp_rank_of: int | None = None) -> str | None:
    """None when contender ``name`` can run on ``device``, else why not (printed with the table)."""
    if name == "ours":
        return None
    if cp_rank_of:
        return "HF transformers has no context parallelism: with --cp-rank-of only ours runs"
    if importlib.util.find_spec("transformers") is None:
        return "transformers is not installed (pip install transformers)"
    if name == "hf-liger":
        if importlib.util.find_spec("liger_kernel") is None:
            return "liger-kernel is not installed (pip install liger-kernel)"
        if device.type != "cuda":
            return f"Liger-Kernel's Triton kernels need a CUDA device; this run is on {device.type}"
    return None


# ---- the worker: one (contender, S) in this process ----------------------------------------------------------------
class _RssWatchdog:
    """CPU: end the process (reporting ``over_budget``) as soon as its RSS passes ``budget`` bytes, so a probe of
    --find-max-len never takes the machine's memory (and the OOM killer) with it."""

    def __init__(self, budget: int):
        self.budget, self.done = budget, threading.Event()
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        while not self.done.wait(0.005):
            rss = status_bytes("VmRSS:")
            if rss > self.budget:
                _emit({"status": "over_budget", "peak_abs_gib": rss / GIB,
                       "error": f"RSS {rss / GIB:.2f} GiB passed the budget of {self.budget / GIB:.2f} GiB"})
                os._exit(3)

    def stop(self) -> None:
        self.done.set()


def _emit(result: dict) -> None:
    sys.stdout.write(RESULT_PREFIX + json.dumps(result) + "\n")
    sys.stdout.flush()


def _tensor_bytes(t: torch.Tensor) -> int:
    local = t.to_local() if hasattr(t, "to_local") else t  # an FSDP2 DTensor: this rank's shard
    return local.numel() * local.element_size()


def _batch(config: ModelConfig, batch: int, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Random tokens ``[B, S]`` int64 and our aligned labels: the targets of positions 0..S-2 and -100 at S-1, i.e.
    the S-1 targets HF's internal shift takes from ``labels=tokens``: both contenders do the same work."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, config.vocab_size, (batch, seq_len), generator=g)
    labels = torch.cat([tokens[:, 1:], torch.full((batch, 1), -100)], dim=1)
    return tokens.to(device), labels.to(device)


def _build_ours(spec: dict, config: ModelConfig, device: torch.device, dtype: torch.dtype):
    """Our Transformer built as the trainer builds it (meta device, parallelize, materialize) in a one-process
    group; returns (model, loss function of no arguments, {op: kernel}, notes)."""
    import torch.distributed as dist

    from .model.transformer import Transformer
    from .parallel.dims import ParallelDims
    from .parallel.parallelize import materialize, parallelize

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                                world_size=1)
    dims = ParallelDims(dp_replicate=1, dp_shard=1, cp=1, tp=1, world_size=1)
    mesh, flat = dims.build_mesh(device.type)
    with torch.device("meta"):
        model = Transformer(config)
    # "mixed" (the trainer): fp32 weights and grads, FSDP2 casts to ``dtype`` for compute. "pure": weights and
    # grads in ``dtype``, the bytes per parameter of an HF model loaded in that dtype.
    mixed = spec.get("ours_params", "mixed") == "mixed" and dtype != torch.float32
    _, chosen = parallelize(model, dims, mesh, flat, activation_checkpointing=spec["ac"], kernels="auto",
                            param_dtype=dtype if mixed else None, device=device)
    materialize(model, device, seed=0)
    if not mixed:
        model.to(dtype)  # RoPE tables are not buffers: they stay fp32 (see model/rope.py)
    model.train()
    tokens, labels = _batch(config, spec["batch"], spec["seq_len"], device)
    notes = {}
    n = spec.get("cp_rank_of")
    if n:
        from .parallel.simulated_ring import rank_chunks, shard_batch_for_rank, simulated_ring_attention

        rank = spec["cp_rank"]
        local = shard_batch_for_rank({"input_ids": tokens, "labels": labels}, rank, n)
        model.set_attention(simulated_ring_attention(rank, n))
        chosen["attention"] = f"ring schedule of rank {rank} of a simulated CP={n} ring (blocks: ops.attention_lse)"
        notes["cp_chunks"] = list(rank_chunks(rank, n))

        def loss_fn():
            return model(local["input_ids"], position_ids=local["position_ids"], labels=local["labels"])
    else:
        def loss_fn():
            return model(tokens, labels=labels)
    return model, loss_fn, chosen, notes


def _build_hf(spec: dict, config: ModelConfig, device: torch.device, dtype: torch.dtype, liger: bool):
    """transformers' Qwen2ForCausalLM of the same config and dtype, gradient checkpointing on, no KV cache (with
    Liger-Kernel's Qwen2 patches when ``liger``); returns (model, loss function of no arguments, kernels, notes)."""
    import transformers

    from .model.config import to_hf_config

    if liger:
        from liger_kernel.transformers import apply_liger_kernel_to_qwen2

        apply_liger_kernel_to_qwen2()  # patches the Qwen2 classes: must run before the model is built
    hf_config = transformers.Qwen2Config(**to_hf_config(config, str(dtype).replace("torch.", "")))
    hf_config.use_cache = False
    with torch.device(device):
        model = transformers.Qwen2ForCausalLM._from_config(hf_config, dtype=dtype, attn_implementation="sdpa")
    model.gradient_checkpointing_enable()
    model.train()
    tokens, _ = _batch(config, spec["batch"], spec["seq_len"], device)

    def loss_fn():
        # HF shifts inside: labels=tokens gives the targets of positions 0..S-2, as our aligned labels do.
        return model(input_ids=tokens, labels=tokens, use_cache=False).loss

    kernels = "Liger-Kernel (Qwen2 patches)" if liger else "transformers (sdpa attention)"
    return model, loss_fn, {"all": kernels}, {"transformers": transformers.__version__}


def run_case(spec: dict) -> dict:
    """Build one contender and time its training steps; returns the case's numbers (see the module docstring).

    ``spec``: contender, config (ModelConfig fields), seq_len, batch, dtype, device, ac, optimizer, warmup, repeats,
    cp_rank_of (None or N), cp_rank, memory_budget_bytes (CPU watchdog, or None).
    """
    from .train.metrics import mfu, peak_flops_per_second, train_flops_per_token

    device = torch.device(spec["device"])
    if device.type == "cuda":
        device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
        torch.cuda.set_device(device)
    dtype = getattr(torch, spec["dtype"])
    config = ModelConfig(**spec["config"])
    watchdog = None
    if device.type == "cpu" and spec.get("memory_budget_bytes"):
        watchdog = _RssWatchdog(spec["memory_budget_bytes"])
    name = spec["contender"]
    if name == "ours":
        model, loss_fn, kernels, notes = _build_ours(spec, config, device, dtype)
    else:
        model, loss_fn, kernels, notes = _build_hf(spec, config, device, dtype, liger=name == "hf-liger")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, foreach=False) if spec["optimizer"] else None

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def step() -> torch.Tensor:
        model.zero_grad(set_to_none=True)  # the trainer's order: gradients do not live across steps
        loss = loss_fn()
        loss.backward()
        if optimizer is not None:
            optimizer.step()
        return loss.detach()

    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        import gc

        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS: the peak of the steps only
        base = status_bytes("VmRSS:")
    times, losses = [], []
    for i in range(spec["warmup"] + spec["repeats"]):
        sync()
        start = time.perf_counter()
        loss = step()
        sync()
        if i >= spec["warmup"]:
            times.append(time.perf_counter() - start)
        losses.append(loss)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else status_bytes("VmHWM:")
    if watchdog is not None:
        watchdog.stop()
    weights = sum(_tensor_bytes(p) for p in model.parameters())
    grads = sum(_tensor_bytes(p.grad) for p in params if p.grad is not None)
    opt_state = 0
    if optimizer is not None:
        opt_state = sum(_tensor_bytes(t) for state in optimizer.state.values() for t in state.values()
                        if isinstance(t, torch.Tensor))
    seconds = statistics.median(times)
    n = spec.get("cp_rank_of") or 1
    local_tokens = spec["batch"] * spec["seq_len"] // n
    tokens_per_second = local_tokens / seconds
    # Model FLOPs of a token of the global sequence; a CP rank does 1/N of the sequence's work (zigzag balances it).
    flops_per_token = train_flops_per_token(config, spec["seq_len"])
    peak_flops = peak_flops_per_second(device, dtype)
    result = {
        "status": "ok", "contender": name, "seq_len": spec["seq_len"], "local_seq_len": spec["seq_len"] // n,
        "layers": config.num_layers, "batch": spec["batch"], "step_ms": 1e3 * seconds,
        "step_ms_all": [1e3 * t for t in times], "tokens_per_second": tokens_per_second,
        "flops_per_token": flops_per_token, "peak_flops": peak_flops,
        "mfu": mfu(tokens_per_second, flops_per_token, peak_flops, 1) if peak_flops else None,
        "weights_gib": weights / GIB, "grads_gib": grads / GIB, "optimizer_gib": opt_state / GIB,
        "static_gib": (weights + grads + opt_state) / GIB, "peak_abs_gib": peak / GIB,
        "base_gib": base / GIB, "peak_extra_gib": (peak - base - grads - opt_state) / GIB,
        "loss": float(losses[-1]), "kernels": kernels,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU", **notes,
    }
    return result


def worker_main(spec: dict) -> int:
    """Run one case and print its JSON line; a CUDA out-of-memory is reported as status "oom"."""
    try:
        result = run_case(spec)
    except torch.OutOfMemoryError as e:
        result = {"status": "oom", "error": str(e).splitlines()[0]}
    finally:
        import torch.distributed as dist

        if dist.is_initialized():  # exiting with live gloo/nccl threads aborts the process
            dist.destroy_process_group()
    _emit(result)
    return 0


# ---- the parent: one subprocess per case ---------------------------------------------------------------------------
def case_spec(contender: str, config: ModelConfig, seq_len: int, *, device: str = "cpu", dtype: str = "float32",
              ac: str = "full", batch: int = 1, optimizer: bool = False, warmup: int = 1, repeats: int = 3,
              cp_rank_of: int | None = None, cp_rank: int = 0, memory_budget_bytes: int | None = None,
              ours_params: str = "mixed") -> dict:
    """The JSON-able description of one case that ``measure`` hands to a worker (fields: see run_case)."""
    if contender not in CONTENDERS:
        raise ConfigError(f"unknown contender {contender!r}: use one of {', '.join(CONTENDERS)}")
    return {"contender": contender, "config": dataclasses.asdict(config), "seq_len": seq_len, "batch": batch,
            "dtype": dtype, "device": device, "ac": ac, "optimizer": optimizer, "warmup": warmup, "repeats": repeats,
            "cp_rank_of": cp_rank_of, "cp_rank": cp_rank, "memory_budget_bytes": memory_budget_bytes,
            "ours_params": ours_params}


def measure(spec: dict, timeout: float | None = None) -> dict:
    """Run ``spec`` (see run_case) in a fresh Python process; returns its result dict, or one with ``status``
    "oom", "over_budget", "timeout" or "error" (with the end of its stderr) when the step did not complete."""
    env = {k: v for k, v in os.environ.items() if k not in _DIST_ENV}
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if spec["device"].startswith("cpu"):
        env.update(MALLOC_ENV)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, "-m", "megatron_lc.bench_train", "--worker", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "error": f"the step took longer than --timeout {timeout} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if lines:
        return json.loads(lines[-1][len(RESULT_PREFIX):])
    tail = "\n".join(proc.stderr.strip().splitlines()[-8:])
    killed = proc.returncode in (-9, 137)  # the kernel's OOM killer (CPU) sends SIGKILL
    return {"status": "oom" if killed else "error", "error": f"worker exited with {proc.returncode}: {tail}"}


def find_max_len(fits: Callable[[int], bool], start: int, granularity: int, multiple: int = 1,
                 max_len: int | None = None) -> tuple[int | None, list[tuple[int, bool]]]:
    """The longest S that ``fits``: double from ``start`` until a length fails (or would pass ``max_len``), then
    bisect between the last fit and the first failure until they are at most ``granularity`` apart. Every length
    tried is a multiple of ``multiple`` (``start`` must be one). Returns (longest fitting S or None when ``start``
    does not fit, [(S, fits), ...] in the order tried)."""
    if start < 1 or start % multiple:
        raise ConfigError(f"--seq-len {start} must be a positive multiple of {multiple} to start --find-max-len")
    tried: list[tuple[int, bool]] = []

    def probe(s: int) -> bool:
        ok = bool(fits(s))
        tried.append((s, ok))
        return ok

    if not probe(start):
        return None, tried
    lo, hi = start, None
    while hi is None:
        if max_len is not None and 2 * lo > max_len:
            return lo, tried  # capped: it may fit longer
        if probe(2 * lo):
            lo *= 2
        else:
            hi = 2 * lo
    while hi - lo > granularity:
        mid = (lo + (hi - lo) // 2) // multiple * multiple
        if mid <= lo:
            break
        if probe(mid):
            lo = mid
        else:
            hi = mid
    return lo, tried


# ---- report ----------------------------------------------------------------------------------------------------------
def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 10**digits else f"{value:,.0f}"
    return str(value)


def to_markdown(rows: list[dict], header: str, notes: list[str]) -> str:
    """The table of every case (one row per contender and S) under ``header``, then ``notes``."""
    cols = ["contender", "S", "layers", "tokens/s", "step ms", "peak extra GiB", "peak abs GiB",
            "weights+grads(+opt) GiB", "MFU", "AC", "optimizer", "status"]
    cp = any(r.get("cp_rank_of") for r in rows)
    if cp:
        cols.insert(2, "CP rank")
    lines = [header, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        ok = r.get("status") == "ok"
        cells = {
            "contender": r["contender"], "S": str(r["seq_len"]), "layers": str(r.get("layers", "-")),
            "CP rank": (f"{r['cp_rank']} of {r['cp_rank_of']} ({r['seq_len'] // r['cp_rank_of']} tok)"
                        if r.get("cp_rank_of") else "-"),
            "tokens/s": _fmt(r.get("tokens_per_second")) if ok else "-",
            "step ms": _fmt(r.get("step_ms")) if ok else "-",
            "peak extra GiB": _fmt(r.get("peak_extra_gib")) if ok else "-",
            "peak abs GiB": _fmt(r.get("peak_abs_gib")),
            "weights+grads(+opt) GiB": _fmt(r.get("static_gib")) if ok else "-",
            "MFU": f"{100 * r['mfu']:.1f}%" if ok and r.get("mfu") is not None else "-",
            "AC": r.get("ac", "-"), "optimizer": "AdamW" if r.get("optimizer") else "no",
            "status": r.get("status", "?") if ok else f"{r.get('status')}",
        }
        lines.append("| " + " | ".join(cells[c] for c in cols) + " |")
    return "\n".join(lines + [""] + notes) + "\n"


def plot(rows: list[dict], path: str) -> None:
    """tokens/s vs S and peak memory (extra solid, absolute dashed) vs S, one line per contender (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 4))
    for name in dict.fromkeys(r["contender"] for r in rows):
        sel = sorted((r for r in rows if r["contender"] == name and r.get("status") == "ok"),
                     key=lambda r: r["seq_len"])
        if not sel:
            continue
        s = [r["seq_len"] for r in sel]
        (line,) = ax_t.plot(s, [r["tokens_per_second"] for r in sel], "o-", label=name)
        ax_m.plot(s, [r["peak_extra_gib"] for r in sel], "o-", color=line.get_color(), label=f"{name} extra")
        ax_m.plot(s, [r["peak_abs_gib"] for r in sel], "x--", color=line.get_color(), label=f"{name} absolute")
    for ax, label in ((ax_t, "tokens/s"), (ax_m, "peak memory (GiB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length S")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # nothing to label when no case completed
            ax.legend(fontsize=7)
    ax_t.set_title("one training step")
    ax_m.set_title("peak: extra above weights+grads(+opt), absolute")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _policy_notes(config: ModelConfig, policy: str, seq_lens: list[int], dtype: torch.dtype) -> list[str]:
    """What the AC policy saves and recomputes (checkpointing.policy_costs), when that module exists."""
    try:
        from .parallel.checkpointing import policy_costs
    except ImportError:
        return []
    size = torch.tensor([], dtype=dtype).element_size()
    lines = [f"AC policy `{policy}` (megatron_lc.parallel.checkpointing.policy_costs, ours, {dtype}):"]
    for s in seq_lens:
        try:
            c = policy_costs(config, policy, s, dtype_bytes=size)
        except (ValueError, TypeError) as e:
            return [f"policy_costs({policy!r}) failed: {e}"]
        lines.append(f"- S={s}: saved {c['saved_bytes_per_token'] / 1024:.1f} KiB/token "
                     f"({c['saved_bytes_per_token'] * s / GIB:.3g} GiB), host {c['host_bytes_per_token'] / 1024:.1f} "
                     f"KiB/token, recompute {100 * c['recompute_fraction']:.1f}% of the step's model FLOPs")
    return lines


# ---- command line ----------------------------------------------------------------------------------------------------
def add_train_args(p: argparse.ArgumentParser) -> None:
    """The flags of ``megatron-lc bench train``."""
    cuda = torch.cuda.is_available()
    p.add_argument("--preset", default="qwen2-0.5b",
                   help="model preset (tiny, demo, qwen2-0.5b, qwen2-1.5b, qwen2-7b) or a model YAML path")
    p.add_argument("--seq-len", type=int, nargs="+", default=[4096], metavar="S",
                   help="sequence lengths (tokens per sample); with --find-max-len the first is where doubling starts")
    p.add_argument("--layers", type=int, default=None, metavar="K",
                   help="reduced-depth probe: replace the preset's num_layers with K")
    p.add_argument("--batch", type=int, default=1, help="samples per step")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--contenders", default=None,
                   help=f"comma-separated among {','.join(CONTENDERS)}; default: all that import and run here")
    p.add_argument("--ac", default=None, metavar="POLICY",
                   help="our activation checkpointing policy (none, full, every_k, selective, offload; parallelize "
                        "validates it); default selective on CUDA (keeps attention's output: no attention recompute), "
                        "full on CPU (the least memory, which is what CPU runs check)")
    p.add_argument("--ours-params", default="mixed", choices=["mixed", "pure"],
                   help="ours with a 16-bit --dtype: mixed = the trainer's fp32 weights and grads with --dtype compute "
                        "(FSDP2 mixed precision); pure = weights and grads in --dtype, as the HF contenders hold them")
    p.add_argument("--optimizer", action="store_true",
                   help="include AdamW (its state, and its step) in the step; the table says so")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before the timed ones")
    p.add_argument("--repeats", type=int, default=3, help="timed steps per case (the median is reported)")
    p.add_argument("--find-max-len", action="store_true",
                   help="per contender, the longest S whose step fits (doubling from --seq-len, then bisection)")
    p.add_argument("--granularity", type=int, default=1024, help="--find-max-len stops bisecting at this many tokens")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help="--find-max-len never tries longer (CPU: bounds the time of cheap contenders)")
    p.add_argument("--memory-budget-gib", type=float, default=None,
                   help="CPU: a step fits when its peak RSS stays under this (required with --find-max-len on CPU)")
    p.add_argument("--cp-rank-of", type=int, default=None, metavar="N",
                   help="measure one rank of a CP=N zigzag ring on this device (ours only; S divisible by 2N)")
    p.add_argument("--cp-rank", type=int, default=0,
                   help="which rank of the --cp-rank-of ring (zigzag gives every rank the same block shapes)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per case before it is stopped")
    p.add_argument("--out", default="runs/bench_train", help="folder for train.md, train.json, train.png")


def _check_args(args: argparse.Namespace) -> None:
    for flag, value, low in (("--batch", args.batch, 1), ("--repeats", args.repeats, 1), ("--warmup", args.warmup, 0),
                             ("--granularity", args.granularity, 1)):
        if value < low:
            raise ConfigError(f"{flag} must be >= {low}, got {value}")
    if args.layers is not None and args.layers < 1:
        raise ConfigError(f"--layers must be a positive number of Transformer blocks, got {args.layers}")
    for s in args.seq_len:
        if s < 2:
            raise ConfigError(f"--seq-len {s}: a step needs at least 2 tokens (one target)")
    n = args.cp_rank_of
    if n is not None:
        if n < 2:
            raise ConfigError(f"--cp-rank-of must be >= 2 ranks, got {n} (leave it out for one device)")
        if not 0 <= args.cp_rank < n:
            raise ConfigError(f"--cp-rank {args.cp_rank} is outside [0, {n}) for --cp-rank-of {n}")
        bad = [s for s in args.seq_len if s % (2 * n)]
        if bad:
            raise ConfigError(f"--seq-len {bad}: with --cp-rank-of {n} every S must be divisible by 2 x {n} = "
                              f"{2 * n} (zigzag cuts the sequence into {2 * n} chunks); e.g. "
                              f"{max(2 * n, bad[0] // (2 * n) * (2 * n))}")
    if args.find_max_len and args.device.startswith("cpu") and not args.memory_budget_gib:
        raise ConfigError("--find-max-len on CPU needs --memory-budget-gib: a CPU step 'fits' when its peak RSS "
                          "stays under that budget")
    if args.memory_budget_gib is not None and args.memory_budget_gib <= 0:
        raise ConfigError(f"--memory-budget-gib must be > 0, got {args.memory_budget_gib}")


def run_bench(args: argparse.Namespace) -> int:
    """``megatron-lc bench train``: run every (contender, S), print the table, write train.md/json/png."""
    _check_args(args)
    config = load_model_config(args.preset, args.layers)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda but CUDA is not available: use --device cpu")
    dtype_name = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    ac = args.ac or ("selective" if device.type == "cuda" else "full")
    requested = args.contenders.split(",") if args.contenders else list(CONTENDERS)
    unknown = [c for c in requested if c not in CONTENDERS]
    if unknown:
        raise ConfigError(f"--contenders {','.join(unknown)}: unknown; choose among {','.join(CONTENDERS)}")
    skipped = {c: why for c in requested if (why := contender_status(c, device, args.cp_rank_of))}
    contenders = [c for c in requested if c not in skipped]
    for name, why in skipped.items():
        print(f"[bench train] skipping {name}: {why}", flush=True)
    if not contenders:
        raise ConfigError(f"--contenders: none of {','.join(requested)} can run here ({skipped})")
    budget = int(args.memory_budget_gib * GIB) if args.memory_budget_gib and device.type == "cpu" else None

    def spec(contender: str, seq_len: int, probe: bool = False) -> dict:
        return case_spec(contender, config, seq_len, device=str(device), dtype=dtype_name, ac=ac, batch=args.batch,
                         optimizer=args.optimizer, cp_rank_of=args.cp_rank_of, cp_rank=args.cp_rank,
                         memory_budget_bytes=budget, ours_params=args.ours_params,
                         # A probe needs one step, two with AdamW: its state exists only from the first step's end.
                         warmup=(1 if args.optimizer else 0) if probe else args.warmup,
                         repeats=1 if probe else args.repeats)

    rows: list[dict] = []

    def run_one(contender: str, seq_len: int, probe: bool = False) -> dict:
        started = time.perf_counter()
        result = measure(spec(contender, seq_len, probe), timeout=args.timeout)
        result.update(contender=contender, seq_len=seq_len, ac=ac if contender == "ours" else "HF grad ckpt",
                      optimizer=args.optimizer, cp_rank_of=args.cp_rank_of, cp_rank=args.cp_rank,
                      wall_s=time.perf_counter() - started, probe=probe)
        if result["status"] == "ok" and budget is not None and result["peak_abs_gib"] * GIB > budget:
            result["status"] = "over_budget"
        rows.append(result)
        shown = (f"{result['tokens_per_second']:,.0f} tok/s, peak extra {result['peak_extra_gib']:.3g} GiB"
                 if result.get("tokens_per_second") else result.get("error", ""))
        print(f"[bench train] {contender} S={seq_len}: {result['status']} {shown} ({result['wall_s']:.0f} s)",
              flush=True)
        return result

    max_len = {}
    for contender in contenders:
        if args.find_max_len:
            multiple = 2 * args.cp_rank_of if args.cp_rank_of else 1
            best, _ = find_max_len(lambda s, c=contender: run_one(c, s, probe=True)["status"] == "ok",
                                   args.seq_len[0], args.granularity, multiple, args.max_seq_len)
            max_len[contender] = best
        else:
            for s in args.seq_len:
                run_one(contender, s)

    # The device's name comes from a worker: asking here would make a CUDA context in this process, whose memory
    # the workers would then not have.
    name = next((r["device_name"] for r in rows if r.get("device_name")), device.type)
    versions = f"torch {torch.__version__}"
    hf_rows = [r for r in rows if r.get("transformers")]
    if hf_rows:
        versions += f", transformers {hf_rows[0]['transformers']}"
    cp_text = ""
    if args.cp_rank_of:
        n, r = args.cp_rank_of, args.cp_rank
        cp_text = (f"; one rank of a simulated CP={n} zigzag ring: rank {r}, chunks {r} and {2 * n - 1 - r} of {2 * n} "
                   f"(zigzag gives every rank the same block shapes, so any rank is the worst-loaded one); tokens/s "
                   f"per GPU, MFU at the global S; weights+grads are one unsharded replica's (FSDP over the ring "
                   f"would hold 1/{n} of them plus one gathered block)")
    timing = (f"each --find-max-len probe times one step{' after one warm-up' if args.optimizer else ''}"
              if args.find_max_len else f"median of {args.repeats} steps after {args.warmup} warm-up")
    header = (f"Training step of {args.preset} ({config.num_layers} layers), batch {args.batch}, on {name}, "
              f"{dtype_name}, {versions}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {timing}; optimizer: "
              f"{'AdamW (state included)' if args.optimizer else 'none (weights + grads only)'}{cp_text}")
    if dtype_name != "float32" and "ours" in contenders:
        held = f"fp32 weights and grads, {dtype_name} compute" if args.ours_params == "mixed" else \
            f"{dtype_name} weights and grads"
        header += f"; ours: {held} (--ours-params {args.ours_params})"
    notes = [f"Skipped: {c}: {why}" for c, why in skipped.items()]
    if max_len:
        what = (f"peak RSS under {args.memory_budget_gib} GiB" if budget else "no out-of-memory")
        notes.append(f"Longest S that fits ({what}, granularity {args.granularity}): " + ", ".join(
            f"{c} {s if s is not None else 'none (the first S does not fit)'}" for c, s in max_len.items()))
    if "ours" in contenders:
        notes += _policy_notes(config, ac, sorted({r["seq_len"] for r in rows if r["contender"] == "ours"}),
                               getattr(torch, dtype_name))
    table = to_markdown(rows, header, notes)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "train.md"), "w") as f:
        f.write(table)
    with open(os.path.join(args.out, "train.json"), "w") as f:
        json.dump({"header": header, "preset": args.preset, "config": dataclasses.asdict(config),
                   "device": name, "dtype": dtype_name, "torch": torch.__version__, "ac": ac,
                   "optimizer": args.optimizer, "ours_params": args.ours_params, "cp_rank_of": args.cp_rank_of,
                   "skipped": skipped,
                   "max_len": max_len, "notes": notes, "rows": rows}, f, indent=1)
    plot(rows, os.path.join(args.out, "train.png"))
    print(table)
    return 0


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_lc.bench_train",
                                     description="megatron-lc bench train (--worker SPEC: one case, JSON out)")
    parser.add_argument("--worker", metavar="SPEC", help="JSON spec of one case (internal: run by measure())")
    args, rest = parser.parse_known_args(argv)
    if args.worker is not None:
        return worker_main(json.loads(args.worker))
    from .cli import main

    return main(["bench", "train", *rest])


if __name__ == "__main__":
    sys.exit(_main())
