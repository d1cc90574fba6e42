"""The SFT dataset on disk (data/sft_format.py): tokens + answer mask under one prefix, aligned labels, left
truncation that never cuts an answer, and the errors for datasets that are not SFT datasets or do not match."""
import numpy as np
import pytest

from megatron_lc.configtools import ConfigError
from megatron_lc.data.indexed import IndexedDatasetWriter
from megatron_lc.data.sft_format import SFTDataset, SFTDatasetWriter, aligned_labels, truncate_left

CHATS = [([5, 6, 7, 8, 9, 10], [0, 0, 0, 1, 1, 0]), ([1, 2, 3], [0, 1, 1]), ([4, 4, 4, 4], [0, 0, 0, 0])]


def _write(prefix):
    with SFTDatasetWriter(prefix, vocab_size=20) as w:
        for ids, mask in CHATS:
            w.add(ids, mask)
    return prefix


def test_round_trip_meta_and_fingerprint(tmp_path):
    ds = SFTDataset(_write(str(tmp_path / "sft")))
    assert len(ds) == 3 and ds.lengths.tolist() == [6, 3, 4]
    for i, (ids, mask) in enumerate(CHATS):
        got_ids, got_mask = ds.get(i)
        assert got_ids.dtype == np.int64 and got_mask.dtype == bool
        assert got_ids.tolist() == ids and got_mask.tolist() == [bool(m) for m in mask]
    assert ds.meta["chats"] == 3 and ds.meta["answer_tokens"] == 4 and ds.vocab_size == 20
    other = SFTDatasetWriter(str(tmp_path / "other"), vocab_size=20)
    for ids, mask in CHATS:
        other.add(ids, [0] * len(ids))  # same tokens, another mask
    other.finalize()
    assert SFTDataset(str(tmp_path / "other")).fingerprint() != ds.fingerprint()


def test_aligned_labels_predict_only_answer_tokens_and_never_past_the_chat():
    ids, mask = np.array(CHATS[0][0]), np.array(CHATS[0][1], dtype=bool)
    assert aligned_labels(ids, mask).tolist() == [-100, -100, 8, 9, -100, -100]
    ids, mask = np.array(CHATS[1][0]), np.array(CHATS[1][1], dtype=bool)
    assert aligned_labels(ids, mask).tolist() == [2, 3, -100]  # the last position has no target in its chat


def test_truncate_left_keeps_every_answer_token_or_refuses():
    ids, mask = np.array(CHATS[0][0]), np.array(CHATS[0][1], dtype=bool)
    kept = truncate_left(ids, mask, 4)
    assert kept[0].tolist() == [7, 8, 9, 10] and aligned_labels(*kept).tolist() == [8, 9, -100, -100]
    assert truncate_left(ids, mask, 3) is None  # the first kept token (8) would lose its label
    assert truncate_left(ids, mask, 6)[0] is ids


def test_not_an_sft_dataset_and_mismatched_mask_are_named(tmp_path):
    with IndexedDatasetWriter(str(tmp_path / "plain"), vocab_size=20) as w:
        w.add_document([1, 2, 3])
    with pytest.raises(ConfigError, match="not an SFT dataset.*data sft"):
        SFTDataset(str(tmp_path / "plain"))
    prefix = _write(str(tmp_path / "sft"))
    with IndexedDatasetWriter(prefix + ".answer", dtype="uint8") as w:  # a mask of another dataset
        w.add_document([0, 1])
    with pytest.raises(ConfigError, match="does not match"):
        SFTDataset(prefix)


def test_writer_rejects_a_mask_of_another_length(tmp_path):
    w = SFTDatasetWriter(str(tmp_path / "sft"), vocab_size=20)
    with pytest.raises(ValueError, match="one length"):
        w.add([1, 2, 3], [0, 1])
    w.abort()
    assert not list(tmp_path.iterdir())
