"""Tensor + sequence parallelism on 2 gloo ranks equals one process: loss, every gradient, grad norm, meta init.

All distributed work runs in one spawn (module fixture); each test then checks one property of its results.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.testing import assert_close

from megatron_lc import ops
from megatron_lc.model.config import preset_config
from megatron_lc.model.transformer import Transformer
from tests.dist_utils import run_distributed

SEED = 3
BASE = dataclasses.replace(preset_config("tiny"), vocab_size=256, loss_chunk_tokens=8)  # N=32 tokens: 4 chunks
CASES = {
    "tied_gqa": dataclasses.replace(BASE, tie_word_embeddings=True),  # 4 heads, 2 KV heads
    "untied_mha": dataclasses.replace(BASE, num_kv_heads=4),
    "untied_gqa_auto_chunk": dataclasses.replace(BASE, loss_chunk_tokens=0),
}
NO_SP_CASE = "untied_gqa_no_sp"  # BASE without sequence parallelism
TOL = dict(atol=1e-5, rtol=1e-5)


def _batch(vocab: int):
    gen = torch.Generator().manual_seed(7)
    b, s = 2, 16
    input_ids = torch.randint(0, vocab, (b, s), generator=gen)
    labels = torch.randint(0, vocab, (b, s), generator=gen)
    labels[0, :3] = -100
    labels[1, 9] = -100
    # Packed documents: positions restart mid-sequence.
    position_ids = torch.cat([torch.arange(10), torch.arange(6)]).expand(b, s).clone()
    position_ids[1] = torch.cat([torch.arange(5), torch.arange(11)])
    return input_ids, position_ids, labels


def _train_step(model, params):
    """Loss sum/count, then backward and the clipped grad norm (max_norm large, so it only measures)."""
    input_ids, position_ids, labels = _batch(model.config.vocab_size)
    loss, count = model(input_ids, position_ids, labels, reduction="sum")
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm=1e6)
    return loss.detach(), count, norm


def _full(t):
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _tp_model_worker(cfg, mesh, sequence_parallel=True):
    from megatron_lc.parallel.parallelize import materialize
    from megatron_lc.parallel.tensor_parallel import apply_tensor_parallel

    with torch.device("meta"):
        model = Transformer(cfg)
    apply_tensor_parallel(model, mesh, sequence_parallel=sequence_parallel)
    materialize(model, torch.device("cpu"), SEED)
    init = {name: _full(p).detach().clone() for name, p in model.named_parameters()}
    loss, count, norm = _train_step(model, list(model.parameters()))
    grads = {name: _full(p.grad) for name, p in model.named_parameters()}
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    out = dict(init=init, loss=loss, count=count, norm=_full(norm), grads=grads,
               stepped={name: _full(p).detach().clone() for name, p in model.named_parameters()},
               local_heads=tuple(p.weight.to_local().shape[0] // cfg.head_dim
                                 for p in (model.layers[0].attn.q_proj, model.layers[0].attn.k_proj)))
    if cfg.tie_word_embeddings:
        out["tied_after_apply"] = model.lm_head.weight is model.embed.weight
        torch.optim.AdamW(model.parameters(), lr=1e-2).step()
        out["tied_after_step"] = (model.lm_head.weight is model.embed.weight,
                                  torch.equal(_full(model.lm_head.weight), _full(model.embed.weight)))
    return out


def _loss_unit_worker(mesh):
    """vocab_parallel_cross_entropy alone: chunked with a token-sharded DTensor hidden (this rank's rows get a
    gradient) vs one chunk with a plain full hidden (all rows); records the local logits shapes."""
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    import megatron_lc.parallel.tensor_parallel as tpm

    gen = torch.Generator().manual_seed(11)
    n, hid, vocab = 20, 16, 64
    hidden, weight = torch.randn(n, hid, generator=gen), torch.randn(vocab, hid, generator=gen) * 0.3
    labels = torch.randint(0, vocab, (n,), generator=gen)
    labels[[2, 5, 17]] = -100
    results = {}
    row_stats = tpm.vocab_parallel_row_stats
    for name, chunk in (("chunked", 8), ("whole", n)):
        shapes = []

        def recording_row_stats(logits, *rest, shapes=shapes):  # sees every chunk's local logits
            shapes.append(logits.shape)
            return row_stats(logits, *rest)

        tpm.vocab_parallel_row_stats = recording_row_stats
        w = distribute_tensor(weight, mesh, [Shard(0)]).requires_grad_()
        h_plain = hidden.clone().requires_grad_()
        rows = h_plain.chunk(mesh.size())[mesh.get_local_rank()]
        h = DTensor.from_local(rows, mesh, [Shard(0)]) if name == "chunked" else h_plain
        loss, count = tpm.vocab_parallel_cross_entropy(h, w, labels, chunk)
        (loss * 0.5).backward()  # a non-unit upstream gradient
        tpm.vocab_parallel_row_stats = row_stats
        results[name] = dict(loss=loss.detach(), count=count, shapes=[tuple(s) for s in shapes],
                             grad_hidden=h_plain.grad, grad_weight=w.grad.full_tensor())
    return dict(inputs=(hidden, weight, labels), **results)


def _bad_degree_worker(mesh):
    from megatron_lc.parallel.tensor_parallel import apply_tensor_parallel

    messages = []
    for cfg in (dataclasses.replace(BASE, num_heads=3, num_kv_heads=3, hidden_size=48),
                dataclasses.replace(BASE, vocab_size=257)):
        with torch.device("meta"):
            model = Transformer(cfg)
        try:
            apply_tensor_parallel(model, mesh)
            messages.append(None)
        except ValueError as e:
            messages.append(str(e))
    model = Transformer(BASE, SEED)
    apply_tensor_parallel(model, mesh)
    ids = torch.zeros(2, 15, dtype=torch.long)
    try:
        model(ids, None, ids, reduction="sum")
        messages.append(None)
    except ValueError as e:
        messages.append(str(e))
    return messages


def _worker(rank, world_size):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("tp",))
    out = {name: _tp_model_worker(cfg, mesh) for name, cfg in CASES.items()}
    out[NO_SP_CASE] = _tp_model_worker(BASE, mesh, sequence_parallel=False)
    out["loss_unit"] = _loss_unit_worker(mesh)
    out["bad_degree"] = _bad_degree_worker(mesh)
    return out


@pytest.fixture(scope="module")
def ranks():
    return run_distributed(_worker, 2, timeout=150)


def _reference(cfg):
    model = Transformer(cfg, SEED)
    loss, count, norm = _train_step(model, list(model.parameters()))
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    return model, loss, count, norm


ALL_CASES = {**CASES, NO_SP_CASE: BASE}


@pytest.mark.parametrize("case", list(ALL_CASES))
def test_meta_init_equals_eager(ranks, case):
    eager = dict(Transformer(ALL_CASES[case], SEED).named_parameters())
    for out in ranks:
        assert out[case]["init"].keys() == eager.keys()
        for name, value in out[case]["init"].items():
            assert torch.equal(value, eager[name].detach()), name


@pytest.mark.parametrize("case", list(ALL_CASES))
def test_loss_grads_norm_and_step_equal_one_process(ranks, case):
    model, loss, count, norm = _reference(ALL_CASES[case])
    for out in ranks:
        r = out[case]
        assert r["local_heads"] == (model.config.num_heads // 2, model.config.num_kv_heads // 2)
        assert_close(r["loss"], loss, **TOL)
        assert torch.equal(r["count"], count)
        assert_close(r["norm"], norm, **TOL)
        for name, param in model.named_parameters():
            assert_close(r["grads"][name], param.grad, **TOL, msg=lambda m, name=name: f"{name}: {m}")
            assert_close(r["stepped"][name], param.detach(), **TOL, msg=lambda m, name=name: f"{name} after SGD: {m}")


def test_tied_weights_stay_tied(ranks):
    for out in ranks:
        assert out["tied_gqa"]["tied_after_apply"]
        assert out["tied_gqa"]["tied_after_step"] == (True, True)


def test_vocab_parallel_loss_chunks_and_shapes(ranks):
    hidden, weight, labels = ranks[0]["loss_unit"]["inputs"]
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, count = ops.linear_cross_entropy(h, w, labels, 0)
    (loss * 0.5).backward()
    for name, chunks in (("chunked", [(8, 32), (8, 32), (4, 32)]), ("whole", [(20, 32)])):
        for out in ranks:
            r = out["loss_unit"][name]
            assert r["shapes"] == chunks  # local logits are [chunk, V/tp], never [N, V]
            assert_close(r["loss"], loss, **TOL)
            assert torch.equal(r["count"], count)
            assert_close(r["grad_weight"], w.grad, **TOL)
        grads = [out["loss_unit"][name]["grad_hidden"] for out in ranks]
        if name == "chunked":  # each rank holds the gradient of its own 10 token rows, zero elsewhere
            assert not grads[0][10:].any() and not grads[1][:10].any()
            grads = [grads[0] + grads[1]] * 2
        for grad in grads:
            assert_close(grad, h.grad, **TOL)


def test_bad_tp_degree_or_length_is_a_clear_error(ranks):
    for out in ranks:
        heads, vocab, length = out["bad_degree"]
        assert heads is not None and "tensor parallel degree 2" in heads and "num_heads=3" in heads
        assert "num_kv_heads=3" in heads and "use a TP degree among [1]" in heads
        assert vocab is not None and "vocab_size=257" in vocab
        assert length is not None and "sequence length 15 is not divisible by the tensor parallel degree 2" in length
