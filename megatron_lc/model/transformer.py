"""A Qwen2-style decoder that matches HF Qwen2ForCausalLM numerically and knows nothing of parallelism.

Pre-norm blocks: x + attn(rmsnorm(x)), then x + mlp(rmsnorm(x)). Attention goes through ``self.attn_fn`` of each
``Attention`` module (``megatron_lc.ops.attention`` by default), which parallelize/ContextParallel replace.
"""
from __future__ import annotations

import hashlib
from typing import Callable

import torch
import torch.nn as nn

from .. import ops
from ..ops.rms_norm import rms_norm
from ..ops.rotary import apply_rotary, apply_rotary_qk
from ..ops.swiglu import swiglu
from .config import ModelConfig
from .dca import dca_attention, role_positions
from .rope import RotaryEmbedding
from .tiled_mlp import auto_tile_tokens, tiled_mlp


class RMSNorm(nn.Module):
    """``x / rms(x) * weight`` with the statistics in fp32, cast back before the weight (as HF Qwen2)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.norm_fn: Callable[..., torch.Tensor] = rms_norm  # (x, weight, eps); megatron_lc.ops swaps kernels in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm_fn(x, self.weight, self.eps)


class KVCache:
    """Keys and values of every layer for incremental decoding: ``k, v: [B, max_len, H_kv, D]`` per layer."""

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, dtype: torch.dtype,
                 device: torch.device | str):
        shape = (batch_size, max_len, config.num_kv_heads, config.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        self.max_len = max_len
        self.length = 0  # tokens already cached (the same for every layer once a forward completes)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append k/v ``[B, S, H_kv, D]`` after the cached tokens; return all keys/values ``[B, length+S, H_kv, D]``."""
        end = self.length + k.shape[1]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} tokens; {end} needed: build it with a larger max_len")
        self.keys[layer][:, self.length:end] = k
        self.values[layer][:, self.length:end] = v
        return self.keys[layer][:, :end], self.values[layer][:, :end]


class Attention(nn.Module):
    """GQA self-attention with RoPE; q/k/v have a bias (Qwen2), o does not.

    Projections are viewed as ``[B, S, -1, head_dim]`` (as TorchTitan), so the head counts come from the weights:
    under tensor parallelism each rank's sharded q/k/v give its H/t and H_kv/t heads without editing the module."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        d, h, hkv = config.head_dim, config.num_heads, config.num_kv_heads
        self.head_dim = d
        self.q_proj = nn.Linear(config.hidden_size, h * d, bias=config.qkv_bias)
        self.k_proj = nn.Linear(config.hidden_size, hkv * d, bias=config.qkv_bias)
        self.v_proj = nn.Linear(config.hidden_size, hkv * d, bias=config.qkv_bias)
        self.o_proj = nn.Linear(h * d, config.hidden_size, bias=False)
        self.attn_fn: Callable[..., torch.Tensor] = ops.attention
        self.rope_fn: Callable[..., tuple[torch.Tensor, torch.Tensor]] = apply_rotary_qk  # (q, k, cos, sin)
        self.dca = config.dual_chunk_attention

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x ``[B, S, hidden]`` -> q ``[B, S, H, D]`` and k, v ``[B, S, H_kv, D]``, RoPE applied to q and k."""
        b, s, _ = x.shape
        q, k = self.rope_fn(self.q_proj(x).view(b, s, -1, self.head_dim),
                            self.k_proj(x).view(b, s, -1, self.head_dim), cos, sin)
        return q, k, self.v_proj(x).view(b, s, -1, self.head_dim)

    def _dca_forward(self, x, cos, sin, cache, layer):
        # cos/sin: [4, B, S, D/2], one table per DCA role (dca.ROLES): keys, then the three query positions.
        if torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError("dual chunk attention is for inference: run under torch.no_grad() (or train without "
                               "model.dual_chunk_attention)")
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, -1, self.head_dim)
        k = apply_rotary(self.k_proj(x).view(b, s, -1, self.head_dim), cos[0], sin[0])
        v = self.v_proj(x).view(b, s, -1, self.head_dim)
        start = cache.length if cache is not None else 0
        if cache is not None:
            k, v = cache.update(layer, k, v)
        q = torch.stack([apply_rotary(q, cos[r], sin[r]) for r in (1, 2, 3)])
        out = dca_attention(q, k, v, start, self.dca["chunk_size"], self.dca["local_size"])
        return self.o_proj(out.reshape(b, s, -1))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None = None,
                layer: int = 0) -> torch.Tensor:
        if self.dca is not None:
            return self._dca_forward(x, cos, sin, cache, layer)
        b, s, _ = x.shape
        q, k, v = self.project(x, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        out = self.attn_fn(q, k, v, causal=True)  # [B, S, H, D]
        return self.o_proj(out.reshape(b, s, -1))


class MLP(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``, no biases. Inputs longer than ``tile_tokens`` tokens run in sequence
    tiles (tiled_mlp.py), so ``[S, intermediate]`` never exists for the whole S; -1 turns tiling off."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn: Callable[..., torch.Tensor] = swiglu  # (gate, up); megatron_lc.ops swaps kernels in
        tile = config.mlp_tile_tokens
        self.tile_tokens = auto_tile_tokens(config.intermediate_size) if tile == 0 else tile

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if 0 < self.tile_tokens < x.numel() // x.shape[-1]:
            return tiled_mlp(x, self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight, self.act_fn,
                             self.tile_tokens)
        return self.down_proj(self.act_fn(self.gate_proj(x), self.up_proj(x)))


class Block(nn.Module):
    """One pre-norm Transformer layer."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = Attention(config)
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None = None,
                layer: int = 0) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, layer)
        return x + self.mlp(self.mlp_norm(x))


def param_seed(seed: int, name: str) -> int:
    """A 63-bit seed from (seed, parameter name): the same draw for a parameter whatever device or sharding."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") >> 1


class Transformer(nn.Module):
    """Decoder-only LM. ``forward(input_ids [B, S]) -> logits [B, S, V]``, or the loss when labels are given."""

    def __init__(self, config: ModelConfig, seed: int = 0):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()
        # (hidden [N, hidden], lm_head weight [V, hidden], labels [N], chunk_tokens) -> (loss sum, count); the
        # parallelize step swaps it (a vocab-parallel loss under tensor parallelism), as attn_fn for attention.
        self.loss_fn: Callable[..., tuple[torch.Tensor, torch.Tensor]] = ops.linear_cross_entropy
        # Not a buffer: model.to(dtype) must not round the tables (see rope.py).
        self.rope = RotaryEmbedding(config)
        if self.embed.weight.device.type != "meta":  # a meta build is initialised after to_empty (or sharding)
            self.init_weights(seed)

    def tie_weights(self) -> None:
        """Make lm_head use the embedding matrix when the config ties them."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight

    def to_empty(self, *, device, recurse: bool = True):
        """As nn.Module.to_empty, which gives every parameter its own storage: re-tie lm_head afterwards."""
        super().to_empty(device=device, recurse=recurse)
        self.tie_weights()
        return self

    # ---- init -------------------------------------------------------------------------------------------------
    def initial_value(self, name: str, shape: torch.Size, seed: int) -> torch.Tensor:
        """The initial fp32 CPU tensor of parameter ``name``: N(0, init_std) for weights of linear and embedding
        layers, zeros for biases, ones for norms. Each is drawn from its own generator seeded by (seed, name)."""
        if name.endswith("norm.weight"):
            return torch.ones(shape)
        if name.endswith(".bias"):
            return torch.zeros(shape)
        gen = torch.Generator().manual_seed(param_seed(seed, name))
        return torch.empty(shape).normal_(0.0, self.config.init_std, generator=gen)

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """(Re)initialise every parameter in place, deterministically per parameter name. Works after
        ``to_empty`` on a meta-built model; the result equals an eager build with the same seed, bit for bit."""
        for name, param in self.named_parameters():  # tied weights appear once, under embed.weight
            param.copy_(self.initial_value(name, param.shape, seed))

    # ---- forward ----------------------------------------------------------------------------------------------
    def set_attention(self, fn: Callable[..., torch.Tensor]) -> None:
        """Route every layer's attention through ``fn(q, k, v, *, causal, softmax_scale=None)``."""
        for block in self.layers:
            block.attn.attn_fn = fn

    def hidden_states(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                      cache: KVCache | None = None) -> torch.Tensor:
        """input_ids ``[B, S]`` int64 -> final-norm hidden states ``[B, S, hidden]`` in the model dtype."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, S], got shape {tuple(input_ids.shape)}")
        b, s = input_ids.shape
        if position_ids is None:
            start = cache.length if cache is not None else 0
            position_ids = torch.arange(start, start + s, device=input_ids.device).unsqueeze(0).expand(b, s)
        elif position_ids.shape != input_ids.shape:
            raise ValueError(f"position_ids {tuple(position_ids.shape)} must match input_ids {tuple(input_ids.shape)}")
        dca = self.config.dual_chunk_attention
        if dca is None:
            cos, sin = self.rope(position_ids)  # [B, S, D/2] fp32
        else:  # [4, B, S, D/2]: keys and the three query roles (dca.py)
            start = cache.length if cache is not None else 0
            if not torch.equal(position_ids, torch.arange(start, start + s, device=position_ids.device).expand(b, s)):
                raise ValueError(f"dual chunk attention needs contiguous positions {start}..{start + s - 1} in every "
                                 f"row (no packed documents): leave position_ids out")
            roles = role_positions(position_ids, dca["chunk_size"], dca["local_size"])
            cos, sin = (t.unflatten(0, (4, b)) for t in self.rope(roles.flatten(0, 1)))
        x = self.embed(input_ids)
        for i, block in enumerate(self.layers):
            x = block(x, cos, sin, cache, i)
        if cache is not None:
            cache.length += s
        return self.norm(x)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        reduction: str = "mean",
        logits_to_keep: int | None = None,
        cache: KVCache | None = None,
    ):
        """Logits or loss.

        input_ids, position_ids, labels: ``[B, S]`` int64. labels are aligned (``labels[:, t]`` is the target of
        position t; the model never shifts) with -100 where no loss is taken.
        - no labels: logits ``[B, S, V]``, or ``[B, logits_to_keep, V]`` for the last positions only.
        - labels, ``reduction="mean"``: fp32 scalar mean over target tokens (0 when there are none).
        - labels, ``reduction="sum"``: (fp32 sum of token losses, int64 count of target tokens).
        The loss runs in token chunks and never holds logits for all tokens.
        """
        h = self.hidden_states(input_ids, position_ids, cache)
        if labels is None:
            if logits_to_keep is not None:
                if logits_to_keep <= 0:
                    raise ValueError(f"logits_to_keep must be a positive number of positions, got {logits_to_keep}")
                h = h[:, -logits_to_keep:]
            return self.lm_head(h)
        if labels.shape != input_ids.shape:
            raise ValueError(f"labels {tuple(labels.shape)} must match input_ids {tuple(input_ids.shape)} "
                             f"(aligned: labels[:, t] is the target of position t)")
        loss_sum, count = self.loss_fn(
            h.reshape(-1, h.shape[-1]), self.lm_head.weight, labels.reshape(-1), self.config.loss_chunk_tokens
        )
        if reduction == "sum":
            return loss_sum, count
        if reduction == "mean":
            return loss_sum / count.clamp(min=1)
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
