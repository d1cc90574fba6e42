"""Triton kernels of megatron_lc, installed as ``megatron_lc.kernels``.

Each kernel lives in ``kernels/<name>.py`` with its Triton forward/backward and an ``autograd.Function``; the
input checks they share are in ``_utils.py``. They import nothing else of ours: the torch references they match
live in their tests (``tests/test_kernel_<name>.py``), and the model reaches them only through the dispatch in
``megatron_lc.ops``.
"""
