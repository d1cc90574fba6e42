"""Our checkpoints: ``step_<N>/`` folders written with torch.distributed.checkpoint (DCP), valid once a marker exists.

A folder holds the model and optimizer (DCP shards ``__<rank>_<i>.distcp`` and their index ``.metadata``: they
reshard on load to any world size or mesh), ``trainer_state.pt`` (step, scheduler, loader state, config, written by
rank 0) plus ``rng_rank<r>.pt`` per rank, and ``MANIFEST.json``: every file's name, size and sha256. Each rank hashes
the files it wrote; rank 0 writes the manifest, then the marker ``COMPLETE``, last: a crash at any earlier point
leaves a folder without it, which ``find_checkpoints`` reports and ``--resume auto`` ignores.

Loading verifies the manifest before anything is unpickled or read by DCP (``verify``: the ranks share the
hashing), so a truncated, changed, missing or swapped file is named instead of failing deep inside torch; folders
written before manifests existed load unverified, with a line saying so. ``load_latest`` falls back to the next
older complete checkpoint when the newest fails. Saving deletes only files a save writes (never a folder's other
files), and pruning to ``keep`` never deletes the checkpoint it has just written. docs/checkpoints.md has the layout
and what the manifest does and does not protect against.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from ..configtools import ConfigError
from ..files import write_atomic, write_json

MARKER = "COMPLETE"
MANIFEST = "MANIFEST.json"
TRAINER_STATE = "trainer_state.pt"
METADATA = ".metadata"  # DCP's index of the shards (a pickle, by torch's design)
_STEP_DIR = re.compile(r"^step_(\d+)$")
# Every name a save writes (DCP's files and their temporaries included): the only files we ever delete.
_OURS = re.compile(r"^(\.metadata|__\d+\.metadata|__\d+_\d+\.distcp|rng_rank\d+\.pt|trainer_state\.pt|"
                   r"MANIFEST\.json|COMPLETE)(\.tmp)?$")
# The files a manifest covers: our files but the manifest, the marker and temporaries.
_LISTED = re.compile(r"^(\.metadata|__\d+\.metadata|__\d+_\d+\.distcp|rng_rank\d+\.pt|trainer_state\.pt)$")
_HASH_BLOCK = 8 << 20


class CheckpointError(ConfigError):
    """A checkpoint folder that cannot be written or loaded as asked; the message names the folder or file and the
    fix (a ConfigError: the command line reports it without a traceback)."""


class CorruptCheckpoint(CheckpointError):
    """A checkpoint whose files do not match its manifest or cannot be read; ``--resume auto`` falls back past it."""


def step_dir(root: str, step: int) -> str:
    """The folder of step ``step`` under the run's checkpoint root."""
    return os.path.join(root, f"step_{step}")


def is_checkpoint(path: str) -> bool:
    """Whether folder ``path`` is one of our checkpoints (it holds the rank-0 trainer state), complete or not."""
    return os.path.isfile(os.path.join(path, TRAINER_STATE))


def find_checkpoints(root: str) -> tuple[list[tuple[int, str]], list[str]]:
    """(complete [(step, path)] oldest first, incomplete [path]) under ``root``."""
    complete, incomplete = [], []
    if not os.path.isdir(root):
        return complete, incomplete
    for name in os.listdir(root):
        match = _STEP_DIR.match(name)
        if not match:
            continue
        path = os.path.join(root, name)
        if os.path.isfile(os.path.join(path, MARKER)):
            complete.append((int(match.group(1)), path))
        else:
            incomplete.append(path)
    return sorted(complete), sorted(incomplete)


def latest_checkpoint(root: str) -> str | None:
    """The newest complete checkpoint folder under ``root``, or None (not verified: ``load_latest`` verifies)."""
    complete, _ = find_checkpoints(root)
    return complete[-1][1] if complete else None


def nearby_checkpoints(path: str, shown: int = 8) -> str:
    """A sentence for an error about ``path`` (given as a checkpoint, but missing or not one): the checkpoints in
    folder ``path`` itself (a run folder) or else in its parent (the run folder of a pruned ``step_<N>``), newest
    first, the latest complete one named; "" when neither folder holds any."""
    for root in (path, os.path.dirname(os.path.normpath(path)) or "."):
        complete, incomplete = find_checkpoints(root)
        if not complete and not incomplete:
            continue
        if not complete:
            return (f" {root} holds no complete checkpoint, only unfinished ones (no {MARKER} marker): "
                    f"{', '.join(incomplete)}.")
        newest = [p for _, p in reversed(complete)]
        listed = ", ".join(newest[:shown]) + (f" and {len(newest) - shown} older" if len(newest) > shown else "")
        unfinished = f"; unfinished (no {MARKER}): {', '.join(incomplete)}" if incomplete else ""
        return (f" Checkpoints in {root}, newest first: {listed}{unfinished}. The latest is {newest[0]} (older ones "
                f"are pruned to checkpoint.keep as training goes on).")
    return ""


# ---- which files are ours ------------------------------------------------------------------------------------
def foreign_files(path: str) -> list[str]:
    """The names in folder ``path`` that no checkpoint save writes (sorted); a save never deletes them."""
    return sorted(n for n in os.listdir(path) if not _OURS.match(n) or os.path.isdir(os.path.join(path, n)))


def is_half_written(path: str) -> bool:
    """Whether ``path`` is an unfinished checkpoint of ours: a folder of our files only, without the marker."""
    return os.path.isdir(path) and not foreign_files(path) and not os.path.exists(os.path.join(path, MARKER))


def _remove_ours(path: str) -> None:
    """Delete the files a save writes in ``path`` (the marker first: a crash midway leaves an incomplete folder),
    then the folder if nothing else is left in it."""
    names = sorted(n for n in os.listdir(path) if _OURS.match(n) and os.path.isfile(os.path.join(path, n)))
    for name in sorted(names, key=lambda n: n != MARKER):
        os.remove(os.path.join(path, name))
    if not os.listdir(path):
        os.rmdir(path)


def _target_error(path: str, force: bool) -> str | None:
    """Why ``save`` must not write at ``path`` (None: it may, after removing the files of ours there)."""
    if os.path.exists(path) and not os.path.isdir(path):
        return f"checkpoint target {path} is a file, not a folder: choose another folder"
    if not os.path.isdir(path) or force:
        return None
    foreign = foreign_files(path)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        return (f"checkpoint target {path} holds files a checkpoint save did not write ({shown}): refusing to "
                f"write a checkpoint among them; move them away or write to a new folder (convert: --force writes "
                f"beside them)")
    return None


# ---- the manifest --------------------------------------------------------------------------------------------
def _file_entry(path: str) -> dict:
    """{"size", "sha256"} of file ``path``."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            digest.update(block)
    return {"size": os.path.getsize(path), "sha256": digest.hexdigest()}


def _listed_files(path: str) -> list[str]:
    return sorted(n for n in os.listdir(path) if _LISTED.match(n))


def _written_by(path: str, rank: int) -> list[str]:
    """The manifest's files that rank ``rank`` wrote (its DCP shards and RNG file; rank 0: also the shared ones)."""
    mine = {f"rng_rank{rank}.pt"} | ({METADATA, TRAINER_STATE} if rank == 0 else set())
    return [n for n in _listed_files(path) if n in mine or (n.startswith(f"__{rank}_") and n.endswith(".distcp"))]


def write_manifest(path: str, files: dict[str, dict]) -> None:
    """Write ``MANIFEST.json`` ({name: {"size", "sha256"}}) in folder ``path``, atomically."""
    manifest = {"format": "megatron_lc checkpoint manifest", "version": 1, "files": dict(sorted(files.items()))}
    write_json(os.path.join(path, MANIFEST), manifest, tmp=os.path.join(path, MANIFEST + ".tmp"))  # save cleans it


def read_manifest(path: str) -> dict[str, dict] | None:
    """The ``{name: {"size", "sha256"}}`` of checkpoint ``path``'s manifest, or None when it has none (written
    before manifests existed). A manifest that is not one is a CorruptCheckpoint naming it."""
    file = os.path.join(path, MANIFEST)
    if not os.path.isfile(file):
        return None
    try:
        with open(file) as f:
            files = json.load(f)["files"]
        ok = isinstance(files, dict) and all(
            _LISTED.match(name) and isinstance(e, dict) and isinstance(e.get("size"), int)
            and isinstance(e.get("sha256"), str) for name, e in files.items())
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        ok = False
    if not ok:
        raise CorruptCheckpoint(f"{file} is not a checkpoint manifest (JSON with a size and sha256 per file of "
                                f"ours): the checkpoint cannot be verified; resume an earlier step_<N> folder")
    return files


def _world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _all_gather(obj) -> list:
    """Every rank's ``obj`` (just ``[obj]`` without a process group)."""
    _, world = _world()
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _agree_or_raise(error: str | None, kind: type[CheckpointError] = CorruptCheckpoint) -> None:
    """Raise ``kind`` on every rank when any rank has an error (so no rank waits in a collective alone)."""
    errors = sorted({e for e in _all_gather(error) if e})
    if errors:
        raise kind("; ".join(errors))


def verify(path: str) -> bool:
    """Check every file of checkpoint ``path`` against its manifest before anything reads them; collective when a
    process group exists (rank r hashes the files at indices r, r + world, ...; the ranks agree on the outcome).
    Returns False for a checkpoint without a manifest (older than manifests: loaded unverified, rank 0 says so);
    a missing, extra, resized or changed file raises CorruptCheckpoint naming it."""
    rank, world = _world()
    error, files = None, None
    try:
        files = read_manifest(path)
    except CorruptCheckpoint as e:
        error = str(e)
    _agree_or_raise(error)
    if files is None:
        if rank == 0:
            print(f"[megatron-lc] {path} has no {MANIFEST} (written before checkpoints had manifests): loading it "
                  f"unverified", flush=True)
        return False
    names = sorted(files)
    problems = [f"{n}: a file of ours that the manifest does not list" for n in _listed_files(path)
                if n not in files] if rank == 0 else []
    for name in names[rank::world]:
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            problems.append(f"{name}: missing")
        elif os.path.getsize(file) != files[name]["size"]:
            problems.append(f"{name}: {os.path.getsize(file)} bytes, the manifest says {files[name]['size']} "
                            f"(truncated or replaced)")
        elif _file_entry(file)["sha256"] != files[name]["sha256"]:
            problems.append(f"{name}: its sha256 differs from the manifest's (changed or swapped)")
    problems = sorted(p for ps in _all_gather(problems) for p in ps)
    if problems:
        raise CorruptCheckpoint(f"checkpoint {path} failed verification against its {MANIFEST}: "
                                f"{'; '.join(problems)}. Resume an earlier step_<N> folder (--resume auto skips "
                                f"this one), or remove this folder")
    return True


# ---- save and load -------------------------------------------------------------------------------------------
def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def save(path: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, trainer_state: dict,
         keep: int | None = None, force: bool = False) -> None:
    """Write checkpoint ``path`` (a step_<N> folder) from every rank; collective. ``trainer_state`` (step,
    scheduler and loader state dicts, config...) is saved by rank 0 with ``has_optimizer`` added; then the manifest
    and the marker; then prune to the newest ``keep``. ``optimizer=None`` writes weights only (e.g. converted from
    an HF folder). An existing ``path`` may hold only files of ours (a half-written or older save at this step,
    replaced); other files are a CheckpointError unless ``force``, which keeps them and writes beside them."""
    trainer_state = {**trainer_state, "has_optimizer": optimizer is not None}
    rank = dist.get_rank()
    error = None
    if rank == 0:
        error = _target_error(path, force)
        if error is None:
            if os.path.isdir(path):
                _remove_ours(path)
            os.makedirs(path, exist_ok=True)
    _agree_or_raise(error, CheckpointError)  # also the barrier: the folder exists before any rank writes
    model_state, optim_state = get_state_dict(model, optimizer if optimizer is not None else [])
    state = {"model": model_state} if optimizer is None else {"model": model_state, "optim": optim_state}
    dcp.save(state, checkpoint_id=path)
    torch.save(_rng_state(), os.path.join(path, f"rng_rank{rank}.pt"))
    if rank == 0:
        torch.save(trainer_state, os.path.join(path, TRAINER_STATE))
    dist.barrier()  # every rank's files are on disk before any rank lists them
    entries = {name: _file_entry(os.path.join(path, name)) for name in _written_by(path, rank)}
    gathered = [None] * dist.get_world_size() if rank == 0 else None
    dist.gather_object(entries, gathered, dst=0)
    if rank == 0:
        files = {name: entry for e in gathered for name, entry in e.items()}
        for name in _listed_files(path):  # a file no rank claimed is still listed, so verification accepts it
            files.setdefault(name, _file_entry(os.path.join(path, name)))
        write_manifest(path, files)
        write_marker(path)
        if keep is not None:
            prune(os.path.dirname(path), keep, newest=path)
    dist.barrier()


def prune(root: str, keep: int, newest: str, belongs: Callable[[str], bool] | None = None) -> list[str]:
    """Delete our files in the complete checkpoints under ``root`` beyond ``keep`` (``newest``, just written and
    verified by construction, counts as one and is never deleted; the others go oldest step first). ``belongs``
    (a predicate on a folder) limits pruning to some checkpoints, e.g. one run's. Returns the folders pruned."""
    complete, _ = find_checkpoints(root)
    others = [p for _, p in complete if os.path.normpath(p) != os.path.normpath(newest)
              and (belongs is None or belongs(p))]
    pruned = others[:max(len(others) - (keep - 1), 0)]
    for old in pruned:
        _remove_ours(old)
    return pruned


def write_marker(path: str) -> None:
    """Mark folder ``path`` complete, atomically (a crash leaves either no marker or the whole one)."""
    write_atomic(os.path.join(path, MARKER), "ok\n", tmp=os.path.join(path, MARKER + ".tmp"))


def load(path: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, *,
         verified: bool = False) -> dict:
    """Load checkpoint ``path`` into ``model`` (and ``optimizer``) whatever their sharding now; collective.
    Verifies the manifest first (unless ``verified``: the caller just did), so nothing is unpickled or read by DCP
    from a folder whose files changed; a mismatch is a CorruptCheckpoint naming the file. Restores this rank's RNG
    state when the checkpoint has one for it. Returns the trainer state dict; a weights-only checkpoint
    (``has_optimizer`` False) leaves the optimizer as it is."""
    if not os.path.isfile(os.path.join(path, MARKER)):
        raise CheckpointError(f"{path} is not a complete checkpoint (no {MARKER} marker): a save crashed there, or "
                              f"it is not a step_<N> folder of ours; resume from an earlier step_<N> folder")
    has_manifest = verified or verify(path)
    trainer_state = read_trainer_state(path)
    weights_only = optimizer is None or not trainer_state["has_optimizer"]
    model_state, optim_state = get_state_dict(model, [] if weights_only else optimizer)
    state = {"model": model_state} if weights_only else {"model": model_state, "optim": optim_state}
    try:
        dcp.load(state, checkpoint_id=path)
    except Exception as e:  # re-raised with the folder named and what it means
        why = ("its files match its manifest, so it does not fit this model (check the model config)" if has_manifest
               else f"it has no {MANIFEST}, so it may be corrupt")
        raise CheckpointError(f"checkpoint {path}: torch.distributed.checkpoint could not load its shards into "
                              f"the model ({type(e).__name__}: {str(e)[:500]}); {why}") from e
    if weights_only:
        set_state_dict(model, [], model_state_dict=state["model"], optim_state_dict={})
    else:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    _restore_rng(os.path.join(path, f"rng_rank{_world()[0]}.pt"))
    return trainer_state


def _restore_rng(file: str) -> None:
    rng, error = None, None
    if os.path.isfile(file):
        try:
            rng = torch.load(file, weights_only=True)  # tensors only: loading never runs code
        except Exception as e:  # noqa: BLE001 - every rank must learn of it (agreed below)
            error = f"{file} cannot be read as an RNG state ({type(e).__name__}: {str(e)[:200]})"
    _agree_or_raise(error)
    if rng is not None:
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])


def read_trainer_state(path: str) -> dict:
    """The rank-0 state of checkpoint ``path``: step, skipped, scheduler, loader, config, has_optimizer. Plain
    types only (``weights_only=True``: loading never runs code); an unreadable or tampered file is a
    CorruptCheckpoint naming it. Call ``verify`` first where the folder is not known to be intact."""
    file = os.path.join(path, TRAINER_STATE)
    try:
        state = torch.load(file, weights_only=True)
    except Exception as e:  # an empty, truncated or tampered file: named, never executed
        raise CorruptCheckpoint(f"{file} cannot be read as a trainer state ({type(e).__name__}: "
                                f"{str(e).splitlines()[0][:300] if str(e) else ''}): the checkpoint is corrupt or "
                                f"was tampered with; resume an earlier step_<N> folder") from e
    if not isinstance(state, dict) or "config" not in state:
        raise CorruptCheckpoint(f"{file} holds no trainer state (a dict with the run's config): the checkpoint is "
                                f"corrupt; resume an earlier step_<N> folder")
    return state


def load_latest(root: str, model: torch.nn.Module,
                optimizer: torch.optim.Optimizer | None) -> tuple[str | None, dict | None]:
    """``--resume auto``: load the newest complete checkpoint under ``root`` that verifies, falling back past
    corrupt ones with a message naming the file; collective. Returns (path, trainer state), or (None, None) when
    ``root`` has no complete checkpoint. Every complete one corrupt: a CheckpointError listing them and the
    choices."""
    complete, _ = find_checkpoints(root)
    failures = []
    for i, (_, path) in enumerate(reversed(complete)):
        try:
            return path, load(path, model, optimizer)
        except CorruptCheckpoint as e:
            failures.append(f"{os.path.basename(path)}: {e}")
            if _world()[0] == 0:
                older = complete[-2 - i][1] if i + 1 < len(complete) else None
                print(f"[megatron-lc] {e}\n[megatron-lc] "
                      + (f"falling back to {older}" if older else "no older complete checkpoint is left"), flush=True)
    if not failures:
        return None, None
    raise CheckpointError(f"--resume auto: no complete checkpoint under {root} can be loaded ("
                          + " | ".join(failures) + "). Choices: fix or remove the broken step_<N> folders; resume "
                          "an older one explicitly (--resume <dir>/step_<N>); or start in a fresh checkpoint.dir")

