"""Rotary position embedding with fp32 tables built from float64 angles.

The frequencies and cos/sin tables are plain attributes, not parameters or buffers, so ``model.to(torch.bfloat16)``
can never round them: bf16 holds integers exactly only up to 256, so a bf16 position or angle table is wrong long
before 32K. Tables are built once per device (and grown when a longer position shows up) and gathered by position
id, so zigzag shards, packed documents and DCA positions all work; they are cast to the activation dtype only at the
multiply.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .config import ModelConfig
from .rope_scaling import scaled_inverse_frequencies


def inverse_frequencies(head_dim: int, theta: float) -> torch.Tensor:
    """``1 / theta^(2i/head_dim)`` for i in [0, head_dim/2), computed in float64, returned fp32: ``[head_dim/2]``."""
    return scaled_inverse_frequencies(head_dim, theta, None, 1)[0]


class RotaryEmbedding:
    """cos/sin tables ``[P, head_dim/2]`` fp32 for positions 0..P-1, per device, gathered by position ids.

    With ``rope_scaling`` the frequencies are scaled (rope_scaling.py) and cos/sin multiplied by the attention
    factor (YaRN). Dynamic NTK depends on the sequence length: up to max_position_embeddings it is plain RoPE, past
    it cos/sin are computed for the given positions with the base of that length, which is ``max(position_ids) + 1``
    over the whole sequence: ``global_max_position`` maps this process's max to the global one (the context-parallel
    step sets it to an all-reduce; the model itself knows nothing of shards).
    """

    def __init__(self, config: ModelConfig):
        self.head_dim = config.head_dim
        self.theta, self.scaling = config.rope_theta, config.rope_scaling
        self.max_position_embeddings = config.max_position_embeddings
        # [D/2] fp32 on CPU; for dynamic NTK, those of lengths up to max_position_embeddings
        self.inv_freq, self.attention_factor = scaled_inverse_frequencies(
            config.head_dim, config.rope_theta, config.rope_scaling, config.max_position_embeddings)
        self.dynamic = bool(config.rope_scaling) and config.rope_scaling["rope_type"] == "dynamic"
        self.min_positions = config.max_position_embeddings
        self.global_max_position: Callable[[int], int] = lambda local_max: local_max
        self._tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _cos_sin(self, positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # float64 angles from the fp32 frequencies the model uses; cos/sin of float64 stay accurate at 1M+.
        angles = positions.to(torch.float64).unsqueeze(-1) * inv_freq.to(positions.device, torch.float64)
        cos, sin = angles.cos(), angles.sin()
        if self.attention_factor != 1.0:
            cos, sin = cos * self.attention_factor, sin * self.attention_factor
        return cos.to(torch.float32), sin.to(torch.float32)

    def table(self, num_positions: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin ``[P, head_dim/2]`` fp32 on ``device`` with P >= num_positions."""
        device = torch.device(device)
        cached = self._tables.get(device)
        if cached is None or cached[0].shape[0] < num_positions:
            size = max(self.min_positions, 2 ** math.ceil(math.log2(max(num_positions, 1))))
            cos, sin = self._cos_sin(torch.arange(size, device="cpu"), self.inv_freq)
            cached = (cos.to(device), sin.to(device))
            self._tables[device] = cached
        return cached

    def __call__(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids ``[B, S]`` int64 -> cos, sin ``[B, S, head_dim/2]`` fp32."""
        if position_ids.is_floating_point():
            raise TypeError(f"position_ids must be an integer tensor, got {position_ids.dtype}")
        lo, hi = (int(t) for t in position_ids.aminmax()) if position_ids.numel() else (0, 0)  # one host sync
        if lo < 0:
            raise ValueError(f"position_ids must be >= 0, got min {lo}")
        if self.dynamic:
            seq_len = self.global_max_position(hi) + 1
            if seq_len > self.max_position_embeddings:
                inv_freq, _ = scaled_inverse_frequencies(self.head_dim, self.theta, self.scaling,
                                                         self.max_position_embeddings, seq_len)
                return self._cos_sin(position_ids, inv_freq)
        cos, sin = self.table(hi + 1, position_ids.device)
        return cos[position_ids], sin[position_ids]

