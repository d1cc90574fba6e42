"""The Qwen2-style model: config and presets, the Transformer, RoPE, generation and HF checkpoints."""
from .config import PRESETS, ModelConfig, from_hf_config, preset_config, to_hf_config
from .generate import generate, sample_next
from .hf import load_hf, save_hf
from .rope import RotaryEmbedding, inverse_frequencies
from .transformer import KVCache, Transformer

__all__ = [
    "PRESETS", "ModelConfig", "from_hf_config", "preset_config", "to_hf_config", "generate", "sample_next",
    "load_hf", "save_hf", "RotaryEmbedding", "inverse_frequencies", "KVCache", "Transformer",
]
