"""Rotary position embedding applied in torch: the implementation behind ``Attention.rope_fn`` (the Triton kernel
is ``kernels/rope.py``; the cos/sin tables are built by ``megatron_lc.model.rope.RotaryEmbedding``)."""
from __future__ import annotations

import torch


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x: [B, S, H, D]`` by cos/sin ``[B, S, D/2]`` (fp32) in the NeoX half-split layout of Qwen2/HF.

    Equals ``x * cat(cos, cos) + rotate_half(x) * cat(sin, sin)`` with cos/sin cast to x.dtype first, as HF does.
    """
    cos = cos.to(x.dtype).unsqueeze(2)  # [B, S, 1, D/2]
    sin = sin.to(x.dtype).unsqueeze(2)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def apply_rotary_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                    sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``apply_rotary`` to q ``[B, S, H, D]`` and k ``[B, S, H_kv, D]``: the torch implementation behind each
    Attention's ``rope_fn`` (a fused kernel rotates both in one launch)."""
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
