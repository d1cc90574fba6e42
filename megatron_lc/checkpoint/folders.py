"""Our checkpoints: ``step_<N>/`` folders written with torch.distributed.checkpoint (DCP), valid once a marker exists.

A folder holds the model and optimizer (DCP shards: they reshard on load to any world size or mesh), and
``trainer_state.pt`` (step, scheduler, loader state, config, written by rank 0) plus ``rng_rank<r>.pt`` per rank.
The marker ``COMPLETE`` is written last, by rank 0, after every rank has finished writing: a crash at any earlier
point leaves a folder without it, which ``find_checkpoints`` reports and ``--resume auto`` ignores. Old complete
folders beyond ``keep`` are deleted only after the new one is complete.
"""
from __future__ import annotations

import os
import re
import shutil

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

MARKER = "COMPLETE"
TRAINER_STATE = "trainer_state.pt"
_STEP_DIR = re.compile(r"^step_(\d+)$")


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
    """The newest complete checkpoint folder under ``root``, or None."""
    complete, _ = find_checkpoints(root)
    return complete[-1][1] if complete else None


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def save(path: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, trainer_state: dict,
         keep: int | None = None) -> None:
    """Write checkpoint ``path`` (a step_<N> folder) from every rank; collective. ``trainer_state`` (step,
    scheduler and loader state dicts, config...) is saved by rank 0 with ``has_optimizer`` added. Then prune to
    the newest ``keep``. ``optimizer=None`` writes weights only (e.g. converted from an HF folder)."""
    trainer_state = {**trainer_state, "has_optimizer": optimizer is not None}
    rank = dist.get_rank()
    if rank == 0:
        if os.path.exists(path):  # a half-written folder from a crashed attempt at this very step
            shutil.rmtree(path)
        os.makedirs(path)
    dist.barrier()
    model_state, optim_state = get_state_dict(model, optimizer if optimizer is not None else [])
    state = {"model": model_state} if optimizer is None else {"model": model_state, "optim": optim_state}
    dcp.save(state, checkpoint_id=path)
    torch.save(_rng_state(), os.path.join(path, f"rng_rank{rank}.pt"))
    if rank == 0:
        torch.save(trainer_state, os.path.join(path, TRAINER_STATE))
    dist.barrier()  # every rank's files are on disk before the marker says so
    if rank == 0:
        write_marker(path)
        if keep is not None:
            complete, _ = find_checkpoints(os.path.dirname(path))
            for _, old in complete[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def write_marker(path: str) -> None:
    """Mark folder ``path`` complete, atomically (a crash leaves either no marker or the whole one)."""
    tmp = os.path.join(path, MARKER + ".tmp")
    with open(tmp, "w") as f:
        f.write("ok\n")
    os.replace(tmp, os.path.join(path, MARKER))


def load(path: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
    """Load checkpoint ``path`` into ``model`` (and ``optimizer``) whatever their sharding now; collective.
    Restores this rank's RNG state when the checkpoint has one for it. Returns the trainer state dict; a
    weights-only checkpoint (``has_optimizer`` False) leaves the optimizer as it is."""
    if not os.path.isfile(os.path.join(path, MARKER)):
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {MARKER} marker): a save crashed there; "
                                f"resume from an earlier step_<N> folder")
    trainer_state = read_trainer_state(path)
    if optimizer is None or not trainer_state["has_optimizer"]:  # weights only
        model_state = get_state_dict(model, [])[0]
        dcp.load({"model": model_state}, checkpoint_id=path)
        set_state_dict(model, [], model_state_dict=model_state, optim_state_dict={})
    else:
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optim": optim_state}
        dcp.load(state, checkpoint_id=path)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rng_path = os.path.join(path, f"rng_rank{dist.get_rank()}.pt")
    if os.path.isfile(rng_path):
        rng = torch.load(rng_path, weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return trainer_state


def read_trainer_state(path: str) -> dict:
    """The rank-0 state of checkpoint ``path``: step, skipped, scheduler, loader, config, has_optimizer."""
    return torch.load(os.path.join(path, TRAINER_STATE), weights_only=True)  # plain types only: loading never runs code
