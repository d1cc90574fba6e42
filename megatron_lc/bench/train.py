"""``megatron-lc bench train``: one training step of a preset at given sequence lengths, ours against HF transformers
(+ gradient checkpointing) and HF + Liger-Kernel (when importable and on CUDA), on the same machine in one run.

Each (contender, S) runs in a fresh subprocess (``python -m megatron_lc.bench.train_worker SPEC``, one JSON line
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

Writes ``train.md`` (the table), ``train.json`` (every number) and ``train.png`` (tokens/s and memory vs S):
this file runs the cases, ``train_worker.py`` is one case, ``train_report.py`` writes the report.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable

import torch

from ..configtools import ConfigError
from ..memory import MALLOC_ENV  # every CPU worker's environment: freed tensors leave the RSS
from ..model.config import ModelConfig, preset_config
from .train_report import write_report
from .train_worker import GIB, RESULT_PREFIX

CONTENDERS = ("ours", "hf", "hf-liger")
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


# ---- the parent: one subprocess per case ---------------------------------------------------------------------------
def case_spec(contender: str, config: ModelConfig, seq_len: int, *, device: str = "cpu", dtype: str = "float32",
              ac: str = "full", batch: int = 1, optimizer: bool = False, warmup: int = 1, repeats: int = 3,
              cp_rank_of: int | None = None, cp_rank: int = 0, memory_budget_bytes: int | None = None,
              ours_params: str = "mixed") -> dict:
    """The JSON-able description of one case that ``measure`` hands to a worker (fields: see
    train_worker.run_case)."""
    if contender not in CONTENDERS:
        raise ConfigError(f"unknown contender {contender!r}: use one of {', '.join(CONTENDERS)}")
    return {"contender": contender, "config": dataclasses.asdict(config), "seq_len": seq_len, "batch": batch,
            "dtype": dtype, "device": device, "ac": ac, "optimizer": optimizer, "warmup": warmup, "repeats": repeats,
            "cp_rank_of": cp_rank_of, "cp_rank": cp_rank, "memory_budget_bytes": memory_budget_bytes,
            "ours_params": ours_params}


def measure(spec: dict, timeout: float | None = None) -> dict:
    """Run ``spec`` (see train_worker.run_case) in a fresh Python process; returns its result dict, or one with
    ``status`` "oom", "over_budget", "timeout" or "error" (with the end of its stderr) when the step did not
    complete."""
    env = {k: v for k, v in os.environ.items() if k not in _DIST_ENV}
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if spec["device"].startswith("cpu"):
        env.update(MALLOC_ENV)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, "-m", "megatron_lc.bench.train_worker", json.dumps(spec)]
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
    p.add_argument("--out", default="runs/bench_train", help="folder for train.md, train.json, train.png (default: %(default)s)")


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


def run_train(args: argparse.Namespace) -> int:
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

    max_len: dict[str, int | None] = {}
    for contender in contenders:
        if args.find_max_len:
            multiple = 2 * args.cp_rank_of if args.cp_rank_of else 1
            best, _ = find_max_len(lambda s, c=contender: run_one(c, s, probe=True)["status"] == "ok",
                                   args.seq_len[0], args.granularity, multiple, args.max_seq_len)
            max_len[contender] = best
        else:
            for s in args.seq_len:
                run_one(contender, s)
    print(write_report(args, config, rows, device_type=device.type, dtype_name=dtype_name, ac=ac,
                       contenders=contenders, skipped=skipped, max_len=max_len))
    return 0
