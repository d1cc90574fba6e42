"""Issue 17, the outputs of the README's path: ``convert`` names the checkpoints that exist when ``--from`` does not
(1b); ``eval`` takes a dataset prefix, finds the model's tokenizer (or refuses naming ``--tokenizer``) and marks the
length the model trained at (8); every command says where it wrote, ``--out`` defaults show in ``--help``, the HF
folder is ready to serve, and the plots show what they must (9)."""
import argparse
import json
import os
import re
from pathlib import Path

import pytest
import torch

from megatron_lc.checkpoint import folders
from megatron_lc.cli import build_parser, main
from megatron_lc.data.tokenizer import load_tokenizer
from megatron_lc.distributed import process_group
from megatron_lc.eval import loss_by_length as lbl
from megatron_lc.eval import niah
from megatron_lc.model import ModelConfig, Transformer, preset_config, save_hf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAINED_SEQ_LEN = 64  # configs/train/tiny-cpu.yaml's data.seq_len
HAYSTACK_SOURCE = Path(argparse.__file__)  # 60 KB of the stdlib's text in no time (the docstring corpus takes s)


def _plain_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A user's run: an HF BPE tokenizer (320 ids), a dataset tokenized with it by ``data tokenize`` (its meta
    records the tokenizer), and a run folder with step_3 and step_4 of the tiny preset (vocab 512) whose trainer
    state holds the resolved tiny-cpu config (step_1 and step_2 pruned, as checkpoint.keep=2 leaves it)."""
    from megatron_lc.bench.data import train_hf_bpe
    from megatron_lc.train.config import load_train_config

    root = tmp_path_factory.mktemp("user")
    text = HAYSTACK_SOURCE.read_text()[:60_000]
    (root / "tok").mkdir()
    train_hf_bpe([text[i:i + 500] for i in range(0, len(text), 500)], str(root / "tok" / "tokenizer.json"), 320)
    with open(root / "corpus.jsonl", "w") as f:
        f.writelines(json.dumps({"text": text[i:i + 2000], "source": "docs"}) + "\n" for i in range(0, len(text), 2000))
    tokens = str(root / "tokens")
    assert main(["data", "tokenize", str(root / "corpus.jsonl"), "--tokenizer", str(root / "tok" / "tokenizer.json"),
                 "--out", tokens, "--workers", "0"]) == 0
    config = load_train_config(os.path.join(ROOT, "configs", "train", "tiny-cpu.yaml"),
                               [f"data.train_tokens={tokens}", f"checkpoint.dir={root / 'runs' / 'r'}"]).to_dict()
    model = Transformer(preset_config("tiny"), seed=0)
    with process_group():
        for step in (3, 4):
            folders.save(folders.step_dir(str(root / "runs" / "r"), step), model, None,
                         {"step": step, "skipped": 0, "tokens_seen": 0, "config": config})
    return {"root": root, "tokens": tokens, "ckpt": str(root / "runs" / "r" / "step_4"),
            "tokenizer": str(root / "tok" / "tokenizer.json")}


# ---- 1b: a --from that is not there lists what is ---------------------------------------------------------------
def test_convert_from_a_pruned_step_lists_the_checkpoints_newest_first(run, capsys):
    runs = run["root"] / "runs" / "r"
    (runs / "step_5").mkdir(exist_ok=True)  # a save that crashed: listed apart, never "the latest"
    with pytest.raises(SystemExit) as e:
        main(["convert", "--from", str(runs / "step_2"), "--to", str(run["root"] / "never")])
    assert e.value.code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"--from {runs / 'step_2'}: not a folder" in err
    assert f"newest first: {runs / 'step_4'}, {runs / 'step_3'}" in err
    assert f"The latest is {runs / 'step_4'}" in err and f"unfinished (no COMPLETE): {runs / 'step_5'}" in err
    # eval's --model given the run folder itself: the checkpoints inside it are listed
    with pytest.raises(SystemExit):
        main(["eval", "niah", "--model", str(runs), "--lengths", "128"])
    err = " ".join(capsys.readouterr().err.split())
    assert f"--model {runs}: neither an HF folder" in err and f"The latest is {runs / 'step_4'}" in err
    os.rmdir(runs / "step_5")


# ---- 9 + 8: the converted folder serves and records its training ----------------------------------------------
@pytest.fixture(scope="module")
def hf_folder(run):
    out = run["root"] / "hf"
    assert main(["convert", "--from", run["ckpt"], "--to", str(out)]) == 0
    return out


def test_convert_writes_a_servable_hf_folder_and_says_where(run, hf_folder, capsys):
    main(["convert", "--from", run["ckpt"], "--to", str(hf_folder), "--force"])  # again, to see what it prints
    printed = capsys.readouterr().out
    assert f"wrote HF folder {hf_folder}" in printed and "tokenizer.json copied from" in printed
    assert {"config.json", "model.safetensors", "tokenizer.json", "training.json"} <= set(os.listdir(hf_folder))
    for name in os.listdir(hf_folder):  # safetensors writes 0600: a server running as another user could not read
        assert os.stat(hf_folder / name).st_mode & 0o777 == _plain_mode(), name
    record = json.loads((hf_folder / "training.json").read_text())
    assert record["trained_seq_len"] == TRAINED_SEQ_LEN and record["steps"] == 4
    assert record["source"] == os.path.abspath(run["ckpt"])
    sample = "Return the number of items in a container."
    assert load_tokenizer(str(hf_folder)).encode(sample) == load_tokenizer(run["tokenizer"]).encode(sample)


# ---- 8: eval finds the tokenizer, refuses without one, takes a dataset prefix, marks the training length ------
@pytest.mark.parametrize("which", ["hf", "checkpoint"])
def test_eval_niah_finds_the_models_tokenizer_and_training_length(run, hf_folder, which, tmp_path, capsys):
    model = str(hf_folder) if which == "hf" else run["ckpt"]
    out = tmp_path / "out"
    assert main(["eval", "niah", "--model", model, "--haystack", str(HAYSTACK_SOURCE), "--lengths", "160",
                 "--depths", "50", "--max-new-tokens", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    where = f"the tokenizer files in {hf_folder}" if which == "hf" else f"training dataset {run['tokens']}"
    assert "(320 ids)" in printed and where in printed
    assert f"wrote {out / 'niah.json'} and {out / 'niah.png'}" in printed
    results = json.loads((out / "niah.json").read_text())
    assert results["train_length"] == TRAINED_SEQ_LEN  # not the preset's max_position_embeddings, 1024
    assert results["train_length_label"] == f"training length {TRAINED_SEQ_LEN}"


def test_eval_refuses_a_model_without_tokenizer_whose_vocabulary_is_not_bytes(tmp_path, capsys):
    save_hf(Transformer(preset_config("tiny"), seed=0), str(tmp_path / "bare"))  # vocab 512, no tokenizer files
    with pytest.raises(SystemExit) as e:
        main(["eval", "niah", "--model", str(tmp_path / "bare"), "--haystack", str(HAYSTACK_SOURCE), "--lengths",
              "256", "--depths", "50",
              "--max-new-tokens", "1", "--out", str(tmp_path / "out")])
    assert e.value.code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "no tokenizer found" in err and "vocabulary of 512 ids" in err and "pass --tokenizer" in err
    assert not (tmp_path / "out").exists()


def test_eval_loss_takes_a_dataset_prefix_and_marks_the_training_length(run, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["eval", "loss", "--model", run["ckpt"], "--data", f"docs={run['tokens']}", "--seq-len", "128",
                 "--bucket-size", "32", "--samples", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out / 'loss_by_length.json'} and {out / 'loss_by_length.png'}" in printed
    results = json.loads((out / "loss_by_length.json").read_text())
    assert list(results["models"]["step_4"]) == ["docs"]
    assert results["train_length"] == TRAINED_SEQ_LEN
    assert results["train_length_label"] == f"training length {TRAINED_SEQ_LEN}"


# ---- 9: two models of one folder name, and the plots -------------------------------------------------------------
def _byte_model(path, theta):
    cfg = ModelConfig(vocab_size=260, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                      num_kv_heads=1, rope_theta=theta, max_position_embeddings=128, extra={"eos_token_id": 257})
    save_hf(Transformer(cfg, seed=0), str(path))


def test_two_models_of_one_folder_name_get_distinct_names_and_legend_entries(tmp_path, capsys):
    from PIL import Image

    _byte_model(tmp_path / "a" / "hf", 1e4)
    _byte_model(tmp_path / "b" / "hf", 1e6)
    (tmp_path / "prose.txt").write_text(" ".join(f"Line {i} of a text about nothing much." for i in range(40)))
    out = tmp_path / "out"
    assert main(["eval", "loss", "--model", str(tmp_path / "a" / "hf"), "--model", str(tmp_path / "b" / "hf"),
                 "--data", f"prose={tmp_path / 'prose.txt'}", "--bucket-size", "32", "--samples", "2",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "b/hf v.s. a/hf" in printed and "tokenizer bytes" in printed
    results = json.loads((out / "loss_by_length.json").read_text())
    assert list(results["models"]) == ["a/hf", "b/hf"]
    # no training.json and no checkpoint: the line would sit at max positions, the right edge, so none is drawn
    assert results["train_length_label"] == "max positions 128 (training length not recorded)"
    with Image.open(out / "loss_by_length.png") as image:
        assert image.size[0] > 300 and image.size[1] > 200


def _bucket_losses(seed):
    g = torch.Generator().manual_seed(seed)
    return lbl.BucketLoss((torch.rand(4, generator=g, dtype=torch.float64) + 5) * 10, torch.full((4,), 10))


def test_loss_plot_legend_and_training_length_line(tmp_path):
    results = {"a/hf": {"prose": _bucket_losses(0)}, "b/hf": {"prose": _bucket_losses(1)}}
    fig = lbl.plot_loss(results, [0, 32, 64, 96, 128], str(tmp_path / "loss.png"), 64, "training length 64")
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["a/hf: prose", "b/hf: prose", "training length 64"]
    model_lines = [line for line in ax.get_lines() if line.get_label() in labels[:2]]
    assert model_lines[0].get_color() != model_lines[1].get_color()  # one domain: the models differ in colour
    (mark,) = [line for line in ax.get_lines() if line.get_label() == "training length 64"]
    assert list(mark.get_xdata()) == [64, 64]
    assert ax.get_xlabel() == "position (tokens)" and ax.get_ylabel() == "loss (nats/token)"
    assert os.path.getsize(tmp_path / "loss.png") > 0


def test_heatmap_marks_the_given_training_length_label(tmp_path):
    results = niah.summarize({"variant": "value", "scoring": "exact", "lengths": [64, 128, 256], "depths": [0, 100],
                              "trials": 1, "seed": 0,
                              "cells": [{"length": n, "depth": d, "trial": 0, "score": float(n <= 64)}
                                        for n in (64, 128, 256) for d in (0, 100)]})
    fig = niah.plot_heatmap(results, str(tmp_path / "niah.png"), 1024, train_label="max positions 1,024 "
                            "(training length not recorded)")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["max positions 1,024 (training length not recorded)"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["64", "128", "256"]
    fig = niah.plot_heatmap(results, str(tmp_path / "niah.png"), 128)
    (mark,) = [line for line in fig.axes[0].get_lines() if line.get_label() == "training length 128"]
    assert list(mark.get_xdata()) == [1.5, 1.5]  # between 128 and 256


def test_kernels_chart_is_drawn_only_when_a_panel_compares(tmp_path):
    from megatron_lc.bench import kernels

    one_each = [{"op": op, "shape": "64x64", "impl": "torch", "fwd_bwd_ms": 1.0 + i}
                for i, op in enumerate(("rmsnorm", "rope"))]
    assert kernels.plot(one_each, str(tmp_path / "none.png")) is None
    assert not (tmp_path / "none.png").exists()
    rows = one_each + [{"op": "rope", "shape": "64x64", "impl": "triton (ours)", "fwd_bwd_ms": 0.5}]
    fig = kernels.plot(rows, str(tmp_path / "kernels.png"))
    assert [ax.get_title() for ax in fig.axes] == ["rmsnorm", "rope"]
    assert all(ax.get_xlim()[0] == 0 for ax in fig.axes)
    assert [t.get_text() for t in fig.axes[1].get_yticklabels()] == ["64x64\ntorch", "64x64\ntriton (ours)"]
    assert os.path.getsize(tmp_path / "kernels.png") > 0


def test_train_report_plot_axes_start_at_zero(tmp_path):
    from megatron_lc.bench import train_report

    rows = [{"contender": c, "seq_len": s, "status": "ok", "tokens_per_second": tps * s,
             "peak_extra_gib": 0.5 + s / 1e4, "peak_abs_gib": 1.0 + s / 1e4}
            for c, tps in (("ours", 9.0), ("hf", 8.0)) for s in (1024, 2048)]
    fig = train_report.plot(rows, str(tmp_path / "train.png"))
    ax_t, ax_m = fig.axes
    assert ax_t.get_ylim()[0] == 0 and ax_m.get_ylim()[0] == 0
    assert [t.get_text() for t in ax_t.get_legend().get_texts()] == ["ours", "hf"]
    assert ax_t.get_ylabel() == "tokens/s" and ax_m.get_ylabel() == "peak memory (GiB)"
    assert os.path.getsize(tmp_path / "train.png") > 0


# ---- 9: --out defaults in --help ------------------------------------------------------------------------------
@pytest.mark.parametrize("command", [("eval", "niah"), ("eval", "loss"), ("bench", "kernels"), ("bench", "train"),
                                     ("bench", "cp"), ("bench", "data")])
def test_out_default_shows_in_help(command):
    _, subparsers = build_parser()
    parser = subparsers[command[0]]
    sub = next(a for a in parser._actions if a.dest == "what").choices[command[1]]
    (out,) = [a for a in sub._actions if a.dest == "out"]
    help_text = " ".join(sub.format_help().split())
    out_help = help_text[help_text.rindex("--out OUT"):].split(" --")[0]
    assert re.search(rf"\(default:? {re.escape(out.default)}\)", out_help), out_help


def test_every_bench_says_where_it_wrote(tmp_path, monkeypatch, capsys):
    """bench data (here a stand-in with its flags, writing what it writes) ends with the folder and its new files."""
    from megatron_lc.bench import cli as bench_cli

    def fake_run(args):
        os.makedirs(os.path.join(args.out, "sp"), exist_ok=True)
        for name in ("bench_data.json", os.path.join("sp", "sp.model")):
            with open(os.path.join(args.out, name), "w") as f:
                f.write("{}")
        return 0

    monkeypatch.setitem(bench_cli.BENCHES, "data", bench_cli.BENCHES["data"]._replace(run=fake_run))
    (tmp_path / "old.txt").write_text("from an earlier run")
    os.utime(tmp_path / "old.txt", (0, 0))
    assert main(["bench", "data", "--out", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip().endswith(f"[bench data] wrote under {tmp_path}: bench_data.json, "
                                                    f"{os.path.join('sp', 'sp.model')}")
