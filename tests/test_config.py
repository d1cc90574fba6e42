"""ModelConfig validation, YAML loading, presets and the YAML files under configs/."""
import glob
import os

import pytest

from megatron_lc.configtools import ConfigError
from megatron_lc.model import PRESETS, ModelConfig, Transformer, preset_config
from megatron_lc.train.config import load_train_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_preset_shapes_match_the_spec():
    # ../shared/specs/positions.md table; parameter counts of the released models (tied counted once).
    expect = {"qwen2-0.5b": 494_032_768, "qwen2-1.5b": 1_543_714_304, "qwen2-7b": 7_615_616_512}
    for name, n in expect.items():
        assert preset_config(name).num_params() == n, name


def test_num_params_matches_a_built_model():
    for name in ("tiny", "demo"):
        cfg = preset_config(name)
        assert sum(p.numel() for p in Transformer(cfg).parameters()) == cfg.num_params()


def test_every_yaml_under_configs_loads():
    files = sorted(glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True))
    assert files, "no YAML under configs/"
    for path in files:
        if os.sep + "models" + os.sep in path:
            ModelConfig.from_yaml(path)
        elif os.sep + "train" + os.sep in path:  # their datasets live on the machines that train
            load_train_config(path, check_paths=False)
        else:
            pytest.fail(f"{path}: no loader is registered for this folder yet; add it to this test")


def test_model_yamls_equal_their_presets():
    for name in PRESETS:
        assert ModelConfig.from_yaml(os.path.join(ROOT, "configs", "models", f"{name}.yaml")) == preset_config(name)


def test_yaml_preset_with_overrides(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("preset: qwen2-0.5b\nrope_theta: 5.0e6\nrms_norm_eps: 1e-5\n")
    cfg = ModelConfig.from_yaml(path)
    assert cfg.rope_theta == 5e6 and cfg.rms_norm_eps == 1e-5 and cfg.hidden_size == 896


def test_unknown_yaml_key_names_the_closest_valid_key(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("vocab_size: 10\nhidden_size: 8\nintermediate_size: 8\nnum_layer: 2\nnum_heads: 2\n"
                    "num_kv_heads: 1\n")
    with pytest.raises(ConfigError, match="unknown key 'num_layer'.*did you mean 'num_layers'"):
        ModelConfig.from_yaml(path)
    path.write_text("preset: tiny\nrope_thetta: 3\n")
    with pytest.raises(ConfigError, match="did you mean 'rope_theta'"):
        ModelConfig.from_yaml(path)


def test_bad_configs_are_clear_errors():
    base = dict(vocab_size=10, hidden_size=64, intermediate_size=8, num_layers=1, num_heads=4, num_kv_heads=2)
    with pytest.raises(ConfigError, match="num_heads=4 is not divisible by model.num_kv_heads=3"):
        ModelConfig(**{**base, "num_kv_heads": 3})
    with pytest.raises(ConfigError, match="hidden_size=66 is not divisible by model.num_heads=4.*head_dim"):
        ModelConfig(**{**base, "hidden_size": 66})
    assert ModelConfig(**{**base, "hidden_size": 66, "head_dim": 16}).head_dim == 16
    with pytest.raises(ConfigError, match="num_layers must be a positive integer"):
        ModelConfig(**{**base, "num_layers": 0})
    with pytest.raises(ConfigError, match="rope_theta must be a number"):
        ModelConfig(**{**base, "rope_theta": "big"})
    with pytest.raises(ConfigError, match="rope_scaling type 'longrope' is not supported"):
        ModelConfig(**{**base, "rope_scaling": {"type": "longrope", "factor": 4.0}})
    with pytest.raises(ConfigError, match="unknown model preset 'qwen2-7B'.*qwen2-7b"):
        preset_config("qwen2-7B")
    with pytest.raises(ConfigError, match="config file not found"):
        ModelConfig.from_yaml("/nonexistent.yaml")
