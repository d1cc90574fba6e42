"""Packed GPT samples, blends and the resumable loader: packing on a hand-written example, EOS options, epochs,
exact resume across DP sizes, disjoint replicas, blend proportions (against megatron-core's own blend indices)
and the errors."""
import warnings

import numpy as np
import pytest
import torch

from megatron_lc.configtools import ConfigError
from megatron_lc.data.indexed import IndexedDataset, IndexedDatasetWriter
from megatron_lc.data.loader import Loader
from megatron_lc.data.samples import BlendedSamples, GPTSamples, blending_indices

EOS = 0


def _write(prefix, docs, vocab_size=70000, meta=None):
    with IndexedDatasetWriter(prefix, vocab_size=vocab_size) as w:
        for d in docs:
            w.add_document(d)
        w.finalize(meta)
    return str(prefix)


def _unique_docs(n_docs=50, first=1, seed=0):
    """Documents of distinct ids (first, first+1, ...), each ending in EOS (0), of random lengths 1..30."""
    rng = np.random.default_rng(seed)
    docs, nxt = [], first
    for _ in range(n_docs):
        k = int(rng.integers(1, 30))
        docs.append(np.concatenate([np.arange(nxt, nxt + k), [EOS]]))
        nxt += k
    return docs


def test_hand_written_packing_and_eos_options(tmp_path):
    """Stream 1 2 3 E 4 5 E 6 7 8 9 E (E = EOS = 0), seq_len 4, file order: 11 // 4 = 2 samples, sharing their
    boundary token: [1 2 3 E | 4] and [4 5 E 6 | 7]."""
    prefix = _write(tmp_path / "ds", [[1, 2, 3, EOS], [4, 5, EOS], [6, 7, 8, 9, EOS]], vocab_size=10)
    plain = GPTSamples(prefix, 4, shuffle=False)
    assert plain.samples_per_epoch == 2
    s0, s1 = plain.sample(0), plain.sample(1)
    assert s0["input_ids"].tolist() == [1, 2, 3, 0] and s0["labels"].tolist() == [2, 3, 0, 4]
    assert s1["input_ids"].tolist() == [4, 5, 0, 6] and s1["labels"].tolist() == [5, 0, 6, 7]
    assert s1["position_ids"].tolist() == [0, 1, 2, 3]
    assert all(t.dtype == torch.int64 and t.shape == (4,) for t in s1.values())
    doc_index, sample_index, shuffle_index = plain.epoch_indices(0)
    assert doc_index.tolist() == [0, 1, 2] and shuffle_index.tolist() == [0, 1]
    assert sample_index.tolist() == [[0, 0], [1, 0], [2, 1]]  # (document position, offset) of tokens 0, 4, 8
    assert plain.sample(2)["input_ids"].tolist() == [1, 2, 3, 0]  # epoch 1, file order again

    opts = GPTSamples(prefix, 4, shuffle=False, eos_token_id=EOS, reset_position_ids=True, eod_mask_loss=True,
                      document_ids=True)
    o1 = opts.sample(1)
    assert o1["input_ids"].tolist() == [4, 5, 0, 6]
    assert o1["position_ids"].tolist() == [0, 1, 2, 0]  # restarts after the EOS
    assert o1["labels"].tolist() == [5, 0, -100, 7]  # no loss on the target after an EOS; EOS as target kept
    assert o1["document_ids"].tolist() == [0, 0, 0, 1]
    o0 = opts.sample(0)
    assert o0["position_ids"].tolist() == [0, 1, 2, 3] and o0["labels"].tolist() == [2, 3, 0, -100]
    # the eos id may come from the dataset meta
    meta_prefix = _write(tmp_path / "meta", [[1, 2, 3, 9], [4, 5, 9]], vocab_size=10, meta={"eos_token_id": 9})
    m = GPTSamples(meta_prefix, 5, shuffle=False, reset_position_ids=True).sample(0)
    assert m["input_ids"].tolist() == [1, 2, 3, 9, 4] and m["position_ids"].tolist() == [0, 1, 2, 3, 0]


def test_epochs_cover_the_stream_once_in_a_seeded_order(tmp_path):
    """Each epoch serves N = (T - 1) // S samples whose inputs are N x S distinct stream tokens (every document
    token but the < S at the epoch's end); epochs reorder; the same seed repeats, another seed differs."""
    docs = _unique_docs()
    total = sum(len(d) for d in docs)
    samples = GPTSamples(_write(tmp_path / "ds", docs), 16, seed=7)
    n = samples.samples_per_epoch
    assert n == (total - 1) // 16
    epochs = []
    for e in range(2):
        inputs = [samples.sample(e * n + k)["input_ids"] for k in range(n)]
        flat = torch.cat(inputs)
        nonzero = flat[flat != EOS]
        assert len(set(nonzero.tolist())) == len(nonzero)  # no stream token twice in an epoch
        assert len(flat) == n * 16 and total - len(flat) < 16
        epochs.append([x[0].item() for x in inputs])
    assert epochs[0] != epochs[1]
    again = GPTSamples(IndexedDataset(tmp_path / "ds"), 16, seed=7)
    other = GPTSamples(IndexedDataset(tmp_path / "ds"), 16, seed=8)
    assert all(torch.equal(again.sample(i)["labels"], samples.sample(i)["labels"]) for i in range(0, 3 * n, 5))
    assert [other.sample(i)["input_ids"][0].item() for i in range(n)] != epochs[0]


def _global_stream(samples, plan, state=None):
    """Run loaders for each (dp_size, micro_batch_size, steps) of ``plan`` in turn, passing the state along, and
    return the served rows in global order (replica 0's micro-batch, replica 1's, ...) and the final state."""
    rows = []
    for dp, mbs, steps in plan:
        loaders = [Loader(samples, mbs, dp, r) for r in range(dp)]
        if state is not None:
            for ld in loaders:
                ld.load_state_dict(state)
        for _ in range(steps):
            for ld in loaders:
                rows.extend(ld.next()["input_ids"])
        states = [ld.state_dict() for ld in loaders]
        assert all(s == states[0] for s in states)  # global: every rank saves the same state
        state = states[0]
    return rows, state


@pytest.mark.parametrize("resume", [(4, 1, 3), (3, 1, 4), (1, 4, 3)])
def test_resume_equals_uninterrupted_across_dp_sizes(tmp_path, resume):
    """5 steps on dp=2 x mbs=2, save, then resume on another dp size: the served samples, in global order, are
    those of one uninterrupted dp=2 run (epoch boundaries crossed on the way)."""
    samples = GPTSamples(_write(tmp_path / "ds", _unique_docs(15)), 16, seed=3)
    first, state = _global_stream(samples, [(2, 2, 5)])
    assert state["consumed"] == 20
    second, _ = _global_stream(GPTSamples(IndexedDataset(tmp_path / "ds"), 16, seed=3), [resume], state)
    straight, _ = _global_stream(samples, [(1, 1, 20 + resume[0] * resume[1] * resume[2])])
    assert samples.samples_per_epoch < len(straight)  # the run crosses an epoch
    assert len(first + second) == len(straight)
    assert all(torch.equal(a, b) for a, b in zip(first + second, straight))


def test_replicas_never_share_a_sample_in_an_epoch(tmp_path):
    """dp=3 replicas x mbs=2 over one epoch: the samples they take are distinct and together the whole epoch."""
    samples = GPTSamples(_write(tmp_path / "ds", _unique_docs()), 8, seed=1)
    n = samples.samples_per_epoch
    taken = [[] for _ in range(3)]
    loaders = [Loader(samples, 2, 3, r) for r in range(3)]
    for _ in range(n // 6):
        for r, ld in enumerate(loaders):
            taken[r].extend(tuple(x.tolist()) for x in ld.next()["input_ids"])
    every = [s for t in taken for s in t]
    assert len(every) == 6 * (n // 6) and len(set(every)) == len(every)
    for a in range(3):
        for b in range(a + 1, 3):
            assert not set(taken[a]) & set(taken[b])
    epoch = {tuple(samples.sample(k)["input_ids"].tolist()) for k in range(n)}
    assert set(every) <= epoch and len(epoch) == n


def test_loader_refuses_other_data(tmp_path):
    a = _write(tmp_path / "a", _unique_docs(seed=0))
    b = _write(tmp_path / "b", _unique_docs(seed=1))
    ld = Loader(GPTSamples(a, 8, seed=0), 2, 2, 0)
    ld.next()
    state = ld.state_dict()
    assert set(state) == {"consumed", "seed", "seq_len", "fingerprint"} and state["consumed"] == 4
    with pytest.raises(ConfigError, match="the training data changed since the checkpoint"):
        Loader(GPTSamples(b, 8, seed=0), 2, 2, 0).load_state_dict(state)
    with pytest.raises(ConfigError, match="data seed is 0 but data.seed is 5"):
        Loader(GPTSamples(a, 8, seed=5), 2, 2, 0).load_state_dict(state)
    with pytest.raises(ConfigError, match="data.seq_len=8, now 16"):
        Loader(GPTSamples(a, 16, seed=0), 2, 2, 0).load_state_dict(state)
    with pytest.raises(ConfigError, match=r"lacks \['seq_len', 'fingerprint'\]"):
        Loader(GPTSamples(a, 8, seed=0), 2, 2, 0).load_state_dict({"consumed": 4, "seed": 0})
    with pytest.raises(ConfigError, match="0 <= dp_rank < dp_size"):
        Loader(GPTSamples(a, 8), 1, 2, 2)
    resumed = Loader(GPTSamples(a, 8, seed=0), 1, 4, 3)
    resumed.load_state_dict(state)
    assert list(resumed.indices()) == [7]


def test_sample_errors(tmp_path):
    prefix = _write(tmp_path / "ds", [[1, 2, EOS], [3, EOS]], vocab_size=10)
    with pytest.raises(ConfigError, match=r"holds 5 tokens, fewer than one sample of seq_len \+ 1 = 6"):
        GPTSamples(prefix, 5)
    with pytest.raises(ConfigError, match="need the EOS id: give eos_token_id"):
        GPTSamples(prefix, 2, eod_mask_loss=True)
    with pytest.raises(ConfigError, match="seq_len must be >= 1"):
        GPTSamples(prefix, 0)
    with pytest.raises(ConfigError, match="data seed must be in"):
        GPTSamples(prefix, 2, seed=-1)
    with pytest.raises(ValueError, match="outside the model's vocabulary of 3"):
        GPTSamples(prefix, 4, vocab_size=3, shuffle=False).sample(0)
    with pytest.raises(ConfigError, match="not found"):
        GPTSamples(tmp_path / "missing", 4)


def _megatron_blend(weights, n):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets import helpers
    src, idx = np.zeros(n, np.int16), np.zeros(n, np.int64)
    w = np.asarray(weights, np.float64) / np.sum(weights)
    helpers.build_blending_indices(src, idx, w, len(weights), n, False)
    return src, idx


@pytest.mark.parametrize("weights", [[0.5, 0.3, 0.2], [7, 2, 1], [0.01, 0.99], [1, 1, 1, 1, 1, 3]])
def test_blend_indices_equal_megatron_and_track_weights(weights):
    """Our error-greedy blend equals megatron-core's C++ build_blending_indices sample for sample (also when built
    in chunks), and after every prefix of n samples each source's count is within 1 of weight x n."""
    n = 5000
    src, idx = blending_indices(weights, n)
    ref_src, ref_idx = _megatron_blend(weights, n)
    np.testing.assert_array_equal(src, ref_src)
    np.testing.assert_array_equal(idx, ref_idx)
    counts = np.zeros(len(weights), np.int64)
    parts = [blending_indices(weights, k, start, counts) for start, k in ((0, 1234), (1234, n - 1234))]
    np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), ref_src)
    w = np.asarray(weights) / np.sum(weights)
    running = np.eye(len(weights))[src].cumsum(0)
    assert np.abs(running - w * np.arange(1, n + 1)[:, None]).max() < 1.0


def test_blended_samples_draw_by_weight_and_resume(tmp_path):
    """Three datasets with disjoint id ranges blended 0.6/0.3/0.1: the source of every served sample (read from
    its ids) follows the weights within 1 sample; a blend resumes exactly; other weights are other data."""
    parts = [GPTSamples(_write(tmp_path / f"d{i}", _unique_docs(20, first=1 + 10000 * i, seed=i)), 8, seed=2)
             for i in range(3)]
    blend = BlendedSamples(parts, [0.6, 0.3, 0.1])
    served = [blend.sample(i)["labels"] for i in range(200)]
    source = np.array([int(x[x != EOS][0]) // 10000 for x in served])
    for n in (10, 50, 200):
        np.testing.assert_allclose(np.bincount(source[:n], minlength=3), np.array([0.6, 0.3, 0.1]) * n, atol=1)
    d, j = blend.locate(150)
    assert torch.equal(served[150], parts[d].sample(j)["labels"])
    first, state = _global_stream(blend, [(2, 3, 4)])
    second, _ = _global_stream(BlendedSamples(parts, [0.6, 0.3, 0.1]), [(3, 1, 4)], state)
    assert all(torch.equal(a, b) for a, b in zip(first + second, [blend.sample(i)["input_ids"] for i in range(36)]))
    with pytest.raises(ConfigError, match="the training data changed"):
        Loader(BlendedSamples(parts, [0.5, 0.3, 0.2]), 1, 1, 0).load_state_dict(state)
    with pytest.raises(ConfigError, match="weights must be finite and > 0"):
        BlendedSamples(parts, [1, 0, 1])
    with pytest.raises(ConfigError, match="one weight per source"):
        BlendedSamples(parts, [1, 1])
    with pytest.raises(ConfigError, match=r"the same seq_len, got \[8, 16\]"):
        BlendedSamples([parts[0], GPTSamples(parts[1].dataset, 16)], [1, 1])


def test_trainer_config_builds_datasets_and_blends(tmp_path):
    """data.train_tokens takes a prefix or either file; data.train_blend builds a blend; the EOS options reach the
    samples; bad blends and a missing dataset fail naming the key or file."""
    from megatron_lc.train.config import load_train_config
    from megatron_lc.train.data_source import train_samples, val_samples

    a = _write(tmp_path / "a", _unique_docs(seed=0))
    b = _write(tmp_path / "b", _unique_docs(seed=1))
    base = ["model.preset=tiny", "data.seq_len=8"]
    for path in (a, a + ".bin", a + ".idx"):
        d = load_train_config(None, [*base, f"data.train_tokens={path}", f"data.val_tokens={b}"]).data
        assert train_samples(d, 70000).fingerprint() == GPTSamples(a, 8).fingerprint()
        assert not val_samples(d, 70000).shuffle
    d = load_train_config(None, [*base, f"data.train_blend=[[3, {a}], [1, {b}]]", "data.eos_token_id=0",
                                 "data.reset_position_ids=true", "data.eod_mask_loss=true"]).data
    blend = train_samples(d, 70000)
    assert isinstance(blend, BlendedSamples) and blend.weights.tolist() == [0.75, 0.25]
    s = next(x for x in map(blend.sample, range(50)) if (x["input_ids"][:-1] == EOS).any())
    is_eos = s["input_ids"] == EOS
    assert bool((s["labels"][is_eos] == -100).all()) and bool((s["position_ids"][1:][is_eos[:-1]] == 0).all())
    with pytest.raises(ConfigError, match="give exactly one"):
        load_train_config(None, [*base, f"data.train_tokens={a}", f"data.train_blend=[[1, {b}]]"])
    with pytest.raises(ConfigError, match=r"data.train_blend must be a list of \[weight > 0, dataset prefix\]"):
        load_train_config(None, [*base, f"data.train_blend=[[0, {b}]]"])
    with pytest.raises(ConfigError, match="nope.idx not found"):
        train_samples(load_train_config(None, [*base, f"data.train_tokens={tmp_path}/nope"]).data, 70000)
