"""ModelConfig: the shape of a Qwen2-style decoder, its named presets, and conversion to/from HF config.json."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from ..configtools import ConfigError, check_keys, check_types, from_dict, load_yaml


@dataclass
class ModelConfig:
    """Architecture of a Qwen2-style decoder-only Transformer (Llama when qkv_bias is False)."""

    vocab_size: int
    """Rows of the token embedding (and of lm_head)."""
    hidden_size: int
    """Width of the residual stream."""
    intermediate_size: int
    """Width of the SwiGLU MLP."""
    num_layers: int
    """Number of Transformer blocks."""
    num_heads: int
    """Query heads."""
    num_kv_heads: int
    """Key/value heads (GQA); must divide num_heads."""
    head_dim: int | None = None
    """Per-head width; None means hidden_size // num_heads."""
    rms_norm_eps: float = 1e-6
    """Epsilon of every RMSNorm."""
    rope_theta: float = 1e6
    """RoPE base."""
    rope_scaling: dict | None = None
    """RoPE scaling in HF form: ``{rope_type (or type): linear | dynamic | yarn, factor: s, ...}`` (rope_scaling.py);
    None or type 'default' for plain RoPE. Stored as ``{rope_type: ..., <params>}``."""
    dual_chunk_attention: dict | None = None
    """Dual Chunk Attention for inference past the trained length: ``{chunk_size, local_size}`` (HF
    ``dual_chunk_attention_config``; dca.py); None for ordinary attention."""
    max_position_embeddings: int = 32768
    """Context length the model was trained for (what RoPE scaling extends)."""
    tie_word_embeddings: bool = False
    """Share the embedding matrix with lm_head."""
    qkv_bias: bool = True
    """Bias on q/k/v projections (Qwen2: True; Llama: False)."""
    init_std: float = 0.02
    """Std of the normal init of linear and embedding weights."""
    loss_chunk_tokens: int = 0
    """Tokens per chunk of the cross-entropy; 0 picks the largest power of two with chunk x vocab x 4 B <= 256 MiB."""
    mlp_tile_tokens: int = 0
    """Tokens per sequence tile of the MLP (a longer input never holds ``[S, intermediate]``, see tiled_mlp.py);
    0 picks the largest power of two with tile x intermediate x 4 B <= 256 MiB; -1 never tiles."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Fields of an HF config.json that we keep only to write them back (bos/eos ids, ...)."""

    def __post_init__(self):
        # Every field against its annotation, whichever way the config was built (YAML, HF config.json, presets).
        values = check_types(ModelConfig, {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}, "model.")
        for name, value in values.items():
            setattr(self, name, value)
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads"):
            value = getattr(self, name)
            if value <= 0:
                raise ConfigError(f"model.{name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"model.num_heads={self.num_heads} is not divisible by model.num_kv_heads={self.num_kv_heads}: "
                f"GQA needs each KV head to serve the same number of query heads; pick num_kv_heads among "
                f"{[d for d in range(1, self.num_heads + 1) if self.num_heads % d == 0]}"
            )
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ConfigError(
                    f"model.hidden_size={self.hidden_size} is not divisible by model.num_heads={self.num_heads}: "
                    f"set model.head_dim explicitly or change the sizes"
                )
            self.head_dim = self.hidden_size // self.num_heads
        if not isinstance(self.head_dim, int) or self.head_dim <= 0 or self.head_dim % 2:
            raise ConfigError(f"model.head_dim must be a positive even integer (RoPE rotates pairs), got {self.head_dim!r}")
        if not self.rope_theta > 0:
            raise ConfigError(f"model.rope_theta must be > 0, got {self.rope_theta!r}")
        if not self.rms_norm_eps > 0:
            raise ConfigError(f"model.rms_norm_eps must be > 0, got {self.rms_norm_eps!r}")
        if self.loss_chunk_tokens < 0:
            raise ConfigError(f"model.loss_chunk_tokens must be >= 0 (0 = automatic), got {self.loss_chunk_tokens}")
        if self.mlp_tile_tokens < -1:
            raise ConfigError(f"model.mlp_tile_tokens must be >= 1, 0 (automatic) or -1 (never tile), got "
                              f"{self.mlp_tile_tokens}")
        from .dca import check_dca
        from .rope_scaling import check_rope_scaling

        try:
            self.rope_scaling = check_rope_scaling(self.rope_scaling, self.max_position_embeddings)
            self.dual_chunk_attention = check_dca(self.dual_chunk_attention)
        except ValueError as e:
            raise ConfigError(str(e)) from None

    @classmethod
    def from_dict(cls, data: dict, where: str = "model config") -> "ModelConfig":
        return from_dict(cls, data, where)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "ModelConfig":
        """Load a YAML file of ModelConfig fields, or ``{preset: name, <field>: override, ...}``."""
        data = load_yaml(path)
        preset = data.pop("preset", None)
        if preset is None:
            return cls.from_dict(data, where=str(path))
        check_keys(cls, data, str(path))
        return dataclasses.replace(preset_config(preset), **data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def num_params(self, include_embedding: bool = True) -> int:
        """Parameter count of the model this config builds (tied weights counted once)."""
        h, d = self.hidden_size, self.head_dim
        attn = h * d * (self.num_heads + 2 * self.num_kv_heads) + self.num_heads * d * h
        if self.qkv_bias:
            attn += d * (self.num_heads + 2 * self.num_kv_heads)
        per_layer = attn + 3 * h * self.intermediate_size + 2 * h
        total = self.num_layers * per_layer + h
        if include_embedding:
            total += self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return total


PRESETS: dict[str, dict[str, Any]] = {
    "qwen2-0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14,
                       num_kv_heads=2, head_dim=64, rope_theta=1e6, max_position_embeddings=32768,
                       tie_word_embeddings=True),
    "qwen2-1.5b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_layers=28, num_heads=12,
                       num_kv_heads=2, head_dim=128, rope_theta=1e6, max_position_embeddings=32768,
                       tie_word_embeddings=True),
    "qwen2-7b": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28, num_heads=28,
                     num_kv_heads=4, head_dim=128, rope_theta=1e6, max_position_embeddings=32768,
                     tie_word_embeddings=False),
    # A few-hundred-K-parameter model for unit tests.
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=176, num_layers=2, num_heads=4, num_kv_heads=2,
                 head_dim=16, rope_theta=1e4, max_position_embeddings=1024, tie_word_embeddings=False),
    # ~3M parameters over 256 byte tokens + specials: trains in minutes on 2 CPU cores (`megatron-lc demo`).
    "demo": dict(vocab_size=260, hidden_size=256, intermediate_size=704, num_layers=4, num_heads=4, num_kv_heads=2,
                 head_dim=64, rope_theta=1e4, max_position_embeddings=2048, tie_word_embeddings=True),
}


def preset_config(name: str) -> ModelConfig:
    """The ModelConfig of a named preset (qwen2-0.5b, qwen2-1.5b, qwen2-7b, tiny, demo)."""
    if name not in PRESETS:
        import difflib

        close = difflib.get_close_matches(name, list(PRESETS), n=1)
        hint = f"did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"unknown model preset '{name}' {hint} (presets: {', '.join(PRESETS)})")
    return ModelConfig(**PRESETS[name])


# HF config.json <-> ModelConfig. Only architecture fields are mapped; the rest is kept in `extra` and written back.
_HF_NAMES = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size",
    "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_heads",
    "num_key_value_heads": "num_kv_heads",
    "head_dim": "head_dim",
    "rms_norm_eps": "rms_norm_eps",
    "rope_theta": "rope_theta",
    "rope_scaling": "rope_scaling",
    "dual_chunk_attention_config": "dual_chunk_attention",
    "max_position_embeddings": "max_position_embeddings",
    "tie_word_embeddings": "tie_word_embeddings",
    "initializer_range": "init_std",
}
_HF_KEEP = ("bos_token_id", "eos_token_id", "pad_token_id")


def from_hf_config(hf: dict[str, Any]) -> ModelConfig:
    """ModelConfig from an HF Qwen2 or Llama config.json dict."""
    model_type = hf.get("model_type")
    if model_type not in ("qwen2", "llama"):
        raise ConfigError(f"config.json model_type={model_type!r}: only 'qwen2' and 'llama' checkpoints are supported")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"config.json hidden_act={hf['hidden_act']!r}: only SwiGLU with 'silu' is supported")
    kwargs: dict[str, Any] = {ours: hf[theirs] for theirs, ours in _HF_NAMES.items() if hf.get(theirs) is not None}
    # transformers 5 writes rope_parameters = {rope_type, rope_theta, ...} instead of rope_theta + rope_scaling.
    params = hf.get("rope_parameters")
    if isinstance(params, dict):
        if "rope_theta" in params:
            kwargs["rope_theta"] = params["rope_theta"]
        if params.get("rope_type", "default") != "default":
            kwargs["rope_scaling"] = {k: v for k, v in params.items() if k != "rope_theta"}
    kwargs.setdefault("num_kv_heads", kwargs.get("num_heads"))
    if model_type == "llama":
        kwargs["qkv_bias"] = bool(hf.get("attention_bias", False))
        if hf.get("mlp_bias"):
            raise ConfigError("config.json mlp_bias=true: MLP biases are not supported")
    if hf.get("use_sliding_window"):
        raise ConfigError("config.json use_sliding_window=true: sliding-window attention is not supported")
    kwargs["extra"] = {k: hf[k] for k in _HF_KEEP if k in hf}
    return ModelConfig(**kwargs)


def to_hf_config(cfg: ModelConfig, dtype: str = "float32") -> dict[str, Any]:
    """An HF config.json dict (Qwen2ForCausalLM, or LlamaForCausalLM when qkv_bias is False)."""
    qwen = cfg.qkv_bias
    out = {theirs: getattr(cfg, ours) for theirs, ours in _HF_NAMES.items()}
    if cfg.rope_scaling:  # "type" for transformers 4.x releases that read only it; 5.x reads rope_type
        out["rope_scaling"] = {"type": cfg.rope_scaling["rope_type"], **cfg.rope_scaling}
    out.update(
        architectures=["Qwen2ForCausalLM" if qwen else "LlamaForCausalLM"],
        model_type="qwen2" if qwen else "llama",
        hidden_act="silu",
        torch_dtype=dtype,
        use_cache=True,
        attention_dropout=0.0,
    )
    if qwen:
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.num_layers)
    else:
        out.update(attention_bias=False, mlp_bias=False)
    out.update(cfg.extra)
    return out
