"""megatron_lc: long-context training for Qwen2-style models."""

__version__ = "0.1.0"
