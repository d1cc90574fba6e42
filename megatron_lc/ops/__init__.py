"""The model's compute ops in torch (the default behind each of the model's hooks) and their dispatch.

RMSNorm, SwiGLU, the rotary embedding's rotation, attention and linear cross-entropy; ``dispatch.apply_kernels``
swaps in the Triton kernels of ``megatron_lc.kernels``.
"""
from .attention import attention, causal_mask, sdpa_attention
from .cross_entropy import IGNORE_INDEX, auto_chunk_tokens, linear_cross_entropy
from .rms_norm import rms_norm
from .rotary import apply_rotary, apply_rotary_qk
from .swiglu import swiglu

__all__ = ["IGNORE_INDEX", "apply_rotary", "apply_rotary_qk", "attention", "auto_chunk_tokens", "causal_mask",
           "linear_cross_entropy", "rms_norm", "sdpa_attention", "swiglu"]
