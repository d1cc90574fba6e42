"""Data faults (issue 16, cases 4, 8, 9): input lost to a truncated file changes the exit status; a .bin/.idx pair
that does not belong together is named at open; token ids beyond the model's vocabulary stop the run at open."""
import gzip
import json
import os
import random
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from dist_utils import run_distributed
from megatron_lc.cli import main
from megatron_lc.configtools import ConfigError
from megatron_lc.data import documents, indexed
from megatron_lc.data.indexed import IndexedDataset, IndexedDatasetWriter
from megatron_lc.train.data_source import train_samples, val_samples


# ---- 4: a truncated .jsonl.gz ------------------------------------------------------------------------------------
def _half_gzip(path: Path, n: int = 200) -> Path:
    """A .jsonl.gz of ``n`` records of random words, cut in half (as an interrupted download leaves it)."""
    rng = random.Random(0)
    lines = [json.dumps({"text": " ".join("".join(rng.choice("abcdefghij") for _ in range(6)) for _ in range(30))})
             for _ in range(n)]
    data = gzip.compress(("\n".join(lines) + "\n").encode())
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.mark.parametrize("stage", ["clean", "tokenize"])
def test_truncated_gzip_is_a_distinct_exit_status(tmp_path, capsys, stage):
    cut = _half_gzip(tmp_path / "web.jsonl.gz")
    extra = ["--tokenizer", "bytes"] if stage == "tokenize" else ["--no-near", "--no-sentence"]
    args = ["data", stage, str(cut), "--workers", "0", *extra]
    assert documents.INPUT_LOST_STATUS == 65  # documented in --help and docs/data.md: scripts test for it
    assert main([*args, "--out", str(tmp_path / "out")]) == 65
    last = capsys.readouterr().out.strip().splitlines()[-1]  # the summary's last line (stderr: progress bars)
    assert "INPUT LOST" in last and str(cut) in last and "--allow-partial-input" in last, last
    # accepted on request: exit 0, the loud line stays
    assert main([*args, "--out", str(tmp_path / "out2"), "--allow-partial-input"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]  # the summary's last line (stderr: progress bars)
    assert "INPUT LOST" in last and "accepted by --allow-partial-input" in last, last


def test_intact_input_says_nothing_lost(tmp_path, capsys):
    path = tmp_path / "ok.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write(json.dumps({"text": "a small intact document."}) + "\n")
    assert main(["data", "tokenize", str(path), "--tokenizer", "bytes", "--out", str(tmp_path / "t"),
                 "--workers", "0"]) == 0
    out = capsys.readouterr()
    assert "INPUT LOST" not in out.out + out.err


def test_exit_status_is_in_the_help(capsys):
    with pytest.raises(SystemExit):
        main(["data", "tokenize", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--allow-partial-input" in help_text and "65" in help_text
    docs = (Path(__file__).resolve().parents[1] / "docs" / "data.md").read_text()
    assert "--allow-partial-input" in docs and "65" in docs


# ---- 8: .bin/.idx pairs that do not belong together --------------------------------------------------------------
def _write(prefix, docs, **kw):
    with IndexedDatasetWriter(prefix, **kw) as w:
        for d in docs:
            w.add_document(d)
    return str(prefix)


def _pair(tmp_path):
    """Two datasets with the same document count and total tokens (so the same .bin and .idx sizes) but other
    document boundaries."""
    a = _write(tmp_path / "a", [[1, 2, 3], [4, 5, 6]], vocab_size=10)
    b = _write(tmp_path / "b", [[1], [2, 3, 4, 5, 6]], vocab_size=10)
    return a, b


def test_foreign_idx_of_the_same_size_is_named(tmp_path):
    a, b = _pair(tmp_path)
    assert os.path.getsize(a + ".idx") == os.path.getsize(b + ".idx")
    shutil.copyfile(b + ".idx", a + ".idx")
    with pytest.raises(ConfigError) as e:
        IndexedDataset(a)
    msg = str(e.value)
    assert f"{a}.idx does not match" in msg and f"{a}.bin" in msg and "copy" in msg, msg


def test_corrupt_bin_of_the_same_size_is_named(tmp_path):
    a, _ = _pair(tmp_path)
    data = bytearray(Path(a + ".bin").read_bytes())
    data[2] ^= 1
    Path(a + ".bin").write_bytes(bytes(data))
    with pytest.raises(ConfigError) as e:
        IndexedDataset(a)
    assert f"{a}.bin does not match" in str(e.value), str(e.value)


def test_idx_that_does_not_fit_says_they_disagree(tmp_path):
    a = _write(tmp_path / "a", [[1, 2, 3], [4, 5, 6]], vocab_size=10)
    b = _write(tmp_path / "b", [[1, 2], [3, 4, 5, 6, 7]], vocab_size=10)
    shutil.copyfile(b + ".idx", a + ".idx")
    with pytest.raises(ConfigError, match=rf"{a}.idx does not match"):  # with our sidecar: the .idx is named
        IndexedDataset(a)
    os.remove(a + ".meta.json")  # megatron's preprocess_data output: no sidecar, so only the sizes speak
    with pytest.raises(ConfigError) as e:
        IndexedDataset(a)
    msg = str(e.value)
    assert "truncated .bin" not in msg and "disagree" in msg, msg
    assert f"{a}.bin has 12 bytes" in msg and "14" in msg, msg


def test_dataset_without_sidecar_opens_unverified(tmp_path):
    a, _ = _pair(tmp_path)
    os.remove(a + ".meta.json")
    lines = []
    ds = IndexedDataset(a, log=lines.append)
    assert ds.get(1).tolist() == [4, 5, 6] and not ds.verified
    assert len(lines) == 1 and "unverified" in lines[0] and a in lines[0], lines
    lines.clear()
    assert IndexedDataset(_write(tmp_path / "c", [[1, 2]], vocab_size=10), log=lines.append).verified
    assert lines == []


def test_fingerprint_reads_a_few_chunks_of_a_large_file(tmp_path, monkeypatch):
    monkeypatch.setattr(indexed, "FINGERPRINT_CHUNK_BYTES", 64)
    prefix = _write(tmp_path / "big", [np.arange(4000) % 50], vocab_size=50)  # 8000 bytes of .bin
    fp = json.loads(Path(prefix + ".meta.json").read_text())["files"]["bin"]
    starts = [start for start, _ in fp["chunks"]]
    assert fp["size"] == 8000 and len(starts) == indexed.FINGERPRINT_CHUNKS
    assert starts[0] == 0 and fp["chunks"][-1][0] + fp["chunks"][-1][1] == 8000
    assert sum(n for _, n in fp["chunks"]) == 64 * indexed.FINGERPRINT_CHUNKS
    data = bytearray(Path(prefix + ".bin").read_bytes())
    data[7999] ^= 1  # the end is always read
    Path(prefix + ".bin").write_bytes(bytes(data))
    with pytest.raises(ConfigError, match="big.bin does not match"):
        IndexedDataset(prefix)


# ---- 9: token ids beyond the model's vocabulary ------------------------------------------------------------------
def _data(**kw):
    base = dict(train_tokens="", train_blend=None, val_tokens=None, eos_token_id=None, reset_position_ids=False,
                eod_mask_loss=False, seq_len=4, seed=0)
    return SimpleNamespace(**{**base, **kw})


def test_writer_records_the_token_range(tmp_path):
    prefix = _write(tmp_path / "a", [[3, 9, 4], [5, 7]], dtype=np.uint16)
    side = json.loads(Path(prefix + ".meta.json").read_text())
    assert (side["min_token_id"], side["max_token_id"]) == (3, 9)
    assert IndexedDataset(prefix).token_id_range() == (3, 9)


def test_out_of_vocab_ids_are_refused_at_open(tmp_path):
    prefix = _write(tmp_path / "a", [[1, 2, 3, 4], [5, 900, 6, 7]], dtype=np.uint16)
    with pytest.raises(ConfigError) as e:
        train_samples(_data(train_tokens=prefix), vocab_size=512)
    msg = str(e.value)
    for part in (prefix, "data.train_tokens", "900", "512", "model.config.vocab_size", "tokenizer"):
        assert part in msg, (part, msg)
    assert train_samples(_data(train_tokens=prefix), vocab_size=901) is not None
    with pytest.raises(ConfigError, match="data.val_tokens"):
        val_samples(_data(val_tokens=prefix), vocab_size=512)


def test_every_blend_member_is_checked(tmp_path):
    good = _write(tmp_path / "good", [[1, 2, 3, 4, 5, 6]], dtype=np.uint16)
    bad = _write(tmp_path / "bad", [[1, 2, 3, 4, 5, 600]], dtype=np.uint16)
    with pytest.raises(ConfigError, match=rf"data.train_blend\[1\] .*{bad}.*600"):
        train_samples(_data(train_blend=[[1.0, good], [1.0, bad]]), vocab_size=512)


def test_dataset_without_range_is_scanned_once_and_cached(tmp_path, monkeypatch):
    prefix = _write(tmp_path / "m", [[1, 2, 3], [4, 700, 5]], dtype=np.uint16)
    os.remove(prefix + ".meta.json")  # as megatron's preprocess_data writes it
    lines = []
    assert IndexedDataset(prefix, log=lines.append).token_id_range() == (1, 700)
    assert any("scann" in line for line in lines) and os.path.isfile(prefix + ".scan.json"), lines

    def no_scan(*_):
        raise AssertionError("scanned again although the cache is valid")

    monkeypatch.setattr(indexed, "_scan_token_range", no_scan)
    assert IndexedDataset(prefix).token_id_range() == (1, 700)
    with pytest.raises(ConfigError, match="700"):
        train_samples(_data(train_tokens=prefix), vocab_size=512)
    monkeypatch.undo()
    # the dataset rewritten by another tool: the cache no longer matches the .bin and is not trusted
    _write(prefix, [[1, 2, 3], [4, 800, 5]], dtype=np.uint16)
    os.remove(prefix + ".meta.json")
    assert IndexedDataset(prefix, log=lambda _: None).token_id_range() == (1, 800)


def test_scan_kept_in_memory_when_the_folder_is_not_writable(tmp_path, monkeypatch):
    prefix = _write(tmp_path / "m", [[1, 2, 3], [4, 5, 6]], dtype=np.uint16)
    os.remove(prefix + ".meta.json")

    def read_only(path, _data):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(indexed, "write_json", read_only)
    lines = []
    assert IndexedDataset(prefix, log=lines.append).token_id_range() == (1, 6)
    assert not os.path.exists(prefix + ".scan.json")
    assert any("in memory" in line and "Permission denied" in line for line in lines), lines


def test_data_verify_command(tmp_path, capsys):
    a, b = _pair(tmp_path)
    os.remove(b + ".meta.json")
    assert main(["data", "verify", a, b + ".idx"]) == 0
    out = capsys.readouterr().out
    assert f"{a}: verified" in out and f"{b}: unverified" in out and "token ids 1..6" in out, out
    assert os.path.isfile(b + ".scan.json") and not os.path.exists(a + ".scan.json")
    shutil.copyfile(b + ".idx", a + ".idx")
    with pytest.raises(SystemExit) as e:
        main(["data", "verify", a])
    assert e.value.code == 2 and f"{a}.idx does not match" in capsys.readouterr().err


def _trainer_job(rank, world, prefix):
    from megatron_lc.train import trainer as trainer_module
    from megatron_lc.train.config import load_train_config

    def no_model(*_, **__):
        raise AssertionError("the model was built before the data was checked")

    trainer_module.Transformer = no_model
    cfg = load_train_config(None, ["model.preset=tiny", "data.seq_len=4", f"data.train_tokens={prefix}"])
    try:
        trainer_module.Trainer(cfg)
    except ConfigError as e:
        return str(e)
    return "no error"


def test_trainer_refuses_before_building_the_model(tmp_path):
    prefix = _write(tmp_path / "a", [[1, 2, 3, 4, 5], [6, 9000, 7, 8, 9]], dtype=np.uint16)  # tiny vocab: 512
    msg = run_distributed(_trainer_job, 1, prefix, timeout=120)[0]
    assert "9000" in msg and "model.config.vocab_size" in msg, msg
