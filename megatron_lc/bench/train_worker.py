"""The worker of ``megatron-lc bench train``: one (contender, S) case in this process, its numbers as one JSON line.

    python -m megatron_lc.bench.train_worker SPEC   # SPEC: the JSON of train.case_spec; run by train.measure

A fresh process per case keeps peaks from leaking between cases, and an out-of-memory kills only that case.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import threading
import time

import torch

from ..memory import PeakMemory, current_memory_bytes
from ..model.config import ModelConfig

RESULT_PREFIX = "BENCH_TRAIN_RESULT "
GIB = 2**30


class _RssWatchdog:
    """CPU: end the process (reporting ``over_budget``) as soon as its RSS passes ``budget`` bytes, so a probe of
    --find-max-len never takes the machine's memory (and the OOM killer) with it."""

    def __init__(self, budget: int):
        self.budget, self.done = budget, threading.Event()
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        cpu = torch.device("cpu")
        while not self.done.wait(0.005):
            rss = current_memory_bytes(cpu)
            if rss > self.budget:
                _emit({"status": "over_budget", "peak_abs_gib": rss / GIB,
                       "error": f"RSS {rss / GIB:.2f} GiB passed the budget of {self.budget / GIB:.2f} GiB"})
                os._exit(3)

    def stop(self) -> None:
        self.done.set()


def _emit(result: dict) -> None:
    sys.stdout.write(RESULT_PREFIX + json.dumps(result) + "\n")
    sys.stdout.flush()


def _tensor_bytes(t: torch.Tensor) -> int:
    local = t.to_local() if hasattr(t, "to_local") else t  # an FSDP2 DTensor: this rank's shard
    return local.numel() * local.element_size()


def make_batch(config: ModelConfig, batch: int, seq_len: int,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Random tokens ``[B, S]`` int64 and our aligned labels: the targets of positions 0..S-2 and -100 at S-1, i.e.
    the S-1 targets HF's internal shift takes from ``labels=tokens``: both contenders do the same work."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, config.vocab_size, (batch, seq_len), generator=g)
    labels = torch.cat([tokens[:, 1:], torch.full((batch, 1), -100)], dim=1)
    return tokens.to(device), labels.to(device)


def _build_ours(spec: dict, config: ModelConfig, device: torch.device, dtype: torch.dtype):
    """Our Transformer built as the trainer builds it (meta device, parallelize, materialize) in a one-process
    group; returns (model, loss function of no arguments, {op: kernel}, notes)."""
    from ..distributed import init_process_group
    from ..model.transformer import Transformer
    from ..parallel.parallel_dims import ParallelDims
    from ..parallel.parallelize import ParallelizeConfig, materialize, parallelize

    init_process_group(device.type, world_size=1)  # unless one exists
    dims = ParallelDims(dp_replicate=1, dp_shard=1, cp=1, tp=1, world_size=1)
    dims.build_mesh(device.type)
    with torch.device("meta"):
        model = Transformer(config)
    # "mixed" (the trainer): fp32 weights and grads, FSDP2 casts to ``dtype`` for compute. "pure": weights and
    # grads in ``dtype``, the bytes per parameter of an HF model loaded in that dtype.
    mixed = spec.get("ours_params", "mixed") == "mixed" and dtype != torch.float32
    _, chosen = parallelize(model, dims, ParallelizeConfig(kernels="auto", activation_checkpointing=spec["ac"],
                                                           param_dtype=dtype if mixed else None))
    materialize(model, device, seed=0)
    if not mixed:
        model.to(dtype)  # RoPE tables are not buffers: they stay fp32 (see model/rope.py)
    model.train()
    tokens, labels = make_batch(config, spec["batch"], spec["seq_len"], device)
    notes = {}
    n = spec.get("cp_rank_of")
    if n:
        from ..parallel.cp_sharding import chunk_ids
        from ..parallel.simulated_ring import shard_batch_for_rank, simulated_ring_attention

        rank = spec["cp_rank"]
        local = shard_batch_for_rank({"input_ids": tokens, "labels": labels}, rank, n)
        model.set_attention(simulated_ring_attention(rank, n))
        chosen["attention"] = f"ring schedule of rank {rank} of a simulated CP={n} ring (blocks: ops.attention_lse)"
        notes["cp_chunks"] = list(chunk_ids(rank, n))

        def loss_fn():
            return model(local["input_ids"], position_ids=local["position_ids"], labels=local["labels"])
    else:
        def loss_fn():
            return model(tokens, labels=labels)
    return model, loss_fn, chosen, notes


def _build_hf(spec: dict, config: ModelConfig, device: torch.device, dtype: torch.dtype, liger: bool):
    """transformers' Qwen2ForCausalLM of the same config and dtype, gradient checkpointing on, no KV cache (with
    Liger-Kernel's Qwen2 patches when ``liger``); returns (model, loss function of no arguments, kernels, notes)."""
    import transformers

    from ..model.config import to_hf_config

    if liger:
        from liger_kernel.transformers import apply_liger_kernel_to_qwen2

        apply_liger_kernel_to_qwen2()  # patches the Qwen2 classes: must run before the model is built
    # use_cache set here, not by assigning the attribute afterwards: pylint's duplicate-code test would have astroid
    # infer that assignment's target through all of transformers (100 s of its run).
    hf_fields = to_hf_config(config, str(dtype).replace("torch.", "")) | {"use_cache": False}
    hf_config = transformers.Qwen2Config(**hf_fields)
    with torch.device(device):
        model = transformers.Qwen2ForCausalLM._from_config(hf_config, dtype=dtype, attn_implementation="sdpa")
    model.gradient_checkpointing_enable()
    model.train()
    tokens, _ = make_batch(config, spec["batch"], spec["seq_len"], device)

    def loss_fn():
        # HF shifts inside: labels=tokens gives the targets of positions 0..S-2, as our aligned labels do.
        return model(input_ids=tokens, labels=tokens, use_cache=False).loss

    kernels = "Liger-Kernel (Qwen2 patches)" if liger else "transformers (sdpa attention)"
    return model, loss_fn, {"all": kernels}, {"transformers": transformers.__version__}


def _device_of(spec: dict) -> torch.device:
    device = torch.device(spec["device"])
    if device.type == "cuda":
        device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
        torch.cuda.set_device(device)
    return device


def run_case(spec: dict) -> dict:
    """Build one contender and time its training steps; returns the case's numbers (see megatron_lc.bench.train).

    ``spec``: contender, config (ModelConfig fields), seq_len, batch, dtype, device, ac, optimizer, warmup, repeats,
    cp_rank_of (None or N), cp_rank, memory_budget_bytes (CPU watchdog, or None), ours_params.
    """
    from ..model.flops import train_flops_per_token
    from ..train.metrics import mfu, peak_flops_per_second

    device = _device_of(spec)
    dtype = getattr(torch, spec["dtype"])
    config = ModelConfig(**spec["config"])
    watchdog = None
    if device.type == "cpu" and spec.get("memory_budget_bytes"):
        watchdog = _RssWatchdog(spec["memory_budget_bytes"])
    name = spec["contender"]
    if name == "ours":
        model, loss_fn, kernels, notes = _build_ours(spec, config, device, dtype)
    else:
        model, loss_fn, kernels, notes = _build_hf(spec, config, device, dtype, liger=name == "hf-liger")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, foreach=False) if spec["optimizer"] else None

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def step() -> torch.Tensor:
        model.zero_grad(set_to_none=True)  # the trainer's order: gradients do not live across steps
        loss = loss_fn()
        loss.backward()
        if optimizer is not None:
            optimizer.step()
        return loss.detach()

    times, losses = [], []
    with PeakMemory(device) as mem:  # the peak of the steps only
        for i in range(spec["warmup"] + spec["repeats"]):
            sync()
            start = time.perf_counter()
            loss = step()
            sync()
            if i >= spec["warmup"]:
                times.append(time.perf_counter() - start)
            losses.append(loss)
    if watchdog is not None:
        watchdog.stop()
    weights = sum(_tensor_bytes(p) for p in model.parameters())
    grads = sum(_tensor_bytes(p.grad) for p in params if p.grad is not None)
    opt_state = 0
    if optimizer is not None:
        opt_state = sum(_tensor_bytes(t) for state in optimizer.state.values() for t in state.values()
                        if isinstance(t, torch.Tensor))
    seconds = statistics.median(times)
    n = spec.get("cp_rank_of") or 1
    tokens_per_second = spec["batch"] * spec["seq_len"] // n / seconds
    # Model FLOPs of a token of the global sequence; a CP rank does 1/N of the sequence's work (zigzag balances it).
    flops_per_token = train_flops_per_token(config, spec["seq_len"])
    peak_flops = peak_flops_per_second(device, dtype)
    return {
        "status": "ok", "contender": name, "seq_len": spec["seq_len"], "local_seq_len": spec["seq_len"] // n,
        "layers": config.num_layers, "batch": spec["batch"], "step_ms": 1e3 * seconds,
        "step_ms_all": [1e3 * t for t in times], "tokens_per_second": tokens_per_second,
        "flops_per_token": flops_per_token, "peak_flops": peak_flops,
        "mfu": mfu(tokens_per_second, flops_per_token, peak_flops, 1) if peak_flops else None,
        "weights_gib": weights / GIB, "grads_gib": grads / GIB, "optimizer_gib": opt_state / GIB,
        "static_gib": (weights + grads + opt_state) / GIB, "peak_abs_gib": mem.peak_abs / GIB,
        "base_gib": mem.base / GIB, "peak_extra_gib": (mem.peak - grads - opt_state) / GIB,
        "loss": float(losses[-1]), "kernels": kernels,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU", **notes,
    }


def worker_main(spec: dict) -> int:
    """Run one case and print its JSON line; a CUDA out-of-memory is reported as status "oom"."""
    try:
        result = run_case(spec)
    except torch.OutOfMemoryError as e:
        result = {"status": "oom", "error": str(e).splitlines()[0]}
    finally:
        from ..distributed import destroy_process_group

        destroy_process_group(barrier=False)  # exiting with live gloo/nccl threads aborts the process
    _emit(result)
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m megatron_lc.bench.train_worker SPEC (the JSON of one case; see train.measure)")
    sys.exit(worker_main(json.loads(sys.argv[1])))
