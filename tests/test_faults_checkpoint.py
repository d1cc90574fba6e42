"""Checkpoint faults, injected: tampered pickles are never executed, damaged files are named by the manifest before
anything reads them, a corrupt newest checkpoint falls back to the previous one, convert never deletes what it did
not write, and (slow) SIGKILL of every process at random moments while saving every step loses nothing.

Small checkpoints are written in this process (a one-process group, ended by ``process_group``); trainer runs
happen in spawned processes (``run_distributed``) as in tests/test_trainer.py, whose corpus, jobs and helpers we reuse.
"""
import hashlib
import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from dist_utils import run_distributed
from hf_helpers import small_config
from megatron_lc.checkpoint import convert, folders
from megatron_lc.checkpoint.convert import load_model
from megatron_lc.checkpoint.folders import CheckpointError, CorruptCheckpoint
from megatron_lc.cli import main
from megatron_lc.distributed import process_group
from megatron_lc.model import Transformer, save_hf
from test_trainer import BASE, LEGACY, _cfg, _free_port, _job, _write_dataset

SIDE_EFFECT = "pickle-ran-code"  # the file a tampered pickle creates if anything ever unpickles it


class Planted:
    """A pickle that creates ``path`` when unpickled (what a tampered checkpoint would do with os.system)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The training tokens of tests/test_trainer.py's corpus (the trainer jobs reused from there read them)."""
    d = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    _write_dataset(d / "train", np.tile(np.arange(64), 400) + 64 * rng.integers(0, 2, 64 * 400))
    return str(d)


def _config():
    return small_config(num_layers=1, hidden_size=32, head_dim=8, intermediate_size=48, vocab_size=64)


def _save_tiny(path, seed=0):
    """A weights-only checkpoint of a tiny model at ``path`` (as convert writes one); returns the model."""
    torch.manual_seed(seed)  # the RNG file differs between seeds, so a swapped one is a different file
    model = Transformer(_config(), seed=seed)
    state = {"step": 0, "skipped": 0, "tokens_seen": 0,
             "config": {"model": {"preset": None, "config": model.config.to_dict(), "init_from": None}}}
    with process_group():
        folders.save(str(path), model, None, state)
    return model


def _rewrite_manifest(path):
    """What a tamperer who also edits the manifest does: make it match the files again (it is not a signature)."""
    names = [n for n in os.listdir(path) if folders._LISTED.match(n)]
    folders.write_manifest(str(path), {n: folders._file_entry(os.path.join(path, n)) for n in names})


# ---- the manifest ------------------------------------------------------------------------------------------------
def test_manifest_lists_every_file_before_the_marker(tmp_path, monkeypatch):
    seen = {}
    write_marker = folders.write_marker

    def check_then_mark(path):
        seen["manifest_before_marker"] = os.path.isfile(os.path.join(path, "MANIFEST.json"))
        write_marker(path)

    monkeypatch.setattr(folders, "write_marker", check_then_mark)
    _save_tiny(tmp_path / "step_0")
    assert seen["manifest_before_marker"]
    manifest = json.loads((tmp_path / "step_0" / "MANIFEST.json").read_text())["files"]
    on_disk = sorted(os.listdir(tmp_path / "step_0"))
    assert on_disk == sorted([*manifest, "MANIFEST.json", "COMPLETE"])
    assert {".metadata", "__0_0.distcp", "rng_rank0.pt", "trainer_state.pt"} <= set(manifest)
    for name, entry in manifest.items():
        data = (tmp_path / "step_0" / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}, name


def _truncate(p, other):
    os.truncate(p / "__0_0.distcp", os.path.getsize(p / "__0_0.distcp") // 2)
    return "__0_0.distcp"


def _flip_byte(p, other):  # same size, one byte changed: only the hash sees it
    data = bytearray((p / "__0_0.distcp").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (p / "__0_0.distcp").write_bytes(bytes(data))
    return "__0_0.distcp"


def _empty_trainer_state(p, other):
    (p / "trainer_state.pt").write_bytes(b"")
    return "trainer_state.pt"


def _missing_shard(p, other):
    os.remove(p / "__0_0.distcp")
    return "__0_0.distcp: missing"


def _extra_shard(p, other):
    shutil.copy(p / "__0_0.distcp", p / "__1_0.distcp")
    return "__1_0.distcp: a file of ours that the manifest does not list"


def _swapped_rng(p, other):
    shutil.copy(other / "rng_rank0.pt", p / "rng_rank0.pt")
    return "rng_rank0.pt"


def _swapped_metadata(p, other):
    shutil.copy(other / ".metadata", p / ".metadata")
    return ".metadata"


@pytest.mark.parametrize("damage", [_truncate, _flip_byte, _empty_trainer_state, _missing_shard, _extra_shard,
                                    _swapped_rng, _swapped_metadata])
def test_single_file_damage_is_named_before_loading(tmp_path, damage):
    """eval's load_model (and every other loader) refuses a checkpoint with one damaged, missing, extra or swapped
    file, naming that file."""
    _save_tiny(tmp_path / "other", seed=1)
    _save_tiny(tmp_path / "step_0", seed=0)
    named = damage(tmp_path / "step_0", tmp_path / "other")
    with pytest.raises(CorruptCheckpoint, match=f"step_0 failed verification .*{named}".replace("(", r"\(")):
        load_model(str(tmp_path / "step_0"))


def _two_rank_job(rank, world, path):
    """Save a checkpoint from 2 ranks; rank 0 damages the second file of the sorted manifest (in rank 1's share:
    files 1, 3, ...); every rank verifies. Returns (manifest names, damaged name, the error this rank saw)."""
    import torch.distributed as dist

    folders.save(path, Transformer(_config(), seed=0), None, {"config": {}})
    with open(os.path.join(path, "MANIFEST.json")) as f:
        names = sorted(json.load(f)["files"])
    if rank == 0:
        with open(os.path.join(path, names[1]), "r+b") as f:
            first = f.read(1)
            f.seek(0)
            f.write(bytes([first[0] ^ 0xFF]))
    dist.barrier()
    try:
        folders.verify(path)
        return names, names[1], None
    except CorruptCheckpoint as e:
        return names, names[1], str(e)


def test_two_ranks_share_the_hashing_and_agree(tmp_path):
    """A checkpoint saved by 2 ranks lists both ranks' files; damage to a file that rank 1 hashes is reported
    identically on both ranks, so neither goes on alone."""
    (names, bad, seen0), (_, _, seen1) = run_distributed(_two_rank_job, 2, str(tmp_path / "step_0"))
    assert {"rng_rank0.pt", "rng_rank1.pt", "__0_0.distcp", "__1_0.distcp"} <= set(names)
    assert seen0 is not None and seen0 == seen1 and f"{bad}: its sha256 differs" in seen0


def test_checkpoint_without_manifest_loads_unverified(capsys):
    """tests/data/legacy_checkpoint predates manifests: it loads, with one line saying it was not verified."""
    load_model(os.path.join(LEGACY, "step_2"))
    out = capsys.readouterr().out
    assert out.count("loading it unverified") == 1 and "has no MANIFEST.json" in out


# ---- tampered pickles ---------------------------------------------------------------------------------------------
def _plant(path, name, side, manifest_too):
    """Replace file ``name`` of checkpoint ``path`` with a pickle that creates ``side`` when unpickled."""
    if name == ".metadata":  # DCP reads it with pickle.load
        (path / name).write_bytes(pickle.dumps(Planted(side)))
    else:
        torch.save({"config": Planted(side), "cpu": Planted(side)}, path / name)
    if manifest_too:
        _rewrite_manifest(path)


TAMPERED = [("trainer_state.pt", False), ("trainer_state.pt", True), ("rng_rank0.pt", False),
            ("rng_rank0.pt", True), (".metadata", False)]


@pytest.mark.parametrize("name,manifest_too", TAMPERED)
def test_tampered_pickle_never_runs_in_eval_or_convert(tmp_path, capsys, name, manifest_too):
    """A planted pickle in trainer_state.pt / rng_rank0.pt (manifest stale, or rewritten to match: then
    weights_only refuses it) or in DCP's .metadata (manifest stale: refused before DCP reads it) never runs, in
    eval's load_model nor in ``megatron-lc convert``."""
    ckpt, side = tmp_path / "step_0", tmp_path / SIDE_EFFECT
    _save_tiny(ckpt)
    _plant(ckpt, name, side, manifest_too)
    with pytest.raises(CorruptCheckpoint, match=name.replace(".", r"\.")):
        load_model(str(ckpt))
    with pytest.raises(SystemExit) as exit_:
        main(["convert", "--from", str(ckpt), "--to", str(tmp_path / "hf")])
    assert exit_.value.code == 2 and name in capsys.readouterr().err
    assert not side.exists() and not (tmp_path / "hf").exists()


def _resume_tampered_job(rank, world, corpus, overrides, root):
    """A 1-step run saves step_1; then, for each tampering, a copy of it with that file planted is resumed
    (explicitly, then with --resume auto); returns the errors."""
    from megatron_lc.train.trainer import Trainer

    _job(rank, world, corpus, [*overrides, f"checkpoint.dir={root}/run"], until=1)
    errors = []
    for i, (name, manifest_too) in enumerate(TAMPERED):
        from pathlib import Path

        run = Path(root) / f"tampered{i}"
        shutil.copytree(Path(root) / "run" / "step_1", run / "step_1")
        _plant(run / "step_1", name, Path(root) / SIDE_EFFECT, manifest_too)
        for resume in (str(run / "step_1"), "auto"):
            try:
                Trainer(_cfg(corpus, [*overrides, f"checkpoint.dir={run}", f"checkpoint.resume={resume}"]))
                errors.append(None)
            except CheckpointError as e:
                errors.append(str(e))
    return errors


def test_tampered_pickle_never_runs_on_resume(corpus, tmp_path):
    overrides = ["train.steps=2", "data.micro_batch_size=2", "logging.tensorboard=false"]
    errors = run_distributed(_resume_tampered_job, 1, corpus, overrides, str(tmp_path))[0]
    for (name, _), explicit, auto in zip(TAMPERED, errors[::2], errors[1::2]):
        assert explicit is not None and name in explicit, (name, explicit)
        assert auto is not None and "no complete checkpoint" in auto and name in auto, (name, auto)
    assert not (tmp_path / SIDE_EFFECT).exists()


# ---- resume with a corrupt newest checkpoint --------------------------------------------------------------------
def _fallback_job(rank, world, corpus, overrides, root):
    """Straight 6 steps; a run to 4 saving step_2 and step_4; step_4's shard truncated; --resume auto to 6 (falls
    back to step_2); then an explicit resume of a corrupt folder, and --resume auto with every checkpoint corrupt."""
    from megatron_lc.train.trainer import Trainer

    straight = _job(rank, world, corpus, overrides)
    ckpt = [*overrides, f"checkpoint.dir={root}", "checkpoint.every=2", "checkpoint.keep=3"]
    first = _job(rank, world, corpus, ckpt, until=4)
    shard = os.path.join(root, "step_4", "__0_0.distcp")
    os.truncate(shard, os.path.getsize(shard) - 1)
    resumed = _job(rank, world, corpus, [*ckpt, "checkpoint.resume=auto"])
    step_4_rewritten = folders.verify(os.path.join(root, "step_4"))
    open(os.path.join(root, "step_6", "trainer_state.pt"), "w").close()
    out = {"straight": straight, "first": first, "resumed": resumed, "step_4_rewritten": step_4_rewritten}
    try:
        Trainer(_cfg(corpus, [*ckpt, f"checkpoint.resume={root}/step_6"]))
    except CheckpointError as e:
        out["explicit"] = str(e)
    for step in (2, 4):
        os.remove(os.path.join(root, f"step_{step}", "rng_rank0.pt"))
    try:
        Trainer(_cfg(corpus, [*ckpt, "checkpoint.resume=auto"]))
    except CheckpointError as e:
        out["none_left"] = str(e)
    return out


def test_corrupt_newest_checkpoint_falls_back_and_continues_identically(corpus, tmp_path, capfd):
    overrides = ["train.steps=6", "data.micro_batch_size=2", "logging.tensorboard=false"]
    out = run_distributed(_fallback_job, 1, corpus, overrides, str(tmp_path))[0]
    printed = capfd.readouterr().out
    assert f"checkpoint {tmp_path}/step_4 failed verification" in printed and "__0_0.distcp: " in printed
    assert f"falling back to {tmp_path}/step_2" in printed
    resumed = out["resumed"]
    assert resumed["start_step"] == 2 and resumed["steps"] == [3, 4, 5, 6]
    assert resumed["loss"] == out["straight"]["loss"][2:]  # identical continuation
    assert out["step_4_rewritten"] is True  # the corrupt step_4 (ours) was replaced by a good one
    # an explicit resume never falls back: it names the file
    assert "step_6 failed verification" in out["explicit"] and "trainer_state.pt: 0 bytes" in out["explicit"]
    assert "falling back" not in out["explicit"]
    none_left = out["none_left"]
    assert all(f"step_{s}" in none_left for s in (2, 4, 6)) and "rng_rank0.pt: missing" in none_left
    assert "--resume <dir>/step_<N>" in none_left and "fresh checkpoint.dir" in none_left


def test_pruning_never_deletes_the_checkpoint_just_written(tmp_path):
    """keep=1 with a later step_6 of an abandoned branch present: saving step_4 keeps step_4 (verified) and
    deletes only our files of the others, never a file we did not write."""
    _save_tiny(tmp_path / "step_2")
    _save_tiny(tmp_path / "step_6")
    (tmp_path / "step_2" / "notes.txt").write_text("mine")
    model = Transformer(_config(), seed=0)
    with process_group():
        folders.save(str(tmp_path / "step_4"), model, None, {"config": {}}, keep=1)
    complete, _ = folders.find_checkpoints(str(tmp_path))
    assert [s for s, _ in complete] == [4] and folders.verify(str(tmp_path / "step_4"))
    assert os.listdir(tmp_path / "step_2") == ["notes.txt"] and not (tmp_path / "step_6").exists()


# ---- convert and save never delete what they did not write ---------------------------------------------------
def _convert(capsys, *args):
    """``megatron-lc convert ARGS`` in this process: (exit status, stderr)."""
    try:
        status = main(["convert", *map(str, args)])
    except SystemExit as e:
        status = e.code
    return status, capsys.readouterr().err


def test_convert_never_deletes_a_folder_it_did_not_write(tmp_path, capsys):
    model = Transformer(_config(), seed=3)
    save_hf(model, str(tmp_path / "hf"))
    runs = tmp_path / "runs"
    (runs / "other-run").mkdir(parents=True)
    (runs / "other-run" / "metrics.jsonl").write_text("{}\n")
    (runs / "notes.txt").write_text("keep me")

    status, err = _convert(capsys, "--from", tmp_path / "hf", "--to", runs)  # the typo of the issue
    assert status == 2 and str(runs) in err and "--force" in err
    assert (runs / "notes.txt").read_text() == "keep me" and (runs / "other-run" / "metrics.jsonl").exists()

    status, _ = _convert(capsys, "--from", tmp_path / "hf", "--to", runs, "--force")  # written beside them
    assert status == 0 and (runs / "notes.txt").read_text() == "keep me"
    assert (runs / "other-run" / "metrics.jsonl").exists() and folders.verify(str(runs))
    back = load_model(str(runs))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), back.parameters()))

    # a complete checkpoint of ours is refused too, and --force replaces it; a half-written one is replaced
    status, err = _convert(capsys, "--from", tmp_path / "hf", "--to", runs)
    assert status == 2 and "already holds a checkpoint" in err
    half = tmp_path / "half" / "step_0"
    _save_tiny(half)
    os.remove(half / "COMPLETE")
    status, _ = _convert(capsys, "--from", tmp_path / "hf", "--to", half)
    assert status == 0 and folders.verify(str(half))

    # checkpoint -> HF: an existing non-empty folder needs --force
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "README.md").write_text("mine")
    status, err = _convert(capsys, "--from", half, "--to", tmp_path / "out")
    assert status == 2 and str(tmp_path / "out") in err and not (tmp_path / "out" / "config.json").exists()
    status, _ = _convert(capsys, "--from", half, "--to", tmp_path / "out", "--force")
    assert status == 0 and (tmp_path / "out" / "config.json").exists()
    assert (tmp_path / "out" / "README.md").read_text() == "mine"


def test_save_refuses_a_folder_with_files_it_did_not_write(tmp_path):
    target = tmp_path / "step_3"
    target.mkdir()
    (target / "data.bin").write_bytes(b"precious")
    with pytest.raises(CheckpointError, match=f"checkpoint target {target} holds files a checkpoint save did not "
                                              f"write \\(data.bin\\)"):
        _save_tiny(target)
    assert (target / "data.bin").read_bytes() == b"precious" and os.listdir(target) == ["data.bin"]


def test_convert_passes_allow_nonfinite_to_load_hf(tmp_path, capsys, monkeypatch):
    save_hf(Transformer(_config(), seed=3), str(tmp_path / "hf"))
    seen = []
    real = convert.load_hf

    def recording_load_hf(path, **kw):
        seen.append(kw.get("allow_nonfinite"))
        kw.pop("allow_nonfinite", None)
        return real(path, **kw)

    monkeypatch.setattr(convert, "load_hf", recording_load_hf)
    assert _convert(capsys, "--from", tmp_path / "hf", "--to", tmp_path / "a")[0] == 0
    assert _convert(capsys, "--from", tmp_path / "hf", "--to", tmp_path / "b", "--allow-nonfinite")[0] == 0
    assert seen == [False, True]


# ---- kill -9 -------------------------------------------------------------------------------------------------------
def _launch(corpus, args, log):
    """Two gloo ranks of ``megatron-lc train`` started as torchrun would (RANK, WORLD_SIZE, MASTER_*), so every
    process of the job is ours to SIGKILL."""
    port, procs = _free_port(), []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "megatron_lc.cli", "train", f"data.train_tokens={corpus}/train.bin", *BASE,
             *args], env=env, stdout=log, stderr=subprocess.STDOUT))
    return procs


def _step_folders(root):
    return {n for n in os.listdir(root) if n.startswith("step_")} if os.path.isdir(root) else set()


def _losses(log_dir):
    path = os.path.join(log_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return {}
    return {r["step"]: r["train/loss"] for r in map(json.loads, open(path).read().splitlines())}


@pytest.mark.slow
def test_sigkill_of_every_process_at_random_moments_then_resume_is_identical(corpus, tmp_path):
    """2 ranks saving every step; up to 3 tries, each SIGKILLs both processes at a random moment (seeded) shortly
    after a save began; then --resume auto runs to the end (or, when a try ended the run before its kill landed,
    says the run is complete and exits 0). Every loss any try logged equals the uninterrupted run's at that step,
    and every complete checkpoint left verifies."""
    steps = 12
    common = [f"train.steps={steps}", "data.micro_batch_size=2", "checkpoint.every=1", "checkpoint.keep=2",
              "logging.tensorboard=false"]
    rng = random.Random(16)
    with open(tmp_path / "log.txt", "w") as log:
        ref = _launch(corpus, [*common, f"checkpoint.dir={tmp_path}/ref"], log)
        assert [p.wait(timeout=300) for p in ref] == [0, 0], (tmp_path / "log.txt").read_text()[-3000:]
        run, tries = tmp_path / "run", []
        for attempt in range(4):
            before = _step_folders(run)
            procs = _launch(corpus, [*common, f"checkpoint.dir={run}", f"logging.dir={tmp_path}/log{attempt}",
                                     "checkpoint.resume=auto"], log)
            last = attempt == 3 or (bool(tries) and tries[-1] == [0, 0])  # the run ended: no more kills
            if not last:
                deadline = time.monotonic() + 120
                while time.monotonic() < deadline and all(p.poll() is None for p in procs) and \
                        not _step_folders(run) - before:  # a save has begun
                    time.sleep(0.005)
                time.sleep(rng.uniform(0.0, 0.8))
                for p in rng.sample(procs, 2):
                    p.send_signal(signal.SIGKILL)
                    time.sleep(rng.uniform(0.0, 0.02))
            tries.append([p.wait(timeout=300) for p in procs])
            if last:
                break
    printed = (tmp_path / "log.txt").read_text()
    assert tries[-1] == [0, 0], (tries, printed[-3000:])
    assert any(rc == [-signal.SIGKILL] * 2 for rc in tries[:-1]), tries
    reference = _losses(tmp_path / "ref")
    assert sorted(reference) == list(range(1, steps + 1))
    logged = [_losses(tmp_path / f"log{a}") for a in range(len(tries))]
    trained = [a for a, losses in enumerate(logged) if losses]
    assert max(logged[trained[-1]]) == steps  # some try ended the run
    assert trained[-1] == 0 or min(logged[trained[-1]]) > 1  # and it resumed: it did not start over
    if not logged[-1]:  # the run had ended before the last try: that one said so and touched nothing
        assert f"the run is already complete: {run}/step_{steps} is step {steps}" in printed, printed[-3000:]
    for attempt, losses in enumerate(logged):
        for step, loss in losses.items():
            assert loss == reference[step], (attempt, step, loss, reference[step])
    for _, path in folders.find_checkpoints(str(run))[0]:
        assert folders.verify(path), path
    np.testing.assert_array_equal([logged[trained[-1]][s] for s in sorted(logged[trained[-1]])],
                                  [reference[s] for s in sorted(logged[trained[-1]])])
