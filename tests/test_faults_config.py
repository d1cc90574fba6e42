"""Clear errors instead of tracebacks (issue 16, cases 6, 12, 13, 14): HF tensors of the wrong dtype or with NaN/inf,
config values of the wrong type, YAML syntax errors, missing data and weights, and sequence lengths CP cannot split.

Each config case runs ``megatron-lc train`` through ``megatron_lc.cli.main`` with the trainer replaced by a function
that fails the test: the error must come from the config checks (a usage error, exit status 2, naming the key and
the fix), before any process group or model is built.
"""
import os
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_helpers import small_config
from megatron_lc.cli import main
from megatron_lc.configtools import ConfigError
from megatron_lc.data.indexed import IndexedDatasetWriter
from megatron_lc.model import Transformer, load_hf, save_hf
from megatron_lc.train.config import load_train_config


class ReachedTrainer(Exception):
    """The command got past every config check."""


@pytest.fixture
def trainer_never_runs(monkeypatch):
    """Replace the trainer, so a check that fails to fire shows as ReachedTrainer (not a training run)."""
    import megatron_lc.train.trainer as trainer

    def reached(cfg):
        raise ReachedTrainer(cfg)

    monkeypatch.setattr(trainer, "train", reached)
    monkeypatch.delenv("WORLD_SIZE", raising=False)


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    """Prefix of a small indexed dataset (PREFIX.bin + PREFIX.idx)."""
    prefix = str(tmp_path_factory.mktemp("tokens") / "train")
    with IndexedDatasetWriter(prefix, vocab_size=256) as w:
        for i in range(8):
            w.add_document(np.arange(64) + i)
    return prefix


def _usage_error(capsys, argv) -> str:
    """Run megatron-lc with ``argv``; it must stop with exit status 2 and no traceback. Returns stderr."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert "Traceback" not in err and 'File "' not in err, err
    return err


def _train(tokens, *overrides):
    return ["train", "model.preset=tiny", "data.seq_len=16", f"data.train_tokens={tokens}", *overrides]


# ---- 12: values of the wrong type, for every section and model.config ----------------------------------------------
@pytest.mark.parametrize("override,expect", [
    ("train.steps=abc", ["train.steps must be an integer", "'abc'", "train.steps=100"]),
    ("data.micro_batch_size=four", ["data.micro_batch_size must be an integer", "'four'"]),
    ("train.steps=7.5", ["train.steps must be an integer", "7.5"]),
    ("train.steps=true", ["train.steps must be an integer", "True"]),
    ("optim.lr=nan", ["optim.lr must be a finite number", "nan"]),
    ("optim.lr=.inf", ["optim.lr must be a finite number", "inf"]),
    ("optim.lr=fast", ["optim.lr must be a number", "'fast'"]),
    ("optim.betas=[0.9]", ["optim.betas must be a list of 2 numbers", "[0.9]"]),
    ("optim.betas=[0.9, x]", ["optim.betas[1] must be a number", "'x'"]),
    ("parallel.cp_pad=0", ["parallel.cp_pad must be true or false", "0"]),
    ("train.compile=1", ["train.compile must be true or false"]),
    ("checkpoint.keep=2.0", ["checkpoint.keep must be an integer"]),
    ("eval.every=[1]", ["eval.every must be an integer"]),
    ("data.train_blend=abc", ["data.train_blend must be a list or null", "'abc'"]),
    ("data.eos_token_id=1.5", ["data.eos_token_id must be an integer or null"]),
    ("train.kernels=[torch]", ["train.kernels must be a string or a mapping"]),
    ("logging.tensorboard=maybe", ["logging.tensorboard must be true or false", "'maybe'"]),
    ("schedule.min_lr_ratio=[0]", ["schedule.min_lr_ratio must be a number"]),
    ("model.config.hidden_size=1.5", ["model.config.hidden_size must be an integer", "1.5"]),
    ("model.config.tie_word_embeddings=1", ["model.config.tie_word_embeddings must be true or false"]),
    ("model.config.rope_theta=.nan", ["model.config.rope_theta must be a finite number"]),
    ("model.config=5", ["model.config must be a mapping", "5"]),
])
def test_wrong_types_name_the_key_type_and_value(capsys, trainer_never_runs, tokens, override, expect):
    err = _usage_error(capsys, _train(tokens, override))
    for text in expect:
        assert text in err, (text, err)


def test_loose_yaml_numbers_still_load(tokens):
    """What YAML gives loosely stays accepted: 1e-4 (a string to PyYAML), an int for a float, a list for a tuple."""
    cfg = load_train_config(None, ["model.preset=tiny", f"data.train_tokens={tokens}", "optim.lr=1e-4",
                                   "optim.grad_clip=2", "optim.betas=[0.8, 1]", "checkpoint.dir=2024"])
    assert cfg.optim.lr == 1e-4 and cfg.optim.grad_clip == 2.0 and isinstance(cfg.optim.grad_clip, float)
    assert cfg.optim.betas == (0.8, 1.0) and cfg.checkpoint.dir == "2024"


def test_model_config_types_outside_the_trainer():
    """ModelConfig checks its own field types too (HF config.json, presets + overrides, direct use)."""
    base = dict(vocab_size=10, hidden_size=64, intermediate_size=8, num_layers=1, num_heads=4, num_kv_heads=2)
    with pytest.raises(ConfigError, match=r"model.tie_word_embeddings must be true or false, got 'yes'"):
        small_config(tie_word_embeddings="yes")
    with pytest.raises(ConfigError, match=r"model.init_std must be a finite number, got inf"):
        small_config(init_std=float("inf"))
    with pytest.raises(ConfigError, match=r"model.vocab_size must be an integer, got 10.0"):
        from megatron_lc.model import ModelConfig

        ModelConfig(**{**base, "vocab_size": 10.0})
    with pytest.raises(ConfigError, match=r"model.config: missing num_kv_heads"):
        ModelConfig.from_dict({k: v for k, v in base.items() if k != "num_kv_heads"}, where="model.config")


# ---- 13: YAML syntax, bad override values, missing paths --------------------------------------------------------------
def test_yaml_syntax_error_names_file_line_and_column(capsys, trainer_never_runs, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  preset: tiny\ntrain:\n  steps: [1, 2\n  seed: 0\n")
    err = _usage_error(capsys, ["train", "--config", str(path)])
    assert f"{path}:5:" in err and "not valid YAML" in err, err
    path.write_text("model:\n  preset: tiny\n    steps: 3\n")
    err = _usage_error(capsys, ["train", "--config", str(path)])
    assert f"{path}:3:10" in err and "mapping values are not allowed" in err, err


def test_override_with_bad_yaml_names_the_override(capsys, trainer_never_runs, tokens):
    err = _usage_error(capsys, _train(tokens, "train.kernels={rmsnorm: triton"))
    assert "override 'train.kernels={rmsnorm: triton'" in err and "not valid YAML" in err and "quote" in err, err


def test_missing_data_and_weights_are_reported_before_training(capsys, trainer_never_runs, tokens, tmp_path):
    with pytest.raises(ReachedTrainer):  # the good dataset passes: by prefix and by either file
        main(_train(tokens))
    with pytest.raises(ReachedTrainer):
        main(_train(tokens + ".idx", f"data.val_tokens={tokens}.bin"))
    missing = str(tmp_path / "nope")
    err = _usage_error(capsys, _train(missing))
    assert f"data.train_tokens={missing!r}" in err and f"{missing}.bin and {missing}.idx not found" in err, err
    assert "megatron-lc data tokenize" in err
    half = str(tmp_path / "half")  # the .bin without its .idx, named by the .bin's path
    shutil.copy(tokens + ".bin", half + ".bin")
    err = _usage_error(capsys, _train(half + ".bin"))
    assert f"{half}.idx not found" in err and f"{half}.bin and" not in err, err
    err = _usage_error(capsys, ["train", "model.preset=tiny", f"data.train_blend=[[1, {tokens}], [2, {missing}]]"])
    assert "data.train_blend[1]" in err and f"{missing}.idx not found" in err, err
    err = _usage_error(capsys, _train(tokens, f"data.val_tokens={missing}"))
    assert "data.val_tokens" in err and f"{missing}.idx not found" in err, err
    err = _usage_error(capsys, _train(tokens, f"model.init_from={missing}"))
    assert f"model.init_from {missing}: not a folder" in err and "HF folder" in err, err
    os.makedirs(missing)
    err = _usage_error(capsys, _train(tokens, f"model.init_from={missing}"))
    assert f"model.init_from {missing}: neither an HF folder" in err, err


# ---- 14: a sequence length context parallelism cannot split -----------------------------------------------------------
@pytest.mark.parametrize("overrides,world,divisor", [
    (["parallel.cp=2"], 2, 4),                                   # zigzag: 2 chunks per CP rank
    (["parallel.cp=2", "parallel.cp_layout=contiguous"], 2, 2),
    (["parallel.cp=2", "parallel.tp=2"], 4, 8),                  # sequence parallelism splits each shard again
    (["parallel.cp=2", "parallel.cp_mode=ulysses"], 2, 2),       # Ulysses shards contiguously whatever the layout
    (["parallel.cp=4", "parallel.cp_mode=hybrid", "parallel.cp_ulysses=2", "parallel.cp_layout=contiguous"], 4, 8),
])
def test_seq_len_cp_cannot_split_names_the_keys_and_fix(tokens, overrides, world, divisor):
    base = ["model.preset=tiny", f"data.train_tokens={tokens}", "parallel.cp_pad=false", *overrides]
    bad = divisor + 1
    cfg = load_train_config(None, [*base, f"data.seq_len={bad}"])
    with pytest.raises(ConfigError) as e:
        cfg.check_world(world)
    msg = str(e.value)
    for text in (f"data.seq_len={bad}", "parallel.cp=", f"multiple of {divisor}", "parallel.cp_pad=true"):
        assert text in msg, (text, msg)
    load_train_config(None, [*base, f"data.seq_len={2 * divisor}"]).check_world(world)
    load_train_config(None, [*base, f"data.seq_len={bad}", "parallel.cp_pad=true"]).check_world(world)


def test_seq_len_tp_alone_must_divide(tokens):
    cfg = load_train_config(None, ["model.preset=tiny", f"data.train_tokens={tokens}", "parallel.tp=2",
                                   "data.seq_len=9"])
    with pytest.raises(ConfigError, match=r"data.seq_len=9 .*parallel.tp=2.*multiple of 2"):
        cfg.check_world(2)


def test_seq_len_cp_error_comes_from_the_command_before_any_process_group(capsys, trainer_never_runs, tokens,
                                                                           monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    err = _usage_error(capsys, _train(tokens, "parallel.cp=2", "parallel.cp_pad=false", "data.seq_len=10"))
    assert "data.seq_len=10" in err and "parallel.cp_pad=true" in err and "multiple of 4" in err, err


# ---- 6: HF tensors of the wrong dtype or with NaN/inf -----------------------------------------------------------------
def _hf_folder(path) -> dict[str, torch.Tensor]:
    save_hf(Transformer(small_config(), seed=0), str(path))
    return load_file(str(path / "model.safetensors"))


def test_load_hf_refuses_integer_and_bool_tensors(tmp_path, capsys):
    tensors = _hf_folder(tmp_path)
    file = str(tmp_path / "model.safetensors")
    name = "model.layers.1.mlp.down_proj.weight"
    for dtype in (torch.int32, torch.bool):
        save_file(dict(tensors, **{name: tensors[name].to(dtype)}), file)
        with pytest.raises(ConfigError) as e:
            load_hf(str(tmp_path))
        assert name in str(e.value) and file in str(e.value) and str(dtype) in str(e.value), str(e.value)
    err = _usage_error(capsys, ["convert", "--from", str(tmp_path), "--to", str(tmp_path / "out" / "step_0")])
    assert name in err and "torch.bool" in err, err
    assert not os.path.exists(tmp_path / "out")


def test_load_hf_refuses_nonfinite_values_unless_allowed(tmp_path):
    tensors = _hf_folder(tmp_path)
    file = str(tmp_path / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"
    bad = tensors[name].clone()
    bad[0, :2] = float("nan")
    bad[3, 5] = float("-inf")
    save_file(dict(tensors, **{name: bad}), file)
    with pytest.raises(ConfigError) as e:
        load_hf(str(tmp_path))
    msg = str(e.value)
    assert name in msg and file in msg and "3 non-finite" in msg and "allow_nonfinite=True" in msg, msg
    model = load_hf(str(tmp_path), allow_nonfinite=True)
    assert int((~torch.isfinite(model.layers[0].attn.q_proj.weight)).sum()) == 3


def test_load_hf_refuses_values_the_dtype_cannot_hold(tmp_path):
    tensors = _hf_folder(tmp_path)
    name = "model.norm.weight"
    save_file(dict(tensors, **{name: torch.full_like(tensors[name], 1e6)}), str(tmp_path / "model.safetensors"))
    load_hf(str(tmp_path), dtype=torch.bfloat16)  # bf16 has fp32's range
    with pytest.raises(ConfigError, match=r"model.norm.weight .*96 values that torch.float16 cannot hold"):
        load_hf(str(tmp_path), dtype=torch.float16)
    with pytest.raises(ConfigError, match=r"dtype torch.int64 .*floating"):
        load_hf(str(tmp_path), dtype=torch.int64)
