"""Packaging: the top-level kernels/ folder installs as megatron_lc.kernels, and claims no bare `kernels` name."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_kernels_install_as_megatron_lc_kernels(tmp_path):
    code = ("import importlib.util, megatron_lc.kernels as k; print(k.__file__); "
            "print(importlib.util.find_spec('kernels') is None)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    path, no_bare = out.stdout.split()
    assert os.path.dirname(path).endswith("kernels") and no_bare == "True"

