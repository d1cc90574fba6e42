"""Activation checkpointing policies, applied by the parallelize step to each Transformer block in place.

- ``none``: autograd keeps every activation it needs.
- ``full``: each block keeps only its input; backward re-runs the whole block (attention included) first.
- ``every_k``: ``full`` on every k-th block, ``none`` on the others (a knob between the two).
- ``selective``: each block keeps its input, its attention output and the attention's log-sum-exp. Backward
  recomputes the norms, q/k/v projections, RoPE, o_proj and the MLP, but never attention, the costliest part at long
  S: the attention's own backward runs on the kept output/lse and the recomputed q/k/v (``_KeepAttention``).
- ``offload``: ``full``, and each block's input goes to (pinned) host memory on a side stream as soon as forward has
  made it; backward brings block i-1's input back while block i recomputes (``HostOffload``). The GPU then holds
  no per-layer activation between forward and backward, so its peak does not grow with depth.

``policy_costs`` states each policy's saved bytes per token and recompute FLOPs (documented in docs/contracts.md and
printed by ``megatron-lc bench train``).
"""
from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..model.config import ModelConfig
from ..model.flops import block_saved_bytes_per_token, forward_flops_breakdown, mlp_is_tiled

POLICIES = ("none", "full", "every_k", "selective", "offload")


# ---- selective: keep attention's output and lse, recompute its inputs -------------------------------------------
def _project(block: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    return block.attn.project(block.attn_norm(x), cos, sin)


class _Recompute:
    """Saved-tensor hooks for the attention call: tensors living in q's, k's or v's storage are not kept but
    re-made in backward from the recomputed q, k, v (same shapes and strides); everything else (the output, the
    lse, a ring's state) is kept as usual."""

    def __init__(self, sources: tuple[torch.Tensor, ...]):
        self.sources = sources  # (q, k, v) during forward only
        self.recomputed: tuple[torch.Tensor, ...] | None = None
        self.grads: tuple[torch.Tensor, ...] | None = None

    def pack(self, t: torch.Tensor):
        for i, src in enumerate(self.sources):
            if t.untyped_storage().data_ptr() == src.untyped_storage().data_ptr() and t.dtype == src.dtype:
                return i, t.size(), t.stride(), t.storage_offset()
        return t

    def unpack(self, packed):
        if isinstance(packed, torch.Tensor):
            return packed
        i, size, stride, offset = packed
        return self.recomputed[i].as_strided(size, stride, offset)


class _CatchGrads(torch.autograd.Function):
    """Identity on (q, k, v) whose backward hands their gradients to the holder instead of propagating them."""

    @staticmethod
    def forward(ctx, anchor, holder, q, k, v):
        ctx.holder = holder
        return q.view_as(q), k.view_as(k), v.view_as(v)

    @staticmethod
    def backward(ctx, dq, dk, dv):
        ctx.holder.grads = (dq, dk, dv)
        return None, None, None, None, None


class _KeepAttention(torch.autograd.Function):
    """``attn_fn(project(x))`` that saves x, the attention output and what the attention itself saves except q, k,
    v. Works with any attention (SDPA, Triton, ring, Ulysses): the attention's graph is built once in forward and
    run in backward, on q/k/v recomputed from x."""

    @staticmethod
    def forward(ctx, x, cos, sin, block):
        with torch.no_grad():
            q, k, v = _project(block, x, cos, sin)
        holder = _Recompute((q, k, v))
        anchor = torch.empty(0, device=x.device, requires_grad=True)  # gives _CatchGrads a graph to sit in
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(holder.pack, holder.unpack):
            out = block.attn.attn_fn(*_CatchGrads.apply(anchor, holder, q, k, v), causal=True)
        holder.sources = None
        del q, k, v  # their memory goes: the graph above kept only where to find them again
        ctx.save_for_backward(x, cos, sin)
        ctx.block, ctx.holder, ctx.out = block, holder, out
        return out.detach()

    @staticmethod
    def backward(ctx, dout):
        x, cos, sin = ctx.saved_tensors
        x = x.detach().requires_grad_(ctx.needs_input_grad[0])
        with torch.enable_grad():
            q, k, v = _project(ctx.block, x, cos, sin)
        holder = ctx.holder
        holder.recomputed = (q.detach(), k.detach(), v.detach())
        torch.autograd.backward(ctx.out, dout)  # the attention's backward only: it stops at _CatchGrads
        grads, ctx.out, holder.recomputed, holder.grads = holder.grads, None, None, None
        # Parameter gradients of the norm and projections accumulate here, as in a reentrant checkpoint.
        torch.autograd.backward((q, k, v), grads)
        return x.grad, None, None, None


def _pre_mlp(block: nn.Module, x: torch.Tensor, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    b, s = out.shape[:2]
    y = x + block.attn.o_proj(out.reshape(b, s, -1))
    return y, block.mlp_norm(y)


def _post_attention(block: nn.Module, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    y, h = _pre_mlp(block, x, out)
    return y + block.mlp(h)


def _selective_forward(block: nn.Module, plain_forward, x, cos, sin, cache=None, layer: int = 0):
    if cache is not None or not torch.is_grad_enabled():  # decoding or evaluation: nothing to save
        return plain_forward(x, cos, sin, cache, layer)
    out = _KeepAttention.apply(x, cos, sin, block)
    if 0 < block.mlp.tile_tokens < out.shape[0] * out.shape[1]:
        # A tiled MLP saves only its input and recomputes its tiles in its own backward: inside the checkpoint it
        # would also re-run its whole forward first. Keeping its input (one more [S, hidden]) saves that.
        y, h = checkpoint(_pre_mlp, block, x, out, use_reentrant=False)
        return y + block.mlp(h)
    return checkpoint(_post_attention, block, x, out, use_reentrant=False)


# ---- offload: block inputs to host memory ---------------------------------------------------------------------------
class _Entry:
    __slots__ = ("d2h", "device", "gpu", "h2d", "host")

    def __init__(self, host, device, d2h):
        self.host, self.device, self.d2h = host, device, d2h
        self.gpu = self.h2d = None


class HostOffload:
    """Moves each checkpointed block's saved input to host memory and back.

    Forward: the input is copied into pinned host memory on a side stream (the caching allocator keeps its GPU
    memory until that copy is done, via ``record_stream``), so the copy overlaps the next block's compute.
    Backward: when block i's input is needed (its recompute starts), block i-1's input starts coming back on the
    side stream, overlapping block i's recompute and backward. On a CPU device the "host" copy is a plain copy,
    which exercises the same bookkeeping in tests.
    """

    def __init__(self):
        self.entries: dict[int, _Entry] = {}
        self.stream = torch.cuda.Stream() if torch.cuda.is_available() else None

    def _to_host(self, t: torch.Tensor) -> _Entry:
        if t.device.type != "cuda":
            return _Entry(t.detach().clone(), t.device, None)
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        ready = torch.cuda.current_stream(t.device).record_event()
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(ready)
            host.copy_(t, non_blocking=True)
            t.record_stream(self.stream)  # not reused by the allocator before the copy has read it
            d2h = self.stream.record_event()
        return _Entry(host, t.device, d2h)

    def _fetch(self, entry: _Entry, stream) -> None:
        if entry.gpu is not None:
            return
        if entry.device.type != "cuda":
            entry.gpu = entry.host.clone()
            return
        with torch.cuda.stream(stream):
            stream.wait_event(entry.d2h)
            entry.gpu = entry.host.to(entry.device, non_blocking=True)
            entry.h2d = stream.record_event()

    def hooks(self, index: int, x: torch.Tensor):
        """saved_tensors_hooks for block ``index``'s checkpoint: offload the tensor that is ``x``, keep the rest."""

        # Not x itself: autograd keeps the hooks with every packed tensor, and a closure over x would keep it alive.
        where, shape = x.untyped_storage().data_ptr(), x.shape

        def pack(t: torch.Tensor):
            if t.untyped_storage().data_ptr() != where or t.shape != shape:
                return t
            entry = self._to_host(t)
            self.entries[index] = entry
            return index, entry

        def unpack(packed):
            if isinstance(packed, torch.Tensor):
                return packed
            i, entry = packed
            current = torch.cuda.current_stream(entry.device) if entry.device.type == "cuda" else None
            self._fetch(entry, current)
            previous = self.entries.pop(i - 1, None)
            if previous is not None:  # block i-1 runs next in backward: bring its input now
                self._fetch(previous, self.stream)
            self.entries.pop(i, None)
            gpu, entry.gpu = entry.gpu, None
            if current is not None and entry.h2d is not None:
                current.wait_event(entry.h2d)
                gpu.record_stream(current)  # allocated on the side stream, used on this one
            return gpu

        return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


def _offload_forward(block_forward, offload: HostOffload, index: int, x, cos, sin, cache=None, layer: int = 0):
    if cache is not None or not torch.is_grad_enabled():
        return block_forward(x, cos, sin, cache, layer)
    with offload.hooks(index, x):
        return checkpoint(block_forward, x, cos, sin, use_reentrant=False)


# ---- applying a policy ------------------------------------------------------------------------------------------------
def apply_activation_checkpointing(model: nn.Module, policy: str, every: int = 1) -> int:
    """Wrap each block's forward in place per ``policy`` (one of POLICIES; ``every`` is k for ``every_k``), so
    parameter names, and with them init and checkpoints, do not change. Returns the number of blocks wrapped."""
    if policy not in POLICIES:
        raise ValueError(f"activation checkpointing policy must be one of {', '.join(POLICIES)}; got {policy!r}")
    if policy == "every_k" and every < 1:
        raise ValueError(f"every_k checkpointing needs ac_every >= 1, got {every}")
    if policy == "none":
        return 0
    offload = HostOffload() if policy == "offload" else None
    count = 0
    for i, block in enumerate(model.layers):
        plain = block.forward
        if policy == "selective":
            block.forward = functools.partial(_selective_forward, block, plain)
        elif policy == "offload":
            block.forward = functools.partial(_offload_forward, plain, offload, i)
        elif policy == "full" or i % every == 0:
            block.forward = functools.partial(checkpoint, plain, use_reentrant=False)
        else:
            continue
        count += 1
    return count


def policy_costs(config: ModelConfig, policy: str, seq_len: int, *, dtype_bytes: int = 2, every: int = 2) -> dict:
    """What a policy keeps and recomputes, per token of a ``seq_len`` sequence, for the whole model.

    Returns ``saved_bytes_per_token`` (activations kept on the device between forward and backward, from the
    block inputs and attention tensors it keeps; ``none`` counts every tensor autograd saves for a tiled-MLP block),
    ``host_bytes_per_token`` (offload), ``recompute_flops_per_token`` (matmul FLOPs re-run in backward, including
    the tiled MLP's re-run of gate/up) and ``recompute_fraction`` (of the step's model FLOPs, 3 x forward).
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}: use one of {', '.join(POLICIES)}")
    L = config.num_layers
    flops = forward_flops_breakdown(config, seq_len)
    tiled = mlp_is_tiled(config, seq_len)
    kept = block_saved_bytes_per_token(config, seq_len, dtype_bytes=dtype_bytes)  # per block, by what is kept
    none, full, selective = kept["all"], kept["input"], kept["input_and_attention"]
    tile_recompute = (2 / 3) * flops["mlp"] if tiled else 0.0
    block_fwd = flops["qkvo"] + flops["mlp"] + flops["attention"]
    # selective re-runs the MLP in its checkpoint unless it is tiled (then only the tiles' gate/up are recomputed).
    saved = {"none": none, "full": full, "selective": selective, "offload": 0.0,
             "every_k": (full + (every - 1) * none) / every}[policy] * L
    recompute = {"none": 0.0, "full": block_fwd, "offload": block_fwd, "every_k": block_fwd / every,
                 "selective": flops["qkvo"] + (0.0 if tiled else flops["mlp"])}[policy] + tile_recompute
    step = 3 * sum(flops.values())
    return {"policy": policy, "saved_bytes_per_token": saved,
            "host_bytes_per_token": full * L if policy == "offload" else 0.0,
            "recompute_flops_per_token": recompute, "recompute_fraction": recompute / step}
