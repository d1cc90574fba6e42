"""Triton kernels of megatron_lc, installed as ``megatron_lc.kernels``.

Each kernel lives in ``kernels/<name>.py`` with its Triton forward/backward, an ``autograd.Function`` and a torch
reference; the model never calls them directly but through the dispatch in ``megatron_lc.ops``.
"""
