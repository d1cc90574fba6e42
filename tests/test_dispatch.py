"""megatron_lc.ops.dispatch: which implementation computes each op, and the model's hooks pointing at it."""
import pytest
import torch

from megatron_lc.model import Transformer, preset_config
from megatron_lc.ops import dispatch
from megatron_lc.ops.rms_norm import rms_norm
from megatron_lc.ops.rotary import apply_rotary_qk
from megatron_lc.ops.swiglu import swiglu


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


def _landed(op):
    try:
        dispatch._triton_impl(op)
        return True
    except ImportError:
        return False


def _step(model, batch):
    loss = model(batch["input_ids"], batch["position_ids"], batch["labels"])
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    torch.optim.AdamW(model.parameters(), lr=1e-2).step()
    with torch.no_grad():
        after = model(batch["input_ids"], batch["position_ids"], batch["labels"])
    return loss.detach(), grads, after


def test_training_step_with_triton_kernels_equals_torch():
    """The tiny preset, fp32, one training step (loss, every gradient, the loss after an AdamW update) with every
    landed Triton kernel (interpreter) equals the torch implementations within 1e-4."""
    cfg = preset_config("tiny")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (2, 40), generator=g)
    labels = torch.roll(ids, -1, 1)
    labels[:, -1] = -100
    labels[0, :5] = -100
    positions = torch.cat([torch.arange(25), torch.arange(15)]).expand(2, 40)  # a packed second document
    batch = {"input_ids": ids, "labels": labels, "position_ids": positions}
    ops = [op for op in dispatch.OPS if _landed(op)]
    assert set(ops) == set(dispatch.OPS)
    results = {}
    for name in ("torch", "triton"):
        model = Transformer(cfg, seed=0)
        chosen = dispatch.apply_kernels(model, {op: name if op in ops else "torch" for op in dispatch.OPS})
        assert all(chosen[op] == name for op in ops)
        results[name] = _step(model, batch)
    (loss_a, grads_a, after_a), (loss_b, grads_b, after_b) = results["torch"], results["triton"]
    torch.testing.assert_close(loss_b, loss_a, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(after_b, after_a, atol=1e-4, rtol=1e-4)
    for n in grads_a:
        torch.testing.assert_close(grads_b[n], grads_a[n], atol=1e-4, rtol=1e-4, msg=n)
