"""ops.attention against a float64 softmax reference: causal, full, GQA, and bottom-right alignment."""
import math

import pytest
import torch

from megatron_lc.ops import attention, causal_mask


def reference(q, k, v, causal, scale=None):
    """Plain float64 attention, q [B, S, H, D], k/v [B, S_kv, H_kv, D]; causal is bottom-right aligned."""
    q, k, v = q.double(), k.double(), v.double()
    rep = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    scale = scale or 1 / math.sqrt(q.shape[-1])
    logits = torch.einsum("bshd,bthd->bhst", q, k) * scale
    if causal:
        s, t = q.shape[1], k.shape[1]
        keep = torch.tensor([[j <= i + t - s for j in range(t)] for i in range(s)])
        logits = logits.masked_fill(~keep, float("-inf"))
    return torch.einsum("bhst,bthd->bshd", logits.softmax(-1), v)


@pytest.mark.parametrize("s,t,h,hkv,causal", [(17, 17, 4, 4, True), (17, 17, 6, 2, True), (5, 23, 7, 1, True),
                                              (1, 9, 4, 2, True), (13, 19, 4, 1, False)])
def test_attention_matches_float64_reference(s, t, h, hkv, causal):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, n, heads, 32, generator=g) for n, heads in ((s, h), (t, hkv), (t, hkv)))
    out = attention(q, k, v, causal=causal)
    assert out.shape == q.shape
    torch.testing.assert_close(out.double(), reference(q, k, v, causal), atol=1e-5, rtol=1e-5)
    out = attention(q, k, v, causal=causal, softmax_scale=0.3)
    torch.testing.assert_close(out.double(), reference(q, k, v, causal, 0.3), atol=1e-5, rtol=1e-5)


def test_causal_mask_is_bottom_right():
    assert causal_mask(2, 4, "cpu").tolist() == [[True, True, True, False], [True, True, True, True]]


def test_bad_shapes_are_clear_errors():
    q = torch.zeros(1, 4, 6, 8)
    with pytest.raises(ValueError, match="query heads 6 are not divisible by key/value heads 4"):
        attention(q, torch.zeros(1, 4, 4, 8), torch.zeros(1, 4, 4, 8))
    with pytest.raises(ValueError, match="more queries"):
        attention(q, torch.zeros(1, 2, 2, 8), torch.zeros(1, 2, 2, 8))
