"""RoPE scaling for length extension: linear (position interpolation), dynamic NTK and YaRN.

Formulas in ../shared/specs/positions.md; the keys and defaults are those of HF transformers' rope utilities, so a
Hub config means the same thing here. ``check_rope_scaling`` validates a config's dict (no torch needed);
``scaled_inverse_frequencies`` turns it into fp32 inverse frequencies and the factor cos/sin are multiplied by.
Frequencies are computed in float64 and rounded once to fp32.
"""
from __future__ import annotations

import math
from typing import Any

import torch

# type -> (required keys, optional keys), besides the type key itself
_KEYS: dict[str, tuple[set[str], set[str]]] = {
    "linear": ({"factor"}, set()),
    "dynamic": ({"factor"}, set()),
    "yarn": ({"factor"}, {"original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow",
                          "mscale", "mscale_all_dim", "truncate"}),
}
TYPES = ("default", *_KEYS)


def check_rope_scaling(scaling: dict[str, Any] | None, max_position_embeddings: int) -> dict[str, Any] | None:
    """Validate an HF-style ``rope_scaling`` dict (``type`` or ``rope_type`` naming the kind) and return it as
    ``{"rope_type": kind, ...}``, or None for plain RoPE. Raises ValueError naming the bad key and the fix."""
    if scaling is None:
        return None
    if not isinstance(scaling, dict):
        raise ValueError(f"model.rope_scaling must be a mapping like {{rope_type: yarn, factor: 4.0}}, got {scaling!r}")
    params = {k: v for k, v in scaling.items() if k not in ("type", "rope_type", "rope_theta")}
    kinds = {scaling[k] for k in ("type", "rope_type") if k in scaling}
    if len(kinds) > 1:
        raise ValueError(f"model.rope_scaling names two types {sorted(kinds)} (type and rope_type): keep one")
    kind = kinds.pop() if kinds else "default"
    if kind == "default":
        if params:
            raise ValueError(f"model.rope_scaling of type default takes no parameters, got {sorted(params)}")
        return None
    if kind not in _KEYS:
        raise ValueError(f"model.rope_scaling type {kind!r} is not supported: use one of {', '.join(TYPES)}")
    required, optional = _KEYS[kind]
    missing = required - params.keys()
    if missing:
        raise ValueError(f"model.rope_scaling ({kind}) needs {sorted(missing)}, e.g. factor: 4.0")
    unknown = params.keys() - required - optional
    if unknown:
        raise ValueError(f"model.rope_scaling ({kind}) has unknown keys {sorted(unknown)}; valid: "
                         f"{sorted(required | optional)}")
    factor = params["factor"]
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor >= 1:
        raise ValueError(f"model.rope_scaling factor must be a number >= 1 (the context multiplier), got {factor!r}")
    if kind == "yarn":
        original = params.get("original_max_position_embeddings", max_position_embeddings)
        if isinstance(original, bool) or not isinstance(original, int) or original <= 0:
            raise ValueError(f"model.rope_scaling original_max_position_embeddings must be a positive integer, "
                             f"got {original!r}")
        for key in ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim"):
            value = params.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
                raise ValueError(f"model.rope_scaling {key} must be a positive number, got {value!r}")
    return {"rope_type": kind, **params}


def _base_frequencies(head_dim: int, theta: float) -> torch.Tensor:
    """``theta^(-2i/head_dim)``, i in [0, head_dim/2), float64 on CPU."""
    # explicit CPU: the model may be built under `with torch.device("meta")`, and the tables must stay real
    return 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device="cpu") / head_dim)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def dynamic_theta(theta: float, head_dim: int, factor: float, seq_len: int, max_position_embeddings: int) -> float:
    """The dynamic-NTK base for a ``seq_len``-token sequence (unchanged up to max_position_embeddings)."""
    seq_len = max(seq_len, max_position_embeddings)
    return theta * ((factor * seq_len / max_position_embeddings) - (factor - 1)) ** (head_dim / (head_dim - 2))


def scaled_inverse_frequencies(head_dim: int, theta: float, scaling: dict[str, Any] | None,
                               max_position_embeddings: int, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """(inverse frequencies ``[head_dim/2]`` fp32 on CPU, attention factor) for a validated ``scaling``.

    ``seq_len`` matters for ``dynamic`` only (the length of the whole sequence, not of one shard); cos and sin are
    multiplied by the attention factor (YaRN; 1 otherwise).
    """
    kind = scaling["rope_type"] if scaling else "default"
    if kind == "default":
        return _base_frequencies(head_dim, theta).float(), 1.0
    factor = float(scaling["factor"])
    if kind == "linear":
        return (_base_frequencies(head_dim, theta) / factor).float(), 1.0
    if kind == "dynamic":
        base = dynamic_theta(theta, head_dim, factor, seq_len or max_position_embeddings, max_position_embeddings)
        return _base_frequencies(head_dim, base).float(), 1.0
    original = scaling.get("original_max_position_embeddings", max_position_embeddings)
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = _yarn_mscale(factor)
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:  # the dimension that turns `rotations` times over `original`
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # the ramp would divide by zero
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float64, device="cpu") - low) / (high - low)).clamp(0, 1)
    extrapolation = _base_frequencies(head_dim, theta)
    inv_freq = extrapolation / factor * ramp + extrapolation * (1 - ramp)
    return inv_freq.float(), float(attention_factor)
