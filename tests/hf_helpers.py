"""Build transformers twins of our models for parity tests (shared by several test files)."""
import os
import tempfile

import torch

from megatron_lc.model import ModelConfig, Transformer, save_hf


def hf_twin(model: Transformer):
    """The transformers model (eager attention, fp32) with exactly our weights, loaded through save_hf."""
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as d:
        save_hf(model, d)
        hf = AutoModelForCausalLM.from_pretrained(d, attn_implementation="eager", dtype=torch.float32)
    return hf.eval()


def small_config(**kw) -> ModelConfig:
    base = dict(vocab_size=320, hidden_size=96, intermediate_size=160, num_layers=2, num_heads=4, num_kv_heads=2,
                head_dim=64, init_std=0.1, max_position_embeddings=256)
    base.update(kw)
    return ModelConfig(**base)


def hf_param(hf, our_name: str) -> torch.nn.Parameter:
    from megatron_lc.model.hf import to_hf_name

    return hf.get_parameter(to_hf_name(our_name))


os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
