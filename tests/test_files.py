"""Small JSON files read back as the object we wrote or a clear error (files.read_json_object) and its three
readers: a dataset's sidecar, a model folder's training.json, a run folder's run.json."""
import json

import pytest

from megatron_lc.configtools import ConfigError
from megatron_lc.files import read_json_object, write_json


def test_read_json_object_returns_the_object_none_or_names_file_and_fix(tmp_path):
    path = tmp_path / "x.json"
    assert read_json_object(str(path), "fix it") is None
    write_json(str(path), {"a": 1})
    assert read_json_object(str(path), "fix it") == {"a": 1}
    path.write_text("[1, 2]")
    with pytest.raises(ConfigError, match=r"x\.json: a JSON list, not the object expected: fix it"):
        read_json_object(str(path), "fix it")
    path.write_bytes(b"{\xff")
    with pytest.raises(KeyError, match=r"x\.json: not readable as JSON .*: fix it"):
        read_json_object(str(path), "fix it", error=KeyError)


def test_readers_name_the_bad_file(tmp_path):
    from megatron_lc.checkpoint.convert import training_record
    from megatron_lc.data.indexed import IndexedDataset, IndexedDatasetWriter
    from megatron_lc.train.run_folder import RunFolderError, read_run

    with IndexedDatasetWriter(str(tmp_path / "d"), vocab_size=10) as w:
        w.add_document([1, 2])
    (tmp_path / "d.meta.json").write_text("not json")
    with pytest.raises(ConfigError, match=r"d\.meta\.json: not readable as JSON.*opens unverified"):
        IndexedDataset(str(tmp_path / "d"))
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")  # an HF folder, as far as training_record looks
    (model / "training.json").write_text('"a string"')
    with pytest.raises(ConfigError, match=r"training\.json: a JSON str.*--train-length"):
        training_record(str(model))
    (tmp_path / "run.json").write_text(json.dumps({"run_id": 3}))
    with pytest.raises(RunFolderError, match=r"run\.json: it is not a run file of ours"):
        read_run(str(tmp_path))
    (tmp_path / "run.json").write_text(json.dumps({"run_id": "r", "token": "t"}))
    assert read_run(str(tmp_path)) == {"run_id": "r", "token": "t"}
