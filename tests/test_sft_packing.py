"""SFT samples (megatron_lc/data/sft_samples.py): packing keeps every chat once per epoch with its aligned labels,
reset restarts positions, pad keeps chats apart, best-fit decreasing beats first fit, too-long chats error or are
cut from the left, identities change with what changes the samples, and the Loader resumes and reshards them.
Pure logic: no process group."""
import numpy as np
import pytest
import torch

from megatron_lc.configtools import ConfigError
from megatron_lc.data.loader import Loader
from megatron_lc.data.sft_format import SFTDatasetWriter, aligned_labels
from megatron_lc.data.sft_samples import SFTSamples

PAD = 0  # the datasets' eos_token_id: chat ids are >= 1, so padding is recognisable by value


def write_chats(prefix, chats, vocab_size=512, meta=None):
    """An SFT dataset at ``prefix`` of ``chats`` [(ids, mask)]."""
    with SFTDatasetWriter(prefix, vocab_size=vocab_size) as w:
        for ids, mask in chats:
            w.add(ids, mask)
        w.finalize({"eos_token_id": PAD} if meta is None else meta)
    return str(prefix)


def random_chats(n, low, high, seed=0, vocab_size=512):
    """``n`` distinct chats of lengths in [low, high): a prompt then an answer (its mask true), ids in [1, vocab)."""
    rng = np.random.default_rng(seed)
    chats = []
    for _ in range(n):
        length = int(rng.integers(low, high))
        mask = np.zeros(length, bool)
        mask[int(rng.integers(1, length)):] = True
        chats.append((rng.integers(1, vocab_size, length), mask))
    return chats


@pytest.fixture(scope="module")
def chats():
    return random_chats(60, 2, 40)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, chats):
    return write_chats(tmp_path_factory.mktemp("sft") / "chats", chats)


def segments(sample):
    """(ids, labels, positions) of each document of a sample, split where document_ids changes."""
    docs = sample["document_ids"].numpy()
    assert np.all(np.diff(docs) >= 0) and docs[0] == 0, docs  # non-decreasing, from 0
    cuts = np.flatnonzero(np.diff(docs)) + 1
    return [tuple(sample[k].numpy()[idx] for k in ("input_ids", "labels", "position_ids"))
            for idx in np.split(np.arange(len(docs)), cuts)]


@pytest.mark.parametrize("packing", ["naive", "reset", "pad"])
def test_every_chat_served_once_per_epoch_with_its_labels(dataset, chats, packing):
    """Two epochs: every chat appears exactly once per epoch, whole, with aligned_labels as its labels; the
    non-padding tokens add up to the dataset's; padding is -100 with the pad id as input and its own document id;
    reset restarts positions at each chat, naive runs them over the row, pad never shares a row."""
    seq_len = 48
    samples = SFTSamples(dataset, seq_len, seed=3, packing=packing)
    index = {tuple(ids.tolist()): i for i, (ids, _) in enumerate(chats)}
    assert len(index) == len(chats)
    rows = samples.rows_per_epoch
    orders = []
    for epoch in range(2):
        seen, tokens, order = [], 0, []
        for k in range(epoch * rows, (epoch + 1) * rows):
            s = samples.sample(k)
            assert all(v.dtype == torch.int64 and v.shape == (seq_len,) for v in s.values())
            if packing == "naive":
                assert torch.equal(s["position_ids"], torch.arange(seq_len))
            parts = segments(s)
            if parts[-1][0].max() == PAD:  # the padding: the row's last document
                ids, labels, _ = parts.pop()
                assert (labels == -100).all() and len(ids) == seq_len - sum(len(p[0]) for p in parts)
            else:
                assert sum(len(p[0]) for p in parts) == seq_len
            if packing == "pad":
                assert len(parts) == 1, "pad packing put two chats in one row"
            for ids, labels, positions in parts:
                c = index[tuple(ids.tolist())]  # KeyError: a chat was cut or merged
                seen.append(c)
                tokens += len(ids)
                np.testing.assert_array_equal(labels, aligned_labels(*chats[c]))
                if packing != "naive":
                    np.testing.assert_array_equal(positions, np.arange(len(ids)))
            order.append(tuple(seen[-len(parts):]))
        assert sorted(seen) == list(range(len(chats)))
        assert tokens == sum(len(ids) for ids, _ in chats) == samples.stats["tokens"]
        orders.append(order)
    assert orders[0] != orders[1] and sorted(orders[0]) == sorted(orders[1])  # same rows, reshuffled per epoch
    pad_tokens = rows * seq_len - samples.stats["tokens"]
    assert samples.stats["padding_tokens"] == pad_tokens
    assert samples.stats["padding_share"] == pytest.approx(pad_tokens / (rows * seq_len))


def _first_fit_rows(lengths, capacity):
    """Rows first fit in arrival order leaves (the reference BFD must beat)."""
    free = []
    for n in lengths:
        for i, space in enumerate(free):
            if space >= n:
                free[i] -= n
                break
        else:
            free.append(capacity - n)
    return len(free)


def test_best_fit_decreasing_leaves_less_padding_than_first_fit(tmp_path, capsys):
    """On lengths where first fit in arrival order needs 4 rows of 10 (2+2+2, 8, 8, 8), BFD needs 3 (8+2 each); on
    300 random lengths BFD needs no more rows than first fit, and the start line reports the padding share."""
    lengths = [2, 2, 2, 8, 8, 8]
    prefix = write_chats(tmp_path / "crafted", [(np.arange(1, n + 1), np.ones(n, bool)) for n in lengths])
    samples = SFTSamples(prefix, 10, packing="naive", log=print)
    assert _first_fit_rows(lengths, 10) == 4
    assert samples.stats["rows"] == 3 and samples.stats["padding_tokens"] == 0
    assert "6 chats -> 3 rows of 10 tokens" in capsys.readouterr().out
    rng = np.random.default_rng(1)
    lengths = [int(n) for n in rng.integers(1, 64, 300)]
    prefix = write_chats(tmp_path / "random", [(np.ones(n, np.int64), np.ones(n, bool)) for n in lengths])
    samples = SFTSamples(prefix, 64, log=print)
    first_fit = _first_fit_rows(lengths, 64)
    assert samples.stats["rows"] < first_fit, (samples.stats, first_fit)
    share = samples.stats["padding_share"]
    assert share == pytest.approx(1 - sum(lengths) / (samples.stats["rows"] * 64))
    assert f"padding {100 * share:.1f}%" in capsys.readouterr().out


def test_too_long_chat_errors_or_is_cut_from_the_left(tmp_path):
    """A chat over seq_len: by default a ConfigError naming it, its length and the fixes; with truncate=left its
    last seq_len tokens (answer kept) and counted; a chat whose answer would be cut: an error naming it."""
    short = (np.arange(1, 9), np.r_[np.zeros(4, bool), np.ones(4, bool)])
    long_ids = np.arange(1, 31)
    long = (long_ids, np.r_[np.zeros(25, bool), np.ones(5, bool)])
    prefix = write_chats(tmp_path / "long", [short, long, short])
    with pytest.raises(ConfigError) as e:
        SFTSamples(prefix, 16)
    for part in ("chat 1 (30 tokens)", "data.seq_len=16", "--max-tokens", "--truncate left", "data.sft_truncate=left"):
        assert part in str(e.value), str(e.value)
    samples = SFTSamples(prefix, 16, truncate="left", shuffle=False)
    assert samples.stats["truncated_chats"] == 1 and samples.stats["truncated_tokens"] == 14
    assert "1 chats cut from the left" in samples.describe()
    rows = [samples.sample(k) for k in range(samples.rows_per_epoch)]
    cut = [r for r in rows if r["input_ids"][0] == 15]
    assert len(cut) == 1 and torch.equal(cut[0]["input_ids"], torch.from_numpy(long_ids[14:]))
    np.testing.assert_array_equal(cut[0]["labels"].numpy(), aligned_labels(long_ids[14:], long[1][14:]))
    assert (cut[0]["labels"] != -100).sum() == 5  # all 5 answer tokens kept their loss
    early = (np.arange(1, 31), np.r_[np.zeros(5, bool), np.ones(25, bool)])
    with pytest.raises(ConfigError, match=r"chat 0 \(30 tokens\) cannot be cut to data.seq_len=16"):
        SFTSamples(write_chats(tmp_path / "early", [early]), 16, truncate="left")


def test_identity_changes_with_what_changes_the_samples(dataset, tmp_path, chats):
    """The same arguments give the same samples and identity; packing, truncation and data change the
    fingerprint; the seed changes the order but not the fingerprint; a missing pad id errors when rows need one."""
    a, b = SFTSamples(dataset, 48, seed=1), SFTSamples(dataset, 48, seed=1)
    assert a.identity() == b.identity()
    assert all(torch.equal(a.sample(7)[k], b.sample(7)[k]) for k in a.sample(7))
    fingerprints = {SFTSamples(dataset, 48, packing=p).fingerprint() for p in ("naive", "reset", "pad")}
    fingerprints.add(SFTSamples(dataset, 48, truncate="left").fingerprint())
    fingerprints.add(SFTSamples(write_chats(tmp_path / "other", chats[:-1]), 48).fingerprint())
    assert len(fingerprints) == 5
    c = SFTSamples(dataset, 48, seed=2)
    assert c.fingerprint() == a.fingerprint() and c.identity()["seed"] == 2
    assert [c.row_of(k) for k in range(10)] != [a.row_of(k) for k in range(10)]
    with pytest.raises(ConfigError, match="data.eos_token_id"):
        SFTSamples(write_chats(tmp_path / "nometa", chats, meta={}), 48)
    from megatron_lc.data.indexed import IndexedDatasetWriter

    with IndexedDatasetWriter(tmp_path / "plain", vocab_size=512) as w:
        w.add_document(np.arange(10))
    with pytest.raises(ConfigError, match="not an SFT dataset"):
        SFTSamples(str(tmp_path / "plain"), 48)


def test_loader_resumes_and_reshards_sft_samples(dataset):
    """Two replicas take disjoint halves of the global rows; a state saved on 2 replicas continues on 1 with the
    rows an uninterrupted 1-replica run serves; a state of another packing is refused."""
    samples = SFTSamples(dataset, 48, seed=5)
    one = Loader(samples, 2, 1, 0)
    stream = [one.next()["input_ids"] for _ in range(4)]  # 8 global rows
    two = [Loader(samples, 1, 2, r) for r in range(2)]
    for step in range(2):
        got = torch.cat([two[r].next()["input_ids"] for r in range(2)])
        assert torch.equal(got, stream[step])
    resumed = Loader(samples, 2, 1, 0)
    resumed.load_state_dict(two[0].state_dict())
    assert torch.equal(resumed.next()["input_ids"], stream[2])
    other = Loader(SFTSamples(dataset, 48, seed=5, packing="reset"), 2, 1, 0)
    with pytest.raises(ConfigError, match="training data changed"):
        other.load_state_dict(two[0].state_dict())
