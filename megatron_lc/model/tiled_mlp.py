"""The SwiGLU MLP over sequence tiles: neither forward nor backward holds ``[S, intermediate]`` for the whole S.

At 128K tokens Qwen2-7B's MLP intermediate is 131072 x 18944 bf16 = 4.6 GiB per tensor, and an eager MLP keeps three
of them (gate, up and their product) for backward. Tiled, forward runs tile by tile and saves only its input; backward
recomputes one tile's gate and up projections, back-propagates that tile and drops it before the next. The transient
is ``[tile, intermediate]`` whatever S; the price is recomputing two of forward's three matmuls.
Weight gradients accumulate across tiles in fp32, as in the chunked linear+cross-entropy: a bf16 running sum drifts.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ..ops.cross_entropy import tokens_per_chunk


def auto_tile_tokens(intermediate_size: int) -> int:
    """Largest power of two with ``tile x intermediate x 4 B <= 256 MiB`` (at least 128 tokens)."""
    return tokens_per_chunk(intermediate_size, minimum=128)


def _mlp(x, gate_w, up_w, down_w, act_fn):
    return F.linear(act_fn(F.linear(x, gate_w), F.linear(x, up_w)), down_w)


class _TiledMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gate_w, up_w, down_w, act_fn, tile):
        out = x.new_empty(x.shape[0], down_w.shape[0])
        for start in range(0, x.shape[0], tile):
            out[start:start + tile] = _mlp(x[start:start + tile], gate_w, up_w, down_w, act_fn)
        ctx.save_for_backward(x, gate_w, up_w, down_w)
        ctx.act_fn, ctx.tile = act_fn, tile
        return out

    @staticmethod
    def backward(ctx, dout):
        x, *weights = ctx.saved_tensors
        need_x, *need_w = ctx.needs_input_grad[:4]
        leaves = [w.detach().requires_grad_(need) for w, need in zip(weights, need_w)]
        sums = [torch.zeros(w.shape, dtype=torch.promote_types(w.dtype, torch.float32), device=w.device)
                if need else None for w, need in zip(weights, need_w)]
        dx = torch.empty_like(x) if need_x else None
        for start in range(0, x.shape[0], ctx.tile):
            xt = x[start:start + ctx.tile].detach().requires_grad_(need_x)
            with torch.enable_grad():
                y = _mlp(xt, *leaves, ctx.act_fn)
            wanted = [t for t in (xt, *leaves) if t.requires_grad]
            grads = list(torch.autograd.grad(y, wanted, dout[start:start + ctx.tile]))
            del y
            if need_x:
                dx[start:start + ctx.tile] = grads.pop(0)
            for acc, grad in zip([s for s in sums if s is not None], grads):
                acc += grad
            del grads
        dw = [None if s is None else s.to(w.dtype) for s, w in zip(sums, weights)]
        return (dx, *dw, None, None)


def tiled_mlp(x: torch.Tensor, gate_w: torch.Tensor, up_w: torch.Tensor, down_w: torch.Tensor,
              act_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], tile_tokens: int) -> torch.Tensor:
    """``down(act_fn(x @ gate_w.T, x @ up_w.T))`` over tiles of ``tile_tokens`` tokens, differentiable in x and the
    weights. x ``[..., H]``; gate_w, up_w ``[I, H]``; down_w ``[H, I]`` (same dtype as x) -> ``[..., H]``."""
    if tile_tokens <= 0:
        raise ValueError(f"tile_tokens must be positive, got {tile_tokens}")
    flat = x.reshape(-1, x.shape[-1])
    return _TiledMLP.apply(flat, gate_w, up_w, down_w, act_fn, tile_tokens).view(*x.shape[:-1], down_w.shape[0])
