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
    from megatron_lc.data.tokenizer import Bytes
    from megatron_lc.eval.niah import run_grid

    tokenizer = Bytes()
    return run_grid(answer_fn, tokenizer, tokenizer.encode(HAYSTACK), **GRID)


def _cp_worker(rank, world):
    from torch.distributed.device_mesh import init_device_mesh

    from megatron_lc.data.tokenizer import Bytes
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
    from megatron_lc.data.tokenizer import Bytes
    from megatron_lc.eval.niah import model_answer_fn

    want = _run(model_answer_fn(Transformer(ModelConfig(**CFG), seed=7).eval(), Bytes(), GRID["max_new_tokens"]))
    for got in run_distributed(_cp_worker, 2, timeout=300):
        assert [c["output"] for c in got["cells"]] == [c["output"] for c in want["cells"]]
        assert got["mean"] == want["mean"] and got["overall"] == want["overall"]
    assert any(c["output"] for c in want["cells"])  # the model said something: the comparison is not of empties


def test_cli_under_torchrun_equals_one_process(tmp_path):
    """`torchrun --nproc-per-node 2 -m megatron_lc.cli eval niah ...` (ring prefill + sharded-cache decode) writes the
    niah.json of the one-process command, cell for cell; rank 0 alone prints the table."""
    import json
    import socket
    import subprocess
    import sys

    from megatron_lc.cli import main
    from megatron_lc.model import save_hf

    save_hf(Transformer(ModelConfig(**CFG, extra={"eos_token_id": 257}), seed=7), str(tmp_path / "model"))
    (tmp_path / "hay.txt").write_text(HAYSTACK)
    # A small grid: this tests the command's plumbing; the test above compares the full grid cell for cell.
    args = ["eval", "niah", "--model", str(tmp_path / "model"), "--haystack", str(tmp_path / "hay.txt"),
            "--lengths", "300,520", "--depths", "0,100", "--max-new-tokens", "4", "--device", "cpu"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                           str(port), "-m", "megatron_lc.cli", *args, "--out", str(tmp_path / "cp2")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    one, cp2 = (json.loads((tmp_path / d / "niah.json").read_text()) for d in ("one", "cp2"))
    assert cp2["cp"] == 2 and one["cp"] == 1
    assert [c["output"] for c in cp2["cells"]] == [c["output"] for c in one["cells"]]
    assert cp2["mean"] == one["mean"]
    assert any(c["output"] for c in one["cells"])
    assert done.stdout.count("mean score") == 1  # printed by rank 0 only
    assert (tmp_path / "cp2" / "niah.png").stat().st_size > 0
