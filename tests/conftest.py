import os

import pytest
import torch

# Without a GPU, Triton kernels run in the interpreter. It is chosen when a kernel is defined, so the variable must
# be set before any test module imports megatron_lc.kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
