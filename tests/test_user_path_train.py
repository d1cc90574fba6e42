"""Issue 17, the trainer on the README's path: a fresh preset model takes the dataset's vocabulary or one error names
the override before anything is built, and a misspelt override names the right key (3); the mesh and the global
batch are printed and data.global_batch_tokens keeps the batch across layouts (5); the start and end summaries,
``saved step_N`` lines and run_config.yaml (6); data.val_tokens alone evaluates (7a); a seq_len above the model's
max positions warns (8); ``train --print-config`` and ``train --list-keys`` (10a).

The runs call ``megatron-lc train`` in-process (``main``): one process, the tiny preset, a few steps."""
import contextlib
import io
import json
import os

import numpy as np
import pytest
import yaml

from megatron_lc.checkpoint import folders
from megatron_lc.cli import main
from megatron_lc.data.indexed import IndexedDatasetWriter
from megatron_lc.train.config import config_keys, load_train_config
from megatron_lc.train.summary import batch_lines

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_CPU = os.path.join(ROOT, "configs", "train", "tiny-cpu.yaml")
VOCAB = 700  # the tokenizer of the data: more ids than the tiny preset's 512


def _dataset(prefix, n_docs, seed):
    """Documents of a learnable stream over VOCAB ids, written as a tokenizer's output is (vocab_size recorded)."""
    rng = np.random.default_rng(seed)
    with IndexedDatasetWriter(str(prefix), vocab_size=VOCAB) as w:
        for _ in range(n_docs):
            w.add_document((np.arange(300) * 7 + rng.integers(0, 2, 300)) % VOCAB)
    return str(prefix)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    return {"train": _dataset(d / "train", 40, 0), "val": _dataset(d / "val", 4, 1), "root": d}


def _train(capsys, *args) -> tuple[int, str, str]:
    """``megatron-lc train --config tiny-cpu.yaml ARGS`` in-process: (exit status, stdout, stderr)."""
    try:
        status = main(["train", "--config", TINY_CPU, "logging.tensorboard=false", "schedule.warmup_steps=0",
                       *args])
    except SystemExit as e:
        status = e.code
    out = capsys.readouterr()
    return status, out.out, out.err


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    """20 steps of the tiny preset on the 700-id data with val data and no eval.every, at seq_len 64 over a model
    whose max positions are 32; then a resume to step 22."""
    folder = str(tmp_path_factory.mktemp("run") / "r")
    outs = []  # capsys is per test: this module-wide run captures by hand
    for extra in ([], ["--resume", "auto", "train.steps=22"]):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = main(["train", "--config", TINY_CPU, "logging.tensorboard=false", "schedule.warmup_steps=0",
                           f"data.train_tokens={data['train']}", f"data.val_tokens={data['val']}",
                           f"checkpoint.dir={folder}", "checkpoint.every=10", "train.steps=20", "eval.batches=1",
                           "model.config.max_position_embeddings=32", *extra])
        outs.append((status, out.getvalue() + err.getvalue()))
    return {"folder": folder, "first": outs[0], "resumed": outs[1]}


def _line(text: str, start: str) -> str:
    found = [line for line in text.splitlines() if line.startswith(f"[megatron-lc] {start}")]
    assert found, (start, text)
    return found[0]


# ---- 3: the dataset's vocabulary ---------------------------------------------------------------------------------
def test_fresh_preset_model_takes_the_datasets_vocabulary(run):
    status, text = run["first"]
    assert status == 0, text
    line = _line(text, f"model.config.vocab_size={VOCAB}")
    assert "512" in line and "tiny" in line and "data.train_tokens" in line, line
    state = folders.read_trainer_state(os.path.join(run["folder"], "step_20"))
    assert state["config"]["model"]["config"]["vocab_size"] == VOCAB  # what convert/eval rebuild the model from
    assert f"vocab {VOCAB}" in _line(text, "model:")


def _refused(capsys, data, tmp_path, *overrides) -> str:
    """The one error of a train run that must stop before anything is built (no run folder, no traceback)."""
    folder = tmp_path / "never"
    status, out, err = _train(capsys, f"data.train_tokens={data['train']}", f"checkpoint.dir={folder}",
                              "train.steps=2", *overrides)
    assert status == 2, (out, err)
    assert "Traceback" not in err and err.count("error:") == 1, err
    assert not folder.exists(), "the run folder was written before the error"
    return err


def test_vocab_that_cannot_fit_stops_with_the_override(capsys, data, tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")  # a model folder: the error comes before its weights are read
    err = _refused(capsys, data, tmp_path, f"model.init_from={hf}")
    assert f"model.config.vocab_size={VOCAB}" in err and "model.init_from" in err and "512" in err, err
    err = _refused(capsys, data, tmp_path, "model.config.vocab_size=600")  # the user's own vocabulary is kept
    assert f"model.config.vocab_size={VOCAB}" in err and "600" in err, err


def test_misspelt_override_is_named_as_the_command_lines(capsys, data, tmp_path):
    err = _refused(capsys, data, tmp_path, "model.vocab_size=4000")
    assert "command-line override model.vocab_size=4000" in err and "model.config.vocab_size" in err, err
    assert "tiny-cpu.yaml" not in err, err


def test_other_ranks_leave_the_error_to_rank_0(capsys, data, tmp_path, monkeypatch):
    """Under torchrun every rank meets the same config error: rank 0 alone prints it (one message, not one per
    rank), every rank exits 2."""
    monkeypatch.setenv("RANK", "1")
    status, out, err = _train(capsys, f"data.train_tokens={data['train']}", "model.vocab_size=4000")
    assert (status, out, err) == (2, "", "")


# ---- 5: mesh and global batch -------------------------------------------------------------------------------------
def test_global_batch_is_the_same_on_every_layout():
    """tiny-cpu.yaml fixes the batch in tokens: 1, 2 and 4 data-parallel processes train the same batch."""
    cfg = load_train_config(TINY_CPU, check_paths=False)
    for world in (1, 2, 4):
        sizes = cfg.check_world(world)
        dp = sizes["dp_replicate"] * sizes["dp_shard"]
        assert cfg.data.seq_len * sizes["micro_batch_size"] * dp * sizes["accumulation"] == 256, (world, sizes)
    cfg = load_train_config(TINY_CPU, ["data.seq_len=256"], check_paths=False)  # the README's mixture run
    assert cfg.check_world(1)["micro_batch_size"] == 1


def test_start_prints_the_mesh_and_the_batch(run):
    text = run["first"][1]
    assert _line(text, "mesh:") == "[megatron-lc] mesh: 1 process = dp 1 (dp_replicate 1 x dp_shard 1) x cp 1 x tp 1"
    batch = _line(text, "global batch:")
    assert "4 sequences x 64 tokens = 256 tokens per step" in batch and "data.global_batch_tokens=256" in batch


def _start_job(rank, world, train_tokens):
    """Build a Trainer on ``world`` processes with tiny-cpu.yaml; return what this rank printed."""
    from megatron_lc.train.trainer import Trainer

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        Trainer(load_train_config(TINY_CPU, [f"data.train_tokens={train_tokens}", 'checkpoint.dir=""',
                                             "checkpoint.every=0"]))
    return out.getvalue()


def test_two_processes_print_their_mesh_and_keep_the_batch(data):
    """dp=2: rank 0 prints the mesh and the same 256-token batch (2 samples per replica), rank 1 prints nothing."""
    from dist_utils import run_distributed

    first, second = run_distributed(_start_job, 2, data["train"], timeout=120)
    assert _line(first, "mesh:") == ("[megatron-lc] mesh: 2 processes = dp 2 (dp_replicate 1 x dp_shard 2) x cp 1 "
                                     "x tp 1")
    batch = _line(first, "global batch:")
    assert "4 sequences x 64 tokens = 256 tokens per step (micro-batch 2 x dp 2" in batch, batch
    assert second == ""


def test_a_batch_that_grows_with_dp_says_so():
    cfg = load_train_config(TINY_CPU, ["data.global_batch_tokens=0"], check_paths=False)
    (line,) = batch_lines(cfg, dp=2, micro=4, accumulation=1)
    assert "512 tokens per step" in line and "dp=2 x the 256 tokens of one replica" in line, line
    assert "data.global_batch_tokens=256" in line, line


# ---- 6: start and end summaries -----------------------------------------------------------------------------------
def test_start_and_end_summaries(run):
    status, text = run["first"]
    folder = run["folder"]
    assert status == 0, text
    assert "parameters (the tiny preset" in _line(text, "model:")
    assert _line(text, "sequence length:").startswith("[megatron-lc] sequence length: 64 tokens")
    assert folder in _line(text, "run folder:")
    assert "fresh start" in _line(text, "resume point:")
    config_path = os.path.join(folder, "run_config.yaml")
    assert _line(text, "resolved config:") == f"[megatron-lc] resolved config: {config_path}"
    resolved = load_train_config(config_path, check_paths=False)  # loads again as a config
    assert resolved.train.steps == 22 and resolved.model.config["vocab_size"] == VOCAB  # the latest start's (resume)
    for step in (10, 20):
        assert f"[megatron-lc] saved step_{step} ({folder}/step_{step})" in text
    done = _line(text, "done:")
    assert "20 steps this run" in done and "5,120 tokens this run" in done and "final train loss" in done, done
    assert _line(text, "checkpoints written:").endswith(f"{folder}/step_10, {folder}/step_20")


def test_resumed_run_names_its_resume_point(run):
    status, text = run["resumed"]
    assert status == 0, text
    assert _line(text, "resume point:") == f"[megatron-lc] resume point: resumed from {run['folder']}/step_20 at step 20"
    assert "2 steps this run (step 20 -> 22)" in _line(text, "done:")


# ---- 7a: validation by default ------------------------------------------------------------------------------------
def test_val_tokens_alone_evaluates(run):
    text = run["first"][1]
    assert "every 2 steps (eval.every not set" in _line(text, "eval:")
    val = _line(text, "val loss:")
    assert "final" in val and "(step 20)" in val and "best" in val, val
    with open(os.path.join(run["folder"], "metrics.jsonl")) as f:
        steps = [line["step"] for line in map(json.loads, f) if "val/loss" in line]
    assert steps[:10] == list(range(2, 21, 2)), steps


# ---- 8: trained length above the model's positions ----------------------------------------------------------------
def test_seq_len_above_max_positions_warns(run):
    status, text = run["first"]
    assert status == 0
    warning = _line(text, "warning: data.seq_len=64")
    for part in ("max_position_embeddings=32", "model.config.max_position_embeddings=64", "model.config.rope_scaling"):
        assert part in warning, (part, warning)
    state = folders.read_trainer_state(os.path.join(run["folder"], "step_20"))
    assert state["config"]["data"]["seq_len"] == 64  # the length eval and export read back


# ---- 10a: --print-config and --list-keys --------------------------------------------------------------------------
def test_print_config_shows_the_resolved_config(capsys, tmp_path):
    status, out, _ = _train(capsys, "--print-config", "train.steps=7", f"checkpoint.dir={tmp_path / 'x'}")
    assert status == 0
    printed = yaml.safe_load(out)
    assert printed["train"]["steps"] == 7 and printed["data"]["seq_len"] == 64  # override, YAML
    assert printed["optim"]["eps"] == 1e-8 and printed["eval"]["every"] is None  # defaults
    assert not (tmp_path / "x").exists()  # nothing trained


def test_list_keys_documents_every_key(capsys):
    assert main(["train", "--list-keys"]) == 0
    lines = capsys.readouterr().out.splitlines()
    keys = [row[0] for row in config_keys()]
    assert len(lines) == len(keys) + 1  # a header, then one line per key
    for key, line in zip(keys, lines[1:]):
        assert line.split()[0] == key, line
    rows = {row[0]: row for row in config_keys()}
    assert all(doc for _, _, _, doc in rows.values()), [k for k, r in rows.items() if not r[3]]
    assert rows["data.global_batch_tokens"][1:3] == ("int", 0)
    assert rows["model.config.vocab_size"][1] == "int" and "embedding" in rows["model.config.vocab_size"][3]
    assert {"optim.lr", "eval.every", "train.kernels", "parallel.cp"} <= set(rows)
