"""megatron_lc.ops.dispatch: which implementation computes each op, and the model's hooks pointing at it."""
import pytest
import torch

from megatron_lc.model import Transformer, preset_config
from megatron_lc.model.rope import apply_rotary_qk
from megatron_lc.model.transformer import rms_norm, swiglu
from megatron_lc.ops import dispatch


def test_auto_is_torch_on_cpu_and_triton_needs_a_gpu_or_the_interpreter(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert {dispatch.resolve(op, "auto", cpu) for op in dispatch.OPS} == {"torch"}
    monkeypatch.setattr(dispatch, "_triton_runs_on", lambda device: device.type == "cuda")
    assert dispatch.resolve("rmsnorm", "auto", cuda) == "triton"
    assert dispatch.resolve("attention", "auto", cuda) == "torch"  # SDPA (cuDNN / flash) until ours is faster
    with pytest.raises(ValueError, match="kernels.rope=triton needs triton and a CUDA device .*TRITON_INTERPRET=1"):
        dispatch.resolve("rope", "triton", cpu)
    with pytest.raises(ValueError, match="must be one of auto, torch, triton, got 'fast'"):
        dispatch.resolve("rope", "fast", cpu)
    with pytest.raises(ValueError, match="unknown op 'softmax'"):
        dispatch.resolve("softmax", "auto", cpu)


def test_apply_kernels_points_every_hook_at_the_choice():
    model = Transformer(preset_config("tiny"))
    chosen = dispatch.apply_kernels(model, "torch")
    assert chosen == {op: "torch" for op in dispatch.OPS}
    assert all(block.attn_norm.norm_fn is rms_norm and block.mlp.act_fn is swiglu and
               block.attn.rope_fn is apply_rotary_qk for block in model.layers)
    assert model.norm.norm_fn is rms_norm
    assert dispatch.apply_kernels(model, {"rope": "torch"}, skip=("attention",)).keys() == set(dispatch.OPS) - {
        "attention"}
    with pytest.raises(ValueError, match=r"unknown op\(s\) \['norm'\]"):
        dispatch.apply_kernels(model, {"norm": "torch"})
