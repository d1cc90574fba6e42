"""The loader that deals samples to data-parallel replicas, with a global, resharding state.

Each ``next()`` advances the whole world by ``micro_batch_size x dp_size`` samples: global samples
``[consumed, consumed + micro_batch_size x dp_size)``, replica ``dp_rank`` taking the slice
``consumed + dp_rank x micro_batch_size + [0, micro_batch_size)``. The state is global ({consumed, seed, seq_len,
fingerprint}), so a run resumed on another number of replicas continues with exactly the samples an uninterrupted
run would have served next, and no two replicas ever take the same global sample. Every CP/TP rank of a replica
passes the same dp_rank and gets the same full sample; ContextParallel shards it.
"""
from __future__ import annotations

import torch

from ..configtools import ConfigError


class Loader:
    """Micro-batches of ``micro_batch_size`` samples for replica ``dp_rank`` of ``dp_size``.

    ``samples``: GPTSamples, BlendedSamples or anything with ``sample(i) -> dict of [S] tensors`` and
    ``identity() -> {seed, seq_len, fingerprint}``.
    """

    def __init__(self, samples, micro_batch_size: int, dp_size: int, dp_rank: int):
        if micro_batch_size < 1 or dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ConfigError(f"Loader needs micro_batch_size >= 1, dp_size >= 1 and 0 <= dp_rank < dp_size, got "
                              f"{micro_batch_size}, {dp_size}, {dp_rank}")
        self.samples, self.micro_batch_size, self.dp_size, self.dp_rank = samples, micro_batch_size, dp_size, dp_rank
        self.consumed = 0

    def indices(self) -> range:
        """The global sample indices of this replica's next micro-batch."""
        first = self.consumed + self.dp_rank * self.micro_batch_size
        return range(first, first + self.micro_batch_size)

    def next(self) -> dict[str, torch.Tensor]:
        """This replica's next micro-batch: dict of int64 ``[micro_batch_size, seq_len]``."""
        rows = [self.samples.sample(i) for i in self.indices()]
        self.consumed += self.micro_batch_size * self.dp_size
        return {key: torch.stack([r[key] for r in rows]) for key in rows[0]}

    def state_dict(self) -> dict:
        """{consumed (global samples), seed, seq_len, fingerprint}: the same on every rank; reshards to any
        dp_size."""
        return {"consumed": self.consumed, **self.samples.identity()}

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state``; ConfigError when it was saved on other data, seed or seq_len."""
        ours = self.samples.identity()
        missing = [k for k in ("consumed", *ours) if k not in state]
        if missing:
            raise ConfigError(f"the checkpoint's loader state lacks {missing} (it has {sorted(state)}): it predates "
                              f"indexed datasets, so its sample order cannot be continued; start a new run, or load "
                              f"its weights only")
        if state["seed"] != ours["seed"]:
            raise ConfigError(f"the checkpoint's data seed is {state['seed']} but data.seed is {ours['seed']}: resume "
                              f"with the same data.seed (or start a new run)")
        if state["seq_len"] != ours["seq_len"]:
            raise ConfigError(f"the checkpoint was trained with data.seq_len={state['seq_len']}, now "
                              f"{ours['seq_len']}: resume with the same seq_len (or start a new run)")
        if state["fingerprint"] != ours["fingerprint"]:
            raise ConfigError(f"the training data changed since the checkpoint (data fingerprint "
                              f"{state['fingerprint']} then, {ours['fingerprint']} now: other documents, blend or "
                              f"weights): resume on the same data, or start a new run")
        self.consumed = int(state["consumed"])
