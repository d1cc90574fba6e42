"""Deterministic per-parameter init: a meta build initialised after to_empty equals an eager build bit for bit."""
import torch

from hf_helpers import small_config
from megatron_lc.model import Transformer, preset_config


def test_meta_build_then_init_equals_eager_build():
    for cfg in (small_config(), small_config(tie_word_embeddings=True, qkv_bias=False), preset_config("tiny")):
        eager = Transformer(cfg, seed=123)
        with torch.device("meta"):
            lazy = Transformer(cfg)
        assert lazy.embed.weight.is_meta
        lazy.to_empty(device="cpu")
        lazy.init_weights(seed=123)
        eager_params = dict(eager.named_parameters())
        for name, p in lazy.named_parameters():
            assert torch.equal(p, eager_params[name]), name
        ids = torch.randint(0, cfg.vocab_size, (1, 12))
        assert torch.equal(lazy(ids), eager(ids))  # the RoPE tables work after a meta build too


def test_init_depends_on_seed_and_name_and_follows_qwen2():
    cfg = small_config(init_std=0.02, num_layers=2)
    a, b = Transformer(cfg, seed=0), Transformer(cfg, seed=1)
    assert not torch.equal(a.embed.weight, b.embed.weight)
    assert not torch.equal(a.layers[0].attn.q_proj.weight, a.layers[1].attn.q_proj.weight)
    w = a.layers[0].mlp.up_proj.weight
    assert abs(w.std().item() - 0.02) < 0.002 and abs(w.mean().item()) < 0.002
    assert torch.equal(a.layers[0].attn.q_proj.bias, torch.zeros_like(a.layers[0].attn.q_proj.bias))
    assert torch.equal(a.norm.weight, torch.ones_like(a.norm.weight))


def test_tied_embeddings_share_storage():
    m = Transformer(small_config(tie_word_embeddings=True))
    assert m.lm_head.weight is m.embed.weight
    assert "lm_head.weight" not in dict(m.named_parameters())
