"""The model's cost model: matmul FLOPs and saved activation bytes per token, pure functions of a ``ModelConfig``.

Read by the trainer (MFU), the activation-checkpointing cost model (``policy_costs``) and the benchmarks. The FLOP
count and its conventions are derived in docs/mfu.md; ``python -m megatron_lc.train.metrics qwen2-7b 32768``
prints the per-term breakdown.
"""
from __future__ import annotations

from .config import ModelConfig


def forward_flops_breakdown(config: ModelConfig, seq_len: int, *, causal: bool = True) -> dict[str, float]:
    """Forward matmul FLOPs per token, by term, for a ``seq_len``-token sequence (a multiply-add is 2 FLOPs).

    Keys: ``qkvo`` (q/k/v/o projections, all layers), ``mlp`` (SwiGLU gate/up/down, all layers), ``attention``
    (scores Q K^T and weighted values P V, all layers), ``lm_head``. Elementwise work (norms, RoPE, softmax, SiLU,
    biases) and the embedding lookup (a gather) are not matmuls and are not counted.
    """
    if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len <= 0:
        raise ValueError(f"seq_len must be a positive integer (tokens per sequence), got {seq_len!r}")
    h, d, L = config.hidden_size, config.head_dim, config.num_layers
    q_width, kv_width = config.num_heads * d, config.num_kv_heads * d
    # Under a causal mask query i sees keys 0..i: summed over i < S that is S(S+1)/2 pairs, (S+1)/2 per token.
    # FlashAttention skips the fully masked blocks, so the halved count is the work actually done.
    keys = (seq_len + 1) / 2 if causal else seq_len
    return {
        "qkvo": L * 2.0 * h * (2 * q_width + 2 * kv_width),  # q and o: h x q_width; k and v: h x kv_width (GQA)
        "mlp": L * 2.0 * 3 * h * config.intermediate_size,
        "attention": L * 2 * 2.0 * config.num_heads * d * keys,  # two matmuls (QK^T, PV) per query head
        "lm_head": 2.0 * h * config.vocab_size,  # counted when tied too: the matmul is done either way
    }


def train_flops_per_token(config: ModelConfig, seq_len: int, *, causal: bool = True) -> float:
    """Model FLOPs of one trained token (forward + backward = 3 x forward) at ``seq_len`` tokens per sequence.

    ``causal=False`` counts every query-key pair (full attention), for comparison with formulas that do.
    Activation recomputation is not counted: MFU measures useful model work, not hardware work.
    """
    return 3.0 * sum(forward_flops_breakdown(config, seq_len, causal=causal).values())


def mlp_is_tiled(config: ModelConfig, seq_len: int) -> bool:
    """Whether the cost model counts the MLP of a ``seq_len``-token sequence as run in sequence tiles
    (tiled_mlp.py): any length under the automatic tile (``mlp_tile_tokens=0``), never with -1."""
    return config.mlp_tile_tokens != -1 and seq_len > (config.mlp_tile_tokens or 0)


def block_saved_bytes_per_token(config: ModelConfig, seq_len: int, *, dtype_bytes: int = 2) -> dict[str, float]:
    """Activation bytes per token that one Transformer block keeps between forward and backward, by what it keeps
    (activations of ``dtype_bytes`` bytes, fp32 statistics):

    - ``all``: every tensor autograd saves without checkpointing: the two norms' inputs and rstd, the projections'
      input, q/k/v, the attention output and lse, and the MLP's input (tiled) or its gate/up/product (untiled);
    - ``input``: the block input only (the block is recomputed in backward);
    - ``input_and_attention``: the block input, the attention output and lse, and with a tiled MLP its input too
      (its forward then runs once: the tiles' own backward recomputes gate/up).
    """
    h, n = config.hidden_size, config.num_heads
    q, kv = n * config.head_dim, config.num_kv_heads * config.head_dim
    b = dtype_bytes
    tiled = mlp_is_tiled(config, seq_len)
    mlp_saved = b * h if tiled else b * (h + 3 * config.intermediate_size)
    block_input = b * h
    return {"all": b * (2 * h + h + q + 2 * kv + q) + 4 * n + 8 + mlp_saved,
            "input": block_input,
            "input_and_attention": block_input + b * q + 4 * n + (b * h if tiled else 0)}
