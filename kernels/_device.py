"""What every kernel checks about where its tensors live."""
from __future__ import annotations

import os

import torch


def require_triton_device(kernel: str, device: torch.device) -> None:
    """Raise a clear error unless ``device`` is CUDA or Triton's interpreter is on (``TRITON_INTERPRET=1``)."""
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"the Triton {kernel} kernel needs CUDA tensors, got {device}: move them to a GPU, or set "
                         f"TRITON_INTERPRET=1 before importing megatron_lc.kernels (slow, for tests)")
