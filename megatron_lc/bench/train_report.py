"""The report of ``megatron-lc bench train``: the Markdown table, the JSON of every number, the plot."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import torch

from ..model.config import ModelConfig
from .train_worker import GIB


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


def plot(rows: list[dict], path: str):
    """tokens/s vs S and peak memory (extra solid, absolute dashed) vs S, one line per contender, both axes from
    zero (PNG at ``path``). Returns the matplotlib Figure (closed: saved, not shown)."""
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
        ax.set_ylim(bottom=0)  # from zero: a difference reads as its real size
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # nothing to label when no case completed
            ax.legend(fontsize=7)
    ax_t.set_title("one training step")
    ax_m.set_title("peak: extra above weights+grads(+opt), absolute")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return fig


def policy_notes(config: ModelConfig, policy: str, seq_lens: list[int], dtype: torch.dtype) -> list[str]:
    """What our AC ``policy`` saves and recomputes at each of ``seq_lens`` (checkpointing.policy_costs)."""
    from ..parallel.activation_checkpointing import policy_costs

    size = torch.tensor([], dtype=dtype).element_size()
    lines = [f"AC policy `{policy}` (megatron_lc.parallel.activation_checkpointing.policy_costs, ours, {dtype}):"]
    for s in seq_lens:
        try:
            c = policy_costs(config, policy, s, dtype_bytes=size)
        except (ValueError, TypeError) as e:
            return [f"policy_costs({policy!r}) failed: {e}"]
        lines.append(f"- S={s}: saved {c['saved_bytes_per_token'] / 1024:.1f} KiB/token "
                     f"({c['saved_bytes_per_token'] * s / GIB:.3g} GiB), host {c['host_bytes_per_token'] / 1024:.1f} "
                     f"KiB/token, recompute {100 * c['recompute_fraction']:.1f}% of the step's model FLOPs")
    return lines


def _header(args: argparse.Namespace, config: ModelConfig, rows: list[dict], device_type: str, dtype_name: str,
            with_ours: bool) -> tuple[str, str]:
    """(the table's header line, the device's name)."""
    # The device's name comes from a worker: asking here would make a CUDA context in this process, whose memory
    # the workers would then not have.
    name = next((r["device_name"] for r in rows if r.get("device_name")), device_type)
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
    if dtype_name != "float32" and with_ours:
        held = f"fp32 weights and grads, {dtype_name} compute" if args.ours_params == "mixed" else \
            f"{dtype_name} weights and grads"
        header += f"; ours: {held} (--ours-params {args.ours_params})"
    return header, name


def write_report(args: argparse.Namespace, config: ModelConfig, rows: list[dict], *, device_type: str,
                 dtype_name: str, ac: str, contenders: list[str], skipped: dict[str, str],
                 max_len: dict[str, int | None]) -> str:
    """Write train.md, train.json and train.png under ``args.out``; returns the table."""
    header, name = _header(args, config, rows, device_type, dtype_name, "ours" in contenders)
    notes = [f"Skipped: {c}: {why}" for c, why in skipped.items()]
    if max_len:
        what = (f"peak RSS under {args.memory_budget_gib} GiB" if device_type == "cpu" else "no out-of-memory")
        notes.append(f"Longest S that fits ({what}, granularity {args.granularity}): " + ", ".join(
            f"{c} {s if s is not None else 'none (the first S does not fit)'}" for c, s in max_len.items()))
    if "ours" in contenders:
        notes += policy_notes(config, ac, sorted({r["seq_len"] for r in rows if r["contender"] == "ours"}),
                              getattr(torch, dtype_name))
    table = to_markdown(rows, header, notes)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "train.md"), "w") as f:
        f.write(table)
    with open(os.path.join(args.out, "train.json"), "w") as f:
        json.dump({"header": header, "preset": args.preset, "config": dataclasses.asdict(config),
                   "device": name, "dtype": dtype_name, "torch": torch.__version__, "ac": ac,
                   "optimizer": args.optimizer, "ours_params": args.ours_params, "cp_rank_of": args.cp_rank_of,
                   "skipped": skipped, "max_len": max_len, "notes": notes, "rows": rows}, f, indent=1)
    plot(rows, os.path.join(args.out, "train.png"))
    return table
