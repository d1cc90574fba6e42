"""RoPE precision: fp32 tables from float64 angles that survive model.to(bf16), and long-distance q.k logits."""
import torch

from hf_helpers import small_config
from megatron_lc.model import Transformer
from megatron_lc.ops.rotary import apply_rotary


def test_tables_stay_fp32_and_equal_float64_reference_after_bf16_cast():
    cfg = small_config(rope_theta=1e6, head_dim=64)
    model = Transformer(cfg, seed=0).to(torch.bfloat16)
    assert model.embed.weight.dtype == torch.bfloat16
    inv64 = 1.0 / (1e6 ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64))
    assert model.rope.inv_freq.dtype == torch.float32
    assert torch.equal(model.rope.inv_freq, inv64.to(torch.float32))
    pos = torch.tensor([[0, 1, 255, 4096, 65535, 1_000_000]])
    cos, sin = model.rope(pos)
    assert cos.dtype == sin.dtype == torch.float32
    angles = pos[0].double().unsqueeze(1) * model.rope.inv_freq.double()  # the frequencies the model uses
    # fp32 rounding of a value in [-1, 1] is at most 2^-25 ~ 3e-8; allow 6e-8
    torch.testing.assert_close(cos[0].double(), angles.cos(), atol=6e-8, rtol=0)
    torch.testing.assert_close(sin[0].double(), angles.sin(), atol=6e-8, rtol=0)


def _qk_logits(model, x, pos_k, pos_q):
    """Per-head q.k logits of layer 0 for a key at pos_k and a query at pos_q: [H] fp64."""
    attn, cfg = model.layers[0].attn, model.config
    dtype = model.embed.weight.dtype
    x = x.to(dtype)
    pos = torch.tensor([[pos_k, pos_q]])
    cos, sin = model.rope(pos)
    q = apply_rotary(attn.q_proj(x).view(1, 2, cfg.num_heads, cfg.head_dim), cos, sin)
    k = apply_rotary(attn.k_proj(x).view(1, 2, cfg.num_kv_heads, cfg.head_dim), cos, sin)
    k = k.repeat_interleave(cfg.num_heads // cfg.num_kv_heads, dim=2)
    return (q[0, 1].double() * k[0, 0].double()).sum(-1)


@torch.no_grad()
def test_bf16_qk_logits_at_16k_distance_as_good_as_at_16():
    cfg = small_config(rope_theta=1e6, head_dim=64, init_std=0.05)
    fp32 = Transformer(cfg, seed=1)
    bf16 = Transformer(cfg, seed=1).to(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    err = {16: 0.0, 16384: 0.0}
    for _ in range(20):
        x = torch.randn(1, 2, cfg.hidden_size, generator=g)
        for d in err:
            start = 100
            ref = _qk_logits(fp32, x, start, start + d)
            got = _qk_logits(bf16, x, start, start + d)
            err[d] = max(err[d], (got - ref).abs().max().item())
    # Rounding positions or inv_freq to bf16 makes the far error tens of times the near one (angles off by
    # up to tens of radians at 16K); correct fp32 tables leave only the bf16 rounding of q and k themselves.
    assert err[16384] <= 2.0 * err[16] + 1e-3, err
