"""Dual Chunk Attention: its position matrix, its three-part attention, and the model's prefill and decode."""
import dataclasses
import math

import pytest
import torch

from hf_helpers import small_config
from megatron_lc.configtools import ConfigError
from megatron_lc.model import Transformer, generate
from megatron_lc.model.dca import dca_attention, relative_positions, role_positions
from megatron_lc.model.rope import RotaryEmbedding
from megatron_lc.ops.rotary import apply_rotary

# chunk_size 8, local_size 2 (period 6), 24 tokens: row i lists the distances to keys 0..i, written by hand from
# the spec's rules (same chunk: i%6 - j%6; chunk before: min(i%6 + 6, 8) - j%6; earlier: min(11, 8) - j%6).
HAND_WRITTEN = [
    "0",
    "1 0",
    "2 1 0",
    "3 2 1 0",
    "4 3 2 1 0",
    "5 4 3 2 1 0",
    "6 5 4 3 2 1 0",
    "7 6 5 4 3 2 1 0",
    "8 7 6 5 4 3 2 1 0",
    "8 7 6 5 4 3 3 2 1 0",
    "8 7 6 5 4 3 4 3 2 1 0",
    "8 7 6 5 4 3 5 4 3 2 1 0",
    "8 7 6 5 4 3 6 5 4 3 2 1 0",
    "8 7 6 5 4 3 7 6 5 4 3 2 1 0",
    "8 7 6 5 4 3 8 7 6 5 4 3 2 1 0",
    "8 7 6 5 4 3 8 7 6 5 4 3 3 2 1 0",
    "8 7 6 5 4 3 8 7 6 5 4 3 4 3 2 1 0",
    "8 7 6 5 4 3 8 7 6 5 4 3 5 4 3 2 1 0",
    "8 7 6 5 4 3 8 7 6 5 4 3 6 5 4 3 2 1 0",
    "8 7 6 5 4 3 8 7 6 5 4 3 7 6 5 4 3 2 1 0",
    "8 7 6 5 4 3 8 7 6 5 4 3 8 7 6 5 4 3 2 1 0",
    "8 7 6 5 4 3 8 7 6 5 4 3 8 7 6 5 4 3 3 2 1 0",
    "8 7 6 5 4 3 8 7 6 5 4 3 8 7 6 5 4 3 4 3 2 1 0",
    "8 7 6 5 4 3 8 7 6 5 4 3 8 7 6 5 4 3 5 4 3 2 1 0",
]


def test_position_matrix_equals_the_hand_written_one():
    got = relative_positions(24, 8, 2)
    for i, row in enumerate(HAND_WRITTEN):
        assert got[i, : i + 1].tolist() == [int(x) for x in row.split()], i
        assert (got[i, i + 1:] == -1).all()


@pytest.mark.parametrize("chunk_size,local_size,seq_len", [(8, 2, 100), (64, 16, 500), (24, 23, 80)])
def test_every_distance_lies_in_0_to_chunk_size(chunk_size, local_size, seq_len):
    rel = relative_positions(seq_len, chunk_size, local_size)
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
    assert rel[causal].min() >= 0 and rel[causal].max() <= chunk_size


def _reference(q_roles, k, v, chunk_size, local_size):
    """One float64 softmax over all keys, each (query, key) logit taken from the query role its chunks call for."""
    period = chunk_size - local_size
    s = q_roles.shape[2]
    group = q_roles.shape[3] // k.shape[2]
    k, v = k.double().repeat_interleave(group, 2), v.double().repeat_interleave(group, 2)
    logits = torch.einsum("rbqhd,bkhd->rbhqk", q_roles.double(), k) / math.sqrt(q_roles.shape[-1])
    chunk = torch.arange(s) // period
    gap = chunk.unsqueeze(1) - chunk.unsqueeze(0)
    role = torch.where(gap == 0, 0, torch.where(gap == 1, 1, 2))  # [S, S]
    picked = torch.gather(logits, 0, role.expand(1, *logits.shape[1:]))[0]
    picked = picked.masked_fill(~torch.ones(s, s, dtype=torch.bool).tril(), float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", picked.softmax(-1), v)


@pytest.mark.parametrize("seq_len,start", [(50, 0), (37, 0), (1, 49), (9, 20)])
def test_three_part_attention_equals_one_softmax_over_the_dca_positions(seq_len, start):
    """q/k rotated by real RoPE at the DCA positions; queries start..start+S-1 over keys 0..start+S-1 (a decode
    step or a later prefill piece when start > 0); fp32 vs float64: atol=rtol=1e-5."""
    chunk_size, local_size = 8, 2
    total = start + seq_len
    gen = torch.Generator().manual_seed(seq_len)
    rope = RotaryEmbedding(small_config(head_dim=16, rope_theta=1e4))
    q = torch.randn(2, total, 4, 16, generator=gen)
    k, v = torch.randn(2, total, 2, 16, generator=gen), torch.randn(2, total, 2, 16, generator=gen)
    pos = role_positions(torch.arange(total).expand(2, total), chunk_size, local_size)
    cos, sin = (t.unflatten(0, (4, 2)) for t in rope(pos.flatten(0, 1)))
    k_rot = apply_rotary(k, cos[0], sin[0])
    q_roles = torch.stack([apply_rotary(q, cos[r], sin[r]) for r in (1, 2, 3)])
    want = _reference(q_roles, k_rot, v, chunk_size, local_size)[:, start:]
    got = dca_attention(q_roles[:, :, start:], k_rot, v, start, chunk_size, local_size)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def _models(chunk_size=8, local_size=2, **kw):
    cfg = small_config(rope_theta=1e4, head_dim=16, **kw)
    dca = dataclasses.replace(cfg, dual_chunk_attention={"chunk_size": chunk_size, "local_size": local_size})
    return Transformer(cfg, seed=2).eval(), Transformer(dca, seed=2).eval()


def test_dca_equals_plain_attention_within_one_chunk():
    plain, dca = _models(chunk_size=40, local_size=8)  # period 32
    ids = torch.randint(0, 320, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(dca(ids), plain(ids), atol=1e-5, rtol=1e-5)
        longer = torch.randint(0, 320, (2, 60), generator=torch.Generator().manual_seed(1))
        assert (dca(longer) - plain(longer)).abs().max() > 1e-3  # past one chunk the positions differ


YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}


@pytest.mark.parametrize("scaling", [None, YARN], ids=["rope", "yarn"])
def test_each_decode_step_equals_its_prefill_row(scaling):
    """Prefill 5 tokens, then decode one at a time across several chunks: every step's logits equal the row of a
    single prefill of the whole sequence (fp32, atol=rtol=1e-5); greedy generate runs through the same path. With
    YaRN too (Qwen2's recipe for 131K: DCA over YaRN-scaled RoPE)."""
    _, model = _models(rope_scaling=scaling)
    ids = torch.randint(0, 320, (2, 30), generator=torch.Generator().manual_seed(3))
    from megatron_lc.model import KVCache

    with torch.no_grad():
        full = model(ids)
        cache = KVCache(model.config, 2, 30, torch.float32, "cpu")
        steps = [model(ids[:, :5], cache=cache)]
        for t in range(5, 30):
            steps.append(model(ids[:, t:t + 1], cache=cache))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    out = generate(model, ids[:, :10], max_new_tokens=12)
    with torch.no_grad():
        again = model(out[:, :-1])[:, 9:].argmax(-1)
    assert torch.equal(out[:, 10:], again)  # each generated token is the argmax of a full prefill's row


def test_dca_rejects_training_packed_positions_and_bad_configs():
    _, model = _models()
    ids = torch.randint(0, 320, (1, 12))
    with pytest.raises(RuntimeError, match="for inference: run under torch.no_grad"):
        model(ids, labels=ids)
    with torch.no_grad(), pytest.raises(ValueError, match="contiguous positions 0..11"):
        model(ids, position_ids=torch.cat([torch.arange(6), torch.arange(6)]).unsqueeze(0))
    with pytest.raises(ConfigError, match="local_size=8 must be smaller than chunk_size=8"):
        small_config(dual_chunk_attention={"chunk_size": 8, "local_size": 8})
    with pytest.raises(ConfigError, match="needs chunk_size and local_size"):
        small_config(dual_chunk_attention={"chunk_size": 8})
