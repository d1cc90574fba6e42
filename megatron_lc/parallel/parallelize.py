"""parallelize(model, parallel_dims, cfg): the one place that turns a plain Transformer into a parallel one.

Order (DESIGN.md, as TorchTitan's ``models/llama3/infra/parallelize.py``): tensor parallel (+ sequence parallel,
vocab-parallel embedding and loss) -> context parallel (attention swap) -> activation checkpointing -> torch.compile
per block -> FSDP2 over dp_shard x cp (HSDP when dp_replicate > 1), each step logged as it is applied. The model is
built on the meta device first; ``materialize`` then allocates the local shards and fills them from the
per-parameter seeded init (or copies given full weights), so every layout gives the weights of an eager build.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from .activation_checkpointing import apply_activation_checkpointing
from .context_parallel import ContextParallel
from .parallel_dims import ParallelDims

logger = logging.getLogger(__name__)


@dataclass
class ParallelizeConfig:
    """What parallelize applies besides the mesh sizes; the trainer fills it from its TrainConfig (same key names)."""

    kernels: str | dict = "auto"
    """auto | torch | triton for every op, or {op: choice} (see megatron_lc.ops.dispatch)."""
    cp_mode: str = "ring"
    """ring | allgather | ulysses | hybrid (hybrid needs ParallelDims.cp_ulysses > 1)."""
    cp_layout: str = "zigzag"
    """zigzag | contiguous, for ring and allgather."""
    cp_pad: bool = True
    """Pad each sample's end (labels -100) to what CP x TP need instead of failing."""
    pad_id: int = 0
    """Token id of that padding."""
    activation_checkpointing: str = "none"
    """none | full | every_k | selective | offload (see activation_checkpointing.py)."""
    ac_every: int = 1
    """k of every_k."""
    compile: bool = False
    """torch.compile each block."""
    param_dtype: torch.dtype | None = None
    """Mixed precision: the dtype FSDP2 casts parameters to for compute (e.g. bf16); None: the parameters' own."""


def apply_fsdp(model: nn.Module, parallel_dims: ParallelDims, param_dtype: torch.dtype | None) -> None:
    """FSDP2 ``fully_shard`` each block, then the root (embedding, final norm, lm_head), over dp_shard x cp, with
    HSDP replication over dp_replicate. Gradients are reduced in fp32; ``param_dtype`` (e.g. bf16) is the dtype
    the unsharded parameters take for compute, while the sharded fp32 ones are what the optimizer updates."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    fsdp_mesh = parallel_dims.get_mesh("fsdp")
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for i, block in enumerate(model.layers):
        # The last block's parameters are needed first in backward: keep them unsharded after forward.
        fully_shard(block, mesh=fsdp_mesh, mp_policy=policy, reshard_after_forward=i < len(model.layers) - 1)
    fully_shard(model, mesh=fsdp_mesh, mp_policy=policy)


def _apply_tp(model: nn.Module, parallel_dims: ParallelDims, chosen: dict[str, str]) -> None:
    from .tensor_parallel import apply_tensor_parallel

    apply_tensor_parallel(model, parallel_dims.get_mesh("tp"))
    chosen.update(rmsnorm="torch (tensor parallel)", linear_cross_entropy="vocab-parallel torch")
    for block in model.layers:  # the tiled MLP calls F.linear on the weights, past the TP modules' hooks
        block.mlp.tile_tokens = -1
    chosen["mlp"] = "untiled (tensor parallel)"
    logger.info("applied tensor parallelism (tp=%d, sequence parallel, vocab-parallel embedding and loss)",
                parallel_dims.tp)


def _apply_cp(model: nn.Module, parallel_dims: ParallelDims, cfg: ParallelizeConfig) -> ContextParallel:
    if (cfg.cp_mode == "hybrid") != (parallel_dims.cp_ulysses > 1):
        raise ValueError(f"cp_mode={cfg.cp_mode} with a Ulysses degree of {parallel_dims.cp_ulysses}: hybrid needs "
                         f"parallel.cp_ulysses > 1, the other modes cp_ulysses = 1")
    cp = ContextParallel(parallel_dims.get_mesh("cp"), mode=cfg.cp_mode, layout=cfg.cp_layout, pad=cfg.cp_pad,
                         pad_id=cfg.pad_id)
    # Sequence parallelism splits each CP shard again by tp: pad for both at once.
    cp.pad_multiple = parallel_dims.seq_len_divisor(cp.layout)
    cp.apply(model)
    logger.info("applied context parallelism (%s over cp=%d, %s layout)", cfg.cp_mode, parallel_dims.cp, cp.layout)
    return cp


def parallelize(model: nn.Module, parallel_dims: ParallelDims,
                cfg: ParallelizeConfig) -> tuple[ContextParallel | None, dict[str, str]]:
    """Choose the ops' kernels, then apply TP, CP, activation checkpointing, compile and FSDP2 to ``model`` (built
    on the meta device) in place, on the meshes of ``parallel_dims`` (``build_mesh`` must have run). Returns the
    ContextParallel transform (which shards batches; None when cp == 1) and {op: what computes it}."""
    from ..ops.dispatch import apply_kernels

    # Under sequence parallelism the norms see DTensors, which a Triton kernel cannot take: they stay torch.
    chosen = apply_kernels(model, cfg.kernels, torch.device(parallel_dims.device_type),
                           skip=("rmsnorm",) if parallel_dims.tp > 1 else ())
    if parallel_dims.tp > 1:
        _apply_tp(model, parallel_dims, chosen)
    cp = None
    if parallel_dims.cp > 1:
        cp = _apply_cp(model, parallel_dims, cfg)
        chosen["attention"] = f"{cfg.cp_mode} over cp={parallel_dims.cp} (blocks: ops.attention_lse)"
    wrapped = apply_activation_checkpointing(model, cfg.activation_checkpointing, cfg.ac_every)
    if wrapped:
        logger.info("applied %s activation checkpointing to %d blocks", cfg.activation_checkpointing, wrapped)
    if cfg.compile:
        for block in model.layers:
            block.compile()
        logger.info("compiled each of the %d blocks with torch.compile", len(model.layers))
    if parallel_dims.fsdp_gradient_divide_factor > 1 or cfg.param_dtype not in (None, torch.float32):
        apply_fsdp(model, parallel_dims, cfg.param_dtype)
        logger.info("applied FSDP2 over %s (parameters for compute in %s)",
                    " x ".join(parallel_dims.get_mesh("fsdp").mesh_dim_names), cfg.param_dtype or "their dtype")
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
