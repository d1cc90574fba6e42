"""KV-cache decoding and generation vs a full forward and vs transformers' generate."""
import pytest
import torch

from hf_helpers import hf_twin, small_config
from megatron_lc.model import KVCache, Transformer, generate


@pytest.fixture(scope="module")
def model():
    return Transformer(small_config(init_std=0.2, num_heads=4, num_kv_heads=2), seed=11).eval()


def test_greedy_generation_equals_transformers(model):
    hf = hf_twin(model)
    prompt = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    ours = generate(model, prompt, max_new_tokens=32)
    theirs = hf.generate(prompt, max_new_tokens=32, do_sample=False, attention_mask=torch.ones_like(prompt))
    assert ours.shape == (2, 9 + 32)
    assert torch.equal(ours, theirs)


@torch.no_grad()
def test_kv_cache_decode_equals_full_forward_at_every_step(model):
    ids = torch.randint(0, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    full = model(ids)  # [B, S, V]
    cache = KVCache(model.config, 2, 40, torch.float32, "cpu")
    prefill = model(ids[:, :8], cache=cache)
    # fp32 summation-order noise on logits of magnitude ~8: the same 1e-4 bound as the HF parity tests
    torch.testing.assert_close(prefill, full[:, :8], atol=1e-4, rtol=0)
    for t in range(8, 40):
        step = model(ids[:, t:t + 1], cache=cache)
        torch.testing.assert_close(step[:, 0], full[:, t], atol=1e-4, rtol=0)
    assert cache.length == 40


@torch.no_grad()
def test_block_of_queries_against_longer_cache_is_bottom_right_causal(model):
    ids = torch.randint(0, model.config.vocab_size, (1, 30), generator=torch.Generator().manual_seed(2))
    full = model(ids)
    cache = KVCache(model.config, 1, 30, torch.float32, "cpu")
    model(ids[:, :17], cache=cache)
    block = model(ids[:, 17:30], cache=cache)  # 13 queries, 30 keys
    torch.testing.assert_close(block, full[:, 17:30], atol=1e-4, rtol=0)


def test_generation_stops_at_eos_and_pads_finished_rows(model):
    prompt = torch.randint(0, model.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(3))
    free = generate(model, prompt, max_new_tokens=20)
    eos = int(free[0, 5 + 3])  # whatever row 0 emits at its 4th step becomes "EOS"
    out = generate(model, prompt, max_new_tokens=20, eos_token_id=eos)
    row0 = out[0, 5:].tolist()
    first = row0.index(eos)
    assert first <= 3
    assert all(t == eos for t in row0[first:])
    if eos not in free[1, 5:].tolist():
        assert out.shape[1] == 25  # row 1 never finished: ran to max_new_tokens
    assert torch.equal(out[1, 5:5 + first + 1], free[1, 5:5 + first + 1])


def test_sampling_is_seeded_and_top_p_one_token_is_greedy(model):
    prompt = torch.randint(0, model.config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(4))
    a = generate(model, prompt, 10, temperature=1.0, generator=torch.Generator().manual_seed(7))
    b = generate(model, prompt, 10, temperature=1.0, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    # top_p this small keeps only the most likely token: sampling must equal greedy
    nucleus = generate(model, prompt, 10, temperature=1.0, top_p=1e-6, generator=torch.Generator().manual_seed(8))
    assert torch.equal(nucleus, generate(model, prompt, 10))


def test_cache_overflow_is_a_clear_error(model):
    cache = KVCache(model.config, 1, 4, torch.float32, "cpu")
    with pytest.raises(ValueError, match="KV cache holds 4 tokens"):
        model(torch.zeros(1, 5, dtype=torch.long), cache=cache)
