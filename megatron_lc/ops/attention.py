"""The one attention function of the model (DESIGN.md): ``attention(q, k, v, *, causal, softmax_scale) -> out``.

Layout is ``[B, S, H, D]`` (sequence before heads) because that is what projections produce and what ring/Ulysses
shard along; torch SDPA wants ``[B, H, S, D]``, so we transpose views, not copies.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def check_attention_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Raise ValueError unless q ``[B, S, H, D]``, k/v ``[B, S_kv, H_kv, D]`` with H divisible by H_kv."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attention wants 4-D [B, S, H, D] tensors, got q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} differ in batch or head_dim")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads {q.shape[2]} are not divisible by key/value heads {k.shape[2]}")


def causal_mask(s_q: int, s_kv: int, device: torch.device) -> torch.Tensor:
    """Bottom-right aligned causal mask ``[s_q, s_kv]`` bool: query i sees keys j <= i + (s_kv - s_q)."""
    i = torch.arange(s_q, device=device).unsqueeze(1)
    j = torch.arange(s_kv, device=device).unsqueeze(0)
    return j <= i + (s_kv - s_q)


def sdpa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """Attention with torch SDPA. q ``[B, S, H, D]``, k/v ``[B, S_kv, H_kv, D]`` -> ``[B, S, H, D]`` in q.dtype.

    Causal with S < S_kv is bottom-right aligned (the last query sees every key), as in KV-cache decoding.
    GQA is passed to SDPA (``enable_gqa``) rather than repeated here.
    """
    check_attention_shapes(q, k, v)
    s_q, s_kv = q.shape[1], k.shape[1]
    if causal and s_q > s_kv:
        raise ValueError(f"causal attention with more queries ({s_q}) than keys ({s_kv}) leaves queries blind")
    mask, is_causal = None, False
    if causal and s_q == s_kv:
        is_causal = True
    elif causal and s_q > 1:  # a block of new queries against a longer cache: SDPA's is_causal aligns top-left
        mask = causal_mask(s_q, s_kv, q.device)
    # causal with a single query sees every key: no mask at all.
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=mask,
        is_causal=is_causal,
        scale=softmax_scale,
        enable_gqa=q.shape[2] != k.shape[2],
    )
    return out.transpose(1, 2)


# What the model calls; parallelize/ContextParallel and the kernels issue swap implementations per module.
attention = sdpa_attention
