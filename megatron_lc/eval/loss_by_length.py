"""Validation loss by position bucket and by domain (Fu et al. 2024, Table 5 layout), single process or sharded.

For each domain, fixed windows of ``seq_len + 1`` tokens are scored by a real forward pass; the loss of the target
of input position ``t`` (the token at ``t + 1``) goes to bucket ``t // bucket_size``. Per-token losses come from
the final hidden states and ``lm_head`` in token chunks, so ``[S, V]`` logits never exist for the whole sequence.

Under context parallelism (``cp``: a ``ContextParallel`` already applied to the model), each rank scores its shard
of every window with ring attention; its local ``position_ids`` say which bucket each token belongs to, and the
per-bucket sums and counts are all-reduced over the CP group, so every rank ends with the CP=1 numbers.
"""
from __future__ import annotations

import itertools
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..configtools import ConfigError
from ..ops.cross_entropy import IGNORE_INDEX


@torch.no_grad()
def per_token_loss(model, input_ids: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor | None = None,
                   chunk_tokens: int = 2048) -> torch.Tensor:
    """Cross-entropy of every position: input_ids, labels, position_ids ``[B, S]`` int64 (labels aligned, -100 =
    no target) -> fp32 ``[B, S]``, 0 where the label is -100. Logits exist for ``chunk_tokens`` tokens at a time
    (fp32 ``[chunk, V]``), never for all of S."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    h = model.hidden_states(input_ids, position_ids)  # [B, S, hidden]
    flat_h, flat_y = h.reshape(-1, h.shape[-1]), labels.reshape(-1)
    out = torch.zeros(flat_y.shape, dtype=torch.float32, device=h.device)
    for start in range(0, flat_y.numel(), chunk_tokens):
        end = start + chunk_tokens
        logits = model.lm_head(flat_h[start:end]).float()  # [chunk, V]
        out[start:end] = F.cross_entropy(logits, flat_y[start:end], ignore_index=IGNORE_INDEX, reduction="none")
    return out.view_as(labels)


@dataclass
class BucketLoss:
    """Loss sums and target counts per position bucket: ``sums`` fp64 ``[n_buckets]``, ``counts`` int64."""

    sums: torch.Tensor
    counts: torch.Tensor

    def mean(self) -> list[float | None]:
        """Mean loss per bucket (None for an empty bucket)."""
        return [float(s / c) if c else None for s, c in zip(self.sums, self.counts)]

    def average(self) -> float | None:
        """Token-weighted mean over all buckets."""
        n = int(self.counts.sum())
        return float(self.sums.sum() / n) if n else None


def bucket_edges(seq_len: int, bucket_size: int) -> list[int]:
    """Bucket boundaries ``[0, b, 2b, ..., seq_len]`` (the last bucket may be shorter)."""
    if bucket_size < 1 or seq_len < 1:
        raise ConfigError(f"need a positive sequence length and bucket size, got seq_len {seq_len}, "
                          f"bucket size {bucket_size}")
    return list(range(0, seq_len, bucket_size)) + [seq_len]


@torch.no_grad()
def loss_by_position(model, windows: torch.Tensor, bucket_size: int, cp=None, batch_size: int = 1,
                     chunk_tokens: int = 2048) -> BucketLoss:
    """Per-bucket loss of ``model`` over ``windows [N, S+1]`` int64 (input = window[:-1], target = window[1:]).

    ``cp``: a ``megatron_lc.parallel.context_parallel.ContextParallel`` whose ``apply(model)`` was already called;
    every CP rank must pass the same windows. Returns the same BucketLoss on every rank.
    """
    if windows.dim() != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must be [N, S+1] with S >= 1, got shape {tuple(windows.shape)}")
    seq_len = windows.shape[1] - 1
    n_buckets = len(bucket_edges(seq_len, bucket_size)) - 1
    device = next(model.parameters()).device
    sums = torch.zeros(n_buckets, dtype=torch.float64, device=device)
    counts = torch.zeros(n_buckets, dtype=torch.int64, device=device)
    was_training = model.training
    model.eval()
    for chunk in windows.split(batch_size):
        chunk = chunk.to(device)
        b = chunk.shape[0]
        batch = {"input_ids": chunk[:, :-1], "labels": chunk[:, 1:],
                 "position_ids": torch.arange(seq_len, device=device).expand(b, seq_len)}
        if cp is not None:
            batch = cp.shard_batch(batch)  # local [B, S/cp]; position_ids keep each token's global position
        losses = per_token_loss(model, batch["input_ids"], batch["labels"], batch["position_ids"], chunk_tokens)
        target = batch["labels"] != IGNORE_INDEX
        bucket = (batch["position_ids"] // bucket_size).clamp(max=n_buckets - 1)[target]
        sums.index_add_(0, bucket, losses[target].double())
        counts.index_add_(0, bucket, torch.ones_like(bucket))
    model.train(was_training)
    if cp is not None:
        import torch.distributed as dist

        for dim in range(cp.mesh.ndim):  # a 2-D (ring, ulysses) mesh: reduce over both
            group = cp.mesh.get_group(dim)
            dist.all_reduce(sums, group=group)
            dist.all_reduce(counts, group=group)
    return BucketLoss(sums.cpu(), counts.cpu())


# ---- data -------------------------------------------------------------------------------------------------------
def windows_from_tokens(tokens: Sequence[int] | torch.Tensor, seq_len: int, num: int, name: str = "text"
                        ) -> torch.Tensor:
    """The first ``num`` consecutive windows of ``seq_len + 1`` tokens -> ``[num, S+1]`` int64; fails naming the
    token counts if the text holds fewer than ``num`` windows."""
    tokens = torch.as_tensor(tokens, dtype=torch.int64)
    need = num * seq_len + 1
    if len(tokens) < need:
        raise ConfigError(f"domain {name!r} has {len(tokens):,} tokens; {num} windows of {seq_len} need {need:,}: "
                          f"give more text, fewer --samples or a shorter --seq-len")
    return torch.stack([tokens[i * seq_len:i * seq_len + seq_len + 1] for i in range(num)])


# ---- table and plot ---------------------------------------------------------------------------------------------
def _short(n: int) -> str:
    if n >= 1024 and n % 1024 == 0:
        return f"{n // 1024}K"
    return str(n)


def bucket_labels(edges: Sequence[int]) -> list[str]:
    return [f"{_short(a)}-{_short(b)}" for a, b in itertools.pairwise(edges)]


def format_table(results: dict[str, dict[str, BucketLoss]], edges: Sequence[int]) -> str:
    """Text table in the layout of Fu et al.'s Table 5, transposed: rows are domains, columns
    position buckets plus the token-weighted average; one block per model. From the second model on, a block of
    differences to the first (``+.012`` = worse), as Fu et al. report other data mixtures against the original.

    ``results``: {model name: {domain: BucketLoss}}; every model must have the same domains.
    """
    labels = bucket_labels(edges) + ["avg"]
    width = max(8, max(len(x) for x in labels) + 1)
    domains = list(next(iter(results.values())))
    name_w = max(12, max(len(d) for d in domains) + 2, max(len(m) for m in results) + 6)

    def row(name, values, fmt):
        return name.ljust(name_w) + "".join(fmt(v).rjust(width) for v in values)

    def values(bl: BucketLoss):
        return bl.mean() + [bl.average()]

    def num(v):
        return "-" if v is None else f"{v:.3f}"

    def diff(v):
        if v is None:
            return "-"
        return f"{'+' if v >= 0 else '-'}{abs(v):.3f}".replace("0.", ".", 1)

    lines = ["loss (nats/token) by position".ljust(name_w) + "".join(x.rjust(width) for x in labels)]
    names = list(results)
    for name in names:
        lines.append(f"{name}")
        for d in domains:
            lines.append(row(f"  {d}", values(results[name][d]), num))
    base = names[0]
    for name in names[1:]:
        lines.append(f"{name} v.s. {base}")
        for d in domains:
            a, b = values(results[name][d]), values(results[base][d])
            lines.append(row(f"  {d}", [None if x is None or y is None else x - y for x, y in zip(a, b)], diff))
    return "\n".join(lines)


def plot_loss(results: dict[str, dict[str, BucketLoss]], edges: Sequence[int], path: str,
              train_length: int | None = None, train_label: str | None = None):
    """PNG of mean loss vs position (bucket centres), one line per (model, domain): a colour per domain, a line
    style per model, the legend ``model: domain`` (names as given: keep them distinct); a dashed line at
    ``train_length`` if given, labelled ``train_label`` (default "training length N"). Returns the matplotlib
    Figure (closed: saved, not shown)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    centres = [(a + b) / 2 for a, b in itertools.pairwise(edges)]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    styles = ["-", "--", ":", "-."]
    for i, (name, domains) in enumerate(results.items()):
        for j, (domain, bl) in enumerate(domains.items()):
            ys = [math.nan if v is None else v for v in bl.mean()]
            # One domain: the models differ by colour as well as by line style.
            ax.plot(centres, ys, styles[i % len(styles)], marker="o", markersize=3,
                    color=f"C{j}" if len(domains) > 1 else f"C{i}", label=f"{name}: {domain}")
    if train_length is not None:
        ax.axvline(train_length, color="black", linestyle="--", linewidth=1,
                   label=train_label or f"training length {train_length:,}")
    ax.set_xlabel("position (tokens)")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("validation loss by position")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return fig


def results_to_json(results: dict[str, dict[str, BucketLoss]], edges: Sequence[int]) -> dict:
    """JSON-ready form: edges, labels, and per model/domain the mean per bucket, average, sums and counts."""
    return {"edges": list(edges), "buckets": bucket_labels(edges),
            "models": {m: {d: {"mean": bl.mean(), "average": bl.average(), "sums": bl.sums.tolist(),
                               "counts": bl.counts.tolist()} for d, bl in ds.items()} for m, ds in results.items()}}
