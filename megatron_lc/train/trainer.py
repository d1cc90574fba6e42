"""The training loop: ``train(cfg)`` under torchrun (any number of processes) or as one process.

One step: every replica takes ``accumulation`` micro-batches; the step's target tokens are counted and all-reduced
over DP x CP first, so each micro-batch's summed loss is scaled to its exact share of the global mean (every target
token weighs the same however the batch is split; FSDP's averaging over its ranks is undone by the same factor).
A step without target tokens is skipped and counted; a non-finite loss or gradient norm skips the step, and
``train.max_bad_steps_in_row`` of them in a row abort the run. SFT (``train.task=sft``) changes only the samples
(data_source: labels -100 outside answers), so its loss is the global mean over answer tokens by the same count,
whichever ranks or micro-batches hold them (a rank with none contributes a zero sum).

The run folders are owned (megatron_lc.train.run_folder): a fresh run refuses another run's folder, a resume takes
its own over, and every metrics line and checkpoint first checks that no newer process took the folder over. A
resume with a changed config is checked and applied by megatron_lc.train.resume. SIGTERM checkpoints and stops the
run; ``train`` then raises StoppedBySignal (exit status EXIT_STOPPED from the command line), so a scheduler can
requeue it. Rank 0 says what the run is and did (megatron_lc.train.summary): a start summary, ``saved step_N``
lines and an end summary.
"""
from __future__ import annotations

import math
import os
import signal
import time

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from ..checkpoint import folders as ckpt
from ..checkpoint.convert import load_model
from ..data.loader import Loader
from ..configtools import ConfigError
from ..distributed import (init_process_group, launcher_watchdog, on_rank0, process_group, set_timeouts,
                           timeout_errors)
from ..memory import peak_memory_bytes, reset_peak_memory
from ..model import Transformer
from ..model.flops import train_flops_per_token
from ..parallel.parallel_dims import ParallelDims
from ..parallel.parallelize import ParallelizeConfig, materialize, parallelize
from . import resume, run_folder
from .config import TrainConfig
from .data_source import fit_vocab, train_samples, val_samples
from .metrics import MetricsLogger, Progress, mfu, peak_flops_per_second
from .optim import build_optimizer, build_scheduler
from .summary import end_lines, start_lines, write_run_config

EXIT_STOPPED = 143  # 128 + SIGTERM: what shells and schedulers report for a job ended by SIGTERM
TIMEOUT_KEY = "parallel.timeout_s"


class TrainingAborted(RuntimeError):
    """Too many bad steps in a row (non-finite loss or gradients)."""


class StoppedBySignal(RuntimeError):
    """SIGTERM stopped the run before train.steps, after its checkpoint; ``status`` is the exit status to use."""

    def __init__(self, message: str, history: list[dict[str, float]]):
        super().__init__(message)
        self.status, self.history = EXIT_STOPPED, history


def _device(cfg: TrainConfig) -> torch.device:
    kind = cfg.train.device
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("train.device=cuda but CUDA is not available: use train.device=cpu or auto")
        return torch.device("cuda", torch.cuda.current_device() if dist.is_initialized() else 0)
    return torch.device("cpu")


def _grad_norm(params: list[torch.Tensor]) -> torch.Tensor:
    """Global L2 norm of the gradients across every shard (FSDP/TP DTensors reduce to the full norm)."""
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=False)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def _parallelize_config(cfg: TrainConfig, param_dtype: torch.dtype | None) -> ParallelizeConfig:
    """The run config's parallelize settings (same key names as the YAML's parallel.* and train.*)."""
    p, t = cfg.parallel, cfg.train
    return ParallelizeConfig(kernels=t.kernels, cp_mode=p.cp_mode, cp_layout=p.cp_layout, cp_pad=p.cp_pad,
                             activation_checkpointing=t.activation_checkpointing, ac_every=t.ac_every,
                             compile=t.compile, param_dtype=param_dtype)


class Trainer:
    """Builds everything from a TrainConfig (collective: every rank constructs one) and runs the loop. Joins the
    process group there is, or starts torchrun's or a one-process one (``train`` ends it: megatron_lc.distributed)."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        fit_vocab(cfg)  # the data's vocabulary, or one error naming the override, before anything is built
        init_process_group(_device(cfg).type, timeout_s=cfg.parallel.timeout_s)
        self.device = _device(cfg)
        self.rank, world = dist.get_rank(), dist.get_world_size()
        sizes = cfg.check_world(world)
        self.accumulation = sizes.pop("accumulation")
        self.micro_batch_size = sizes.pop("micro_batch_size")
        self.run_folders = None
        if cfg.checkpoint.resume == "none":  # a fresh run: refuse another run's folder before any work
            self._take_run_folders(None, None)
        self.dims = ParallelDims(world_size=world, **sizes)
        self.dims.build_mesh(self.device.type)
        set_timeouts(cfg.parallel.timeout_s)  # the mesh's groups too (DeviceMesh gives them torch's default)
        self.dp_cp_group = self.dims.get_mesh("dp_cp").get_group()
        self.model_config = cfg.model_config()
        d = cfg.data  # data first: a dataset that does not fit the model's vocabulary stops before the model exists
        samples = train_samples(d, self.model_config.vocab_size, cfg.train.task)
        self.val_samples = val_samples(d, self.model_config.vocab_size, cfg.train.task)
        with torch.device("meta"):
            self.model = Transformer(self.model_config)
        param_dtype = torch.bfloat16 if cfg.train.dtype == "bfloat16" else None
        self.cp, self.kernels = parallelize(self.model, self.dims, _parallelize_config(cfg, param_dtype))
        if self.rank == 0:
            print(f"[megatron-lc] kernels: {', '.join(f'{op}={name}' for op, name in self.kernels.items())}",
                  flush=True)
        # FSDP/HSDP average gradients over their ranks; the loss scale below multiplies that back to a sum.
        self.grad_divisor = self.dims.fsdp_gradient_divide_factor
        full_weights = None
        if cfg.model.init_from:
            full_weights = dict(load_model(cfg.model.init_from, flag="model.init_from").named_parameters())
        materialize(self.model, self.device, cfg.train.seed, full_weights)
        self.params = [q for q in self.model.parameters() if q.requires_grad]
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.train.steps, cfg.schedule)
        self.config_hparams = resume.optimizer_hparams(self.optimizer)  # before a checkpoint overwrites them
        self.dp_rank = self.dims.get_mesh("dp").get_local_rank()
        self.loader = Loader(samples, self.micro_batch_size, self.dims.dp, self.dp_rank)
        self.step, self.skipped, self.bad_in_row, self.tokens_seen = 0, 0, 0, 0
        self.batch_tokens = d.seq_len * self.micro_batch_size * self.dims.dp * self.accumulation  # per optimizer step
        self.flops_per_token = train_flops_per_token(self.model_config, d.seq_len)
        self.peak_flops = peak_flops_per_second(self.device, param_dtype or torch.float32)
        self.stop_requested, self.stopped_by = False, None
        self.grad_hook = None  # called as grad_hook(trainer) once a step's gradients are final, before clipping
        self.resume_point = "a fresh start at step 0" + (f" from the weights of {cfg.model.init_from}"
                                                         if cfg.model.init_from else "")
        self._maybe_resume()
        self.saved: list[str] = []  # checkpoints this process wrote (the end summary lists them)
        if self.rank == 0:
            path = write_run_config(cfg) if self.run_folders.folders else None
            for line in start_lines(cfg, self.model_config, sizes, world, (self.micro_batch_size, self.accumulation),
                                    self.resume_point, path):
                print(line, flush=True)

    # ---- checkpoints ------------------------------------------------------------------------------------------
    def _maybe_resume(self) -> None:
        c = self.cfg.checkpoint
        if c.dir and self.rank == 0:
            for path in ckpt.find_checkpoints(c.dir)[1]:
                print(f"[megatron-lc] ignoring incomplete checkpoint {path} (no {ckpt.MARKER} marker: its save "
                      f"crashed)", flush=True)
        if c.resume == "none":
            return
        early = self._check_resume_early()  # run_folder/resume: a config that cannot resume stops before any load
        # auto falls back past corrupt checkpoints (saying which file failed); an explicit path never does
        path, state = (ckpt.load_latest(c.dir, self.model, self.optimizer) if c.resume == "auto"
                       else (c.resume, ckpt.load(c.resume, self.model, self.optimizer)))
        self._take_run_folders(path, state, early)  # run_folder/resume: config diff, refusals, the folder taken
        if path is None:
            return
        if not state["has_optimizer"]:  # weights only (e.g. converted from HF): a warm start at step 0
            self.resume_point = f"step 0 from the weights of {path} (weights only: a warm start, not a resume)"
            return
        self.scheduler.load_state_dict(state["scheduler"])
        resume.apply(self.optimizer, self.scheduler, self.config_hparams)  # the new lr, not the checkpoint's
        self.loader.load_state_dict(state["loader"])
        self.step, self.skipped, self.tokens_seen = state["step"], state["skipped"], state["tokens_seen"]
        self.resume_point = f"resumed from {path} at step {self.step}"
        if self.rank == 0:
            print(f"[megatron-lc] resumed from {path} at step {self.step}", flush=True)

    def _check_resume_early(self) -> list:
        """Refuse a resume whose config cannot continue the checkpoint it will load (the newest complete one, or
        checkpoint.resume) before any weight is read; a checkpoint that cannot be read is left to the loading.
        Returns [path checked, its change lines] (on every rank) so the run-folder step does not diff the same
        checkpoint again."""
        c = self.cfg.checkpoint

        def check():
            path = ckpt.latest_checkpoint(c.dir) if c.resume == "auto" else c.resume
            try:
                state = ckpt.read_trainer_state(path) if path else None
            except ConfigError:
                return [None, []]
            if state and state.get("has_optimizer"):
                return [path, resume.check(self.cfg, state, path, self.batch_tokens)]
            return [None, []]

        return on_rank0(check)

    def _take_run_folders(self, path: str | None, state: dict | None, early: list | None = None) -> None:
        """Rank 0 checks the run's folders (on a resume also the config against checkpoint ``path``'s, printing
        what changed, unless ``early`` = [path, lines] already diffed it) and takes them over; every rank gets the
        same run id and owner token, or the same error."""
        c, log_dir = self.cfg.checkpoint, self.cfg.logging.dir
        folders = {"checkpoint.dir": c.dir} if c.dir else {}
        if log_dir and os.path.normpath(log_dir) != os.path.normpath(c.dir or "."):
            folders["logging.dir"] = log_dir
        resumed = state is not None and state.get("has_optimizer")

        def take():
            checked, lines = early or [None, []]
            if not resumed:
                lines = []
            elif checked != path:  # auto fell back past a corrupt newest checkpoint: diff the one it loaded
                lines = resume.check(self.cfg, state, path, self.batch_tokens)
            run, notes = run_folder.take(folders, fresh=c.resume == "none", overwrite=c.overwrite,
                                         run_id=state.get("run_id") if resumed else None, checkpoint=path)
            for line in [*lines, *notes]:
                print(line, flush=True)
            return [run.run_id, run.token]

        run_id, token = on_rank0(take)
        self.run_folders = run_folder.RunFolders(run_id, token, tuple(folders.values()))

    def save(self) -> str:
        """Write step_<step>/ (collective), once every rank saw that this process still owns the run folder; then
        prune to checkpoint.keep among this run's checkpoints only."""
        c = self.cfg.checkpoint
        self._agree(every_rank_looks=True)
        path = ckpt.step_dir(c.dir, self.step)
        state = {"step": self.step, "skipped": self.skipped, "tokens_seen": self.tokens_seen,
                 "scheduler": self.scheduler.state_dict(), "loader": self.loader.state_dict(),
                 "config": self.cfg.to_dict(), "run_id": self.run_folders.run_id,
                 "global_batch_tokens": self.batch_tokens}
        ckpt.save(path, self.model, self.optimizer, state)
        if self.rank == 0:
            ckpt.prune(c.dir, c.keep, newest=path, belongs=run_folder.belongs_to(self.run_folders.run_id))
        return path

    # ---- one step ---------------------------------------------------------------------------------------------
    def _prepare(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.cp is not None:
            batch = self.cp.shard_batch(batch)
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def _all_reduce(self, *values: torch.Tensor) -> list[torch.Tensor]:
        packed = torch.stack([v.to(self.device, torch.float64) for v in values])
        dist.all_reduce(packed, group=self.dp_cp_group)
        return list(packed)

    def train_step(self) -> dict[str, float]:
        """One optimizer step (or a counted skip). Returns this step's metrics (the same on every rank)."""
        start = time.perf_counter()
        batches = [self._prepare(self.loader.next()) for _ in range(self.accumulation)]
        local_count = sum(int((b["labels"] != -100).sum()) for b in batches)
        (global_count,) = self._all_reduce(torch.tensor(local_count))
        self.step += 1
        tokens = self.batch_tokens
        self.tokens_seen += tokens
        metrics = {"train/lr": self.scheduler.get_last_lr()[0], "train/tokens_seen": self.tokens_seen}
        if global_count == 0:
            self.skipped += 1
            return {**metrics, "train/skipped_steps": self.skipped}
        scale = self.grad_divisor / float(global_count)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for b in batches:
            s, _ = self.model(b["input_ids"], b["position_ids"], b["labels"], reduction="sum")
            (s * scale).backward()
            loss_sum += s.detach().double()
        (loss_sum,) = self._all_reduce(loss_sum)
        loss = (loss_sum / global_count).item()
        norm = _grad_norm(self.params)
        if self.grad_hook is not None:
            self.grad_hook(self)
        if not (math.isfinite(loss) and torch.isfinite(norm)):
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped += 1
            self.bad_in_row += 1
            if self.bad_in_row >= self.cfg.train.max_bad_steps_in_row:
                raise TrainingAborted(f"{self.bad_in_row} steps in a row had a non-finite loss or gradient (last: "
                                      f"loss {loss}, grad norm {norm.item()}) at step {self.step}: lower optim.lr, "
                                      f"check the data, or resume from an earlier checkpoint")
            return {**metrics, "train/loss": loss, "train/skipped_steps": self.skipped}
        self.bad_in_row = 0
        if self.cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_(self.params, self.cfg.optim.grad_clip, norm, foreach=False)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        metrics.update({"train/loss": loss, "train/grad_norm": norm.item(), "train/skipped_steps": self.skipped,
                        "train/tokens_per_second": tokens / seconds, "train/step_seconds": seconds})
        if self.peak_flops:
            metrics["train/mfu"] = mfu(tokens / seconds, self.flops_per_token, self.peak_flops, dist.get_world_size())
        return metrics

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over eval.batches micro-batches per replica of the validation file (the same ones each time)."""
        loader = Loader(self.val_samples, self.micro_batch_size, self.dims.dp, self.dp_rank)
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        for _ in range(self.cfg.eval.batches):
            b = self._prepare(loader.next())
            s, c = self.model(b["input_ids"], b["position_ids"], b["labels"], reduction="sum")
            total += torch.stack([s.double(), c.double()])
        loss_sum, count = self._all_reduce(*total)
        return (loss_sum / count.clamp(min=1)).item()

    # ---- the loop ---------------------------------------------------------------------------------------------
    def _on_sigterm(self, signum, frame):
        self.stop_requested = True

    def _agree(self, *, every_rank_looks: bool) -> bool:
        """Whether any rank got SIGTERM, in one all-reduce with whether a newer process took the run folder over
        (looked at by every rank, or by rank 0 alone: the one that writes metrics); a takeover raises
        RunFolderTakenOver on every rank, before anything more is written."""
        taken = None
        if every_rank_looks or self.rank == 0:
            try:
                self.run_folders.check_owner()
            except run_folder.RunFolderTakenOver as e:
                taken = e
        flags = torch.tensor([float(self.stop_requested), float(taken is not None)], device=self.device)
        dist.all_reduce(flags)
        if flags[1].item():
            raise taken or run_folder.RunFolderTakenOver(
                f"rank {self.rank}: rank 0 found the run folder taken over by a newer process: stopping without "
                f"writing")
        return bool(flags[0].item())

    def _say_stopped(self) -> None:
        self.stopped_by = "SIGTERM"
        if self.rank == 0:
            then = ("`--resume auto` continues" if self.cfg.checkpoint.dir
                    else "nothing was saved (no checkpoint.dir)")
            print(f"[megatron-lc] stopped by SIGTERM at step {self.step}; {then}", flush=True)

    def run(self, until: int | None = None) -> list[dict[str, float]]:
        """Train to train.steps, or to step ``until`` (then checkpoint, as on SIGTERM, and return: the schedule
        still spans train.steps, so a resumed run continues exactly). Returns the per-step metrics."""
        cfg = self.cfg
        previous = signal.signal(signal.SIGTERM, self._on_sigterm) if self._main_thread() else None
        log_dir = cfg.logging.dir or cfg.checkpoint.dir
        history = []
        logger = MetricsLogger(log_dir, rank=self.rank, tensorboard=cfg.logging.tensorboard,
                               resume_step=self.step or None) if log_dir else None
        progress = Progress(cfg.train.steps, rank=self.rank)
        eval_every = cfg.eval_every()
        first_step, first_tokens, started = self.step, self.tokens_seen, time.perf_counter()
        try:
            last = cfg.train.steps if until is None else min(until, cfg.train.steps)
            with timeout_errors(TIMEOUT_KEY, cfg.parallel.timeout_s):
                while self.step < last:
                    reset_peak_memory(self.device)
                    metrics = self.train_step()
                    metrics["train/peak_memory_gib"] = peak_memory_bytes(self.device) / 2**30
                    if eval_every and (self.step % eval_every == 0 or self.step == cfg.train.steps):
                        metrics["val/loss"] = self.evaluate()
                    history.append({"step": self.step, **metrics})
                    signalled = self._agree(every_rank_looks=False)  # before this step's metrics are written
                    if logger and self.step % cfg.logging.every == 0:
                        logger.log(self.step, metrics)
                    progress.update(self.step, metrics)
                    stop = signalled or self.step == last
                    if cfg.checkpoint.dir and (stop or
                                               (cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0)):
                        self.saved.append(self.save())
                        progress.message(f"[megatron-lc] saved step_{self.step} ({self.saved[-1]})")
                    if signalled:
                        self._say_stopped()
                    if stop:
                        break
        finally:
            if logger:
                logger.close()
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
        if self.rank == 0:
            for line in end_lines(history, first_step, self.step, (first_tokens, self.tokens_seen),
                                  time.perf_counter() - started, self.saved):
                print(line, flush=True)
        return history

    @staticmethod
    def _main_thread() -> bool:
        import threading

        return threading.current_thread() is threading.main_thread()


def train(cfg: TrainConfig) -> list[dict[str, float]]:
    """Build a Trainer from ``cfg`` and run it; returns the per-step metrics. Tears down the process group it
    started (under torchrun, or alone), so the process exits cleanly. Raises StoppedBySignal when SIGTERM stopped
    the run (after its checkpoint), CollectiveTimeout naming parallel.timeout_s when a collective timed out; under
    torchrun a worker whose agent died exits (megatron_lc.distributed.launcher_watchdog)."""
    timeout_s = cfg.parallel.timeout_s
    with (process_group(_device(cfg).type, timeout_s=timeout_s), launcher_watchdog(timeout_s),
          timeout_errors(TIMEOUT_KEY, timeout_s)):
        done = resume.finished_run(cfg)
        if done:  # a requeue or restart of a run that ended: success, and nothing is loaded or written
            if dist.get_rank() == 0:
                print(f"[megatron-lc] the run is already complete: {done} is step {cfg.train.steps} of "
                      f"train.steps={cfg.train.steps}; nothing to train (raise train.steps to train on)", flush=True)
            return []
        trainer = Trainer(cfg)
        history = trainer.run()
    if trainer.stopped_by:
        raise StoppedBySignal(f"stopped by {trainer.stopped_by} at step {trainer.step}", history)
    return history
