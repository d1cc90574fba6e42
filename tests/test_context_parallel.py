"""The full model under ContextParallel (ring, all-gather, Ulysses, hybrid) equals the single-process model."""
import pytest
import torch

from dist_utils import run_distributed
from megatron_lc.model import ModelConfig, Transformer

CFG = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
           head_dim=16, init_std=0.2, max_position_embeddings=256)


def _batch(seq_len, packed, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, CFG["vocab_size"], (2, seq_len + 1), generator=g)
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:].clone()}
    batch["labels"][0, :5] = -100  # e.g. a prompt
    if packed:  # two documents per row: positions restart where the second begins
        cut = seq_len // 3
        pos = torch.cat([torch.arange(cut), torch.arange(seq_len - cut)])
        batch["position_ids"] = pos.expand(2, seq_len).clone()
    return batch


def _config(case):
    return ModelConfig(**CFG, rope_scaling=case.get("rope_scaling"))


def _single_process(case):
    model = Transformer(_config(case), seed=1)
    batch = _batch(case["seq_len"], case["packed"])
    total, count = model(batch["input_ids"], position_ids=batch.get("position_ids"), labels=batch["labels"],
                         reduction="sum")
    (total / count).backward()
    return total.detach(), count, {n: p.grad for n, p in model.named_parameters()}


def _cp_model_worker(rank, world, cases):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from megatron_lc.parallel.context_parallel import ContextParallel

    results = []
    for case in cases:
        shape = case.get("mesh", (world,))
        mesh = init_device_mesh("cpu", shape)
        model = Transformer(_config(case), seed=1)
        cp = ContextParallel(mesh, mode=case["mode"], layout=case.get("layout", "zigzag"), pad=case.get("pad", False))
        cp.apply(model)
        local = cp.shard_batch(_batch(case["seq_len"], case["packed"]))
        total, count = model(local["input_ids"], position_ids=local["position_ids"], labels=local["labels"],
                             reduction="sum")
        # what the trainer does: all-reduce (sum, count) over the CP group, divide once by the global count,
        # and sum the gradients over the group
        stats = torch.stack([total.detach(), count.to(torch.float32)])
        dist.all_reduce(stats)
        (total / stats[1]).backward()
        grads = {}
        for n, p in model.named_parameters():
            dist.all_reduce(p.grad)
            grads[n] = p.grad
        results.append((stats[0], int(stats[1]), grads, local["input_ids"].shape[1]))
    return results


def _compare(cases, results):
    for i, case in enumerate(cases):
        total, count, grads = _single_process(case)
        cp_total, cp_count, cp_grads, _ = results[0][i]
        assert cp_count == int(count), case
        torch.testing.assert_close(cp_total / cp_count, total / count, atol=1e-5, rtol=1e-5,
                                   msg=lambda m: f"{case} loss: {m}")
        for name, g in grads.items():
            torch.testing.assert_close(cp_grads[name], g, atol=1e-5, rtol=1e-5, msg=lambda m: f"{case} {name}: {m}")


@pytest.mark.parametrize("world", [2, 4])
def test_model_under_cp_equals_single_process(world):
    cases = [dict(mode=mode, seq_len=48, packed=packed) for mode in ("ring", "allgather") for packed in (False, True)]
    cases.append(dict(mode="ring", layout="contiguous", seq_len=48, packed=True))
    cases.append(dict(mode="ulysses", seq_len=48, packed=True))
    if world == 4:
        cases.append(dict(mode="hybrid", mesh=(2, 2), seq_len=48, packed=True))
    results = run_distributed(_cp_model_worker, world, cases, timeout=300)
    _compare(cases, results)


def test_dynamic_ntk_under_cp_uses_the_global_length():
    """Dynamic NTK past max_position_embeddings (256): the base follows the whole sequence's length (320), not a
    shard's largest position, so CP equals one process (a shard-local length would change every rank's angles)."""
    dynamic = {"rope_type": "dynamic", "factor": 2.0}
    cases = [dict(mode="ring", seq_len=320, packed=False, rope_scaling=dynamic),
             dict(mode="hybrid", mesh=(2, 2), seq_len=320, packed=False, rope_scaling=dynamic)]
    results = run_distributed(_cp_model_worker, 4, cases, timeout=300)
    _compare(cases, results)


def test_padding_makes_cp3_work_with_any_length():
    cases = [dict(mode="ring", seq_len=40, packed=True, pad=True), dict(mode="allgather", seq_len=40, packed=False,
                                                                        pad=True)]
    results = run_distributed(_cp_model_worker, 3, cases, timeout=300)
    assert results[0][0][3] == 42 // 3  # padded to a multiple of 2 x 3
    _compare(cases, results)


def _bad_input_worker(rank, world, what):
    from torch.distributed.device_mesh import init_device_mesh

    from megatron_lc.parallel.context_parallel import ContextParallel

    mesh = init_device_mesh("cpu", (world,))
    if what == "shapes":
        cp = ContextParallel(mesh, mode="ring")
        cp.shard_batch(_batch(48 if rank == 0 else 40, packed=False))
    elif what == "length":
        ContextParallel(mesh, mode="ring").shard_batch(_batch(42, packed=False))
    elif what == "heads":
        cfg = ModelConfig(**{**CFG, "num_heads": 6, "num_kv_heads": 2, "hidden_size": 96})
        ContextParallel(mesh, mode="ulysses").apply(Transformer(cfg))
    return "no error"


@pytest.mark.parametrize("what,message", [
    ("shapes", "different shapes"),
    ("length", "not divisible by 8 .*pad=True"),
    ("heads", "Ulysses degree 4 does not divide num_heads=6"),
])
def test_bad_input_fails_on_every_rank_without_hanging(what, message):
    with pytest.raises(AssertionError) as err:
        run_distributed(_bad_input_worker, 4, what, timeout=120)
    text = str(err.value)
    import re

    for rank in range(4):
        assert f"rank {rank}:" in text, text
    assert re.search(message, text), text
    assert "hang" not in text


def _dp_cp_worker(rank, world):
    """A (dp=2, cp=2) mesh from ParallelDims: each DP replica gets its own sample; CP runs inside the replica."""
    import torch.distributed as dist

    from megatron_lc.parallel.context_parallel import ContextParallel
    from megatron_lc.parallel.parallel_dims import ParallelDims

    dims = ParallelDims(dp_replicate=1, dp_shard=-1, cp=2, tp=1, world_size=world)
    dims.build_mesh("cpu")
    dp_rank = dims.get_mesh("dp").get_local_rank()
    model = Transformer(ModelConfig(**CFG), seed=1)
    cp = ContextParallel(dims.get_mesh("cp"), mode="ring")
    cp.apply(model)
    batch = _batch(48, packed=True, seed=10 + dp_rank)  # replicas see different samples
    local = cp.shard_batch(batch)
    total, count = model(local["input_ids"], position_ids=local["position_ids"], labels=local["labels"],
                         reduction="sum")
    stats = torch.stack([total.detach(), count.to(torch.float32)])
    dist.all_reduce(stats, group=dims.get_mesh("cp").get_group())
    assert dims.get_mesh("dp_cp").size() == 4 and dims.get_mesh("fsdp").mesh_dim_names == ("dp_shard_cp",)
    return dp_rank, (stats[0] / stats[1]).item()


def test_cp_inside_a_dp_by_cp_mesh():
    results = run_distributed(_dp_cp_worker, 4, timeout=300)
    for dp_rank, loss in results:
        model = Transformer(ModelConfig(**CFG), seed=1)
        batch = _batch(48, packed=True, seed=10 + dp_rank)
        with torch.no_grad():
            expected = model(batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"]).item()
        assert abs(loss - expected) <= 1e-5, (dp_rank, loss, expected)


# ---- ParallelDims: sizes, checks and derived factors (no process group) ---------------------------------------
def test_parallel_dims_resolves_the_rest_of_the_world_and_derives_factors():
    from megatron_lc.parallel.parallel_dims import ParallelDims

    dims = ParallelDims(dp_replicate=2, dp_shard=-1, cp=2, tp=2, world_size=16)
    assert (dims.dp_shard, dims.dp) == (2, 4)
    assert dims.fsdp_gradient_divide_factor == 8  # FSDP2/HSDP average over dp_replicate x dp_shard x cp, not tp
    assert dims.seq_len_divisor() == 2 * 2 * 2  # zigzag: 2 chunks per CP rank, then tp for sequence parallelism
    assert dims.seq_len_divisor("contiguous") == 2 * 2
    assert ParallelDims(1, -1, 1, 2, world_size=2).seq_len_divisor() == 2  # no CP: tp alone
    with pytest.raises(RuntimeError, match="build_mesh"):
        dims.get_mesh("cp")


@pytest.mark.parametrize("sizes,message", [
    ((1, -1, 2, 2, 6), "world size 6 is not divisible by dp_replicate x cp x tp = 4"),
    ((1, 2, 2, 1, 3), "= 4 but the world has 3 processes"),
    ((1, 0, 1, 1, 1), "parallel.dp_shard must be >= 1 or -1"),
    ((1, 1, 0, 1, 1), "parallel.cp must be >= 1"),
    ((1, 1, 4, 1, 4, 3), "Ulysses degree parallel.cp_ulysses=3 must divide cp=4"),
])
def test_parallel_dims_errors_name_the_setting(sizes, message):
    from megatron_lc.configtools import ConfigError
    from megatron_lc.parallel.parallel_dims import ParallelDims

    with pytest.raises(ConfigError, match=message):
        ParallelDims(*sizes)


def _parallelize_worker(rank, world):
    import logging

    from megatron_lc.parallel.parallel_dims import ParallelDims
    from megatron_lc.parallel.parallelize import ParallelizeConfig, materialize, parallelize

    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger("megatron_lc.parallel.parallelize")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    dims = ParallelDims(dp_replicate=1, dp_shard=-1, cp=2, tp=1, world_size=world)
    dims.build_mesh("cpu")
    with torch.device("meta"):
        model = Transformer(ModelConfig(**CFG))
    cp, chosen = parallelize(model, dims, ParallelizeConfig(kernels="torch", activation_checkpointing="full"))
    materialize(model, torch.device("cpu"), seed=1)
    local = cp.shard_batch(_batch(45, packed=False))  # 45 -> padded to 48 (2 chunks x cp)
    total, count = model(local["input_ids"], position_ids=local["position_ids"], labels=local["labels"],
                         reduction="sum")
    total.backward()
    return messages, cp.pad_multiple, chosen["attention"], tuple(local["input_ids"].shape)


def test_parallelize_takes_dims_and_a_config_and_logs_each_step():
    messages, pad_multiple, attention, shape = run_distributed(_parallelize_worker, 2, timeout=300)[0]
    assert pad_multiple == 4 and shape == (2, 24) and attention.startswith("ring over cp=2")
    expected = ("applied context parallelism", "applied full activation checkpointing", "applied FSDP2 over dp_shard_cp")
    assert len(messages) == 3 and all(m.startswith(e) for m, e in zip(messages, expected)), messages
