"""The trainer's SFT task (train.task=sft): dataset kinds checked against the task before the model is built, the
SFT config keys checked, and SFT on every parallel layout equal to one process on packed rows whose answer tokens
are spread very unevenly over ranks and micro-batches (some hold none).

Runs happen in spawned gloo processes (tests/dist_utils.py), as in test_trainer.py.
"""
import numpy as np
import pytest
import torch

from dist_utils import run_distributed
from megatron_lc.configtools import ConfigError
from megatron_lc.data.indexed import IndexedDatasetWriter
from megatron_lc.train.config import load_train_config
from test_sft_packing import write_chats

SEQ_LEN = 30  # not a multiple of 4: ring and hybrid CP pad every row
BASE = ["model.preset=tiny", "train.task=sft", "data.sft_packing=reset", f"data.seq_len={SEQ_LEN}",
        "optim.lr=3e-3", "schedule.warmup_steps=2", "train.steps=5", f"data.global_batch_tokens={4 * SEQ_LEN}"]


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    """Chats of three kinds: long ones without answer tokens (a row to themselves: rows with no loss at all),
    mid-length ones whose answer is their second half, and short ones that are all answer."""
    d = tmp_path_factory.mktemp("sft_train")
    rng = np.random.default_rng(4)
    chats = []
    for kind in rng.permutation([0] * 12 + [1] * 16 + [2] * 16):
        n = int(rng.integers(29, 31) if kind == 0 else rng.integers(8, 16) if kind == 1 else rng.integers(2, 5))
        mask = np.zeros(n, bool) if kind == 0 else np.arange(n) >= n // 2 if kind == 1 else np.ones(n, bool)
        chats.append((rng.integers(1, 512, n), mask))
    write_chats(d / "train", chats)
    with IndexedDatasetWriter(d / "plain", vocab_size=512) as w:
        w.add_document(rng.integers(0, 512, 200))
    return str(d)


def _cfg(data, overrides):
    return load_train_config(None, [f"data.train_tokens={data}/train", *BASE, *overrides])


def test_dataset_kind_must_match_the_task(sft_data):
    """An SFT dataset under train.task=pretrain and a plain one under train.task=sft (train or val) stop in
    fit_vocab, the Trainer's first step, naming the key and the fix; SFT-only and pretrain-only keys under the
    other task are refused by the config check."""
    from megatron_lc.train.data_source import fit_vocab, train_samples

    with pytest.raises(ConfigError, match=r"data.train_tokens .*train is an SFT dataset .* set train.task=sft"):
        fit_vocab(_cfg(sft_data, ["train.task=pretrain", "data.sft_packing=naive"]))
    with pytest.raises(ConfigError, match=r"data.train_tokens .*plain is a pretraining dataset .* train.task=sft"):
        fit_vocab(load_train_config(None, [f"data.train_tokens={sft_data}/plain", *BASE]))
    with pytest.raises(ConfigError, match=r"data.val_tokens .*plain is a pretraining dataset"):
        fit_vocab(_cfg(sft_data, [f"data.val_tokens={sft_data}/plain"]))
    with pytest.raises(ConfigError, match=r"set train.task=sft"):  # the samples check on their own too
        train_samples(_cfg(sft_data, ["train.task=pretrain", "data.sft_packing=naive"]).data, 512)
    for overrides, message in (
            (["train.task=pretrain"], "data.sft_packing=reset apply to SFT only, but train.task=pretrain"),
            (["data.sft_truncate=left", "data.sft_packing=naive", "train.task=pretrain"], "data.sft_truncate=left"),
            (["data.reset_position_ids=true"], "data.reset_position_ids=true apply to pretraining only"),
            (["data.sft_packing=ragged"], "data.sft_packing must be one of naive, reset, pad"),
            (["train.task=dpo"], "train.task must be one of pretrain, sft")):
        with pytest.raises(ConfigError, match=message):
            _cfg(sft_data, overrides)


def test_sft_validation_samples_are_answer_tokens(sft_data):
    """data.val_tokens under train.task=sft: the rows in packing order, whose labels over an epoch count every
    answer token that has a position before it (a chat's first token is never a target)."""
    from megatron_lc.data.sft_format import SFTDataset
    from megatron_lc.train.data_source import val_samples

    cfg = _cfg(sft_data, [f"data.val_tokens={sft_data}/train"])
    val = val_samples(cfg.data, 512, cfg.train.task)
    assert not val.shuffle and val.packing == "reset"
    assert [val.row_of(k) for k in range(val.rows_per_epoch)] == list(range(val.rows_per_epoch))
    ds = SFTDataset(f"{sft_data}/train")
    answers = sum(int(ds.get(i)[1][1:].sum()) for i in range(len(ds)))
    assert answers > 0
    assert sum(int((val.sample(k)["labels"] != -100).sum()) for k in range(val.rows_per_epoch)) == answers


def _shard_worker(rank, world, data):
    """This rank's ring-CP shard of the first 4 rows of data_source's SFT samples (30 tokens, padded to 32)."""
    from torch.distributed.device_mesh import init_device_mesh

    from megatron_lc.parallel.context_parallel import ContextParallel
    from megatron_lc.train.data_source import train_samples

    samples = train_samples(_cfg(data, []).data, 512, "sft")
    rows = [samples.sample(k) for k in range(4)]
    batch = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
    cp = ContextParallel(init_device_mesh("cpu", (world,)), mode="ring", pad=True)
    return batch, cp.shard_batch(batch)


def test_cp_padding_is_a_document_of_its_own(sft_data):
    """Ring CP over 2 ranks pads SFT rows of 30 tokens to 32: the padding gets the row's last document id + 1, so
    document_ids stay non-decreasing for document masking; the rest of the row is sharded unchanged."""
    from megatron_lc.parallel.cp_sharding import unshard_sequence

    (full, shard0), (_, shard1) = run_distributed(_shard_worker, 2, sft_data)
    docs = unshard_sequence([shard0["document_ids"], shard1["document_ids"]])
    assert torch.equal(docs[:, :SEQ_LEN], full["document_ids"])
    assert torch.equal(docs[:, SEQ_LEN:], (full["document_ids"][:, -1:] + 1).expand(-1, 2)), docs
    labels = unshard_sequence([shard0["labels"], shard1["labels"]])
    assert torch.equal(labels[:, :SEQ_LEN], full["labels"]) and (labels[:, SEQ_LEN:] == -100).all()


def _job(rank, world, data, overrides):
    """Train 5 SFT steps; return losses, grad norms and the skipped-step count."""
    from megatron_lc.train.trainer import Trainer

    history = Trainer(_cfg(data, overrides)).run()
    nan = float("nan")  # a skipped step (no answer token anywhere) logs neither
    return {"loss": [h.get("train/loss", nan) for h in history],
            "norm": [h.get("train/grad_norm", nan) for h in history],
            "skipped": history[-1]["train/skipped_steps"]}


def _answer_counts(data, micro, dp, cp, layout):
    """Answer tokens [step, micro-batch, dp rank, cp rank] the 5 steps give each rank (the loader's and
    ContextParallel's arithmetic, no processes)."""
    from megatron_lc.parallel.cp_sharding import pad_batch, shard_sequence
    from megatron_lc.train.data_source import train_samples

    samples = train_samples(_cfg(data, []).data, 512, "sft")
    accumulation = 4 // (micro * dp)
    counts = np.zeros((5, accumulation, dp, cp), np.int64)
    for step in range(5):
        for m in range(accumulation):
            first = (step * accumulation + m) * micro * dp
            for r in range(dp):
                labels = torch.stack([samples.sample(first + r * micro + j)["labels"] for j in range(micro)])
                labels = pad_batch({"input_ids": labels, "labels": labels}, 4 if cp > 1 else 1)["labels"]
                for c in range(cp):
                    counts[step, m, r, c] = (shard_sequence(labels, c, cp, layout=layout) != -100).sum()
    return counts


@pytest.mark.slow  # 6 runs of 1-4 processes: measured in the report
def test_sft_layouts_equal_one_process(sft_data):
    """dp=2 (2 accumulated micro-batches, offloaded activation checkpointing), cp=2 ring (selective), cp=2 Ulysses
    (every_k), hybrid cp=4 (2x2) and tp=2 (full) give one process's 5-step losses and grad norms within 1e-5
    (fp32), on rows where ranks and micro-batches hold very different answer-token counts, some none (and step 4's
    rows none at all: skipped on every layout)."""
    for counts in (_answer_counts(sft_data, 1, 2, 1, "zigzag"), _answer_counts(sft_data, 2, 1, 2, "zigzag")):
        # the premise of the test: micro-batches without answer tokens in steps with some, and steps where one
        # rank's answer tokens are a third of another's or fewer
        per_step = counts.reshape(5, counts.shape[1], -1)  # [step, micro-batch, rank]
        assert ((per_step == 0) & (per_step.sum((1, 2), keepdims=True) > 0)).any(), per_step
        totals = per_step.sum(1)  # [step, rank]
        assert (totals.max(1) >= 3 * totals.min(1)).any() and (totals.min(1) == 0).any(), totals
    ref = run_distributed(_job, 1, sft_data, ["data.micro_batch_size=4"], timeout=300)[0]
    # step 4's rows hold no answer token at all: skipped and counted, not a 0/0; every other loss is finite
    assert ref["skipped"] == 1 and np.isnan(ref["loss"][3]) and np.isfinite(np.delete(ref["loss"], 3)).all(), ref
    layouts = [
        (2, ["data.micro_batch_size=1", "train.activation_checkpointing=offload"]),
        (2, ["data.micro_batch_size=2", "parallel.cp=2", "train.activation_checkpointing=selective"]),
        (2, ["data.micro_batch_size=4", "parallel.cp=2", "parallel.cp_mode=ulysses",
             "train.activation_checkpointing=every_k"]),
        (4, ["data.micro_batch_size=1", "parallel.cp=4", "parallel.cp_mode=hybrid", "parallel.cp_ulysses=2"]),
        (2, ["data.micro_batch_size=2", "parallel.tp=2", "train.activation_checkpointing=full"]),
    ]
    for world, overrides in layouts:
        res = run_distributed(_job, world, sft_data, overrides, timeout=300)
        for r in res:
            assert r["skipped"] == 1, (overrides, r)
            torch.testing.assert_close(torch.tensor(r["loss"]), torch.tensor(ref["loss"]), atol=1e-5, rtol=1e-5,
                                       equal_nan=True, msg=lambda m: f"{overrides}: {m}")
            torch.testing.assert_close(torch.tensor(r["norm"]), torch.tensor(ref["norm"]), atol=1e-5, rtol=1e-5,
                                       equal_nan=True, msg=lambda m: f"{overrides}: {m}")
