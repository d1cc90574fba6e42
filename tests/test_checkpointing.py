"""Activation checkpointing policies and the sequence-tiled MLP: same numbers as no checkpointing, less memory."""
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from megatron_lc.model import Transformer, preset_config
from megatron_lc.model.tiled_mlp import auto_tile_tokens, tiled_mlp
from megatron_lc.ops.swiglu import swiglu
from megatron_lc.parallel.activation_checkpointing import POLICIES, apply_activation_checkpointing, policy_costs


def _step(policy: str, tile: int, ids: torch.Tensor, every: int = 2):
    """Loss, grads and attention calls (forward, during backward) of one step of the tiny preset in fp32."""
    cfg = dataclasses.replace(preset_config("tiny"), mlp_tile_tokens=tile)
    model = Transformer(cfg, seed=1)
    calls = [0]
    base = model.layers[0].attn.attn_fn

    def counting(*args, **kwargs):
        calls[0] += 1
        return base(*args, **kwargs)

    model.set_attention(counting)
    apply_activation_checkpointing(model, policy, every)
    loss = model(ids, labels=ids)
    forward_calls = calls[0]
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    return loss.detach(), grads, forward_calls, calls[0] - forward_calls


@pytest.mark.parametrize("tile", [-1, 16])
@pytest.mark.parametrize("policy", [p for p in POLICIES if p != "none"])
def test_policy_equals_no_checkpointing(policy, tile):
    """Loss and every gradient equal the un-checkpointed (and untiled) step at atol=rtol=1e-5 (fp32)."""
    ids = torch.randint(0, 512, (2, 37), generator=torch.Generator().manual_seed(0))
    ref_loss, ref_grads, _, _ = _step("none", -1, ids)
    loss, grads, _, _ = _step(policy, tile, ids)
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("policy,backward_calls", [("none", 0), ("full", 2), ("every_k", 1), ("selective", 0),
                                                   ("offload", 2)])
def test_attention_reruns_in_backward(policy, backward_calls):
    """selective never re-runs attention in backward (that is its point); full and offload re-run every layer's,
    every_k (k=2, 2 layers) one of them."""
    ids = torch.randint(0, 512, (1, 24), generator=torch.Generator().manual_seed(1))
    _, _, forward_calls, during_backward = _step(policy, 8, ids)
    assert forward_calls == 2 and during_backward == backward_calls


def test_checkpointed_model_evaluates_and_decodes_like_plain():
    """Without grad, and with a KV cache, the wrapped blocks run the plain forward."""
    from megatron_lc.model import generate

    cfg = preset_config("tiny")
    ids = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(2))
    plain = Transformer(cfg, seed=3)
    want_logits = plain(ids).detach()
    want_tokens = generate(plain, ids, max_new_tokens=5, temperature=0.0)
    for policy in ("selective", "offload", "full"):
        model = Transformer(cfg, seed=3)
        apply_activation_checkpointing(model, policy)
        with torch.no_grad():
            torch.testing.assert_close(model(ids), want_logits, atol=1e-6, rtol=1e-6)
        assert torch.equal(generate(model, ids, max_new_tokens=5, temperature=0.0), want_tokens)


def test_bad_policy_is_named():
    model = Transformer(preset_config("tiny"))
    with pytest.raises(ValueError, match="one of none, full, every_k, selective, offload; got 'sometimes'"):
        apply_activation_checkpointing(model, "sometimes")
    with pytest.raises(ValueError, match="ac_every >= 1, got 0"):
        apply_activation_checkpointing(model, "every_k", 0)


# ---- tiled MLP ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tokens,tile", [(37, 8), (37, 37), (111, 16)])
def test_tiled_mlp_equals_untiled(tokens, tile):
    """Output and the gradients of input and all three weights equal the plain MLP (fp32, atol=rtol=1e-5);
    the tile need not divide the token count."""
    gen = torch.Generator().manual_seed(tokens)
    x = torch.randn(1, tokens, 48, generator=gen)
    gate, up = torch.randn(80, 48, generator=gen) / 7, torch.randn(80, 48, generator=gen) / 7
    down = torch.randn(48, 80, generator=gen) / 9
    dy = torch.randn(1, tokens, 48, generator=gen)

    def run(fn):
        leaves = [t.clone().requires_grad_() for t in (x, gate, up, down)]
        out = fn(*leaves)
        out.backward(dy)
        return out.detach(), [t.grad for t in leaves]

    ref_out, ref_grads = run(lambda a, g, u, d: torch.nn.functional.linear(swiglu(a @ g.T, a @ u.T), d))
    out, grads = run(lambda a, g, u, d: tiled_mlp(a, g, u, d, swiglu, tile))
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_tiled_mlp_bf16_weight_grads_accumulate_in_fp32():
    """bf16 inputs: the weight gradient summed over 64 tiles stays within 2x of the untiled bf16 matmul's own error
    against float64 (a bf16 running sum over the tiles would drift past it)."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(4096, 64, generator=gen)
    gate, up, down = (torch.randn(128, 64, generator=gen) / 8, torch.randn(128, 64, generator=gen) / 8,
                      torch.randn(64, 128, generator=gen) / 11)
    dy = torch.randn(4096, 64, generator=gen)

    def grads(fn, dtype):
        leaves = [t.to(dtype).requires_grad_() for t in (x, gate, up, down)]
        fn(*leaves).backward(dy.to(dtype))
        return [t.grad.double() for t in leaves]

    def plain(a, g, u, d):
        return torch.nn.functional.linear(swiglu(a @ g.T, a @ u.T), d)

    exact = grads(plain, torch.float64)
    untiled = grads(plain, torch.bfloat16)
    tiled = grads(lambda a, g, u, d: tiled_mlp(a, g, u, d, swiglu, 64), torch.bfloat16)
    for i in (1, 2, 3):  # the weights
        ref_err = (untiled[i] - exact[i]).abs().max().item()
        assert (tiled[i] - exact[i]).abs().max().item() <= 2 * ref_err


def test_mlp_tiles_only_long_inputs():
    cfg = dataclasses.replace(preset_config("tiny"), mlp_tile_tokens=0)
    assert Transformer(cfg).layers[0].mlp.tile_tokens == auto_tile_tokens(cfg.intermediate_size)
    assert auto_tile_tokens(8960) == 4096 and auto_tile_tokens(18944) == 2048  # Qwen2-1.5B, Qwen2-7B
    with pytest.raises(Exception, match="mlp_tile_tokens"):
        dataclasses.replace(cfg, mlp_tile_tokens=-2)


# ---- memory ------------------------------------------------------------------------------------------------------
_RETAINED = r"""
import json, sys, torch
from megatron_lc.model import Transformer, ModelConfig
from megatron_lc.parallel.activation_checkpointing import apply_activation_checkpointing
def rss():
    for line in open('/proc/self/status'):
        if line.startswith('VmRSS:'):
            return int(line.split()[1]) * 1024
cfg = ModelConfig(vocab_size=256, hidden_size=256, intermediate_size=768, num_layers=4, num_heads=4, num_kv_heads=2,
                  mlp_tile_tokens=512)
model = Transformer(cfg)
apply_activation_checkpointing(model, sys.argv[1])
ids = torch.randint(0, 256, (1, 2048))
model(ids, labels=ids).backward()  # warm up: allocator and autograd state
model.zero_grad(set_to_none=False)
base = rss()
loss = model(ids, labels=ids)
print(json.dumps({"retained": rss() - base}))
"""


def test_saved_bytes_order():
    """What stays alive between forward and backward (VmRSS of a fresh process, 4 layers x 2048 tokens x hidden 256,
    fp32): full and offload (on CPU the 'host' copy is the input itself) keep about one input per layer,
    selective about three (input, attention output, tiled MLP input), none the most."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    retained = {}
    for policy in ("none", "selective", "full", "offload"):
        done = subprocess.run([sys.executable, "-c", _RETAINED, policy], capture_output=True, text=True, env=env,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        retained[policy] = json.loads(done.stdout.strip().splitlines()[-1])["retained"]
    per_layer_input = 2048 * 256 * 4
    assert retained["full"] < retained["selective"] < retained["none"], retained
    # selective keeps, per layer, the input, the attention output (and a small lse) and, the MLP being tiled at
    # this length, the MLP's input: 3 inputs' worth, 2 more than full.
    assert retained["selective"] - retained["full"] <= 4 * (2 * per_layer_input + 2048 * 4 * 4) + 2**20, retained
    assert retained["none"] > retained["selective"] + 4 * per_layer_input, retained
    # On CPU the "host" copy replaces the input: nothing else may keep the original alive.
    assert abs(retained["offload"] - retained["full"]) <= 2**20, retained


def test_policy_costs_model():
    """The documented cost model orders the policies as the measurements do."""
    cfg = preset_config("qwen2-1.5b")
    costs = {p: policy_costs(cfg, p, 131072) for p in POLICIES}
    saved = {p: c["saved_bytes_per_token"] for p, c in costs.items()}
    assert saved["offload"] < saved["full"] < saved["selective"] < saved["every_k"] < saved["none"]
    assert costs["offload"]["host_bytes_per_token"] == saved["full"] == 2 * 1536 * 28
    recompute = {p: c["recompute_flops_per_token"] for p, c in costs.items()}
    assert recompute["none"] < recompute["selective"] < recompute["full"] == recompute["offload"]
    with pytest.raises(ValueError, match="unknown policy"):
        policy_costs(cfg, "most", 4096)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_offload_moves_saved_inputs_off_the_gpu():
    """After forward, offload holds about one layer input fewer per layer on the GPU than full checkpointing, and
    the gradients are unchanged (fp32, atol=rtol=1e-5)."""
    cfg = dataclasses.replace(preset_config("tiny"), hidden_size=512, num_heads=8, num_kv_heads=2, head_dim=64,
                              intermediate_size=1024, num_layers=6)
    ids = torch.randint(0, cfg.vocab_size, (1, 8192), device="cuda")
    results = {}
    for policy in ("full", "offload"):
        model = Transformer(cfg, seed=1).cuda()
        apply_activation_checkpointing(model, policy)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        loss = model(ids, labels=ids)
        torch.cuda.synchronize()
        kept = torch.cuda.memory_allocated() - before
        loss.backward()
        results[policy] = kept, {n: p.grad.float().cpu() for n, p in model.named_parameters()}
    per_input = 8192 * 512 * 4
    assert results["offload"][0] <= results["full"][0] - (cfg.num_layers - 1) * per_input, results
    for name, grad in results["full"][1].items():
        torch.testing.assert_close(results["offload"][1][name], grad, atol=1e-5, rtol=1e-5, msg=name)
