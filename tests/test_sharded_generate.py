"""Generation over a sharded KV cache (ring prefill, LSE-merged decode) equals single-process generation."""
import pytest
import torch

from dist_utils import run_distributed
from megatron_lc.model import ModelConfig, Transformer, generate

CFG = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
           head_dim=16, init_std=0.2, max_position_embeddings=256)


def _prompt(length):
    return torch.randint(0, CFG["vocab_size"], (2, length), generator=torch.Generator().manual_seed(length))


def _worker(rank, world, cases):
    from torch.distributed.device_mesh import init_device_mesh

    from megatron_lc.parallel.context_parallel import ContextParallel
    from megatron_lc.parallel.sharded_generate import generate_sharded

    mesh = init_device_mesh("cpu", (world,))
    results = []
    for length, new, kwargs in cases:
        model = Transformer(ModelConfig(**CFG), seed=1).eval()
        cp = ContextParallel(mesh, mode="ring")
        cp.apply(model)
        out = generate_sharded(model, cp, _prompt(length), new, **kwargs)
        results.append(out)
    return results


CASES = [(37, 12, {}), (40, 9, {}), (33, 5, {"eos_token_id": [3, 7]}), (41, 0, {})]


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_decode_equals_single_process_token_for_token(world):
    results = run_distributed(_worker, world, CASES, timeout=300)
    for i, (length, new, kwargs) in enumerate(CASES):
        model = Transformer(ModelConfig(**CFG), seed=1).eval()
        want = generate(model, _prompt(length), new, **kwargs)
        for rank_results in results:
            assert torch.equal(rank_results[i], want), (world, length)


def _sampling_worker(rank, world):
    from torch.distributed.device_mesh import init_device_mesh

    from megatron_lc.parallel.context_parallel import ContextParallel
    from megatron_lc.parallel.sharded_generate import generate_sharded

    torch.manual_seed(100 + rank)  # different random states per rank: the tokens must still agree
    model = Transformer(ModelConfig(**CFG), seed=1).eval()
    cp = ContextParallel(init_device_mesh("cpu", (world,)), mode="ring")
    cp.apply(model)
    return generate_sharded(model, cp, _prompt(30), 8, temperature=1.0)


def test_sampling_gives_every_rank_the_same_tokens():
    outs = run_distributed(_sampling_worker, 2, timeout=300)
    assert torch.equal(outs[0], outs[1])


def _short_worker(rank, world):
    from torch.distributed.device_mesh import init_device_mesh

    from megatron_lc.parallel.context_parallel import ContextParallel
    from megatron_lc.parallel.sharded_generate import generate_sharded

    model = Transformer(ModelConfig(**CFG), seed=1).eval()
    cp = ContextParallel(init_device_mesh("cpu", (world,)), mode="ring")
    cp.apply(model)
    generate_sharded(model, cp, _prompt(4), 3)


def test_too_short_prompt_is_a_clear_error():
    with pytest.raises(Exception, match="too short to shard over 2 ranks"):
        run_distributed(_short_worker, 2, timeout=120)
