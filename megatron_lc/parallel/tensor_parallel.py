"""Tensor parallelism with Megatron-style sequence parallelism, a vocab-parallel embedding and a vocab-parallel loss.

The layout is TorchTitan's for Llama. On a TP group of t ranks, with sequence parallelism (the default), each block:

    residual stream [B, S/t, hidden] (sequence-sharded, plain tensors)
      -> attn_norm (SequenceParallel) -> all-gather S -> q/k/v colwise: H/t and H_kv/t local heads, plain tensors,
         so RoPE and any attention function (context parallelism included) run unchanged
      -> o_proj rowwise -> reduce-scatter over S -> residual add; the same for mlp_norm, gate/up colwise, down rowwise.

Embedding and lm_head are sharded over the vocabulary (Shard(0) of their [V, hidden] weight, so tied weights stay
one DTensor); the embedding's output is reduce-scattered over S. The final norm's output is all-gathered over S
(the loss needs every token on every rank) and the loss is a chunked vocab-parallel cross-entropy: a rank never
holds more than ``[chunk, V/t]`` logits, and full-vocabulary logits never exist.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_module
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    PrepareModuleOutput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from ..ops.cross_entropy import IGNORE_INDEX, auto_chunk_tokens, check_loss_inputs, chunked_loss_sum


# ---- vocab-parallel loss -----------------------------------------------------------------------------------------
def vocab_parallel_row_stats(logits: torch.Tensor, target: torch.Tensor, has_target: torch.Tensor,
                             group: dist.ProcessGroup) -> tuple[torch.Tensor, torch.Tensor]:
    """``ops.cross_entropy.RowStats`` over a TP group: logits ``[c, V/t]`` are this rank's vocabulary columns.
    Shifts them in place by the global row max; returns lse ``[c]`` and the target logit ``[c]`` (from the rank
    that holds it) of the shifted rows, the same on every rank."""
    row_max = logits.max(dim=-1).values
    dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
    logits.sub_(row_max.unsqueeze(1))
    # One all-reduce for both sums: exp-sum over every shard, and the target logit from its owner (others 0).
    sums = torch.stack([logits.exp().sum(-1), logits.gather(1, target.unsqueeze(1)).squeeze(1) * has_target])
    dist.all_reduce(sums, group=group)
    return sums[0].log(), sums[1]


def vocab_parallel_cross_entropy(hidden: torch.Tensor, weight: DTensor, labels: torch.Tensor,
                                 chunk_tokens: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum and count of the cross-entropy of ``hidden @ weight.T`` with the vocabulary sharded over a TP group.

    hidden ``[N, hidden]`` (fp32/bf16): a DTensor on weight's mesh (any placement; gathered to Replicate) or a plain
    tensor holding all N tokens on every TP rank. weight ``[V, hidden]``: DTensor ``Shard(0)`` on a 1-D TP mesh.
    labels ``[N]`` int64 (the same on every TP rank), -100 ignored. chunk_tokens: tokens per chunk, 0 = automatic.
    Returns (fp32 loss sum, int64 count), identical on every TP rank: the loss of all N tokens, not to be summed
    again over TP. Same signature as ``ops.linear_cross_entropy``, so it can be a ``Transformer.loss_fn``.
    """
    if not isinstance(weight, DTensor) or weight.device_mesh.ndim != 1 or tuple(weight.placements) != (Shard(0),):
        got = f"{weight.device_mesh.ndim}-D mesh, {weight.placements}" if isinstance(weight, DTensor) else "a tensor"
        raise ValueError(f"vocab_parallel_cross_entropy needs weight as a DTensor Shard(0) on a 1-D TP mesh, got "
                         f"{got}: apply apply_tensor_parallel to the model, or use ops.linear_cross_entropy")
    check_loss_inputs(hidden, weight, labels)
    mesh = weight.device_mesh
    if not isinstance(hidden, DTensor):
        hidden = DTensor.from_local(hidden, mesh, [Replicate()], run_check=False)
    elif hidden.device_mesh != mesh:
        raise ValueError(f"hidden lives on {hidden.device_mesh}, weight on {mesh}: both must be on the TP mesh")
    if not hidden.placements[0].is_replicate():  # a no-op redistribute would all-reduce the gradient below
        hidden = hidden.redistribute(mesh, [Replicate()])
    # Each rank's gradient is its vocabulary shard's summand of d(loss)/d(hidden): marked Partial, DTensor reduces it
    # on the way back (a reduce-scatter to the sequence shards under SP, an all-reduce for a plain hidden).
    h = hidden.to_local(grad_placements=[Partial()])
    w = weight.to_local()
    # Each rank's chunk loop sees [chunk, V/t] logits; the row statistics are reduced over the group.
    group = mesh.get_group()
    loss_sum = chunked_loss_sum(h, w, labels, chunk_tokens or auto_chunk_tokens(w.shape[0]),
                                vocab_start=mesh.get_local_rank() * w.shape[0],
                                row_stats=lambda *stats: vocab_parallel_row_stats(*stats, group))
    return loss_sum, (labels != IGNORE_INDEX).sum()


# ---- the model transform -----------------------------------------------------------------------------------------
def _replicate_norm(norm: nn.Module, mesh: DeviceMesh, local_output: bool) -> None:
    """Norm on a replicated stream (no SP): Replicate DTensor weights, as every other parameter is a DTensor."""
    distribute_module(
        norm, mesh,
        input_fn=lambda mod, inputs, mesh: tuple(DTensor.from_local(x, mesh, [Replicate()], run_check=False)
                                                 for x in inputs),
        output_fn=(lambda mod, out, mesh: out.to_local()) if local_output else None,
    )


def _sequence_check(tp: int):
    """Forward pre-hook of the embedding: SP shards S evenly (an uneven S would be mis-gathered)."""

    def check(module, args):
        length = args[0].shape[1]
        if length % tp:
            raise ValueError(f"sequence length {length} is not divisible by the tensor parallel degree {tp}: "
                             f"sequence parallelism splits it evenly; pad the batch to a multiple of {tp}")
    return check


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh, *, sequence_parallel: bool = True) -> None:
    """Shard a ``Transformer`` (eager or built on the meta device) over the 1-D ``tp_mesh`` in place.

    Attention/MLP weights become DTensors (colwise q/k/v/gate/up, rowwise o/down), embedding and lm_head are
    vocab-sharded (and stay tied when the config ties them), norms are replicated (attention sees H/t local heads
    through its -1 reshape), and ``model.loss_fn`` becomes ``vocab_parallel_cross_entropy``. With
    ``sequence_parallel`` the residual stream is sharded over the sequence (S must then divide by the TP degree).
    Every TP rank must feed the same batch. A meta-built model is then filled by ``parallelize.materialize``.
    ``hidden_states`` then returns a Replicate DTensor; logits (no labels) stay plain full ``[B, S, V]`` tensors.
    Norm weight gradients are Partial DTensors (reduced lazily by full_tensor, clip_grad_norm_, optimizers, FSDP2).
    """
    if tp_mesh.ndim != 1:
        raise ValueError(f"tp_mesh must be 1-D, got {tp_mesh.ndim}-D {tp_mesh}: pass mesh['tp']")
    if isinstance(model.embed.weight, DTensor):
        raise ValueError("the model's embedding is already a DTensor: apply_tensor_parallel must run once, first")
    tp, cfg = tp_mesh.size(), model.config
    sizes = {name: getattr(cfg, name) for name in ("num_heads", "num_kv_heads", "intermediate_size", "vocab_size")}
    bad = {name: size for name, size in sizes.items() if size % tp}
    if bad:
        fits = [d for d in range(1, cfg.num_kv_heads + 1) if all(size % d == 0 for size in sizes.values())]
        raise ValueError(f"tensor parallel degree {tp} does not divide " + ", ".join(f"{k}={v}" for k, v in bad.items())
                         + f": use a TP degree among {fits} (or pad the vocabulary / change the model shape)")
    stream = Shard(1) if sequence_parallel else Replicate()  # layout of the residual stream between blocks

    for block in model.layers:
        # attn(x, cos, sin, cache, layer): only x is laid out; cos/sin are plain full-sequence tables.
        plan = {
            "attn": PrepareModuleInput(input_layouts=(stream, None, None, None, None),
                                       desired_input_layouts=(Replicate(), None, None, None, None)),
            "attn.q_proj": ColwiseParallel(),
            "attn.k_proj": ColwiseParallel(),
            "attn.v_proj": ColwiseParallel(),
            "attn.o_proj": RowwiseParallel(output_layouts=stream),
            "mlp": PrepareModuleInput(input_layouts=(stream,), desired_input_layouts=(Replicate(),)),
            "mlp.gate_proj": ColwiseParallel(),
            "mlp.up_proj": ColwiseParallel(),
            "mlp.down_proj": RowwiseParallel(output_layouts=stream),
        }
        if sequence_parallel:
            plan.update(attn_norm=SequenceParallel(), mlp_norm=SequenceParallel())
        else:
            _replicate_norm(block.attn_norm, tp_mesh, local_output=True)
            _replicate_norm(block.mlp_norm, tp_mesh, local_output=True)
        parallelize_module(block, tp_mesh, plan)  # attention reshapes with -1 heads: it needs no local head count

    parallelize_module(model, tp_mesh, {
        # Vocab-sharded rows; each token's row lives on one rank, so the output is reduce-scattered (or all-reduced).
        "embed": RowwiseParallel(input_layouts=Replicate(), output_layouts=stream),
        # Only for logits (labels=None, e.g. eval): the loss uses lm_head.weight directly, never lm_head(h).
        "lm_head": ColwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
    })
    if sequence_parallel:
        parallelize_module(model.norm, tp_mesh, SequenceParallel())
        # The loss needs every token on every rank: gather the final hidden states over the sequence here.
        parallelize_module(model.norm, tp_mesh, PrepareModuleOutput(
            output_layouts=Shard(1), desired_output_layouts=Replicate(), use_local_output=False))
        model.embed.register_forward_pre_hook(_sequence_check(tp), prepend=True)
    else:
        _replicate_norm(model.norm, tp_mesh, local_output=False)
    model.tie_weights()  # parallelize_module made a new Parameter for each of embed and lm_head
    model.loss_fn = vocab_parallel_cross_entropy
