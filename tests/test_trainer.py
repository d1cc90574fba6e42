"""The trainer end to end on CPU (gloo): loss falls, parallel layouts equal one process, exact resume, resharded
loading, crash-safe checkpoints, skipped and aborted steps, config errors, TensorBoard and JSONL logs.

Every run happens in spawned processes (``run_distributed``), one process being world size 1, so no process group
leaks into the test process (``convert`` runs in-process: it opens and closes a one-process group of its own).
"""
import json
import os

import numpy as np
import pytest
import torch

from dist_utils import run_distributed
from megatron_lc.configtools import ConfigError
from megatron_lc.data.indexed import IndexedDatasetWriter
from megatron_lc.train.config import load_train_config

BASE = ["model.preset=tiny", "data.seq_len=32", "optim.lr=3e-3", "schedule.warmup_steps=2"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A learnable token stream (a repeating 0..63 ramp, each token shifted by 64 with probability 1/2)."""
    d = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    tokens = np.tile(np.arange(64), 400) + 64 * rng.integers(0, 2, 64 * 400)
    _write_dataset(d / "train", tokens)
    _write_dataset(d / "val", np.tile(np.arange(64), 40) + 64 * rng.integers(0, 2, 64 * 40))
    return str(d)


def _write_dataset(prefix, tokens, doc_len=640):
    """The stream as an indexed dataset (prefix.bin/.idx) of documents of doc_len tokens (uint16: vocab fits)."""
    with IndexedDatasetWriter(prefix, dtype=np.uint16) as w:
        for start in range(0, len(tokens), doc_len):
            w.add_document(tokens[start:start + doc_len])


def _cfg(corpus, overrides):
    return load_train_config(None, [f"data.train_tokens={corpus}/train.bin", *BASE, *overrides])


def _job(rank, world, corpus, overrides, until=None, check_init=False, capture_grads=False):
    """Build a Trainer (every rank), optionally check its sharded init against an eager build, train, and return
    the losses, logged grad norms and the full gradients after step 1."""
    from torch.distributed.tensor import DTensor

    from megatron_lc.model import Transformer
    from megatron_lc.train.trainer import Trainer

    trainer = Trainer(_cfg(corpus, overrides))
    result = {"start_step": trainer.step}
    full = {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
            for n, p in trainer.model.named_parameters()}
    if check_init:
        eager = dict(Transformer(trainer.model_config, seed=trainer.cfg.train.seed).named_parameters())
        result["init_equal"] = {n: torch.equal(full[n].float(), eager[n].detach()) for n in eager}
    grads = {}

    def hook(t):
        if t.step == 1 and capture_grads:
            for n, p in t.model.named_parameters():
                grads[n] = (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).clone()

    trainer.grad_hook = hook
    history = trainer.run(until=until)
    result.update(loss=[h.get("train/loss") for h in history], norm=[h.get("train/grad_norm") for h in history],
                  steps=[h["step"] for h in history], val=[h["val/loss"] for h in history if "val/loss" in h],
                  skipped=[h["train/skipped_steps"] for h in history], grads=grads, end_step=trainer.step)
    return result


def _run(world, corpus, overrides, until=None, check_init=False, capture_grads=False):
    return run_distributed(_job, world, corpus, overrides, until, check_init, capture_grads, timeout=300)


def test_tiny_model_learns_and_logs(corpus, tmp_path):
    """50 steps: the loss falls; TensorBoard holds the loss, val loss and lr series; the JSONL has one line per
    step; checkpoints every 10 steps, the last 2 kept."""
    out = tmp_path / "run"
    res = _run(1, corpus, ["train.steps=50", "data.micro_batch_size=4", f"checkpoint.dir={out}",
                           "checkpoint.every=10", "checkpoint.keep=2", f"data.val_tokens={corpus}/val.bin",
                           "eval.every=25"])[0]
    assert res["loss"][-1] < 0.5 * res["loss"][0], res["loss"]
    assert len(res["val"]) == 2 and res["val"][1] < res["val"][0]
    lines = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [line["step"] for line in lines] == list(range(1, 51))
    assert all({"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_second"} <= set(line) for line in lines)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out)).Reload()
    for tag, count in (("train/loss", 50), ("train/lr", 50), ("val/loss", 2)):
        assert len(events.Scalars(tag)) == count, tag
    assert events.Scalars("train/loss")[-1].value == pytest.approx(res["loss"][-1], rel=1e-6)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("step_")) == ["step_40", "step_50"]  # keep 2
    assert os.path.isfile(out / "step_50" / "COMPLETE")


def test_bf16_run_on_cpu(corpus):
    res = _run(1, corpus, ["train.steps=3", "train.dtype=bfloat16", "data.micro_batch_size=2"])[0]
    assert all(np.isfinite(res["loss"])) and res["skipped"][-1] == 0, res


# ---- parallel layouts against one process ------------------------------------------------------------------------
_REFERENCE = {}


def _reference(corpus):
    if corpus not in _REFERENCE:
        _REFERENCE[corpus] = _run(1, corpus, ["train.steps=5", "data.micro_batch_size=4"], capture_grads=True)[0]
    return _REFERENCE[corpus]


@pytest.mark.parametrize("world,overrides", [
    (2, ["data.micro_batch_size=2"]),                     # FSDP2 over 2 data-parallel ranks
    (2, ["data.micro_batch_size=4", "parallel.cp=2"]),    # one replica, the sequence over 2 ranks (ring)
    (4, ["data.micro_batch_size=2", "parallel.cp=2"]),    # dp 2 x cp 2
    (2, ["data.micro_batch_size=4", "parallel.tp=2"]),    # tensor parallel with sequence parallelism
    (4, ["data.micro_batch_size=2", "parallel.tp=2"]),    # FSDP2 x TP: the 2-D sharded init must equal eager
    (4, ["data.micro_batch_size=4", "parallel.cp=2", "parallel.tp=2"]),
    (4, ["data.micro_batch_size=1", "parallel.dp_replicate=2", "parallel.dp_shard=2"]),  # HSDP
    (1, ["data.micro_batch_size=2", "data.global_batch_tokens=128"]),  # 2 accumulated micro-batches
    (2, ["data.micro_batch_size=1", "data.global_batch_tokens=128", "train.activation_checkpointing=full"]),
    (2, ["data.micro_batch_size=2", "train.activation_checkpointing=every_k", "parallel.cp_mode=allgather"]),
    (4, ["data.micro_batch_size=4", "parallel.cp=4", "parallel.cp_mode=hybrid", "parallel.cp_ulysses=2"]),
    (2, ["data.micro_batch_size=4", "parallel.cp=2", "parallel.cp_mode=ulysses"]),
    (2, ["data.micro_batch_size=2", "train.activation_checkpointing=selective", "model.config.mlp_tile_tokens=24"]),
    (2, ["data.micro_batch_size=4", "parallel.cp=2", "train.activation_checkpointing=selective"]),
    (4, ["data.micro_batch_size=4", "parallel.cp=2", "parallel.tp=2", "train.activation_checkpointing=selective"]),
    (2, ["data.micro_batch_size=2", "train.activation_checkpointing=offload", "model.config.mlp_tile_tokens=24"]),
], ids=["dp2", "cp2", "dp2xcp2", "tp2", "dp2xtp2", "cp2xtp2", "hsdp2x2", "accum2", "dp2-accum2-ac", "dp2-ack",
        "cp4-hybrid2x2", "cp2-ulysses", "dp2-selective-tiled", "cp2-selective", "cp2xtp2-selective",
        "dp2-offload-tiled"])
def test_parallel_layout_equals_one_process(corpus, world, overrides):
    """Gradients after step 1 (full tensors), the logged grad norms and the 5-step loss curve equal one process
    at atol=rtol=1e-5; the sharded meta-device init equals an eager build bit for bit."""
    ref = _reference(corpus)
    res = _run(world, corpus, ["train.steps=5", *overrides], check_init=True, capture_grads=True)
    for r in res:
        assert all(r["init_equal"].values()), [n for n, ok in r["init_equal"].items() if not ok]
        torch.testing.assert_close(torch.tensor(r["loss"]), torch.tensor(ref["loss"]), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(torch.tensor(r["norm"]), torch.tensor(ref["norm"]), atol=1e-5, rtol=1e-5)
        assert r["grads"].keys() == ref["grads"].keys()
        for name, grad in ref["grads"].items():
            torch.testing.assert_close(r["grads"][name], grad, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.slow  # the Triton interpreter runs every kernel: 80 s at 5 steps x 4 sequences, so 3 x 2 here
def test_triton_kernels_train_like_torch(corpus):
    """train.kernels=triton (every op; the interpreter without a GPU, fp32): 3 steps of the tiny preset (the third
    on weights both optimizer steps changed) give the torch kernels' losses and grad norms within 1e-4."""
    common = ["train.steps=3", "data.micro_batch_size=2"]
    ref = _run(1, corpus, common)[0]
    res = _run(1, corpus, [*common, "train.kernels=triton"])[0]
    np.testing.assert_allclose(res["loss"], ref["loss"], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(res["norm"], ref["norm"], atol=1e-4, rtol=1e-4)


def test_torchrun_cli_equals_one_process(corpus, tmp_path):
    """`torchrun --nproc-per-node 2 -m megatron_lc.cli train ... parallel.cp=2`: the JSONL loss curve equals the
    one-process run's."""
    import subprocess
    import sys

    ref = _reference(corpus)
    args = [f"data.train_tokens={corpus}/train.bin", *BASE, "train.steps=5", "data.micro_batch_size=4",
            "parallel.cp=2", f"logging.dir={tmp_path}"]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-port", str(_free_port()), "-m", "megatron_lc.cli", "train", *args],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    losses = [json.loads(line)["train/loss"] for line in open(tmp_path / "metrics.jsonl")]
    np.testing.assert_allclose(losses, ref["loss"], atol=1e-5, rtol=1e-5)
    assert "step 5/5 | loss" in done.stderr  # the progress line, printed once (rank 0 only)
    assert done.stderr.count("step 5/5 |") == 1


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_optimizer_groups_and_schedules():
    from megatron_lc.model import Transformer, preset_config
    from megatron_lc.train.config import OptimSection, ScheduleSection
    from megatron_lc.train.optim import build_optimizer, lr_multiplier

    model = Transformer(preset_config("tiny"))
    decay, no_decay = build_optimizer(model, OptimSection(weight_decay=0.1)).param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim == 2 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    cosine = ScheduleSection(kind="cosine", warmup_steps=2, min_lr_ratio=0.1)
    assert [round(lr_multiplier(s, 6, cosine), 6) for s in range(6)] == [0.5, 1.0, 1.0, 0.775, 0.325, 0.1]
    assert [lr_multiplier(s, 6, ScheduleSection(kind="warmup_constant", warmup_steps=4)) for s in (0, 3, 5)] == \
        [0.25, 1.0, 1.0]
    assert {lr_multiplier(s, 6, ScheduleSection(kind="constant", warmup_steps=3)) for s in range(6)} == {1.0}


# ---- checkpoints ------------------------------------------------------------------------------------------------
def _resume_job(rank, world, corpus, overrides):
    """10 steps, stop (checkpoint), then a new Trainer with resume=auto runs to 20."""
    first = _job(rank, world, corpus, overrides, until=10)
    second = _job(rank, world, corpus, [*overrides, "checkpoint.resume=auto"])
    return first, second


def test_exact_resume(corpus, tmp_path):
    common = ["train.steps=20", "data.micro_batch_size=2", "checkpoint.every=0"]
    straight = _run(1, corpus, common)[0]
    first, second = run_distributed(_resume_job, 1, corpus, [*common, f"checkpoint.dir={tmp_path}"])[0]
    assert first["end_step"] == 10 and second["start_step"] == 10 and second["steps"] == list(range(11, 21))
    np.testing.assert_allclose(first["loss"] + second["loss"], straight["loss"], atol=1e-6, rtol=0)


def test_checkpoint_from_two_processes_loads_in_one(corpus, tmp_path):
    """Saved by 2 FSDP ranks at step 3, loaded by 1 process: the loss of step 4 is the 2-process run's."""
    common = ["train.steps=6", f"checkpoint.dir={tmp_path}", "checkpoint.keep=5"]
    two = _run(2, corpus, [*common, "data.micro_batch_size=2", "checkpoint.every=3"], until=4)
    one = _run(1, corpus, [*common, "data.micro_batch_size=4", f"checkpoint.resume={tmp_path}/step_3"], until=4)[0]
    assert one["start_step"] == 3 and one["steps"] == [4]
    assert one["loss"][0] == pytest.approx(two[0]["loss"][3], abs=1e-5)


class _InjectedFault(RuntimeError):
    pass


def _crash_before_marker(path):
    raise _InjectedFault(f"crashing after the shards of {path}, before its marker")


def _crash_job(rank, world, corpus, overrides):
    """2 steps; then a run whose save crashes after the shards are written, before the marker; then a resume."""
    from megatron_lc.checkpoint import folders

    _job(rank, world, corpus, overrides, until=2)
    write_marker = folders.write_marker
    folders.write_marker = _crash_before_marker
    try:
        _job(rank, world, corpus, [*overrides, "checkpoint.resume=auto"], until=4)
        crashed = False
    except _InjectedFault:
        crashed = True
    finally:
        folders.write_marker = write_marker
    return crashed, _job(rank, world, corpus, [*overrides, "checkpoint.resume=auto"], until=3)


def test_crashed_save_leaves_the_previous_checkpoint(corpus, tmp_path, capfd):
    from megatron_lc.checkpoint.folders import find_checkpoints

    overrides = ["train.steps=6", "data.micro_batch_size=2", f"checkpoint.dir={tmp_path}", "checkpoint.every=2"]
    crashed, after = run_distributed(_crash_job, 1, corpus, overrides)[0]
    assert crashed
    assert after["start_step"] == 2 and after["steps"] == [3]  # resume auto took step_2, not the broken step_4
    assert f"ignoring incomplete checkpoint {tmp_path}/step_4" in capfd.readouterr().out
    complete, incomplete = find_checkpoints(str(tmp_path))
    assert [s for s, _ in complete] == [2, 3] and incomplete == [f"{tmp_path}/step_4"]


def _sigterm_job(rank, world, corpus, overrides):
    import signal

    from megatron_lc.train.trainer import Trainer

    trainer = Trainer(_cfg(corpus, overrides))
    trainer.grad_hook = lambda t: os.kill(os.getpid(), signal.SIGTERM) if t.step == 3 else None
    history = trainer.run()
    return [h["step"] for h in history]


def test_sigterm_checkpoints_and_stops(corpus, tmp_path):
    steps = run_distributed(_sigterm_job, 1, corpus, ["train.steps=10", f"checkpoint.dir={tmp_path}"])[0]
    assert steps == [1, 2, 3] and os.path.isfile(tmp_path / "step_3" / "COMPLETE")


# ---- bad steps and bad configs --------------------------------------------------------------------------------
def _skip_job(rank, world, corpus, overrides):
    from megatron_lc.train.trainer import Trainer, TrainingAborted

    trainer = Trainer(_cfg(corpus, overrides))
    original = trainer.loader.next

    def no_targets_at_step_2():
        batch = original()
        if trainer.step == 1:  # the batch of step 2
            batch["labels"].fill_(-100)
        return batch

    trainer.loader.next = no_targets_at_step_2
    history = trainer.run(until=3)
    out = {"skipped": [h["train/skipped_steps"] for h in history], "has_loss": ["train/loss" in h for h in history]}
    with torch.no_grad():
        next(trainer.model.parameters()).fill_(float("nan"))  # every later step has a NaN loss
    try:
        trainer.run()
        out["aborted"] = None
    except TrainingAborted as e:
        out["aborted"] = str(e)
    return out


def test_skipped_and_aborted_steps(corpus):
    out = run_distributed(_skip_job, 1, corpus, ["train.steps=20", "train.max_bad_steps_in_row=3"])[0]
    assert out["skipped"] == [0, 1, 1] and out["has_loss"] == [True, False, True]
    assert out["aborted"] and "3 steps in a row had a non-finite loss or gradient" in out["aborted"]


@pytest.mark.parametrize("overrides,message", [
    (["optim.lrr=1"], "unknown key 'optim.lrr' in the command-line override optim.lrr=1: did you mean optim.lr?"),
    (["parallel.tp=3"], "parallel.tp=3 does not divide model num_heads=4"),
    (["parallel.cp_mode=ulysses", "parallel.cp=8"], "its degree 8 x tp=1 must divide num_heads=4"),
    (["parallel.cp_mode=hybrid", "parallel.cp=4"], "hybrid needs parallel.cp_ulysses >= 2 dividing cp=4"),
    (["parallel.cp_ulysses=2", "parallel.cp=4"], "applies to cp_mode=hybrid only"),
    (["schedule.kind=linear"], "schedule.kind must be one of cosine, constant, warmup_constant"),
    (["eval.every=10"], "eval.every > 0 needs data.val_tokens"),
    (["optim.lr"], "must look like section.key=value"),
])
def test_config_errors_name_the_key(corpus, overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _cfg(corpus, overrides)


def test_world_size_must_fit_the_mesh(corpus):
    cfg = _cfg(corpus, ["parallel.cp=2", "parallel.dp_shard=2"])
    assert cfg.check_world(4)["dp_shard"] == 2
    with pytest.raises(ConfigError, match="= 4 but the world has 3 processes"):
        cfg.check_world(3)
    with pytest.raises(ConfigError, match="global_batch_tokens=100 is not a multiple"):
        _cfg(corpus, ["data.global_batch_tokens=100"]).check_world(1)
    assert _cfg(corpus, ["data.global_batch_tokens=256", "data.micro_batch_size=2"]).check_world(2)["accumulation"] == 2


# ---- conversion to and from HF folders ----------------------------------------------------------------------------
def _params_job(rank, world, corpus, overrides, train=False):
    """The model's full parameters after building a Trainer (and, with ``train``, after its run)."""
    from torch.distributed.tensor import DTensor

    from megatron_lc.train.trainer import Trainer

    trainer = Trainer(_cfg(corpus, overrides))
    if train:
        trainer.run()
    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
            for n, p in trainer.model.named_parameters()}


def test_convert_checkpoint_to_hf_and_back(corpus, tmp_path):
    """A checkpoint written by 2 FSDP ranks -> HF folder (transformers-loadable) with the trained weights; that HF
    folder -> a weights-only checkpoint a new run starts from (step 0, fresh optimizer)."""
    from megatron_lc.cli import main  # here, not at the top: every spawned rank imports this module
    from megatron_lc.model import load_hf

    run = tmp_path / "run"
    trained = run_distributed(_params_job, 2, corpus, ["train.steps=2", "data.micro_batch_size=2",
                                                       f"checkpoint.dir={run}"], True)[0]
    assert main(["convert", "--from", str(run / "step_2"), "--to", str(tmp_path / "hf")]) == 0
    exported = dict(load_hf(str(tmp_path / "hf")).named_parameters())
    assert exported.keys() == trained.keys()
    for name, value in trained.items():
        assert torch.equal(exported[name], value), name
    assert main(["convert", "--from", str(tmp_path / "hf"), "--to", str(tmp_path / "warm" / "step_0")]) == 0
    warm = run_distributed(_params_job, 1, corpus, [f"checkpoint.resume={tmp_path}/warm/step_0"])[0]
    for name, value in trained.items():
        assert torch.equal(warm[name], value), name


LEGACY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "legacy_checkpoint")


def test_checkpoint_written_before_the_move_resumes_and_converts(corpus, tmp_path):
    """tests/data/legacy_checkpoint (written by the code before megatron_lc/checkpoint/): a run resumed from its
    step_2 makes the loss of step 3 that the old run made; converted to HF it gives the old conversion's tensors;
    model.init_from=step_2 starts a run from its weights."""
    from safetensors.torch import load_file

    from megatron_lc.cli import main
    from megatron_lc.model import load_hf

    with open(os.path.join(LEGACY, "expected.json")) as f:
        expected = json.load(f)
    resumed = _run(1, corpus, [*expected["overrides"], f"checkpoint.resume={LEGACY}/step_2"], until=3)[0]
    assert resumed["start_step"] == 2 and resumed["steps"] == [3]
    assert resumed["loss"][0] == pytest.approx(expected["loss"][2], abs=1e-6)
    assert main(["convert", "--from", os.path.join(LEGACY, "step_2"), "--to", str(tmp_path / "hf")]) == 0
    old = load_file(os.path.join(LEGACY, "hf", "model.safetensors"))
    new = load_file(tmp_path / "hf" / "model.safetensors")
    assert old.keys() == new.keys() and all(torch.equal(old[k], new[k]) for k in old)
    warm = run_distributed(_params_job, 1, corpus, [*expected["overrides"], f"model.init_from={LEGACY}/step_2"])[0]
    hf = dict(load_hf(os.path.join(LEGACY, "hf")).named_parameters())
    assert warm.keys() == hf.keys() and all(torch.equal(warm[k], hf[k]) for k in hf)


@pytest.mark.slow
def test_compiled_blocks_equal_eager(corpus):
    """train.compile=true (torch.compile per block, ~15 s of compiling on CPU): losses and grad norms of 3 steps
    equal eager at atol=rtol=1e-5."""
    common = ["train.steps=3", "data.micro_batch_size=2"]
    eager = _run(1, corpus, common)[0]
    compiled = _run(1, corpus, [*common, "train.compile=true"])[0]
    for key in ("loss", "norm"):
        np.testing.assert_allclose(compiled[key], eager[key], atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
def test_gpu_bf16_run_learns(corpus):
    """One GPU (NCCL): bf16 FSDP2 mixed precision, 30 steps; the loss falls and no step is skipped."""
    res = run_distributed(_job, 1, corpus, ["train.steps=30", "train.dtype=bfloat16", "train.device=cuda",
                                            "data.micro_batch_size=4"], None, False, False, backend="nccl",
                          timeout=300)[0]
    assert res["loss"][-1] < 0.7 * res["loss"][0] and res["skipped"][-1] == 0, res["loss"]
