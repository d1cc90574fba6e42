"""Training metrics: MFU (of the model FLOPs counted in megatron_lc.model.flops), JSONL + TensorBoard logs, a
progress line (peak memory: megatron_lc.memory).

The FLOP count and its conventions are derived in docs/mfu.md; ``python -m megatron_lc.train.metrics qwen2-7b
32768`` prints the per-term breakdown.
"""
from __future__ import annotations

import json
import math
import numbers
import os
import sys
import time
from collections.abc import Callable
from typing import TextIO

import torch

from ..model.flops import forward_flops_breakdown, train_flops_per_token

PEAK_FLOPS_ENV = "MEGATRON_LC_PEAK_FLOPS"


# ---- peak FLOP/s and MFU (model FLOPs per token: megatron_lc.model.flops) ------------------------------------
# Dense (no 2:4 sparsity) peak FLOP/s from NVIDIA's datasheets, keyed by a substring of torch.cuda.get_device_name.
# First match wins, so specific names come before the generic ones. NVL parts run at other clocks: not listed.
_PEAKS: list[tuple[str, dict[str, float]]] = [
    ("h100 pcie", {"bf16": 756e12, "tf32": 378e12, "fp32": 51.2e12}),
    ("h100", {"bf16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12}),  # SXM: "NVIDIA H100 80GB HBM3"
    ("h200", {"bf16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12}),
    ("a100", {"bf16": 312e12, "tf32": 156e12, "fp32": 19.5e12}),  # SXM and PCIe share the peak
]


def _tf32_matmuls() -> bool:
    """Whether float32 matmuls run on TF32 tensor cores (torch's new API, else the legacy flag)."""
    precision = getattr(torch.backends.cuda.matmul, "fp32_precision", "none")
    if precision != "none":
        return precision == "tf32"
    try:
        return bool(torch.backends.cuda.matmul.allow_tf32)
    except RuntimeError:  # torch refuses to read the legacy flag after the new API was used elsewhere
        return False


def peak_flops_per_second(device: torch.device, dtype: torch.dtype) -> float | None:
    """Dense peak FLOP/s of one ``device`` for matmuls in ``dtype``; None when unknown (CPU, unlisted GPU, fp64).

    ``MEGATRON_LC_PEAK_FLOPS`` (a float, FLOP/s per device) overrides the table for any device. float32 uses the
    TF32 peak only when TF32 matmuls are enabled, else the CUDA-core FP32 peak.
    """
    override = os.environ.get(PEAK_FLOPS_ENV)
    if override is not None:
        try:
            value = float(override)
        except ValueError:
            value = float("nan")
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{PEAK_FLOPS_ENV}={override!r} is not a positive number of FLOP/s per device; "
                             f"set it like {PEAK_FLOPS_ENV}=989.4e12, or unset it to use the built-in table")
        return value
    device = torch.device(device)
    if device.type != "cuda":
        return None
    kind = {torch.bfloat16: "bf16", torch.float16: "bf16",  # fp16 and bf16 share the tensor-core peak
            torch.float32: "tf32" if _tf32_matmuls() else "fp32"}.get(dtype)
    if kind is None:
        return None
    name = torch.cuda.get_device_name(device).lower()
    if "nvl" in name:
        return None
    for key, peaks in _PEAKS:
        if key in name:
            return peaks[kind]
    return None


def mfu(tokens_per_second: float, flops_per_token: float, peak: float, world_size: int) -> float:
    """Model FLOPs utilisation as a fraction (0.41 = 41%).

    ``tokens_per_second``: tokens trained per second by all ``world_size`` devices together; ``flops_per_token``:
    from train_flops_per_token; ``peak``: FLOP/s of one device (peak_flops_per_second).
    """
    if not (isinstance(world_size, int) and world_size >= 1):
        raise ValueError(f"world_size must be a positive integer (devices in the job), got {world_size!r}")
    if peak is None or not peak > 0:
        raise ValueError(f"peak must be > 0 FLOP/s, got {peak!r}; MFU is undefined without a known peak")
    if not (tokens_per_second >= 0 and flops_per_token >= 0):
        raise ValueError(f"tokens_per_second and flops_per_token must be >= 0, got {tokens_per_second!r} and "
                         f"{flops_per_token!r}")
    return tokens_per_second * flops_per_token / (peak * world_size)


# ---- logs ----------------------------------------------------------------------------------------------------------
def _check_metrics(step: int, metrics: dict) -> dict[str, float | int]:
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"step must be a non-negative integer, got {step!r}")
    clean: dict[str, float | int] = {}
    for key, value in metrics.items():
        if not isinstance(key, str) or key == "step":
            raise ValueError(f"metric names must be strings other than 'step' (it is the x axis), got {key!r}")
        if isinstance(value, torch.Tensor) or not isinstance(value, numbers.Real):
            raise TypeError(f"metric {key!r} must be a Python or NumPy number, got {type(value).__name__} "
                            f"{value!r}; pass tensor.item()")
        clean[key] = int(value) if isinstance(value, numbers.Integral) else float(value)
    return clean


class MetricsLogger:
    """Rank 0 writes ``{"step": N, <tag>: value, ...}`` lines to ``log_dir/jsonl_name`` and TensorBoard scalars to
    ``log_dir``; metric names are the tags ("train/loss", "train/lr", "val/loss"). Other ranks do nothing.

    The JSONL is only ever appended to, never truncated: a resumed run's lines follow the earlier ones, so steps
    that a crashed attempt logged after its last checkpoint appear again, and the last line of a step is the one
    that counts. Only a torn last line (a crash mid-write, no newline) is cut, so the next record starts on a line
    of its own. ``resume_step=N`` (a run restarted from step N's checkpoint) hides TensorBoard events after step N,
    which the run is about to rewrite (TensorBoard's purge_step; the event files stay as they are). Non-finite
    values are written as null in the JSONL (strict JSON) and as they are in TensorBoard.
    """

    def __init__(self, log_dir: str | os.PathLike, *, rank: int, tensorboard: bool = True,
                 jsonl_name: str = "metrics.jsonl", resume_step: int | None = None):
        self.active = rank == 0
        self._file = self._writer = None
        if not self.active:
            return
        if resume_step is not None and (not isinstance(resume_step, int) or resume_step < 0):
            raise ValueError(f"resume_step must be None or the non-negative step resumed from, got {resume_step!r}")
        os.makedirs(log_dir, exist_ok=True)
        path = os.path.join(log_dir, jsonl_name)
        if os.path.exists(path):
            _cut_torn_line(path)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ImportError(f"TensorBoard logging needs the tensorboard package ({e}): pip install tensorboard, "
                                  f"or turn it off (logging.tensorboard=false)") from e
            # A START event at purge_step hides older events at steps >= purge_step when TensorBoard reads the dir.
            purge = resume_step + 1 if resume_step is not None else None
            self._writer = SummaryWriter(str(log_dir), purge_step=purge)
        self._file = open(path, "a")  # noqa: SIM115 -- open for the logger's life, closed by close()

    def log(self, step: int, metrics: dict[str, float | int]) -> None:
        """Write the scalars of ``step``; the JSONL line is flushed before returning, so a crash loses nothing."""
        if not self.active:
            return
        if self._file is None:
            raise RuntimeError("MetricsLogger.log() after close()")
        clean = _check_metrics(step, metrics)
        strict = {k: (v if isinstance(v, int) or math.isfinite(v) else None) for k, v in clean.items()}
        self._file.write(json.dumps({"step": step, **strict}) + "\n")
        self._file.flush()
        if self._writer is not None:
            for key, value in clean.items():
                self._writer.add_scalar(key, value, global_step=step)
            self._writer.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _cut_torn_line(path: str) -> None:
    """Cut a last line without its newline (a record a crash left half-written); every complete line stays."""
    with open(path, "rb+") as f:
        end = f.seek(0, os.SEEK_END)
        pos = end
        while pos > 0:  # back to the last newline, a block at a time (the file may be large)
            start = max(0, pos - 65536)
            f.seek(start)
            block = f.read(pos - start)
            if pos == end and block.endswith(b"\n"):
                return
            if b"\n" in block:
                f.truncate(start + block.rfind(b"\n") + 1)
                return
            pos = start
        f.truncate(0)  # one torn line and nothing before it


# ---- progress line -------------------------------------------------------------------------------------------------
def format_duration(seconds: float) -> str:
    """``seconds`` as a person reads a duration: 42s, 3m05s, 1h02m, 2d03h."""
    s = round(seconds)
    if s >= 86400:
        return f"{s // 86400}d{s % 86400 // 3600:02d}h"
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def _count(x: float) -> str:
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.1f}{unit}"
    return f"{x:.0f}"


# (tag, format) of the fields a progress line shows, in order, when the metrics hold them.
_FIELDS = [
    ("train/loss", lambda v: f"loss {v:.3f}"),
    ("val/loss", lambda v: f"val loss {v:.3f}"),
    ("train/lr", lambda v: f"lr {v:.1e}"),
    ("train/tokens_per_second", lambda v: f"{_count(v)} tok/s"),
    ("train/mfu", lambda v: f"MFU {100 * v:.1f}%"),
    ("train/peak_memory_gib", lambda v: f"mem {v:.1f} GiB"),
]


class Progress:
    """A one-line status on rank 0: ``step 120/1000 | loss 2.315 | lr 3.0e-04 | 18.2k tok/s | MFU 41.2% |
    mem 61.3 GiB | ETA 1h02m``.

    At most one line per ``every_seconds`` (plus the last step and forced updates). On a terminal the line is
    rewritten in place; elsewhere (a log file) each is a plain line. ``stream`` defaults to sys.stderr at print
    time. The ETA uses the mean step time since the first update (whose step is taken as one step after the
    start, so a resumed run's ETA counts only this run's steps); ``time_limit_s`` (a run that stops after that many
    seconds from here) caps it at the time left.
    """

    def __init__(self, total_steps: int, *, rank: int, stream: TextIO | None = None, every_seconds: float = 10.0,
                 time_limit_s: float | None = None, clock: Callable[[], float] = time.monotonic):
        if not (isinstance(total_steps, int) and total_steps >= 1):
            raise ValueError(f"total_steps must be a positive integer, got {total_steps!r}")
        if not every_seconds >= 0:
            raise ValueError(f"every_seconds must be >= 0, got {every_seconds!r}")
        self.total, self.active, self.stream = total_steps, rank == 0, stream
        self.every, self.clock, self.time_limit = every_seconds, clock, time_limit_s
        self._start, self._first_step = clock(), None
        self._last_print = -math.inf
        self._width = 0  # length of the line on a terminal, to blank a longer previous one

    def format(self, step: int, metrics: dict[str, float]) -> str:
        """The status line of ``step`` (no newline)."""
        parts = [f"step {step}/{self.total}"]
        parts += [fmt(metrics[tag]) for tag, fmt in _FIELDS if metrics.get(tag) is not None]
        if self._first_step is not None and step < self.total:
            done = step - self._first_step + 1
            if done > 0:
                elapsed = self.clock() - self._start
                eta = elapsed / done * (self.total - step)
                if self.time_limit is not None:
                    eta = min(eta, max(0.0, self.time_limit - elapsed))
                parts.append("ETA " + format_duration(eta))
        return " | ".join(parts)

    def update(self, step: int, metrics: dict[str, float] | None = None, *, force: bool = False) -> None:
        """Show ``step`` if ``every_seconds`` passed since the last line, it is the last step, or ``force``."""
        if not self.active:
            return
        if self._first_step is None:
            self._first_step = step
        now = self.clock()
        last = step >= self.total
        if not (force or last or now - self._last_print >= self.every):
            return
        self._last_print = now
        line = self.format(step, metrics or {})
        stream = self.stream or sys.stderr
        if stream.isatty():
            stream.write("\r" + line.ljust(self._width) + ("\n" if last or force else ""))
            self._width = 0 if last or force else len(line)
        else:
            stream.write(line + "\n")
        stream.flush()

    def message(self, line: str) -> None:
        """Print ``line`` (an evaluation, a note) on a line of its own on rank 0, ending a status line that a
        terminal shows unfinished, so the next update starts below it."""
        if not self.active:
            return
        stream = self.stream or sys.stderr
        if self._width:
            stream.write("\n")
            self._width = 0
        stream.write(line + "\n")
        stream.flush()


def _main(argv: list[str] | None = None) -> None:
    """Print the FLOP breakdown of a preset at some sequence lengths (the numbers in docs/mfu.md)."""
    import argparse

    from ..model.config import preset_config

    parser = argparse.ArgumentParser(prog="python -m megatron_lc.train.metrics", description=_main.__doc__)
    parser.add_argument("preset")
    parser.add_argument("seq_len", type=int, nargs="+")
    args = parser.parse_args(argv)
    cfg = preset_config(args.preset)
    n = cfg.num_params()
    print(f"{args.preset}: {n:,} parameters ({cfg.num_params(include_embedding=False):,} non-embedding)")
    names = {"qkvo": "q/k/v/o projections", "mlp": "SwiGLU MLP", "attention": "attention (causal)",
             "lm_head": "lm_head"}
    for s in args.seq_len:
        train = train_flops_per_token(cfg, s)
        full = train_flops_per_token(cfg, s, causal=False)
        print(f"seq_len {s}: train FLOPs per token (3 x forward)")
        for key, value in forward_flops_breakdown(cfg, s).items():
            print(f"  {names[key]:<22}{3 * value:.4e}")
        attn = 3 * forward_flops_breakdown(cfg, s)["attention"]
        print(f"  {'total':<22}{train:.4e}  (attention {attn / train:.1%}; 6 x all parameters: {6 * n:.4e})")
        print(f"  {'full-attention total':<22}{full:.4e}  ({full / train:.3f}x the causal count)")
        rates = [f"{name} ({peak / 1e12:g}e12) {0.4 * peak / train:,.0f}" for name, peak in
                 (("H100 SXM", dict(_PEAKS)["h100"]["bf16"]), ("A100", dict(_PEAKS)["a100"]["bf16"]))]
        print("  tokens/s per GPU at 40% MFU, bf16 peak FLOP/s: " + "; ".join(rates))

if __name__ == "__main__":
    _main()
