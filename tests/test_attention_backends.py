"""Block attention backends (megatron_lc.ops.attention_lse) against float64: the chunked math backend on CPU, the
CUDA ones (aten FlashAttention-2, flash-attn when installed) on a GPU, and our CUDA ring against ring-flash-attn.

A ring backward calls a block's backward with the *merged* out and lse of all blocks; each test here does the same:
split the keys into two blocks, merge their outputs, then sum the blocks' gradients computed from the merged ones.
"""
import importlib.util

import pytest
import torch

from megatron_lc.ops import attention
from megatron_lc.ops import attention_lse as lse_ops
from megatron_lc.ops.attention_lse import block_backward, block_forward, chosen_backend, merge_into
from test_attention import reference

SCALE = 1.6  # q, k ~ N(0, 1.6^2): logits reach about +-10


def _inputs(b, s_q, s_kv, h, h_kv, d, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = SCALE * torch.randn(b, s_q, h, d, generator=g)
    k = SCALE * torch.randn(b, s_kv, h_kv, d, generator=g)
    v, dout = torch.randn(b, s_kv, h_kv, d, generator=g), torch.randn(b, s_q, h, d, generator=g)
    return [t.to(device, dtype) for t in (q, k, v, dout)]


def _float64_truth(q, k, v, dout, causal):
    q64, k64, v64 = (t.detach().double().cpu().requires_grad_() for t in (q, k, v))
    out = reference(q64, k64, v64, causal)
    out.backward(dout.double().cpu())
    return out.detach(), q64.grad, k64.grad, v64.grad


def _two_block_attention(q, k, v, dout, causal, backend, split):
    """Forward over keys [:split] and [split:] merged by lse, then each block's backward from the merged output."""
    s_q, s_kv = q.shape[1], k.shape[1]
    blocks = [(slice(0, split), False), (slice(split, s_kv), causal)]  # causal only within the last block
    if causal and s_kv - split < s_q:
        raise ValueError("the causal block needs at least as many keys as queries")
    out = lse = None
    for ks, block_causal in blocks:
        o, l = block_forward(q, k[:, ks], v[:, ks], causal=block_causal, backend=backend)
        if out is None:
            out, lse = o.float().clone(), l.clone()
        else:
            merge_into(out, lse, o, l)
    out = out.to(q.dtype)
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
    dv = torch.zeros_like(dk)
    for ks, block_causal in blocks:
        gq, gk, gv = block_backward(dout, q, k[:, ks], v[:, ks], out, lse, causal=block_causal, backend=backend)
        dq += gq.float()
        dk[:, ks] += gk.float()
        dv[:, ks] += gv.float()
    return out, dq, dk, dv


# ---- CPU ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("causal", [True, False])
def test_math_backend_in_query_chunks_matches_float64(monkeypatch, causal):
    monkeypatch.setattr(lse_ops, "MATH_CHUNK_ELEMENTS", 2 * 4 * 40 * 3)  # 3 queries per chunk: 4 chunks + a rest
    q, k, v, dout = _inputs(2, 13, 40, 4, 2, 16, torch.float32, "cpu")
    assert len(lse_ops._query_chunks(q, 40)) == 5
    got = _two_block_attention(q, k, v, dout, causal, "math", split=20)
    truth = _float64_truth(q, k, v, dout, causal)
    for a, b in zip(got, truth):
        torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_triton_backend_two_block_ring_step_matches_float64(causal):
    """Our Triton kernel (interpreter) behind block_forward/backward, used as a ring uses it: fp32 at 1e-5."""
    q, k, v, dout = _inputs(2, 13, 40, 4, 2, 16, torch.float32, "cpu")
    got = _two_block_attention(q, k, v, dout, causal, "triton", split=20)
    for a, b in zip(got, _float64_truth(q, k, v, dout, causal)):
        torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=1e-5)


def test_backend_names_and_auto_choice_on_cpu():
    q, k = torch.zeros(1, 4, 2, 8), torch.zeros(1, 6, 1, 8)
    assert chosen_backend(q, q[:, :, :1], causal=True) == "cpu_flash"
    assert chosen_backend(q, k, causal=False) == "cpu_flash"
    assert chosen_backend(q, k, causal=True) == "math"  # the CPU kernel's causal mask is top-left aligned
    with pytest.raises(ValueError, match="unknown block attention backend 'fast'.*'math'"):
        block_forward(q, k, k, causal=False, backend="fast")
    if importlib.util.find_spec("flash_attn") is None:
        with pytest.raises(ValueError, match=r"needs the flash-attn package: pip install 'megatron_lc\[gpu\]'"):
            block_forward(q, k, k, causal=False, backend="flash_attn")


# ---- GPU ------------------------------------------------------------------------------------------------------
def _cuda_backends():
    names = ["cuda_flash", "triton", "math"]
    if importlib.util.find_spec("flash_attn") is not None:
        names.insert(0, "flash_attn")
    return names


@pytest.mark.gpu
@pytest.mark.parametrize("backend", _cuda_backends())
@pytest.mark.parametrize("h,h_kv,d", [(8, 8, 64), (8, 2, 128)])
@pytest.mark.parametrize("causal", [True, False])
def test_cuda_backend_bf16_within_twice_sdpa_error(backend, h, h_kv, d, causal):
    """bf16 outputs and gradients of the two-block (ring-style) computation within 2x the error that torch SDPA's
    own bf16 forward/backward has against float64 on the same inputs."""
    q, k, v, dout = _inputs(2, 256, 512, h, h_kv, d, torch.bfloat16, "cuda")
    truth = _float64_truth(q, k, v, dout, causal)
    got = _two_block_attention(q, k, v, dout, causal, backend, split=256)
    qs, ks, vs = (t.detach().clone().requires_grad_() for t in (q, k, v))
    sdpa_out = attention(qs, ks, vs, causal=causal)
    sdpa_out.backward(dout)
    sdpa = (sdpa_out.detach(), qs.grad, ks.grad, vs.grad)
    for name, a, ref, t in zip(("out", "dq", "dk", "dv"), got, sdpa, truth):
        err = (a.double().cpu() - t).abs().max().item()
        ref_err = (ref.double().cpu() - t).abs().max().item()
        assert err <= 2 * ref_err, (backend, name, err, ref_err)


@pytest.mark.gpu
def test_auto_picks_a_flash_kernel_for_bf16_on_cuda():
    q = torch.zeros(1, 8, 2, 64, device="cuda", dtype=torch.bfloat16)
    expected = "flash_attn" if importlib.util.find_spec("flash_attn") is not None else "cuda_flash"
    assert chosen_backend(q, q, causal=True) == expected
    assert chosen_backend(q.float(), q.float(), causal=True) == "triton"  # aten/flash-attn kernels take no fp32


def _ring_vs_ring_flash_attn(rank, world, shape):
    import torch.distributed as dist
    from ring_flash_attn import zigzag_ring_flash_attn_func

    from megatron_lc.parallel.ring import ring_attention
    from megatron_lc.parallel.cp_sharding import shard_sequence

    b, s, h, h_kv, d = shape
    full = _inputs(b, s, s, h, h_kv, d, torch.bfloat16, f"cuda:{rank}")
    results = {}
    for name in ("ours", "theirs"):
        q, k, v, dout = (shard_sequence(t, rank, world).detach().clone().requires_grad_(i < 3)
                         for i, t in enumerate(full))
        if name == "ours":
            out = ring_attention(q, k, v, dist.group.WORLD, causal=True)
        else:
            out = zigzag_ring_flash_attn_func(q, k, v, causal=True, group=dist.group.WORLD)
        out.backward(dout)
        results[name] = [out.detach(), q.grad, k.grad, v.grad]
    return results


@pytest.mark.gpu
@pytest.mark.skipif(importlib.util.find_spec("ring_flash_attn") is None, reason="needs ring-flash-attn")
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_zigzag_ring_matches_ring_flash_attn():
    """Same zigzag shards through our ring and ring_flash_attn's zigzag function (bf16, NCCL): our outputs and
    gradients are within 2x the error theirs have against float64."""
    from dist_utils import run_distributed
    from megatron_lc.parallel.cp_sharding import unshard_sequence

    world, shape = 2, (2, 1024, 8, 2, 64)
    results = run_distributed(_ring_vs_ring_flash_attn, world, shape, backend="nccl", timeout=300)
    q, k, v, dout = _inputs(shape[0], shape[1], shape[1], *shape[2:], torch.bfloat16, "cuda")
    truth = _float64_truth(q, k, v, dout, True)
    for i, name in enumerate(("out", "dq", "dk", "dv")):
        ours, theirs = (unshard_sequence([r[who][i] for r in results]).double() for who in ("ours", "theirs"))
        err, their_err = ((x - truth[i]).abs().max().item() for x in (ours, theirs))
        assert err <= 2 * their_err, (name, err, their_err)
