"""Triton RoPE (megatron_lc.kernels.rope) against the torch op it replaces (megatron_lc.ops.rotary) and a float64
rotation. On CPU the kernel runs in the Triton interpreter (small shapes: one program per token row costs ~15 ms
there, so 2 x 13 rows cover odd lengths, several batches and every position pattern at a quarter of 3 x 37's cost)."""
import functools

import pytest
import torch
from megatron_lc.kernels.rope import rope_qk, rope_qk_from_table

from megatron_lc.model.rope import RotaryEmbedding, inverse_frequencies
from megatron_lc.ops.rotary import apply_rotary_qk as rope_reference

DEV = "cuda" if torch.cuda.is_available() else "cpu"
FP32_TOL = {"atol": 1e-5, "rtol": 1e-5}
THETA = 1e6


class _Cfg:
    def __init__(self, head_dim, max_pos=64):
        self.head_dim, self.rope_theta, self.max_position_embeddings = head_dim, THETA, max_pos
        self.rope_scaling = None


@functools.cache
def _rope(head_dim):
    """One RotaryEmbedding per head_dim for the whole file: building the ~1M-row tables takes a second each."""
    return RotaryEmbedding(_Cfg(head_dim))


def _positions(kind, b, s, g):
    """[B, S] int64: arbitrary, non-monotonic ids like zigzag CP shards, packed documents and DCA."""
    if kind == "permutation":
        return torch.stack([torch.randperm(4 * s, generator=g)[:s] for _ in range(b)])
    if kind == "reset":  # packed documents: positions restart mid-sequence
        pos = torch.arange(s).repeat(b, 1)
        return torch.where(pos < s // 3, pos, pos - s // 3)
    if kind == "large":  # up to ~1M, shuffled
        return torch.randint(900_000, 1_048_576, (b, s), generator=g)
    raise ValueError(kind)


def _inputs(b=2, s=13, h=4, h_kv=2, d=64, dtype=torch.float32, pos_kind="permutation", seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, s, h, d, generator=g).to(DEV, dtype)
    k = torch.randn(b, s, h_kv, d, generator=g).to(DEV, dtype)
    pos = _positions(pos_kind, b, s, g).to(DEV)
    rope = _rope(d)
    cos, sin = rope(pos)
    cos_t, sin_t = rope.table(int(pos.max()) + 1, DEV)
    return q, k, pos, cos, sin, cos_t, sin_t


def _fwd_bwd(fn, q, k, gq, gk):
    q, k = q.detach().requires_grad_(), k.detach().requires_grad_()
    q_rot, k_rot = fn(q, k)
    dq, dk = torch.autograd.grad((q_rot, k_rot), (q, k), (gq, gk))
    return q_rot.detach(), k_rot.detach(), dq, dk


def _rotate64(x, cos, sin, inverse=False):
    """float64 rotation of x by the same fp32 table values (no dtype cast): the exact result."""
    c, s = cos.double().unsqueeze(2), sin.double().unsqueeze(2)
    s = -s if inverse else s
    x1, x2 = x.double().chunk(2, dim=-1)
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("pos_kind", ["permutation", "reset", "large"])
def test_fp32_forward_backward_match_reference(d, pos_kind):
    q, k, pos, cos, sin, cos_t, sin_t = _inputs(d=d, pos_kind=pos_kind)
    g = torch.Generator().manual_seed(1)
    gq, gk = torch.randn(q.shape, generator=g).to(DEV), torch.randn(k.shape, generator=g).to(DEV)
    ref = _fwd_bwd(lambda a, b: rope_reference(a, b, cos, sin), q, k, gq, gk)
    ours = _fwd_bwd(lambda a, b: rope_qk(a, b, cos, sin), q, k, gq, gk)
    table = _fwd_bwd(lambda a, b: rope_qk_from_table(a, b, cos_t, sin_t, pos), q, k, gq, gk)
    for r, o, t in zip(ref, ours, table):
        torch.testing.assert_close(o, r, **FP32_TOL)
        assert torch.equal(t, o)  # the in-kernel gather reads the same table rows as cos_t[pos]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_within_twice_reference_error(dtype):
    """Error against float64 (on the same 16-bit inputs and fp32 table values) <= 2x the torch reference's."""
    q, k, pos, cos, sin, cos_t, sin_t = _inputs(d=128, dtype=dtype, pos_kind="large")
    g = torch.Generator().manual_seed(2)
    gq, gk = (torch.randn(t.shape, generator=g).to(DEV, dtype) for t in (q, k))
    ref = _fwd_bwd(lambda a, b: rope_reference(a, b, cos, sin), q, k, gq, gk)
    ours = _fwd_bwd(lambda a, b: rope_qk(a, b, cos, sin), q, k, gq, gk)
    table = _fwd_bwd(lambda a, b: rope_qk_from_table(a, b, cos_t, sin_t, pos), q, k, gq, gk)
    exact = (_rotate64(q, cos, sin), _rotate64(k, cos, sin),
             _rotate64(gq, cos, sin, inverse=True), _rotate64(gk, cos, sin, inverse=True))
    ulp = torch.finfo(dtype).eps
    for name, r, o, t, e in zip(("q_rot", "k_rot", "dq", "dk"), ref, ours, table, exact):
        assert o.dtype == dtype
        ref_err = (r.double() - e).abs().max().item()
        our_err = (o.double() - e).abs().max().item()
        assert our_err <= 2 * max(ref_err, ulp), f"{name}: ours {our_err:.3g} vs reference {ref_err:.3g}"
        assert torch.equal(t, o)


def test_gqa_head_counts_and_non_contiguous_inputs():
    """Different head counts (incl. more k heads than q heads, one head, 7 heads), and strided views."""
    for h, h_kv in ((7, 1), (2, 5), (1, 1)):
        q, k, pos, cos, sin, cos_t, sin_t = _inputs(b=2, s=9, h=h, h_kv=h_kv, d=64)
        for o, r in zip(rope_qk(q, k, cos, sin), rope_reference(q, k, cos, sin)):
            torch.testing.assert_close(o, r, **FP32_TOL)
    # q as a transposed [B, H, S, D] buffer viewed as [B, S, H, D]; k a slice of a wider projection
    g = torch.Generator().manual_seed(3)
    q_bhsd = torch.randn(2, 4, 11, 32, generator=g).to(DEV)
    q = q_bhsd.transpose(1, 2)
    k = torch.randn(2, 11, 3, 96, generator=g).to(DEV)[..., 16:48]
    assert not q.is_contiguous() and not k.is_contiguous()
    pos = torch.randperm(11, generator=g).repeat(2, 1).to(DEV)
    rope = RotaryEmbedding(_Cfg(32))
    cos, sin = rope(pos)
    cos_t, sin_t = rope.table(11, DEV)
    gq, gk = torch.randn(q.shape, generator=g).to(DEV).transpose(0, 1).contiguous().transpose(0, 1), \
        torch.randn(k.shape, generator=g).to(DEV)
    ref = _fwd_bwd(lambda a, b: rope_reference(a, b, cos, sin), q, k, gq, gk)
    ours = _fwd_bwd(lambda a, b: rope_qk(a, b, cos, sin), q, k, gq, gk)
    # broadcast cos/sin (stride 0 over batch) and a non-contiguous position view through the table path
    pos_nc = torch.stack((pos, pos), dim=-1)[..., 0]
    table = _fwd_bwd(lambda a, b: rope_qk_from_table(a, b, cos_t, sin_t, pos_nc), q, k, gq, gk)
    bcast = _fwd_bwd(lambda a, b: rope_qk(a, b, cos[:1].expand_as(cos), sin[:1].expand_as(sin)), q, k, gq, gk)
    for r, o, t, bc in zip(ref, ours, table, bcast):
        torch.testing.assert_close(o, r, **FP32_TOL)
        assert torch.equal(t, o) and torch.equal(bc, o)


@pytest.mark.parametrize("d", [2, 80, 256])
def test_other_head_dims(d):
    """D/2 not a power of two (80: masked lanes), the smallest (2) and largest (256) head_dim, fwd and bwd."""
    q, k, pos, cos, sin, cos_t, sin_t = _inputs(b=1, s=5, h=3, h_kv=1, d=d)
    g = torch.Generator().manual_seed(5)
    gq, gk = torch.randn(q.shape, generator=g).to(DEV), torch.randn(k.shape, generator=g).to(DEV)
    ref = _fwd_bwd(lambda a, b: rope_reference(a, b, cos, sin), q, k, gq, gk)
    table = _fwd_bwd(lambda a, b: rope_qk_from_table(a, b, cos_t, sin_t, pos), q, k, gq, gk)
    for r, t in zip(ref, table):
        torch.testing.assert_close(t, r, **FP32_TOL)


def test_position_one_million_reads_float64_built_table():
    """At ~1M the fp32 angle position * inv_freq is off by up to ~1e-2 rad: the kernel must read the table built
    from float64 angles (matching the float64 rotation to fp32 rounding), not recompute angles."""
    d = 64
    positions = torch.tensor([[1_000_000, 1_048_575, 999_999, 3]], device=DEV)
    q = torch.randn(1, 4, 2, d, generator=torch.Generator().manual_seed(4)).to(DEV)
    k = q[:, :, :1].clone()
    inv = inverse_frequencies(d, THETA)
    angles64 = positions.cpu().double()[..., None] * inv.double()  # [1, 4, D/2] float64
    cos64, sin64 = angles64.cos().to(DEV), angles64.sin().to(DEV)
    # fp32 angles (what an in-kernel position * inv_freq would compute) are visibly different
    angles32 = positions.cpu().float()[..., None] * inv
    assert (angles32.double() - angles64).abs().max() > 1e-3
    cos_t, sin_t = _rope(d).table(1_048_576, DEV)
    q_rot, k_rot = rope_qk_from_table(q, k, cos_t, sin_t, positions)
    exact = _rotate64(q, cos64, sin64)
    # fp32 table values are within 6e-8 of float64 cos/sin; |x| < ~5, so the rotation is within ~1e-6
    torch.testing.assert_close(q_rot.double(), exact, atol=2e-6, rtol=0)
    torch.testing.assert_close(k_rot.double(), exact[:, :, :1], atol=2e-6, rtol=0)
    wrong = _rotate64(q, angles32.double().cos().to(DEV), angles32.double().sin().to(DEV))
    assert (q_rot.double() - wrong).abs().max() > 1e-3


def test_unsupported_inputs_raise_clear_errors():
    q, k, pos, cos, sin, cos_t, sin_t = _inputs(b=1, s=4, d=64)
    for d in (63, 512):
        qd, kd = torch.randn(1, 4, 2, d, device=DEV), torch.randn(1, 4, 1, d, device=DEV)
        cd = torch.zeros(1, 4, d // 2, device=DEV)
        with pytest.raises(ValueError, match=f"head_dim {d}"):
            rope_qk(qd, kd, cd, cd)
    with pytest.raises(TypeError, match="int64"):
        rope_qk(q.to(torch.int64), k.to(torch.int64), cos, sin)
    with pytest.raises(TypeError, match="dtype"):
        rope_qk(q, k.double(), cos, sin)
    with pytest.raises(ValueError, match="cos must have shape"):
        rope_qk(q, k, cos[..., :16], sin)
    with pytest.raises(ValueError, match=r"position_ids must be in \[0, "):
        rope_qk_from_table(q, k, cos_t[:2], sin_t[:2], pos)
    with pytest.raises(TypeError, match="position_ids must be int64"):
        rope_qk_from_table(q, k, cos_t, sin_t, pos.float())


def test_gradients_only_to_q_and_k():
    q, k, pos, _cos, _sin, cos_t, sin_t = _inputs(b=1, s=5, d=64)
    cos_t = cos_t.clone().requires_grad_()
    q = q.clone().requires_grad_()
    q_rot, _k_rot = rope_qk_from_table(q, k, cos_t, sin_t, pos)
    q_rot.sum().backward()  # k_rot unused: its gradient arrives as None
    assert q.grad is not None and cos_t.grad is None


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_realistic_shape(dtype):
    """1 x 32768 tokens, 28 query / 4 KV heads, head_dim 128 (Qwen2-7B): equal to the reference, both paths."""
    q, k, pos, cos, sin, cos_t, sin_t = _inputs(b=1, s=32768, h=28, h_kv=4, d=128, dtype=dtype, pos_kind="large")
    gq, gk = torch.randn_like(q), torch.randn_like(k)
    ref = _fwd_bwd(lambda a, b: rope_reference(a, b, cos, sin), q, k, gq, gk)
    ours = _fwd_bwd(lambda a, b: rope_qk(a, b, cos, sin), q, k, gq, gk)
    table = _fwd_bwd(lambda a, b: rope_qk_from_table(a, b, cos_t, sin_t, pos), q, k, gq, gk)
    tol = FP32_TOL if dtype == torch.float32 else {"atol": 2 ** -7, "rtol": 2 ** -7}  # one bf16 ulp at |x| ~ 1
    for r, o, t in zip(ref, ours, table):
        torch.testing.assert_close(o, r, **tol)
        assert torch.equal(t, o)


@pytest.mark.gpu
def test_gpu_offsets_past_int32():
    """q with more than 2^31 elements (1 x 1.1M tokens x 16 heads x 128, bf16, 4.5 GB): int64 offsets; the last
    tokens (offsets past 2^31) are checked against the reference."""
    s, h, d = 1_100_000, 16, 128
    assert s * h * d > 2**31
    q = torch.randn(1, s, h, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, s, 1, d, device="cuda", dtype=torch.bfloat16)
    pos = torch.arange(s, device="cuda").flip(0)[None]
    cos_t, sin_t = _rope(d).table(s, "cuda")
    with torch.no_grad():
        q_rot, k_rot = rope_qk_from_table(q, k, cos_t, sin_t, pos)
    tail = slice(s - 1000, s)
    cos, sin = cos_t[pos[:, tail]], sin_t[pos[:, tail]]
    q_ref, k_ref = rope_reference(q[:, tail], k[:, tail], cos, sin)
    assert torch.equal(q_rot[:, tail], q_ref) and torch.equal(k_rot[:, tail], k_ref)
