"""RoPE scaling (linear, dynamic NTK, YaRN) against transformers' own rope utilities and Qwen2 model."""
import dataclasses
import math

import pytest
import torch

from hf_helpers import hf_twin, small_config
from megatron_lc.configtools import ConfigError
from megatron_lc.model import Transformer, from_hf_config, to_hf_config
from megatron_lc.model.rope_scaling import scaled_inverse_frequencies

# fp32 frequencies: ours are float64 rounded once, transformers' are computed in fp32: within 2 ulp.
ULP2 = dict(atol=0.0, rtol=2.4e-7)

# (head_dim, theta, max_position_embeddings, rope_scaling)
YARN_CASES = {
    "qwen2-7b-spec": (128, 1e6, 131072, {"rope_type": "yarn", "factor": 4.0,
                                         "original_max_position_embeddings": 32768}),
    "d64-theta1e4-s8": (64, 1e4, 16384, {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 2048}),
    "d128-betas-no-truncate": (128, 5e5, 65536, {"rope_type": "yarn", "factor": 2.0, "beta_fast": 16,
                                                 "beta_slow": 2, "truncate": False,
                                                 "original_max_position_embeddings": 32768}),
    "d64-attention-factor": (64, 1e6, 8192, {"rope_type": "yarn", "factor": 4.0, "attention_factor": 1.3,
                                             "original_max_position_embeddings": 2048}),
}


def _hf_parameters(head_dim, theta, max_pos, scaling, seq_len=None):
    from transformers import Qwen2Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = Qwen2Config(hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim,
                         max_position_embeddings=max_pos, rope_parameters={"rope_theta": theta, **scaling})
    inv_freq, factor = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](config, "cpu", seq_len=seq_len)
    return inv_freq, factor


@pytest.mark.parametrize("case", list(YARN_CASES))
def test_yarn_frequencies_and_factor_equal_transformers(case):
    head_dim, theta, max_pos, scaling = YARN_CASES[case]
    ours, factor = scaled_inverse_frequencies(head_dim, theta, scaling, max_pos)
    theirs, their_factor = _hf_parameters(head_dim, theta, max_pos, scaling)
    torch.testing.assert_close(ours, theirs.float(), **ULP2)
    assert factor == pytest.approx(their_factor, rel=1e-12)


def test_yarn_worked_example_of_the_spec():
    """Qwen2-7B, factor 4 over 32768: the ramp runs over dims 23..40 and the attention factor is 1.1386."""
    head_dim, theta, max_pos, scaling = YARN_CASES["qwen2-7b-spec"]
    inv_freq, factor = scaled_inverse_frequencies(head_dim, theta, scaling, max_pos)
    base = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    assert factor == pytest.approx(0.1 * math.log(4) + 1) and round(factor, 4) == 1.1386
    torch.testing.assert_close(inv_freq[:24], base[:24].float(), **ULP2)  # extrapolated: unchanged
    torch.testing.assert_close(inv_freq[40:], (base[40:] / 4).float(), **ULP2)  # interpolated: / factor
    assert ((inv_freq[24:40] < base[24:40].float()) & (inv_freq[24:40] > (base[24:40] / 4).float())).all()


@pytest.mark.parametrize("kind,seq_len", [("linear", None), ("dynamic", 1000), ("dynamic", 5000)])
def test_linear_and_dynamic_equal_transformers(kind, seq_len):
    scaling = {"rope_type": kind, "factor": 3.0}
    ours, factor = scaled_inverse_frequencies(64, 1e4, scaling, 2048, seq_len)
    theirs, their_factor = _hf_parameters(64, 1e4, 2048, scaling, seq_len)
    torch.testing.assert_close(ours, theirs.float(), **ULP2)
    assert factor == their_factor == 1.0


@pytest.mark.parametrize("scaling,seq_len", [
    ({"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 512}, 4096),
    ({"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512}, 1024),
    ({"rope_type": "linear", "factor": 2.0}, 700),
    ({"rope_type": "dynamic", "factor": 4.0}, 1500),  # past max_position_embeddings (512): the base grows
])
def test_model_logits_equal_transformers_qwen2(scaling, seq_len):
    """Our model with rope_scaling equals transformers' Qwen2 loaded from the config.json we write.

    transformers computes RoPE angles in fp32 (even for a float64 model), an error that grows with the position
    (about 1e-4 in these logits at 4K, with plain RoPE too); ours come from float64 angles. So the reference is our
    model in float64: transformers' fp32 logits must be within 1e-3 of it (a different scaling would be off by
    1e-1 or more), and ours within 2x transformers' own error."""
    cfg = small_config(rope_theta=1e4, max_position_embeddings=512, rope_scaling=scaling)
    model = Transformer(cfg, seed=5).eval()
    hf = hf_twin(model)
    ids = torch.randint(0, cfg.vocab_size, (1, seq_len), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours, theirs = model(ids).double(), hf(ids).logits.double()
        reference = model.double()(ids)
    hf_error = (theirs - reference).abs().max().item()
    assert hf_error <= 1e-3
    assert (ours - reference).abs().max().item() <= 2 * hf_error


def test_yarn_changes_the_logits():
    """The scaling reaches the attention: the same weights without it give other logits."""
    cfg = small_config(rope_theta=1e4, max_position_embeddings=512,
                       rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128})
    ids = torch.randint(0, cfg.vocab_size, (1, 300), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        scaled = Transformer(cfg, seed=5)(ids)
        plain = Transformer(dataclasses.replace(cfg, rope_scaling=None), seed=5)(ids)
    assert (scaled - plain).abs().max().item() > 1e-2


def test_hf_config_forms_read_and_write():
    """Hub form (rope_theta + rope_scaling with type or rope_type) and transformers 5 form (rope_parameters) read
    the same; what we write carries both type keys and loads in transformers 5 unchanged."""
    from transformers import Qwen2Config

    common = dict(model_type="qwen2", vocab_size=320, hidden_size=96, intermediate_size=160, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=131072)
    yarn = {"factor": 4.0, "original_max_position_embeddings": 32768}
    forms = [
        {**common, "rope_theta": 1e6, "rope_scaling": {"type": "yarn", **yarn}},
        {**common, "rope_theta": 1e6, "rope_scaling": {"rope_type": "yarn", **yarn}},
        {**common, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, **yarn}},
    ]
    configs = [from_hf_config(f) for f in forms]
    for cfg in configs:
        assert cfg.rope_theta == 1e6 and cfg.rope_scaling == {"rope_type": "yarn", **yarn}
    written = to_hf_config(configs[0])
    assert written["rope_scaling"] == {"type": "yarn", "rope_type": "yarn", **yarn} and written["rope_theta"] == 1e6
    loaded = Qwen2Config(**{k: v for k, v in written.items() if k != "model_type"})
    assert loaded.rope_parameters["rope_type"] == "yarn" and loaded.rope_parameters["rope_theta"] == 1e6
    assert from_hf_config({**loaded.to_dict(), "model_type": "qwen2"}).rope_scaling == configs[0].rope_scaling


@pytest.mark.parametrize("scaling,message", [
    ({"rope_type": "yarn"}, r"needs \['factor'\]"),
    ({"type": "linear", "factor": 0.5}, "factor must be a number >= 1"),
    ({"type": "dynamic", "factor": 2.0, "low_freq_factor": 1}, r"unknown keys \['low_freq_factor'\]"),
    ({"type": "yarn", "rope_type": "linear", "factor": 2.0}, "names two types"),
    ({"rope_type": "llama3", "factor": 8.0}, "type 'llama3' is not supported"),
    ({"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 0}, "positive integer"),
    ({"rope_type": "yarn", "factor": 2.0, "beta_fast": -1}, "beta_fast must be a positive number"),
])
def test_bad_rope_scaling_is_named(scaling, message):
    with pytest.raises(ConfigError, match=message):
        small_config(rope_scaling=scaling)


def test_dynamic_ntk_uses_the_whole_sequence_length():
    """Past max_position_embeddings the base follows max(position_ids) + 1, or the value global_max_position gives
    (what context parallelism sets): a shard with small positions still gets the whole sequence's base."""
    cfg = small_config(rope_theta=1e4, max_position_embeddings=256, rope_scaling={"type": "dynamic", "factor": 2.0})
    model = Transformer(cfg)
    pos = torch.arange(100, 200).unsqueeze(0)
    cos_short, _ = model.rope(pos)  # max 200 < 256: plain RoPE
    plain = Transformer(dataclasses.replace(cfg, rope_scaling=None))
    torch.testing.assert_close(cos_short, plain.rope(pos)[0], atol=0, rtol=0)
    whole = torch.arange(0, 1000).unsqueeze(0)
    cos_whole, sin_whole = model.rope(whole)
    model.rope.global_max_position = lambda local_max: 999
    cos_shard, sin_shard = model.rope(pos)
    torch.testing.assert_close(cos_shard, cos_whole[:, 100:200], atol=0, rtol=0)
    torch.testing.assert_close(sin_shard, sin_whole[:, 100:200], atol=0, rtol=0)
