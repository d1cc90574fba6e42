"""parallelize(model, dims, mesh, ...): the one place that turns a plain Transformer into a parallel one.

Order (DESIGN.md): tensor parallel (+ sequence parallel, vocab-parallel embedding and loss) -> context parallel
(attention swap) -> activation checkpointing -> torch.compile per block -> FSDP2 over dp_shard x cp (HSDP when
dp_replicate > 1). The model is built on the meta device first; ``materialize`` then allocates the local shards
and fills them from the per-parameter seeded init (or copies given full weights), so every layout gives the
weights of an eager build.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, distribute_tensor

from .checkpointing import apply_activation_checkpointing
from .context_parallel import ContextParallel
from .dims import ParallelDims


def apply_fsdp(model: nn.Module, mesh: DeviceMesh, flat: dict[str, DeviceMesh], dims: ParallelDims,
               param_dtype: torch.dtype | None) -> None:
    """FSDP2 ``fully_shard`` each block, then the root (embedding, final norm, lm_head), over dp_shard x cp, with
    HSDP replication over dp_replicate. Gradients are reduced in fp32; ``param_dtype`` (e.g. bf16) is the dtype
    the unsharded parameters take for compute, while the sharded fp32 ones are what the optimizer updates."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    fsdp_mesh = mesh["dp_replicate", "dp_shard_cp"] if dims.dp_replicate > 1 else flat["dp_shard_cp"]
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for i, block in enumerate(model.layers):
        # The last block's parameters are needed first in backward: keep them unsharded after forward.
        fully_shard(block, mesh=fsdp_mesh, mp_policy=policy, reshard_after_forward=i < len(model.layers) - 1)
    fully_shard(model, mesh=fsdp_mesh, mp_policy=policy)


def parallelize(model: nn.Module, dims: ParallelDims, mesh: DeviceMesh, flat: dict[str, DeviceMesh], *,
                cp_mode: str = "ring", cp_layout: str = "zigzag", cp_pad: bool = True,
                activation_checkpointing: str = "none", ac_every: int = 1, compile: bool = False,
                param_dtype: torch.dtype | None = None, pad_id: int = 0, kernels: str | dict = "torch",
                device: torch.device | str = "cpu") -> tuple[ContextParallel | None, dict[str, str]]:
    """Choose the ops' kernels, then apply TP, CP, activation checkpointing, compile and FSDP2 to ``model`` (built
    on the meta device) in place; ``mesh`` and ``flat`` come from ``ParallelDims.build_mesh``. Returns the
    ContextParallel transform (which shards batches; None when cp == 1) and {op: what computes it}."""
    from ..ops.dispatch import apply_kernels

    # Under sequence parallelism the norms see DTensors, which a Triton kernel cannot take: they stay torch.
    chosen = apply_kernels(model, kernels, device, skip=("rmsnorm",) if dims.tp > 1 else ())
    if dims.tp > 1:
        from .tensor_parallel import apply_tensor_parallel

        apply_tensor_parallel(model, mesh["tp"])
        chosen.update(rmsnorm="torch (tensor parallel)", linear_cross_entropy="vocab-parallel torch")
        for block in model.layers:  # the tiled MLP calls F.linear on the weights, past the TP modules' hooks
            block.mlp.tile_tokens = -1
        chosen["mlp"] = "untiled (tensor parallel)"
    cp = None
    if dims.cp > 1:
        if (cp_mode == "hybrid") != (dims.cp_ulysses > 1):
            raise ValueError(f"cp_mode={cp_mode} with a Ulysses degree of {dims.cp_ulysses}: hybrid needs "
                             f"parallel.cp_ulysses > 1, the other modes cp_ulysses = 1")
        cp = ContextParallel(dims.cp_mesh(mesh), mode=cp_mode, layout=cp_layout, pad=cp_pad, pad_id=pad_id)
        cp.apply(model)
        chosen["attention"] = f"{cp_mode} over cp={dims.cp} (blocks: ops.attention_lse)"
    apply_activation_checkpointing(model, activation_checkpointing, ac_every)
    if compile:
        for block in model.layers:
            block.compile()
    if dims.dp_replicate * dims.fsdp > 1 or param_dtype not in (None, torch.float32):
        apply_fsdp(model, mesh, flat, dims, param_dtype)
    return cp, chosen


@torch.no_grad()
def materialize(model: nn.Module, device: torch.device, seed: int,
                full_weights: dict[str, torch.Tensor] | None = None) -> None:
    """Allocate a meta-built (and possibly sharded) model on ``device`` and fill every parameter: each rank takes
    its shard of the full tensor that ``model.initial_value(name, shape, seed)`` draws (or of ``full_weights[name]``,
    e.g. loaded from an HF folder). Equal, bit for bit, to an eager ``Transformer(config, seed)`` on one process."""
    model.to_empty(device=device)
    for name, param in model.named_parameters():
        if full_weights is not None:
            if name not in full_weights:
                raise KeyError(f"no weight for parameter {name!r} among the {len(full_weights)} given")
            full = full_weights[name]
        else:
            full = model.initial_value(name, param.shape, seed)
        if tuple(full.shape) != tuple(param.shape):
            raise ValueError(f"weight {name}: shape {tuple(full.shape)} does not match the model's {tuple(param.shape)}")
        if isinstance(param, DTensor):
            # Every rank holds the same full tensor, so each takes its shard locally (src_data_rank=None: no
            # broadcast from a source rank).
            local = distribute_tensor(full.to(device, param.dtype), param.device_mesh, param.placements,
                                      src_data_rank=None).to_local()
            param.to_local().copy_(local)
        else:
            param.copy_(full)
