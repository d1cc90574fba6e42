"""Faults around the run folder (issue 16, cases 2, 3, 10, 11, 15): a fresh run never mixes with another run's
folder, metrics are appended and pruning deletes only this run's checkpoints; a resume with a changed config says
what changed, applies what may change and refuses the rest; collectives time out after parallel.timeout_s with a
message naming it; workers of a SIGKILLed torchrun agent exit and a stale process never writes into a folder a newer
one took over; SIGTERM says so and exits 143; overrides may follow --resume.

Trainer runs happen in spawned processes (``run_distributed``), the CLI ones in subprocesses.
"""
import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback

import numpy as np
import pytest

from dist_utils import run_distributed
from megatron_lc.configtools import ConfigError
from megatron_lc.data.indexed import IndexedDatasetWriter
from megatron_lc.train.config import load_train_config

BASE = ["model.preset=tiny", "data.seq_len=32", "optim.lr=3e-3", "schedule.warmup_steps=1",
        "data.micro_batch_size=2", "logging.tensorboard=false"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    tokens = np.tile(np.arange(64), 100) + 64 * rng.integers(0, 2, 6400)
    with IndexedDatasetWriter(str(d / "train"), dtype=np.uint16) as w:
        for start in range(0, len(tokens), 640):
            w.add_document(tokens[start:start + 640])
    return str(d / "train.bin")


def _cfg(corpus, overrides):
    return load_train_config(None, [f"data.train_tokens={corpus}", *BASE, *overrides])


def _trainer(corpus, overrides):
    from megatron_lc.train.trainer import Trainer

    return Trainer(_cfg(corpus, overrides))


def _error(corpus, overrides) -> str | None:
    """The message of the error a Trainer build with ``overrides`` raises (None: it builds)."""
    try:
        _trainer(corpus, overrides)
    except ConfigError as e:
        return str(e)
    return None


def _listing(folder) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes (what "nothing changed" compares)."""
    out = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = f.read()
    return out


def _steps(path) -> list[int]:
    with open(path) as f:
        return [json.loads(line)["step"] for line in f]


def _logged(run) -> int:
    """Complete lines in ``run``/metrics.jsonl (0 before it exists): how far a run in another process got."""
    try:
        with open(os.path.join(run, "metrics.jsonl")) as f:
            return f.read().count("\n")
    except FileNotFoundError:
        return 0


# ---- the trainer scenarios: one spawned process runs them all (a process's first Trainer costs seconds) --------
def _fresh(corpus, run):
    _trainer(corpus, ["train.steps=2", f"checkpoint.dir={run}"]).run()
    before = _listing(run)
    refused = _error(corpus, ["train.steps=3", f"checkpoint.dir={run}"])
    unchanged = _listing(run) == before
    if refused is None:  # it trained over the other run: nothing more to see
        return refused, unchanged, before
    _trainer(corpus, ["train.steps=3", f"checkpoint.dir={run}", "checkpoint.overwrite=true"]).run()
    return refused, unchanged, before


def _prune(corpus, run):
    common = ["train.steps=8", f"checkpoint.dir={run}", "checkpoint.every=2", "checkpoint.keep=1"]
    _trainer(corpus, common).run(until=4)
    other = run + "-other"
    _trainer(corpus, ["train.steps=1", f"checkpoint.dir={other}"]).run()
    shutil.copytree(os.path.join(other, "step_1"), os.path.join(run, "step_1"))  # another run's checkpoint
    _trainer(corpus, [*common, "checkpoint.resume=auto"]).run()


def _append(corpus, run):
    common = ["train.steps=6", f"checkpoint.dir={run}", "checkpoint.every=2", "checkpoint.keep=5"]
    _trainer(corpus, common).run(until=4)
    with open(os.path.join(run, "metrics.jsonl")) as f:
        first = f.read()
    with open(os.path.join(run, "metrics.jsonl"), "a") as f:
        f.write('{"step": 5, "train/lo')  # a crash mid-write
    _trainer(corpus, [*common, f"checkpoint.resume={run}/step_2"]).run(until=4)
    return first


def _changed_config(corpus, run):
    from megatron_lc.checkpoint import folders

    common = ["train.steps=6", f"checkpoint.dir={run}"]
    first = _trainer(corpus, common)
    first.run(until=3)
    # weights only (as `convert` writes them): a warm start, where anything may change
    warm = run + "-warm/step_0"
    folders.save(warm, first.model, None, {"step": 0, "skipped": 0, "tokens_seen": 0, "config": first.cfg.to_dict()})
    resume = [*common, "checkpoint.resume=auto"]
    out = {"refused": {}}
    for key, overrides in {"seed": ["train.seed=1"], "shape": ["model.config.num_layers=1"],
                           "seq_len": ["data.seq_len=64"], "dtype": ["train.dtype=bfloat16"],
                           "steps": ["train.steps=3"], "batch": ["data.micro_batch_size=1"]}.items():
        out["refused"][key] = _error(corpus, [*resume, *overrides])
    out["batch_allowed"] = _error(corpus, [*resume, "data.micro_batch_size=1", "checkpoint.allow_batch_change=true"])
    out["same_batch_by_accumulation"] = _error(corpus, [*resume, "data.micro_batch_size=1",
                                                        "data.global_batch_tokens=64"])
    out["warm_start"] = _error(corpus, ["train.steps=6", f"checkpoint.resume={warm}", "data.seq_len=64",
                                        "optim.lr=1e-4"])
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        t = _trainer(corpus, [*resume, "train.steps=8", "optim.lr=1e-3", "schedule.kind=constant",
                              "optim.weight_decay=0.05"])
    out["printed"] = printed.getvalue()
    out["groups"] = [(g["lr"], g["initial_lr"], g["weight_decay"]) for g in t.optimizer.param_groups]
    out["base_lrs"] = list(t.scheduler.base_lrs)
    out["logged_lr"] = [h["train/lr"] for h in t.run(until=5)]
    return out


def _stale(corpus, run):
    common = ["train.steps=6", f"checkpoint.dir={run}", "checkpoint.every=2"]
    stale = _trainer(corpus, common)
    stale.run(until=2)
    _trainer(corpus, [*common, "checkpoint.resume=auto"])  # a newer process takes the folder over
    errors = []
    for attempt in (stale.run, stale.save):
        try:
            attempt()
        except Exception as e:  # noqa: BLE001 - which error, and its message, is the result
            errors.append(f"{type(e).__name__}: {e}")
    return errors


def _complete(corpus, run):
    from megatron_lc.train.trainer import train

    _trainer(corpus, ["train.steps=2", f"checkpoint.dir={run}"]).run()
    _trainer(corpus, ["train.steps=4", f"checkpoint.dir={run}-stopped"]).run(until=2)  # stopped, not ended
    out = {}
    for name, folder in (("ended", run), ("stopped", run + "-stopped")):
        before, printed = _listing(folder), io.StringIO()
        with contextlib.redirect_stdout(printed):
            history = train(_cfg(corpus, [f"train.steps={2 if name == 'ended' else 4}", f"checkpoint.dir={folder}",
                                          "checkpoint.resume=auto"]))
        out[name] = {"steps": [h["step"] for h in history], "printed": printed.getvalue(),
                     "unchanged": _listing(folder) == before}
    return out


SCENARIOS = {"fresh": _fresh, "prune": _prune, "append": _append, "changed_config": _changed_config,
             "stale": _stale, "complete": _complete}


def _scenarios_job(rank, world, corpus, root):
    out = {}
    for name, scenario in SCENARIOS.items():
        try:
            out[name] = ("ok", scenario(corpus, os.path.join(root, name)))
        except Exception:  # noqa: BLE001 - reported by that scenario's test; the others still run
            out[name] = ("error", traceback.format_exc())
    return out


@pytest.fixture(scope="module")
def scenarios(corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return root, run_distributed(_scenarios_job, 1, corpus, str(root), timeout=300)[0]


def _result(scenarios, name):
    """(the scenario's run folder, what it returned); its traceback fails the test when it raised."""
    root, results = scenarios
    status, value = results[name]
    if status == "error":
        pytest.fail(f"scenario {name} raised in the trainer process:\n{value}")
    return root / name, value


# ---- case 2: a fresh run in another run's folder; pruning and metrics touch only this run's files ---------------
def test_fresh_run_refuses_another_runs_folder_and_overwrite_moves_it_aside(scenarios):
    run, (refused, unchanged, before) = _result(scenarios, "fresh")
    assert refused and f"checkpoint.dir={run} holds another run's files" in refused, refused
    for choice in ("--resume auto", "checkpoint.overwrite=true", f"checkpoint.dir={run}-2"):
        assert choice in refused, (choice, refused)
    assert unchanged  # the refusal wrote, truncated and deleted nothing
    # overwrite moved the old run, byte for byte, into replaced_<date>_<run id>/; the folder holds the new run only
    (aside,) = [p for p in run.iterdir() if p.name.startswith("replaced_")]
    assert _listing(aside) == before
    old_id = json.loads(before["run.json"])["run_id"]
    assert aside.name.endswith(old_id)
    assert json.loads((run / "run.json").read_text())["run_id"] != old_id
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("step_")) == ["step_3"]
    assert _steps(run / "metrics.jsonl") == [1, 2, 3]


def test_pruning_deletes_only_this_runs_checkpoints(scenarios):
    """keep=1 over a folder that also holds another run's (older) checkpoint: that one stays, byte for byte."""
    run, _ = _result(scenarios, "prune")
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("step_")) == ["step_1", "step_8"]
    assert _listing(run / "step_1") == _listing(f"{run}-other/step_1")


def test_metrics_are_appended_on_resume_never_truncated(scenarios):
    """Resumed from step_2 after steps 1-4 were logged: the old lines stay, the new ones follow (only the torn
    half-line of a crash is cut)."""
    run, first = _result(scenarios, "append")
    assert (run / "metrics.jsonl").read_text().startswith(first)
    assert _steps(run / "metrics.jsonl") == [1, 2, 3, 4, 3, 4]


# ---- case 3: a resume with a changed config ---------------------------------------------------------------------
def test_resume_with_a_changed_config(scenarios):
    """lr, schedule and steps are applied (the optimizer and scheduler do not keep the checkpoint's lr) and the diff
    is printed; model shape, seeds, seq_len and dtype are refused naming the key and model.init_from; train.steps
    at or below the checkpoint's step is an error; a new global batch needs checkpoint.allow_batch_change; a
    weights-only checkpoint is a warm start."""
    run, out = _result(scenarios, "changed_config")
    refused = out["refused"]
    for key, named in (("seed", "train.seed (0 -> 1)"), ("shape", "model.config.num_layers (2 -> 1)"),
                       ("seq_len", "data.seq_len (32 -> 64)"), ("dtype", "train.dtype ('float32' -> 'bfloat16')")):
        assert refused[key] and named in refused[key] and "model.init_from=" in refused[key], (key, refused[key])
    assert refused["steps"] and "train.steps=3 is at or below step 3" in refused["steps"]
    assert refused["batch"] and "64 tokens per optimizer step then, 32 now" in refused["batch"]
    assert "checkpoint.allow_batch_change=true" in refused["batch"]
    assert out["batch_allowed"] is None and out["same_batch_by_accumulation"] is None and out["warm_start"] is None
    assert out["groups"] == [(1e-3, 1e-3, 0.05), (1e-3, 1e-3, 0.0)]  # no decay on norms, as built
    assert out["base_lrs"] == [1e-3, 1e-3] and out["logged_lr"] == [1e-3, 1e-3]
    assert f"config changes since {run}/step_3 (checkpoint -> now):" in out["printed"], out["printed"]
    for line in ("optim.lr: 0.003 -> 0.001 (applied)", "schedule.kind: 'cosine' -> 'constant' (applied)",
                 "train.steps: 6 -> 8 (applied)", "optim.weight_decay: 0.1 -> 0.05 (applied)"):
        assert line in out["printed"], (line, out["printed"])


def test_resume_auto_of_a_run_that_ended_is_a_success_that_touches_nothing(scenarios):
    """A requeued job, or a torchrun restart after the last save: resume=auto finds the checkpoint at the run's own
    train.steps, says so and returns without training or writing a byte; a run stopped before its end trains on."""
    run, out = _result(scenarios, "complete")
    ended, stopped = out["ended"], out["stopped"]
    assert ended["steps"] == [] and ended["unchanged"], ended
    assert f"the run is already complete: {run}/step_2 is step 2 of train.steps=2" in ended["printed"], ended
    assert stopped["steps"] == [3, 4] and not stopped["unchanged"], stopped
    assert "already complete" not in stopped["printed"]


# ---- case 10: a newer process took the folder over --------------------------------------------------------------
def test_stale_process_never_writes_into_a_taken_over_folder(scenarios):
    run, errors = _result(scenarios, "stale")
    assert len(errors) == 2 and all(e.startswith(f"RunFolderTakenOver: {run} was taken over by a newer process")
                                    for e in errors), errors
    assert _steps(run / "metrics.jsonl") == [1, 2]
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("step_")) == ["step_2"]


# ---- case 15: overrides after --resume ---------------------------------------------------------------------------
def test_overrides_after_the_resume_flag(corpus, tmp_path, capsys):
    from megatron_lc import cli

    with pytest.raises(SystemExit) as done:  # the override after the flag reaches the config (and its key check)
        cli.main(["train", f"data.train_tokens={corpus}", "--resume", "auto", f"checkpoint.dir={tmp_path}",
                  "train.stepz=5"])
    assert done.value.code == 2
    assert "did you mean train.steps" in capsys.readouterr().err
    parser, subparsers = cli.build_parser()
    args = cli.parse_args(parser, subparsers, ["train", "--config", "c.yaml", "a.b=1", "--resume", "auto", "c.d=2"])
    assert (args.command, args.config, args.resume, args.overrides) == ("train", "c.yaml", "auto", ["a.b=1", "c.d=2"])


# ---- case 10: timeouts and a dead launcher -----------------------------------------------------------------------
def test_launcher_gone_sees_a_dead_parent_or_store():
    from megatron_lc.distributed import launcher_gone

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        alive = s.getsockname()
        assert launcher_gone(os.getppid(), alive) is None
    assert "does not answer" in launcher_gone(os.getppid(), alive)  # closed now
    assert "torchrun agent (pid 1) is gone" in launcher_gone(1, None)


def _timeout_job(rank, world, corpus):
    from torch.distributed import distributed_c10d as c10d

    trainer = _trainer(corpus, ["train.steps=50", "parallel.timeout_s=2"])
    timeouts = sorted({g._get_backend(d).options._timeout.total_seconds() for g in c10d._world.pg_map
                       for d in g._device_types})
    trainer.grad_hook = lambda t: time.sleep(5) if t.step == 2 and t.rank == 1 else None  # a stalled rank
    try:
        trainer.run()
    except Exception as e:  # noqa: BLE001 - the message is the result
        return timeouts, f"{type(e).__name__}: {e}"
    return timeouts, None


@pytest.mark.slow
def test_collectives_time_out_after_parallel_timeout_s(corpus):
    """Every group (default and mesh) times out after parallel.timeout_s; a stalled rank ends the run with an
    error naming the key and its seconds."""
    results = run_distributed(_timeout_job, 2, corpus, timeout=60)
    for timeouts, _ in results:
        assert timeouts == [2.0]
    message = results[0][1]
    assert message and message.startswith("CollectiveTimeout: rank 0: a collective waited longer than "
                                           "parallel.timeout_s=2 s"), message


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(pid: int) -> list[int]:
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(name))
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait_for(predicate, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return predicate()


def _cli_train(corpus, run, log, *extra, torchrun=False):
    args = [f"data.train_tokens={corpus}", *BASE, "train.steps=100000", f"checkpoint.dir={run}", *extra]
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                 str(_free_port()), "-m", "megatron_lc.cli"] if torchrun else [sys.executable, "-m", "megatron_lc.cli"])
    return subprocess.Popen([*launcher, "train", *args], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


@pytest.mark.slow
def test_workers_of_a_killed_torchrun_agent_exit(corpus, tmp_path):
    run, log_path = tmp_path / "run", tmp_path / "log.txt"
    with open(log_path, "w") as log:
        agent = _cli_train(corpus, run, log, "parallel.timeout_s=10", torchrun=True)
    try:
        assert _wait_for(lambda: _logged(run), 60), log_path.read_text()[-3000:]
        workers = _children(agent.pid)
        assert len(workers) == 2, workers
        agent.kill()
        agent.wait()
        assert _wait_for(lambda: not any(_alive(w) for w in workers), 15), log_path.read_text()[-3000:]
        # the first to notice exits; its peer then notices too, or its next collective fails on the closed pair
        assert "its torchrun agent (pid" in log_path.read_text()
    finally:
        with contextlib.suppress(ProcessLookupError):  # workers left alive (the failure): end them
            os.killpg(agent.pid, signal.SIGKILL)


# ---- case 11: SIGTERM --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_sigterm_says_so_and_exits_143(corpus, tmp_path):
    run, log_path = tmp_path / "run", tmp_path / "log.txt"
    with open(log_path, "w") as log:
        proc = _cli_train(corpus, run, log)
    try:
        assert _wait_for(lambda: _logged(run), 60), log_path.read_text()[-3000:]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 143, log_path.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log_path.read_text()
    (step,) = [p.name.split("_")[1] for p in run.iterdir() if p.name.startswith("step_")]
    assert f"stopped by SIGTERM at step {step}; `--resume auto` continues" in text, text[-2000:]
    assert (run / f"step_{step}" / "COMPLETE").is_file()
