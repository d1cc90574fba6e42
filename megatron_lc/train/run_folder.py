"""Which run a folder belongs to, so that a run never writes over, prunes or continues another run's files.

``run.json`` in each folder a run writes to (``checkpoint.dir``, and ``logging.dir`` when it is another folder)
names the run (``run_id``: fixed for the run's life and stored in each of its checkpoints) and its current owner
(``token``, pid, host, start time: a new token each time a process starts or resumes the run).

- A fresh run (``checkpoint.resume=none``) refuses a folder that holds a run's files (run.json, run_config.yaml,
  metrics.jsonl, TensorBoard events, step_<N>/ folders), naming the choices. ``checkpoint.overwrite=true`` moves those files,
  untouched, into ``replaced_<date>_<old run id>/`` inside the folder: nothing is deleted, the old run can still be
  read or moved back, and the folder then holds only the new run, so pruning, metrics and ``--resume auto`` cannot
  mix the two.
- A resumed run takes the folder over (a new token), keeping the run id; a folder of another run refuses.
- Before each metrics line and checkpoint the trainer checks that its token is still the owner's
  (``RunFolders.check_owner``): a process left running after a newer one took the folder over (a launcher killed
  with its workers alive) stops without writing.
- Pruning to ``checkpoint.keep`` counts and deletes only this run's checkpoints (``belongs_to``).
"""
from __future__ import annotations

import datetime
import os
import re
import socket
import uuid
from dataclasses import dataclass

from ..checkpoint import folders as ckpt
from ..configtools import ConfigError
from ..files import read_json_object, write_json

RUN_FILE = "run.json"
_RUN_NAMES = re.compile(r"^(run\.json|run_config\.yaml|metrics\.jsonl|events\.out\.tfevents\..+|step_\d+)$")


class RunFolderError(ConfigError):
    """A folder holds another run's files, or a run other than the checkpoint's; the message names the folder,
    its config key and the choices."""


class RunFolderTakenOver(RuntimeError):
    """A newer process took the run folder over: this one must not write there any more."""


def new_run_id() -> str:
    """A fresh run id: the UTC start time and 8 random hex digits (sortable, readable, unique)."""
    return f"{datetime.datetime.now(datetime.UTC):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:8]}"


def run_files(folder: str) -> list[str]:
    """The names in ``folder`` that a run writes (sorted; files of anything else are not counted)."""
    return sorted(n for n in os.listdir(folder) if _RUN_NAMES.match(n)) if os.path.isdir(folder) else []


def read_run(folder: str) -> dict | None:
    """``folder``'s run.json ({run_id, token, pid, host, started, created}), or None when it has none."""
    path = os.path.join(folder, RUN_FILE)
    fix = "it is not a run file of ours (JSON with run_id and token): move it away, or choose another folder"
    run = read_json_object(path, fix, RunFolderError)
    if run is not None and not (isinstance(run.get("run_id"), str) and isinstance(run.get("token"), str)):
        raise RunFolderError(f"{path}: {fix}")
    return run


def checkpoint_run_id(path: str) -> str | None:
    """The run id stored in checkpoint ``path`` (None: written before run ids, by `convert`, or unreadable)."""
    try:
        return ckpt.read_trainer_state(path).get("run_id")
    except (ConfigError, OSError):
        return None


def belongs_to(run_id: str):
    """A predicate on checkpoint folders: whether one was written by run ``run_id`` (what pruning may delete)."""
    return lambda path: checkpoint_run_id(path) == run_id


@dataclass(frozen=True)
class RunFolders:
    """The folders a run writes to, with its run id and this process's owner token."""

    run_id: str
    token: str
    folders: tuple[str, ...]

    def check_owner(self) -> None:
        """Raise RunFolderTakenOver when any folder's run.json no longer carries this process's token."""
        for folder in self.folders:
            try:
                run = read_run(folder)
            except RunFolderError:
                run = None
            if run is None or run["token"] != self.token:
                who = (f"pid {run.get('pid')} on {run.get('host')} since {run.get('started')}" if run
                       else f"its {RUN_FILE} is gone")
                raise RunFolderTakenOver(f"{folder} was taken over by a newer process ({who}): this process "
                                         f"(pid {os.getpid()}) stops without writing there again")


def _write_run(folder: str, run: dict) -> None:
    os.makedirs(folder, exist_ok=True)
    write_json(os.path.join(folder, RUN_FILE), run)  # atomic: a reader sees the old owner or the new one


def _shown(names: list[str]) -> str:
    return ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")


def _move_aside(key: str, folder: str, names: list[str], old: dict | None) -> str:
    stamp = f"{datetime.datetime.now(datetime.UTC):%Y%m%d-%H%M%S}"
    dest = os.path.join(folder, f"replaced_{stamp}_{old['run_id'] if old else 'unnamed-run'}")
    suffix = 1
    while os.path.exists(dest + (f"_{suffix}" if suffix > 1 else "")):
        suffix += 1
    dest += f"_{suffix}" if suffix > 1 else ""
    os.makedirs(dest)
    for name in names:
        os.rename(os.path.join(folder, name), os.path.join(dest, name))
    return (f"[megatron-lc] checkpoint.overwrite=true: moved the previous run's files in {key}={folder} "
            f"({_shown(names)}) into {dest}; nothing was deleted")


def take(folders: dict[str, str], *, fresh: bool, overwrite: bool = False, run_id: str | None = None,
         checkpoint: str | None = None) -> tuple[RunFolders, list[str]]:
    """Take ``folders`` ({config key: folder}) for this process (rank 0 only): check them, write run.json with a
    new owner token, and return the RunFolders with the lines to print.

    ``fresh``: a new run; a folder holding a run's files is a RunFolderError naming the choices, or with
    ``overwrite`` its files are moved aside. Otherwise a resume of run ``run_id`` (the checkpoint's; None: the
    folder's run, or a new id when the folder has none) from ``checkpoint``; a folder of another run refuses."""
    owners = {key: read_run(folder) for key, folder in folders.items()}
    notes = []
    if fresh:
        busy = {key: run_files(folder) for key, folder in folders.items() if run_files(folder)}
        for key, names in busy.items():
            if not overwrite:
                folder, old = folders[key], owners[key]
                which = f"run {old['run_id']}" if old else "a run"
                raise RunFolderError(
                    f"{key}={folder} holds another run's files ({which}: {_shown(names)}); a fresh run there would "
                    f"mix with it (its metrics, its checkpoints, a later --resume auto). Choose one: continue it "
                    f"with `--resume auto`; start in a new folder ({key}={folder.rstrip('/')}-2); or set "
                    f"checkpoint.overwrite=true to move its files into {folder}/replaced_<date>_<run id>/ (nothing "
                    f"is deleted)")
            notes.append(_move_aside(key, folders[key], names, owners[key]))
            owners[key] = None
        run_id = new_run_id()
    else:
        known = sorted({o["run_id"] for o in owners.values() if o})
        if run_id is None and len(known) > 1:
            raise RunFolderError("; ".join(f"{k}={folders[k]} belongs to run {o['run_id']}" for k, o in owners.items()
                                           if o) + ": a run writes only to its own folders; give it those of one run")
        run_id = run_id or (known[0] if known else new_run_id())
        for key, old in owners.items():
            if old and old["run_id"] != run_id:
                raise RunFolderError(
                    f"{key}={folders[key]} belongs to run {old['run_id']}, but checkpoint {checkpoint} belongs to run "
                    f"{run_id}: resuming would write one run's files into the other's folder. Resume that folder's "
                    f"own checkpoints (--resume auto), or give {key} a folder of its own")
    token = uuid.uuid4().hex
    now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    for key, folder in folders.items():
        old = owners[key]
        _write_run(folder, {"run_id": run_id, "token": token, "pid": os.getpid(), "host": socket.gethostname(),
                            "started": now, "created": old.get("created", now) if old else now})
    return RunFolders(run_id, token, tuple(folders.values())), notes
