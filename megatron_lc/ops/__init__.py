"""Dispatch of the model's compute ops: attention and linear cross-entropy.

The model calls only what is here; later issues add backends (Triton, flash-attn, cuDNN) behind these names.
"""
from .attention import attention, causal_mask, sdpa_attention
from .cross_entropy import IGNORE_INDEX, auto_chunk_tokens, linear_cross_entropy

__all__ = ["attention", "causal_mask", "sdpa_attention", "IGNORE_INDEX", "auto_chunk_tokens", "linear_cross_entropy"]
