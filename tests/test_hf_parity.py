"""Our Transformer vs transformers' Qwen2ForCausalLM / LlamaForCausalLM with the same weights (fp32)."""
import copy

import pytest
import torch
import torch.nn.functional as F

from hf_helpers import hf_param, hf_twin, small_config
from megatron_lc.model import Transformer

CONFIGS = {
    "mha-tied-theta1e4-d64": dict(num_heads=4, num_kv_heads=4, head_dim=64, tie_word_embeddings=True, rope_theta=1e4),
    "gqa2-untied-theta1e6-d128": dict(num_heads=4, num_kv_heads=2, head_dim=128, rope_theta=1e6),
    "gqa7-untied-theta5e7-d64": dict(num_heads=7, num_kv_heads=1, head_dim=64, rope_theta=5e7),
    "gqa7-tied-theta1e6-d128-3layers": dict(num_heads=7, num_kv_heads=1, head_dim=128, tie_word_embeddings=True,
                                            num_layers=3),
    "llama-no-qkv-bias-d64": dict(num_heads=4, num_kv_heads=2, head_dim=64, qkv_bias=False, rope_theta=5e5),
}


def _randomize_biases_and_norms(model, seed):
    # init makes biases 0 and norms 1, which would hide a missing bias or norm weight; make them random.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias") or name.endswith("norm.weight"):
                p.copy_(p + 0.1 * torch.randn(p.shape, generator=gen))


@pytest.fixture(params=list(CONFIGS), scope="module")
def pair(request):
    cfg = small_config(**CONFIGS[request.param])
    model = Transformer(cfg, seed=3).eval()
    _randomize_biases_and_norms(model, 4)
    return model, hf_twin(model)


def test_hf_architecture(pair):
    model, hf = pair
    expected = "Qwen2ForCausalLM" if model.config.qkv_bias else "LlamaForCausalLM"
    assert type(hf).__name__ == expected


def test_logits_match_hf(pair):
    model, hf = pair
    ids = torch.randint(0, model.config.vocab_size, (2, 61), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(ids)
        theirs = hf(ids).logits
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_logits_match_hf_with_packed_position_ids(pair):
    model, hf = pair
    ids = torch.randint(0, model.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(1))
    pos = torch.cat([torch.arange(25), torch.arange(15)]).unsqueeze(0) + 100  # a reset mid-sequence, offset start
    with torch.no_grad():
        ours = model(ids, position_ids=pos)
        theirs = hf(ids, position_ids=pos).logits
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_loss_and_gradients_match_hf(pair):
    model, hf = pair
    v = model.config.vocab_size
    ids = torch.randint(0, v, (2, 47), generator=torch.Generator().manual_seed(2))
    hf_labels = ids.clone()
    hf_labels[0, :9] = -100  # e.g. a prompt without loss
    # HF shifts inside; ours takes aligned labels: labels[:, t] is the target of position t.
    labels = torch.cat([hf_labels[:, 1:], torch.full((2, 1), -100)], dim=1)
    model.zero_grad()
    hf.zero_grad()
    loss = model(ids, labels=labels)
    loss.backward()
    hf_loss = hf(ids, labels=hf_labels).loss
    hf_loss.backward()
    torch.testing.assert_close(loss, hf_loss, atol=1e-6, rtol=1e-5)
    # also against F.cross_entropy on the shifted full logits, the definition
    ref = F.cross_entropy(hf(ids).logits[:, :-1].reshape(-1, v), hf_labels[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, ref, atol=1e-6, rtol=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, hf_param(hf, name).grad, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def test_sum_reduction_is_sum_and_count(pair):
    model, _ = pair
    ids = torch.randint(0, model.config.vocab_size, (2, 30), generator=torch.Generator().manual_seed(5))
    labels = ids.roll(-1, dims=1)
    labels[:, -1] = -100
    labels[1, :10] = -100
    with torch.no_grad():
        total, count = model(ids, labels=labels, reduction="sum")
        mean = model(ids, labels=labels)
    assert count.item() == 2 * 30 - 2 - 10
    torch.testing.assert_close(total / count, mean, atol=1e-6, rtol=1e-6)


def test_bf16_logits_error_within_twice_transformers_bf16_error(pair):
    # Tolerance rule for bf16: our error vs float64 at most 2x the error transformers' own bf16 model has.
    model, hf = pair
    ids = torch.randint(0, model.config.vocab_size, (2, 50), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        truth = copy.deepcopy(model).double()(ids)
        ours = copy.deepcopy(model).to(torch.bfloat16)(ids).double()
        theirs = copy.deepcopy(hf).to(torch.bfloat16)(ids).logits.double()
    our_err, ref_err = (ours - truth).abs().max().item(), (theirs - truth).abs().max().item()
    assert our_err <= 2 * ref_err, (our_err, ref_err)
