"""What every kernel checks about its inputs (as Liger-Kernel's ``ops/utils.py``): the dtypes the kernels take,
that tensors share a dtype and a device, and that the device can run Triton."""
from __future__ import annotations

import os

import torch

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def require_triton_device(kernel: str, device: torch.device) -> None:
    """Raise a clear error unless ``device`` is CUDA or Triton's interpreter is on (``TRITON_INTERPRET=1``)."""
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"the Triton {kernel} kernel needs CUDA tensors, got {device}: move them to a GPU, or set "
                         f"TRITON_INTERPRET=1 before importing megatron_lc.kernels (slow, for tests)")


def check_inputs(kernel: str, tensors: dict[str, torch.Tensor], *, same_dtype: bool = True,
                 dtype_error: type[Exception] = ValueError, hint: str = "") -> None:
    """Check the ``{name: tensor}`` inputs of ``kernel``: each dtype in SUPPORTED_DTYPES (one shared dtype when
    ``same_dtype``; else ``dtype_error`` with ``hint`` appended), one device for all, and that device runs Triton."""
    names = ", ".join(tensors)
    dtypes = [t.dtype for t in tensors.values()]
    if same_dtype and (len(set(dtypes)) != 1 or dtypes[0] not in SUPPORTED_DTYPES):
        raise dtype_error(f"{kernel} kernel: {names} must share one dtype of {SUPPORTED_DTYPES}, got "
                          f"{', '.join(map(str, dtypes))}{hint}")
    for name, t in tensors.items():
        if t.dtype not in SUPPORTED_DTYPES:
            raise dtype_error(f"{kernel} kernel: {name} dtype {t.dtype} is not supported; use one of "
                              f"{SUPPORTED_DTYPES}{hint}")
    devices = [t.device for t in tensors.values()]
    if len(set(devices)) != 1:
        raise ValueError(f"{names} must be on one device, got {', '.join(map(str, devices))}")
    require_triton_device(kernel, devices[0])
