"""Triton fused linear + cross-entropy (kernels/linear_cross_entropy.py) against plain torch autograd.

On CPU the kernel runs in the Triton interpreter (conftest sets TRITON_INTERPRET=1); the matmuls are torch's, so
fp32, bf16 and fp16 all run here. Tolerances: fp32 at atol=rtol=1e-5 (the loss sum is ~O(100), so rtol makes its
bound ~1e-3 absolute); bf16/fp16: our max error against a float64 reference is at most 2x the torch reference's
error on the same inputs (plus 1e-6 absolute, for quantities where torch happens to be exact).
"""
from __future__ import annotations

import pytest
import torch
from megatron_lc.kernels.linear_cross_entropy import auto_chunk_tokens, linear_cross_entropy
from torch.utils._python_dispatch import TorchDispatchMode

from megatron_lc.ops.cross_entropy import IGNORE_INDEX

N = 3 * 37


def linear_cross_entropy_reference(hidden, weight, labels, z_loss=0.0):
    """Plain torch, unchunked (holds ``[N, V]``): same contract as ``linear_cross_entropy``, loss in fp32 out."""
    logits = hidden @ weight.t()
    loss = torch.nn.functional.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    valid = labels != IGNORE_INDEX
    if z_loss > 0:
        lse = torch.logsumexp(logits, dim=-1)
        loss = loss + z_loss * (lse * lse * valid).sum()
    return loss.float(), valid.sum()


def _inputs(n, h, v, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g)
    weight = torch.randn(v, h, generator=g) / h**0.5 * 2.0
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::5] = IGNORE_INDEX
    labels[37:74] = IGNORE_INDEX  # with chunk_tokens=37: a chunk where every label is ignored
    return hidden.to(dtype), weight.to(dtype), labels


def _run(fn, hidden, weight, labels, **kw):
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    loss, count = fn(h, w, labels, **kw)
    (loss * 0.5).backward()  # non-unit upstream gradient: backward must scale
    return loss.detach(), count, h.grad, w.grad


@pytest.mark.parametrize("h_dim,v", [(64, 1000), (64, 1003), (896, 1003)])
@pytest.mark.parametrize("z_loss", [0.0, 1e-4])
def test_fp32_matches_reference(h_dim, v, z_loss):
    hidden, weight, labels = _inputs(N, h_dim, v, torch.float32)
    ours = _run(linear_cross_entropy, hidden, weight, labels, chunk_tokens=37, z_loss=z_loss)
    ref = _run(linear_cross_entropy_reference, hidden, weight, labels, z_loss=z_loss)
    assert ours[1].dtype == torch.int64 and int(ours[1]) == int(ref[1]) == int((labels != IGNORE_INDEX).sum())
    assert ours[0].dtype == torch.float32
    for a, b in zip(ours[0:1] + ours[2:], ref[0:1] + ref[2:]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # ignored rows get exactly zero gradient
    assert torch.all(ours[2][labels == IGNORE_INDEX] == 0)


def test_chunk_sizes_agree():
    hidden, weight, labels = _inputs(N, 64, 1003, torch.float32, seed=1)
    ref = _run(linear_cross_entropy, hidden, weight, labels, chunk_tokens=N)
    for chunk in (1, 16, 0):
        ours = _run(linear_cross_entropy, hidden, weight, labels, chunk_tokens=chunk)
        for a, b in zip(ours[0:1] + ours[2:], ref[0:1] + ref[2:]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("z_loss", [0.0, 1e-4])
def test_half_within_twice_torch_error(dtype, z_loss):
    hidden, weight, labels = _inputs(N, 64, 1003, dtype, seed=2)
    ours = _run(linear_cross_entropy, hidden, weight, labels, chunk_tokens=37, z_loss=z_loss)
    ref = _run(linear_cross_entropy_reference, hidden, weight, labels, z_loss=z_loss)
    exact = _run(linear_cross_entropy_reference, hidden.double(), weight.double(), labels, z_loss=z_loss)
    assert ours[2].dtype == dtype and ours[3].dtype == dtype
    for name, i in (("loss", 0), ("grad_hidden", 2), ("grad_weight", 3)):
        err_ours = (ours[i].double() - exact[i].double()).abs().max().item()
        err_ref = (ref[i].double() - exact[i].double()).abs().max().item()
        assert err_ours <= 2 * err_ref + 1e-6, f"{dtype} {name}: ours {err_ours:.3e} > 2 x torch {err_ref:.3e}"


def test_no_grad_and_noncontiguous():
    hidden, weight, labels = _inputs(N, 64, 1000, torch.float32, seed=3)
    ref, count = linear_cross_entropy_reference(hidden, weight, labels)
    with torch.no_grad():
        loss, c = linear_cross_entropy(hidden, weight, labels, chunk_tokens=50)
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    assert int(c) == int(count) and not loss.requires_grad
    # non-contiguous inputs are copied to contiguous
    h_t = hidden.t().contiguous().t()  # same values, column-major
    assert not h_t.is_contiguous() and not torch.cat([weight, weight], dim=1)[:, ::2].is_contiguous()
    w_nc = torch.cat([weight, weight], dim=1)[:, ::2]
    w_nc_val = w_nc.contiguous()
    loss2, _ = linear_cross_entropy(h_t, w_nc, labels, chunk_tokens=50)
    ref2, _ = linear_cross_entropy_reference(hidden, w_nc_val, labels)
    torch.testing.assert_close(loss2, ref2, atol=1e-5, rtol=1e-5)


def test_ignore_index_parameter():
    """Another ignore index (as F.cross_entropy's): its labels are skipped, and -100 is then out of range."""
    hidden, weight, labels = _inputs(8, 16, 32, torch.float32)
    labels = torch.where(labels == IGNORE_INDEX, 3, labels)
    loss, count = linear_cross_entropy(hidden, weight, labels, ignore_index=3)
    ref = torch.nn.functional.cross_entropy(hidden @ weight.t(), labels, ignore_index=3, reduction="sum")
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    assert int(count) == int((labels != 3).sum())
    with pytest.raises(ValueError, match="ignore index 3"):
        linear_cross_entropy(hidden, weight, torch.full((8,), IGNORE_INDEX), ignore_index=3)


def test_errors():
    hidden, weight, labels = _inputs(8, 16, 32, torch.float32)
    with pytest.raises(ValueError, match="dtype|share"):
        linear_cross_entropy(hidden.double(), weight.double(), labels)
    with pytest.raises(ValueError, match="share"):
        linear_cross_entropy(hidden, weight.half(), labels)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        linear_cross_entropy(hidden, weight, torch.full((8,), 32))
    with pytest.raises(ValueError, match="int64"):
        linear_cross_entropy(hidden, weight, labels.int())
    with pytest.raises(ValueError, match=r"\[N, H\]"):
        linear_cross_entropy(hidden, weight[:, :8], labels)


def test_auto_chunk_tokens_bounded():
    for v in (1000, 151936):
        for dt in (torch.float32, torch.bfloat16):
            c = auto_chunk_tokens(v, dt)
            assert c * v * torch.empty((), dtype=dt).element_size() <= 256 * 2**20 or c == 16


class _LargestAlloc(TorchDispatchMode):
    """Records the bytes of the largest tensor any torch op creates (outputs only; in-place ops create none)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


def test_memory_bounded_by_chunk():
    """N=1024, V=1000, H=64, chunk=64: no tensor larger than the [chunk, V] fp32 buffer (256 KB) is created,
    8x below the N*V*4 = 4.1 MB a full logits tensor would take (bound asserted: 2 x chunk*V*4)."""
    n, h_dim, v, chunk = 1024, 64, 1000, 64
    hidden, weight, labels = _inputs(n, h_dim, v, torch.float32, seed=4)
    h = hidden.requires_grad_()
    w = weight.requires_grad_()
    with _LargestAlloc() as mode:
        loss, _ = linear_cross_entropy(h, w, labels, chunk_tokens=chunk)
    bound = 2 * chunk * v * 4
    assert mode.largest <= bound < n * v * 4, f"largest tensor {mode.largest} B > bound {bound} B"
    assert torch.isfinite(loss)


@pytest.mark.gpu
def test_gpu_realistic_shape_vs_torch_chunked():
    """hidden 896, vocab 151936, 8192 tokens, bf16 on CUDA vs the torch chunked path (same 2x-error rule)."""
    from megatron_lc.ops import linear_cross_entropy as torch_chunked

    n, h_dim, v = 8192, 896, 151936
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(n, h_dim, device="cuda", generator=g).bfloat16()
    weight = (torch.randn(v, h_dim, device="cuda", generator=g) * 0.02).bfloat16()
    labels = torch.randint(0, v, (n,), device="cuda", generator=g)
    labels[::7] = IGNORE_INDEX
    ours = _run(linear_cross_entropy, hidden, weight, labels)
    ref = _run(torch_chunked, hidden, weight, labels)
    exact = _run(torch_chunked, hidden.float(), weight.float(), labels)
    assert int(ours[1]) == int(ref[1])
    for name, i in (("loss", 0), ("grad_hidden", 2), ("grad_weight", 3)):
        err_ours = (ours[i].float() - exact[i].float()).abs().max().item()
        err_ref = (ref[i].float() - exact[i].float()).abs().max().item()
        assert err_ours <= 2 * err_ref + 1e-6, f"{name}: ours {err_ours:.3e} > 2 x torch {err_ref:.3e}"


# ---- compiled (not interpreted) on a machine without a GPU ----------------------------------------------------------
_AOT_SCRIPT = """
import sys
try:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError as e:  # a triton without these internals: nothing to check here
    print(e)
    sys.exit(77)
import megatron_lc.kernels.linear_cross_entropy as K

for dt in ("fp32", "bf16", "fp16"):
    for has_z in (False, True):
        for grad in (False, True):
            consts = dict(BLOCK=K.BLOCK_V, HAS_Z=has_z, WRITE_GRAD=grad)
            sig = dict(Logits="*" + dt, Labels="*i64", Loss="*fp32", stride_row="i64", V="i32", z_loss="fp32",
                       ignore_index="i32", BLOCK="constexpr", HAS_Z="constexpr", WRITE_GRAD="constexpr")
            triton.compile(ASTSource(fn=K._ce_rows_kernel, signature=sig, constexprs=consts),
                           target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
print("compiled")
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests compile and run the kernel")
def test_kernel_compiles_for_sm90():
    """The interpreter checks no types: compile the row kernel for sm_90 through the real Triton compiler, in a
    process without TRITON_INTERPRET."""
    import os
    import subprocess
    import sys

    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], env=env, capture_output=True, text=True, check=False,
                            timeout=300)
    if result.returncode == 77:
        pytest.skip(f"this triton cannot compile ahead of time here: {result.stdout.strip()}")
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-3000:]
