"""Triton RMSNorm and SwiGLU (megatron_lc.kernels) against their torch references and float64. The references are
the torch ops the kernels replace in the model (megatron_lc.ops.rms_norm, megatron_lc.ops.swiglu).

fp32: forward and gradients equal the reference's autograd to 1e-5. fp16/bf16: the kernel's max abs error against a
float64 computation must be at most twice the torch reference's own error on the same inputs (or one ulp of the
dtype at the output's scale where the reference is exact). On CPU the kernels run in the Triton interpreter, so shapes are small.

The interpreter (triton 3.9) converts fp32 -> bf16 by truncation (up to 1 ulp) where GPUs and torch round to
nearest (up to 1/2 ulp): that doubles each rounding error, so in the interpreter the bf16 bound is 4x, not 2x."""
import os

import pytest
import torch
import torch.nn.functional as F
from megatron_lc.kernels.rmsnorm import rmsnorm
from megatron_lc.kernels.swiglu import swiglu

from megatron_lc.ops.rms_norm import rms_norm as rmsnorm_reference
from megatron_lc.ops.swiglu import swiglu as swiglu_reference

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL32 = {"atol": 1e-5, "rtol": 1e-5}
EPS = 1e-6


def _randn(*shape, dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(DEV, dtype)


def _grads(fn, inputs, dy):
    """Output and input gradients of fn(*inputs) for upstream gradient dy."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    out.backward(dy.to(out.dtype))
    return [out.detach()] + [t.grad for t in leaves]


def _rms64(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _swiglu64(g, u):
    return F.silu(g) * u


def _assert_within_2x_reference(ours, ref, exact, dtype, names):
    """Each of ours deviates from exact (float64) at most twice as much as ref does, or one ulp of dtype where ref is
    exact (4x for bf16 in the interpreter, whose truncating bf16 conversion doubles the rounding error)."""
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    factor = 4 if dtype == torch.bfloat16 and interpreted else 2
    for name, o, r, e in zip(names, ours, ref, exact):
        assert o.dtype == r.dtype, f"{name}: dtype {o.dtype}, reference {r.dtype}"
        ref_err = (r.double() - e).abs().max().item()
        ulp = torch.finfo(dtype).eps * e.abs().max().item()
        err = (o.double() - e).abs().max().item()
        bound = factor * (ref_err if ref_err > 0 else ulp)
        assert err <= bound, f"{name}: error {err:.3e} > {factor} x reference error {ref_err:.3e} (ulp {ulp:.3e})"


# ---- RMSNorm ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("h", [17, 896, 1536])
def test_rmsnorm_fp32(h):
    x, w, dy = _randn(3, 37, h), _randn(h, seed=1), _randn(3, 37, h, seed=2)
    ours = _grads(lambda a, b: rmsnorm(a, b, EPS), (x, w), dy)
    ref = _grads(lambda a, b: rmsnorm_reference(a, b, EPS), (x, w), dy)
    for name, o, r in zip(("y", "dx", "dweight"), ours, ref):
        torch.testing.assert_close(o, r, **TOL32, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("h", [17, 896])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("w_fp32", [False, True])
def test_rmsnorm_low_precision(h, dtype, w_fp32):
    """Weight in x's dtype gives y in x's dtype; an fp32 weight gives fp32 y (torch promotion)."""
    x, dy = _randn(3, 37, h, dtype=dtype), _randn(3, 37, h, dtype=dtype, seed=2)
    w = _randn(h, dtype=torch.float32 if w_fp32 else dtype, seed=1)
    ours = _grads(lambda a, b: rmsnorm(a, b, EPS), (x, w), dy)
    ref = _grads(lambda a, b: rmsnorm_reference(a, b, EPS), (x, w), dy)
    exact = _grads(lambda a, b: _rms64(a, b, EPS), (x.double(), w.double()), dy.double())
    assert ours[0].dtype == (torch.float32 if w_fp32 else dtype)
    _assert_within_2x_reference(ours, ref, exact, dtype, ("y", "dx", "dweight"))


def test_rmsnorm_leading_shape_and_non_contiguous():
    h = 40
    base = _randn(2, 3, 37, 2 * h)
    x = base[..., ::2]  # column stride 2: copied to contiguous
    xt = _randn(37, 2, 3, h).permute(1, 2, 0, 3)  # [2, 3, 37, H] with unit column stride: read through strides
    w, dy = _randn(h, seed=1), _randn(2, 3, 37, h, seed=2)
    for inp in (x, xt):
        assert not inp.is_contiguous()
        ours = _grads(lambda a, b: rmsnorm(a, b, EPS), (inp, w), dy)
        ref = _grads(lambda a, b: rmsnorm_reference(a, b, EPS), (inp, w), dy)
        assert ours[0].shape == (2, 3, 37, h)
        for o, r in zip(ours, ref):
            torch.testing.assert_close(o, r, **TOL32)
    # upstream gradient with stride-0 rows (an expanded tensor), as autograd can hand over
    dy_exp = _randn(1, h, seed=3).expand(2 * 3 * 37, h).reshape(2, 3, 37, h)
    ours = _grads(lambda a, b: rmsnorm(a, b, EPS), (xt, w), dy_exp)
    ref = _grads(lambda a, b: rmsnorm_reference(a, b, EPS), (xt, w), dy_exp)
    for o, r in zip(ours, ref):
        torch.testing.assert_close(o, r, **TOL32)


def test_rmsnorm_errors():
    with pytest.raises(ValueError, match="torch.float64"):
        rmsnorm(_randn(4, 16, dtype=torch.float64), _randn(16), EPS)
    with pytest.raises(ValueError, match="torch.int32"):
        rmsnorm(torch.ones(4, 16, dtype=torch.int32, device=DEV), _randn(16), EPS)
    with pytest.raises(ValueError, match="weight"):
        rmsnorm(_randn(4, 16), _randn(15), EPS)
    with pytest.raises(ValueError, match="65536"):
        rmsnorm(_randn(1, 65537), _randn(65537), EPS)


# ---- SwiGLU -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("i", [17, 1536])
def test_swiglu_fp32(i):
    g, u, dh = _randn(3, 37, i, scale=3.0), _randn(3, 37, i, seed=1), _randn(3, 37, i, seed=2)
    ours = _grads(swiglu, (g, u), dh)
    ref = _grads(swiglu_reference, (g, u), dh)
    for name, o, r in zip(("h", "dgate", "dup"), ours, ref):
        torch.testing.assert_close(o, r, **TOL32, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_swiglu_low_precision(dtype):
    i = 896
    g, u, dh = (_randn(3, 37, i, dtype=dtype, seed=s, scale=3.0) for s in range(3))
    ours = _grads(swiglu, (g, u), dh)
    ref = _grads(swiglu_reference, (g, u), dh)
    exact = _grads(_swiglu64, (g.double(), u.double()), dh.double())
    assert ours[0].dtype == dtype
    _assert_within_2x_reference(ours, ref, exact, dtype, ("h", "dgate", "dup"))


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # interpreter: exp(200) -> inf, sigmoid 0
def test_swiglu_leading_shape_non_contiguous_and_extremes():
    i = 17
    g = _randn(2, 3, i, 37, scale=3.0).transpose(-1, -2)  # [2, 3, 37, I], non-contiguous: copied
    g[0, 0, 0, :4] = torch.tensor([-200.0, 200.0, -90.0, 90.0])  # sigmoid saturates: no inf/NaN
    u, dh = _randn(2, 3, 37, i, seed=1), _randn(2, 3, 37, i, seed=2)
    ours = _grads(swiglu, (g, u), dh)
    ref = _grads(swiglu_reference, (g, u), dh)
    assert ours[0].shape == (2, 3, 37, i)
    for o, r in zip(ours, ref):
        assert torch.isfinite(o).all()
        torch.testing.assert_close(o, r, **TOL32)


def test_swiglu_errors():
    with pytest.raises(ValueError, match="torch.float64"):
        swiglu(_randn(4, 16, dtype=torch.float64), _randn(4, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match="torch.int32"):
        swiglu(torch.ones(4, 16, dtype=torch.int32, device=DEV), torch.ones(4, 16, dtype=torch.int32, device=DEV))
    with pytest.raises(ValueError, match="one dtype"):
        swiglu(_randn(4, 16), _randn(4, 16, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="shape"):
        swiglu(_randn(4, 16), _randn(4, 17))


# ---- GPU, realistic shapes ----------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("w_fp32", [False, True])
def test_rmsnorm_cuda_bf16_realistic(w_fp32):
    n, h = 4096, 3584
    x, dy = _randn(n, h, dtype=torch.bfloat16), _randn(n, h, dtype=torch.bfloat16, seed=2)
    w = _randn(h, dtype=torch.float32 if w_fp32 else torch.bfloat16, seed=1)
    ours = _grads(lambda a, b: rmsnorm(a, b, EPS), (x, w), dy)
    ref = _grads(lambda a, b: rmsnorm_reference(a, b, EPS), (x, w), dy)
    exact = _grads(lambda a, b: _rms64(a, b, EPS), (x.double(), w.double()), dy.double())
    _assert_within_2x_reference(ours, ref, exact, torch.bfloat16, ("y", "dx", "dweight"))


@pytest.mark.gpu
def test_swiglu_cuda_bf16_realistic():
    n, i = 4096, 18944
    g, u, dh = (_randn(n, i, dtype=torch.bfloat16, seed=s, scale=3.0) for s in range(3))
    ours = _grads(swiglu, (g, u), dh)
    ref = _grads(swiglu_reference, (g, u), dh)
    exact = _grads(_swiglu64, (g.double(), u.double()), dh.double())
    _assert_within_2x_reference(ours, ref, exact, torch.bfloat16, ("h", "dgate", "dup"))
