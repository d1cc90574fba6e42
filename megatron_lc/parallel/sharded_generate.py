"""Generation from a context longer than one device holds: ring prefill, then decode over a sharded KV cache.

Prefill runs the prompt through the model under ContextParallel (ring attention), each rank keeping the keys and
values of its own shard. At each decode step every rank runs the new token (the model is replicated; one token is
cheap), attends its query to the keys it holds, and the partial outputs merge by log-sum-exp across the group, so
all ranks get the same output, logits and next token. New tokens' keys go to rank ``t % W`` in turn, which keeps
the shards balanced. Keys carry their RoPE rotation, so the order in which they sit in the shards does not matter.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..model.generate import EosTracker, sample_next
from ..model.transformer import KVCache, Transformer
from ..ops.attention_lse import block_forward, merge_into
from .comm import all_gather_into
from .context_parallel import ContextParallel


class ShardedKVCache(KVCache):
    """This rank's part of the KV cache. ``keep`` says whether the tokens of the next forward are stored here;
    ``length`` counts the tokens of the whole sequence (what the model adds after each forward)."""

    def __init__(self, model: Transformer, batch_size: int, max_local: int, dtype: torch.dtype, device):
        super().__init__(model.config, batch_size, max_local, dtype, device)
        self.local = [0] * model.config.num_layers
        self.keep = True

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keep:
            start, end = self.local[layer], self.local[layer] + k.shape[1]
            if end > self.max_len:
                raise ValueError(f"this rank's KV cache holds {self.max_len} tokens; {end} needed")
            self.keys[layer][:, start:end] = k
            self.values[layer][:, start:end] = v
            self.local[layer] = end
        n = self.local[layer]
        return self.keys[layer][:, :n], self.values[layer][:, :n]


def _merged_attention(group: dist.ProcessGroup):
    """attn_fn for decode: this rank's keys, then an LSE merge of every rank's partial output (same on all)."""

    def attention(q, k, v, *, causal=True, softmax_scale=None):
        out, lse = block_forward(q, k, v, causal=False, softmax_scale=softmax_scale)  # new queries see all keys
        world = dist.get_world_size(group)
        outs = torch.empty((world * out.shape[0], *out.shape[1:]), dtype=torch.float32, device=out.device)
        lses = torch.empty((world * lse.shape[0], *lse.shape[1:]), dtype=torch.float32, device=lse.device)
        all_gather_into(outs, out.float(), group)
        all_gather_into(lses, lse, group)
        outs, lses = outs.unflatten(0, (world, -1)), lses.unflatten(0, (world, -1))
        merged, merged_lse = outs[0].clone(), lses[0].clone()
        for r in range(1, world):  # the same order on every rank: bitwise the same result everywhere
            merge_into(merged, merged_lse, outs[r], lses[r])
        return merged.to(q.dtype)

    return attention


@torch.no_grad()
def generate_sharded(model: Transformer, cp: ContextParallel, input_ids: torch.Tensor, max_new_tokens: int,
                     temperature: float = 0.0, top_p: float = 1.0, eos_token_id: int | list[int] | None = None,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """``model.generate`` for a prompt spread over the ring ``cp`` (mode ``ring``, 1-D mesh): every rank passes
    the same full ``input_ids [B, S]`` and gets the same ``[B, S + T]`` int64. Greedy (temperature 0) equals
    single-process generation token for token; a sampled token is rank 0's. ``cp.apply(model)`` must have been
    called."""
    if cp.mode != "ring" or cp.mesh.ndim != 1:
        raise ValueError(f"sharded generation runs over a ring (ContextParallel mode='ring'), got mode={cp.mode!r}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    b, s = input_ids.shape
    multiple = cp.multiple()
    # The ring prefills the longest prefix the layout can shard, keeping at least the last token back: it and any
    # remainder go through the decode path, whose logits every rank gets.
    prefill = (s - 1) // multiple * multiple
    if prefill == 0:
        raise ValueError(f"a prompt of {s} tokens is too short to shard over {cp.size} ranks (needs more than "
                         f"{multiple}): use megatron_lc.model.generate")
    world, rank = cp.size, cp.mesh.get_local_rank(0)
    dtype = next(model.parameters()).dtype
    decode_tokens = s - prefill + max_new_tokens
    cache = ShardedKVCache(model, b, prefill // world + -(-decode_tokens // world), dtype, input_ids.device)
    eos = EosTracker(eos_token_id, b, input_ids.device)

    ring_attention = model.layers[0].attn.attn_fn
    local = cp.shard_batch({"input_ids": input_ids[:, :prefill]})
    model(local["input_ids"], position_ids=local["position_ids"], logits_to_keep=1, cache=cache)
    model.set_attention(_merged_attention(cp.group))
    try:
        out = [input_ids]
        logits = None
        for t in range(prefill, s + max_new_tokens):
            if t < s:
                token = input_ids[:, t]
            else:
                token = sample_next(logits, temperature, top_p, generator)
                if temperature > 0:  # one draw for all: ranks' random states need not agree
                    dist.broadcast(token, src=dist.get_global_rank(cp.group, 0), group=cp.group)
                token = eos.step(token)
                out.append(token.unsqueeze(1))
                if eos.done or t == s + max_new_tokens - 1:
                    break
            cache.keep = (t - prefill) % world == rank
            pos = torch.full((b, 1), t, dtype=torch.long, device=input_ids.device)
            logits = model(token.unsqueeze(1), position_ids=pos, cache=cache)[:, -1]
    finally:
        model.set_attention(ring_attention)
    return torch.cat(out, dim=1)
