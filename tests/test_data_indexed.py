"""Megatron indexed datasets (.bin/.idx): exact round trips, byte compatibility with megatron-core in both
directions, sidecars, crash-safe writing and the errors on bad files."""
import json
import os
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_lc.configtools import ConfigError
from megatron_lc.data.indexed import IndexedDataset, IndexedDatasetWriter, dataset_prefix, token_dtype


def _docs(vocab_size, n=40, seed=0):
    rng = np.random.default_rng(seed)
    docs = [rng.integers(0, vocab_size, int(rng.integers(1, 50))) for _ in range(n)]
    docs[0][0], docs[1][0] = 0, vocab_size - 1  # the extreme ids
    return docs


def _write(prefix, docs, **kw):
    with IndexedDatasetWriter(prefix, **kw) as w:
        for d in docs:
            w.add_document(d)
    return str(prefix)


def _megatron():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDataset as MegatronDataset
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    return MegatronDataset, IndexedDatasetBuilder


def test_dtype_rule_follows_megatron():
    assert token_dtype(1000) == np.uint16 and token_dtype(65499) == np.uint16
    assert token_dtype(65500) == np.int32 and token_dtype(151936) == np.int32
    assert dataset_prefix("a/b.bin") == dataset_prefix("a/b.idx") == dataset_prefix("a/b") == "a/b"


@pytest.mark.parametrize("vocab_size,dtype", [(1000, np.uint16), (65500, np.int32), (151936, np.int32)])
def test_round_trip_exact(tmp_path, vocab_size, dtype):
    """Every token of every document comes back exactly, from the prefix, the .bin or the .idx path."""
    docs = _docs(vocab_size)
    prefix = _write(tmp_path / "ds", docs, vocab_size=vocab_size)
    for path in (prefix, prefix + ".bin", prefix + ".idx"):
        ds = IndexedDataset(path)
        assert ds.dtype == dtype and len(ds) == len(docs)
        assert ds.num_tokens == sum(len(d) for d in docs)
        np.testing.assert_array_equal(ds.sequence_lengths, [len(d) for d in docs])
        np.testing.assert_array_equal(ds.document_indices, np.arange(len(docs) + 1))
        for i, d in enumerate(docs):
            np.testing.assert_array_equal(ds.get(i), d)
        i = next(i for i, d in enumerate(docs) if len(d) >= 3)
        np.testing.assert_array_equal(ds.get(i, 1, 2), docs[i][1:3])
        assert ds.sources is None and ds.meta == {}


def test_sources_and_meta_sidecars(tmp_path):
    docs = _docs(500, n=6)
    with IndexedDatasetWriter(tmp_path / "ds", vocab_size=500) as w:
        for i, d in enumerate(docs):
            w.add_document(d, source=["web", "code", "books"][i % 3])
        w.finalize({"tokenizer": "byte", "eos_token_id": 2})
    ds = IndexedDataset(tmp_path / "ds")
    assert ds.source_names == ["web", "code", "books"]
    np.testing.assert_array_equal(ds.sources, [0, 1, 2, 0, 1, 2])
    assert ds.sources.dtype == np.uint16 and ds.meta == {"tokenizer": "byte", "eos_token_id": 2}
    # megatron ignores the sidecars
    MegatronDataset, _ = _megatron()
    assert len(MegatronDataset(str(tmp_path / "ds"))) == 6


@pytest.mark.parametrize("vocab_size", [1000, 100_000])
def test_megatron_reads_our_files(tmp_path, vocab_size):
    MegatronDataset, _ = _megatron()
    docs = _docs(vocab_size)
    prefix = _write(tmp_path / "ds", docs, vocab_size=vocab_size)
    theirs, ours = MegatronDataset(prefix), IndexedDataset(prefix)
    assert len(theirs) == len(docs)
    assert theirs.index.dtype == ours.dtype
    np.testing.assert_array_equal(theirs.document_indices, ours.document_indices)
    np.testing.assert_array_equal(theirs.sequence_lengths, ours.sequence_lengths)
    for i, d in enumerate(docs):
        np.testing.assert_array_equal(theirs[i], d)
    np.testing.assert_array_equal(theirs.get(5, offset=0, length=1), docs[5][:1])


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_we_read_megatron_builder_files(tmp_path, dtype):
    """IndexedDatasetBuilder as preprocess_data calls it (add_document per document), including one document of
    two sequences (so document_indices is not just 0..n) and add_item + end_document."""
    _, Builder = _megatron()
    docs = _docs(60000)
    prefix = str(tmp_path / "theirs")
    builder = Builder(prefix + ".bin", dtype=dtype)
    for d in docs[:-3]:
        builder.add_document(d, [len(d)])
    two = np.concatenate([docs[-3], docs[-2]])
    builder.add_document(two, [len(docs[-3]), len(docs[-2])])
    builder.add_item(torch.tensor(docs[-1]))
    builder.end_document()
    builder.finalize(prefix + ".idx")
    ours = IndexedDataset(prefix)
    assert ours.dtype == dtype and len(ours) == len(docs)
    expected_docs = np.concatenate([np.arange(len(docs) - 2), [len(docs) - 1, len(docs)]])
    np.testing.assert_array_equal(ours.document_indices, expected_docs)
    for i, d in enumerate(docs):
        np.testing.assert_array_equal(ours.get(i), d)


def test_writer_rejects_bad_documents(tmp_path):
    w = IndexedDatasetWriter(tmp_path / "ds", vocab_size=100)
    with pytest.raises(ValueError, match=r"document 0 has token ids in \[1, 100\], outside \[0, 99\]"):
        w.add_document([1, 100])
    with pytest.raises(ValueError, match="document 0 is empty"):
        w.add_document([])
    with pytest.raises(ValueError, match="integer token ids"):
        w.add_document([1.5, 2.0])
    w.add_document([1, 2], source="web")
    with pytest.raises(ValueError, match="lacks a source"):
        w.add_document([3])
    w.abort()
    with pytest.raises(ConfigError, match="does not fit uint16"):
        IndexedDatasetWriter(tmp_path / "x", vocab_size=70000, dtype=np.uint16)
    with pytest.raises(ConfigError, match="cannot hold token ids"):
        IndexedDatasetWriter(tmp_path / "x", dtype=np.float32)
    assert not os.listdir(tmp_path)  # abort removed the temporary files


def test_crash_while_writing_keeps_the_old_dataset(tmp_path):
    """An error inside the writer's ``with`` leaves the previous dataset of the prefix untouched, and no
    temporary files."""
    prefix = _write(tmp_path / "ds", [[1, 2, 3]], vocab_size=10)
    with pytest.raises(RuntimeError, match="boom"), IndexedDatasetWriter(prefix, vocab_size=10) as w:
        w.add_document([4, 5])
        raise RuntimeError("boom")
    ds = IndexedDataset(prefix)
    assert len(ds) == 1 and ds.get(0).tolist() == [1, 2, 3]
    assert sorted(os.listdir(tmp_path)) == ["ds.bin", "ds.idx", "ds.meta.json"]
    # before finalize, nothing exists under the final names of a new prefix
    w = IndexedDatasetWriter(tmp_path / "new", vocab_size=10)
    w.add_document([1])
    with pytest.raises(ConfigError, match="new.idx not found"):
        IndexedDataset(tmp_path / "new")
    w.finalize()
    assert IndexedDataset(tmp_path / "new").get(0).tolist() == [1]


def test_bad_files_say_which_and_what(tmp_path):
    prefix = _write(tmp_path / "ds", _docs(1000, n=5), vocab_size=1000)
    with pytest.raises(ConfigError, match=r"nope.idx not found: a dataset is PREFIX.bin \+ PREFIX.idx"):
        IndexedDataset(tmp_path / "nope")
    idx = Path(prefix + ".idx").read_bytes()
    binary = Path(prefix + ".bin").read_bytes()

    def broken(name, idx_bytes, bin_bytes):
        p = tmp_path / name
        p.with_suffix(".idx").write_bytes(idx_bytes)
        p.with_suffix(".bin").write_bytes(bin_bytes)
        return str(p)

    with pytest.raises(ConfigError, match=r"bad.idx and .*bad.bin disagree: the .idx \(\d+ bytes, 5 sequences\) says "
                                          r"the tokens end at byte \d+, but .*bad.bin has \d+ bytes"):
        IndexedDataset(broken("bad", idx, binary[:-2]))
    with pytest.raises(ConfigError, match=r"magic.idx: magic b'NOTMMIDX\\x00', expected b'MMIDIDX\\x00\\x00'"):
        IndexedDataset(broken("magic", b"NOTMMIDX\x00" + idx[9:], binary))
    with pytest.raises(ConfigError, match="version 2, expected 1"):
        IndexedDataset(broken("version", idx[:9] + struct.pack("<Q", 2) + idx[17:], binary))
    with pytest.raises(ConfigError, match="truncated or corrupt index"):
        IndexedDataset(broken("short", idx[:-8], binary))
    with pytest.raises(ConfigError, match="shorter than the 34-byte header"):
        IndexedDataset(broken("tiny", idx[:20], binary))
    with pytest.raises(ConfigError, match="dtype code 6 is not an integer token dtype"):
        IndexedDataset(broken("float", idx[:17] + bytes([6]) + idx[18:], binary))
    ds = IndexedDataset(prefix)
    with pytest.raises(IndexError, match="sequence 5 out of range for 5 sequences"):
        ds.get(5)
    with pytest.raises(IndexError, match=r"tokens \[0, 1000\) out of range for sequence 0"):
        ds.get(0, 0, 1000)


def test_stale_sidecar_is_an_error(tmp_path):
    prefix = _write(tmp_path / "ds", [[1, 2, 3], [4]], vocab_size=10)
    meta = Path(prefix + ".meta.json").read_text()
    _write(tmp_path / "ds", [[1, 2, 3]], vocab_size=10)
    Path(prefix + ".meta.json").write_text(meta)  # e.g. megatron rewrote .bin/.idx, our sidecar stayed
    with pytest.raises(ConfigError, match=r"ds.meta.json belongs to another dataset: .*\(2 sequences / 4 tokens "
                                          r"then, 1 / 3 now\): a stale sidecar"):
        IndexedDataset(prefix)
    side = json.loads(meta)
    del side["files"]  # a sidecar from before fingerprints: the counts still catch it
    Path(prefix + ".meta.json").write_text(json.dumps(side))
    with pytest.raises(ConfigError, match="describes 2 sequences / 4 tokens but the dataset has 1 / 3"):
        IndexedDataset(prefix)


def test_fingerprint_ignores_the_path_not_the_content(tmp_path):
    a = IndexedDataset(_write(tmp_path / "a", [[1, 2, 3], [4, 5]], vocab_size=10))
    b = IndexedDataset(_write(tmp_path / "b", [[1, 2, 3], [4, 5]], vocab_size=10))
    c = IndexedDataset(_write(tmp_path / "c", [[1, 2], [3, 4, 5]], vocab_size=10))
    d = IndexedDataset(_write(tmp_path / "d", [[1, 2, 3], [4, 6]], vocab_size=10))
    assert a.fingerprint() == b.fingerprint()
    assert len({a.fingerprint(), c.fingerprint(), d.fingerprint()}) == 3
