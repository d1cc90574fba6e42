"""HF folders: save_hf -> transformers, transformers -> load_hf, sharding, and clear errors for bad checkpoints."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_helpers import small_config
from megatron_lc.model import Transformer, load_hf, save_hf


@pytest.mark.parametrize("kw", [dict(tie_word_embeddings=True), dict(qkv_bias=False, num_kv_heads=1)])
def test_save_hf_loads_in_transformers_with_same_logits(tmp_path, kw):
    from transformers import AutoModelForCausalLM

    model = Transformer(small_config(**kw), seed=5).eval()
    save_hf(model, str(tmp_path))
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), attn_implementation="eager").eval()
    assert type(hf).__name__ == ("Qwen2ForCausalLM" if model.config.qkv_bias else "LlamaForCausalLM")
    ids = torch.randint(0, model.config.vocab_size, (2, 33))
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize("tied", [True, False])
def test_load_hf_of_transformers_saved_model(tmp_path, tied):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=200, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied,
                      initializer_range=0.1, max_position_embeddings=128)
    torch.manual_seed(0)
    hf = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():  # transformers inits biases to 0: randomise to check them
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    hf.save_pretrained(str(tmp_path))
    model = load_hf(str(tmp_path)).eval()
    assert model.config.tie_word_embeddings == tied
    assert (model.lm_head.weight is model.embed.weight) == tied
    ids = torch.randint(0, 200, (2, 29))
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max().item() <= 1e-4


def test_sharded_save_and_load_round_trip_and_bf16(tmp_path):
    model = Transformer(small_config(num_layers=3), seed=2)
    save_hf(model, str(tmp_path), max_shard_bytes=200_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (tmp_path / "model.safetensors").exists()
    back = load_hf(str(tmp_path))
    for (n, a), (_, b) in zip(model.named_parameters(), back.named_parameters()):
        assert torch.equal(a, b), n
    save_hf(model, str(tmp_path), dtype=torch.bfloat16)  # overwrites: the old shards must go
    assert not (tmp_path / "model.safetensors.index.json").exists()
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    half = load_hf(str(tmp_path))
    assert half.embed.weight.dtype == torch.bfloat16 and half.rope.inv_freq.dtype == torch.float32
    assert load_hf(str(tmp_path), dtype=torch.float32, rope_theta=5e6).config.rope_theta == 5e6


def test_missing_unexpected_and_misshaped_tensors_are_named(tmp_path):
    model = Transformer(small_config(), seed=0)
    save_hf(model, str(tmp_path))
    file = str(tmp_path / "model.safetensors")
    tensors = load_file(file)

    broken = dict(tensors)
    del broken["model.layers.1.self_attn.k_proj.bias"]
    save_file(broken, file)
    with pytest.raises(ValueError, match=r"missing tensors \['model.layers.1.self_attn.k_proj.bias'\]"):
        load_hf(str(tmp_path))

    broken = dict(tensors, **{"model.layers.0.mlp.extra.weight": torch.zeros(2)})
    save_file(broken, file)
    with pytest.raises(ValueError, match=r"unexpected tensors \['model.layers.0.mlp.extra.weight'\]"):
        load_hf(str(tmp_path))

    broken = dict(tensors, **{"model.layers.0.mlp.up_proj.weight": torch.zeros(160, 95)})
    save_file(broken, file)
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.up_proj.weight.*\(160, 95\).*\(160, 96\)"):
        load_hf(str(tmp_path))


def test_missing_files_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf(str(tmp_path))
    save_hf(Transformer(small_config()), str(tmp_path))
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="neither model.safetensors"):
        load_hf(str(tmp_path))


LEGACY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "legacy_checkpoint")


def test_load_model_reads_a_checkpoint_or_an_hf_folder(tmp_path):
    """One decision for "HF folder or checkpoint?": load_model gives the same model from a step_<N>/ folder (one
    written before megatron_lc/checkpoint/ existed) and from its HF conversion; anything else names the flag."""
    from megatron_lc.checkpoint.convert import folder_kind, load_model
    from megatron_lc.configtools import ConfigError

    assert folder_kind(os.path.join(LEGACY, "step_2")) == "checkpoint"
    assert folder_kind(os.path.join(LEGACY, "hf")) == "hf"
    ours = load_model(os.path.join(LEGACY, "step_2"), overrides={"rope_theta": 5e4})
    hf = load_model(os.path.join(LEGACY, "hf"), dtype="bfloat16", overrides={"rope_theta": 5e4})
    assert ours.config.rope_theta == hf.config.rope_theta == 5e4 and not ours.training
    for (name, a), (_, b) in zip(ours.named_parameters(), hf.named_parameters(), strict=True):
        assert torch.equal(a.bfloat16(), b), name
    with pytest.raises(ConfigError, match="--from .*: not a folder"):
        folder_kind(str(tmp_path / "missing"), "--from")
    with pytest.raises(ConfigError, match="neither an HF folder .* nor a checkpoint"):
        load_model(str(tmp_path))
