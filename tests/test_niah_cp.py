"""NIAH under context parallelism (CP=2, gloo): ring prefill + sharded-cache decode give the outputs and scores of
one process, cell for cell."""
import torch

from dist_utils import run_distributed
from megatron_lc.model import ModelConfig, Transformer

CFG = dict(vocab_size=260, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
           head_dim=16, init_std=0.3, max_position_embeddings=1024, rope_theta=1e4)
GRID = dict(lengths=[300, 520], depths=[0, 50, 100], variant="value", max_new_tokens=8, seed=3)
HAYSTACK = ("The river bends twice before the mill. Nobody remembers who built it! Was it the old miller? " * 40)


def _run(answer_fn):
    from megatron_lc.eval.niah import run_grid
    from megatron_lc.eval.tokenizer import Bytes

    tokenizer = Bytes()
    return run_grid(answer_fn, tokenizer, tokenizer.encode(HAYSTACK), **GRID)


def _cp_worker(rank, world):
    from torch.distributed.device_mesh import init_device_mesh

    from megatron_lc.eval.tokenizer import Bytes
    from megatron_lc.parallel.context_parallel import ContextParallel
    from megatron_lc.parallel.sharded_generate import generate_sharded

    model = Transformer(ModelConfig(**CFG), seed=7).eval()
    cp = ContextParallel(init_device_mesh("cpu", (world,)), mode="ring")
    cp.apply(model)
    tokenizer = Bytes()

    def answer(prompt_ids):
        ids = torch.tensor([prompt_ids])
        out = generate_sharded(model, cp, ids, GRID["max_new_tokens"], eos_token_id=tokenizer.eos_token_id)
        return tokenizer.decode(out[0, len(prompt_ids):].tolist())

    return _run(answer)


def test_niah_under_cp2_equals_one_process():
    from megatron_lc.eval.niah import model_answer_fn
    from megatron_lc.eval.tokenizer import Bytes

    want = _run(model_answer_fn(Transformer(ModelConfig(**CFG), seed=7).eval(), Bytes(), GRID["max_new_tokens"]))
    for got in run_distributed(_cp_worker, 2, timeout=300):
        assert [c["output"] for c in got["cells"]] == [c["output"] for c in want["cells"]]
        assert got["mean"] == want["mean"] and got["overall"] == want["overall"]
    assert any(c["output"] for c in want["cells"])  # the model said something: the comparison is not of empties
