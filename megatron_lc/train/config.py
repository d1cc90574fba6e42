"""TrainConfig: every setting of a training run, as typed dataclasses loaded from YAML plus ``key.sub=value`` overrides.

``load_train_config(path, overrides)`` checks everything that can be checked without processes (unknown keys with
the closest valid name, impossible values and combinations); ``TrainConfig.check_world(world_size)`` checks the
mesh against the number of processes. Both run before any process group starts.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

import yaml

from ..configtools import ConfigError, check_keys, check_types, closest_key, load_yaml, yaml_problem
from ..model.config import ModelConfig, preset_config


@dataclass
class ModelSection:
    """Which model to train: a preset and/or explicit ModelConfig fields, and where its first weights come from."""

    preset: str | None = None
    """A named preset (qwen2-0.5b, qwen2-1.5b, qwen2-7b, tiny, demo); fields given beside it override it."""
    config: dict[str, Any] = field(default_factory=dict)
    """ModelConfig fields (all of them without a preset, or overrides of the preset's)."""
    init_from: str | None = None
    """Weights to start from: an HF Qwen2 folder (config.json + safetensors) or a step_<N>/ checkpoint; None: random
    init from train.seed."""

    def build(self) -> ModelConfig:
        if self.preset is None and not self.config:
            raise ConfigError("model: give model.preset (e.g. tiny, qwen2-0.5b) or model.config fields")
        check_keys(ModelConfig, self.config, "model.config")
        fields = check_types(ModelConfig, self.config, "model.config.")  # errors name the key as the YAML has it
        if self.preset is None:
            return ModelConfig.from_dict(fields, where="model.config")
        return dataclasses.replace(preset_config(self.preset), **fields)


@dataclass
class ParallelSection:
    """How the world is split: data parallel (replicated x sharded) x context parallel x tensor parallel."""

    dp_replicate: int = 1
    """Replicas of the model (DDP-style, gradients all-reduced)."""
    dp_shard: int = -1
    """FSDP2 shards of each replica; -1: whatever the world size leaves after the other dimensions."""
    cp: int = 1
    """Context-parallel degree: processes that split one sequence."""
    tp: int = 1
    """Tensor-parallel degree (with sequence parallelism)."""
    cp_mode: str = "ring"
    """ring | allgather | ulysses | hybrid (see megatron_lc.parallel.context_parallel)."""
    cp_ulysses: int = 1
    """hybrid only: the Ulysses degree inside cp (cp = ring degree x cp_ulysses; Ulysses on the faster links)."""
    cp_layout: str = "zigzag"
    """zigzag (load-balanced causal work) | contiguous."""
    cp_pad: bool = True
    """Pad each sample to a multiple of the CP chunk count (labels -100), so any length works."""
    timeout_s: float = 1800.0
    """Seconds any collective may wait for the other ranks before the run stops with an error naming this key (a
    stalled or dead rank ends the job instead of hanging it); also the limit for noticing a dead torchrun agent."""


@dataclass
class OptimSection:
    """AdamW and gradient clipping."""

    lr: float = 3e-4
    """Peak learning rate."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.1
    """Decoupled weight decay on matrices (not on norms, biases)."""
    grad_clip: float = 1.0
    """Global gradient-norm clip across all shards; 0 disables clipping (the norm is still logged)."""


@dataclass
class ScheduleSection:
    """Learning-rate schedule over train.steps."""

    kind: str = "cosine"
    """cosine (warmup then cosine to min_lr_ratio x lr) | constant | warmup_constant."""
    warmup_steps: int = 0
    """Linear warmup steps from 0 (cosine and warmup_constant)."""
    min_lr_ratio: float = 0.1
    """Floor of the cosine as a fraction of the peak lr."""


@dataclass
class DataSection:
    """Where tokens come from and how they are batched."""

    train_tokens: str = ""
    """Training dataset in Megatron's indexed format: its prefix (PREFIX.bin + PREFIX.idx, as written by
    megatron_lc.data.indexed.IndexedDatasetWriter or megatron's preprocess_data) or the path of either file."""
    train_blend: list | None = None
    """Instead of train_tokens: several datasets drawn by weight, [[weight, prefix], ...] (weights > 0, normalised;
    Megatron's error-greedy interleaving)."""
    val_tokens: str | None = None
    """Held-out dataset (prefix, .bin or .idx) for validation loss, read in file order; None: no validation."""
    eos_token_id: int | None = None
    """End-of-document token id for reset_position_ids / eod_mask_loss; None: the dataset meta's eos_token_id.
    train.task=sft: the input id of padding (None: the dataset meta's pad_token_id, else its eos_token_id)."""
    reset_position_ids: bool = False
    """Position ids restart at 0 after each EOS in a packed sample (each document starts at position 0)."""
    eod_mask_loss: bool = False
    """No loss where the input token is EOS (label -100): the first token of the next document is not predicted
    from the previous document's EOS; predicting the EOS itself keeps its loss."""
    sft_packing: str = "naive"
    """train.task=sft: naive (chats concatenated into rows, attention crosses them) | reset (naive, positions
    restart at each chat) | pad (one chat per row); naive and reset pack best-fit decreasing (data/sft_samples.py)."""
    sft_truncate: str = "none"
    """train.task=sft: none (a chat longer than seq_len is an error) | left (keep its last seq_len tokens; never
    an answer token)."""
    seq_len: int = 2048
    """Tokens per sample (the model sees seq_len inputs and seq_len aligned labels)."""
    micro_batch_size: int = 1
    """Samples per data-parallel replica per micro-batch (with global_batch_tokens: at most this many, the largest
    size that divides each replica's share)."""
    global_batch_tokens: int = 0
    """Tokens per optimizer step over the whole world, the way to fix the batch: any layout (dp size) that divides
    it trains the same batch, the rest made up by gradient accumulation; must be a multiple of seq_len x
    micro_batch_size x data-parallel degree; it counts rows x seq_len (SFT padding included). 0: one micro-batch
    per replica, so the batch grows with dp."""
    seed: int = 0
    """Seed of the sample order."""


@dataclass
class CheckpointSection:
    """torch.distributed.checkpoint folders step_<N>/ under dir."""

    dir: str = ""
    """Folder of the run's checkpoints; empty: no checkpoints."""
    every: int = 0
    """Save every N steps (0: only at the end and on SIGTERM)."""
    keep: int = 2
    """Complete checkpoints to keep (older ones are deleted after a newer one is complete)."""
    resume: str = "none"
    """none | auto (newest complete step_<N> under dir) | a path to a step_<N> folder."""
    overwrite: bool = False
    """A fresh run (resume none) in a dir or logging.dir holding another run's files: move those files aside into
    replaced_<date>_<run id>/ in the same folder (nothing is deleted) and start; false: refuse, naming the choices."""
    allow_batch_change: bool = False
    """Resume with another global batch (tokens per optimizer step: a new dp size, micro-batch or
    data.global_batch_tokens) than the checkpoint's; false: refuse."""


@dataclass
class LoggingSection:
    """Metrics: TensorBoard and JSONL under dir, and a progress line on rank 0."""

    dir: str = ""
    """Folder for metrics.jsonl and TensorBoard events; empty: checkpoint.dir, or no files."""
    every: int = 1
    """Log every N steps."""
    tensorboard: bool = True
    """Write TensorBoard event files."""


@dataclass
class EvalSection:
    """Validation loss on data.val_tokens."""

    every: int | None = None
    """Every N steps and at the last step; None: every max(1, train.steps // 10) steps when data.val_tokens is
    given, else never; 0: never."""
    batches: int = 4
    """Micro-batches per replica per validation."""


@dataclass
class TrainSection:
    """The loop itself."""

    task: str = "pretrain"
    """pretrain (packed token streams, loss on every token) | sft (SFT datasets of `megatron-lc data sft`, loss on
    answer tokens only, packed as data.sft_packing says)."""
    steps: int = 100
    """Optimizer steps."""
    seed: int = 0
    """Seed of the initial weights (per parameter name, so any sharding gives the same model)."""
    dtype: str = "float32"
    """bfloat16 | float32: parameters and activations (gradients are reduced in fp32)."""
    activation_checkpointing: str = "none"
    """none | full (every block) | every_k (every ac_every-th block) | selective (keep attention's output and lse,
    recompute the rest) | offload (full, block inputs in host memory); see parallel/activation_checkpointing.py."""
    ac_every: int = 2
    """k of every_k."""
    compile: bool = False
    """torch.compile each block."""
    max_bad_steps_in_row: int = 5
    """Steps with a non-finite loss or gradient are skipped; this many in a row abort the run."""
    device: str = "auto"
    """auto (cuda when available) | cpu | cuda."""
    kernels: str | dict = "auto"
    """auto | torch | triton for every op, or {op: choice} for rmsnorm, swiglu, rope, linear_cross_entropy,
    attention (see megatron_lc.ops.dispatch; auto: Triton on CUDA, SDPA for attention, torch on CPU)."""


@dataclass
class TrainConfig:
    """A whole run. Sections mirror the YAML's top-level keys."""

    model: ModelSection = field(default_factory=ModelSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    optim: OptimSection = field(default_factory=OptimSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    data: DataSection = field(default_factory=DataSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    eval: EvalSection = field(default_factory=EvalSection)
    train: TrainSection = field(default_factory=TrainSection)

    def model_config(self) -> ModelConfig:
        return self.model.build()

    def eval_every(self) -> int:
        """Steps between validations (0: none): eval.every, or when it is not set and data.val_tokens is given,
        max(1, train.steps // 10)."""
        if self.eval.every is not None:
            return self.eval.every
        return max(1, self.train.steps // 10) if self.data.val_tokens else 0

    def sections(self) -> dict[str, Any]:
        """{section name: its dataclass}, in the YAML's order."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # ---- checks ---------------------------------------------------------------------------------------------
    def check(self) -> None:
        """Raise ConfigError naming the key for values of the wrong type (converting what YAML gives loosely, such
        as 1e-4 for a float), impossible values and combinations (no processes and no files needed)."""
        for name, section in self.sections().items():
            values = {f.name: getattr(section, f.name) for f in dataclasses.fields(section)}
            for key, value in check_types(type(section), values, f"{name}.").items():
                setattr(section, key, value)
        model = self.model_config()
        p, d, t = self.parallel, self.data, self.train
        from ..parallel.parallel_dims import check_sizes

        check_sizes(p.dp_replicate, p.dp_shard, p.cp, p.tp)
        _choice("parallel.cp_mode", p.cp_mode, ("ring", "allgather", "ulysses", "hybrid"))
        _choice("parallel.cp_layout", p.cp_layout, ("zigzag", "contiguous"))
        _choice("schedule.kind", self.schedule.kind, ("cosine", "constant", "warmup_constant"))
        _choice("train.dtype", t.dtype, ("float32", "bfloat16"))
        _choice("train.task", t.task, ("pretrain", "sft"))
        _choice("data.sft_packing", d.sft_packing, ("naive", "reset", "pad"))
        _choice("data.sft_truncate", d.sft_truncate, ("none", "left"))
        _check_task_keys(t.task, d)
        _choice("train.activation_checkpointing", t.activation_checkpointing, ("none", "full", "every_k", "selective", "offload"))
        _choice("train.device", t.device, ("auto", "cpu", "cuda"))
        from ..ops.dispatch import CHOICES, OPS

        kernels = t.kernels if isinstance(t.kernels, dict) else {op: t.kernels for op in OPS}
        for op, choice in kernels.items():
            if op not in OPS:
                raise ConfigError(f"train.kernels: unknown op {op!r}; ops are {', '.join(OPS)}")
            _choice(f"train.kernels.{op}", choice, CHOICES)
        if t.steps < 1:
            raise ConfigError(f"train.steps must be >= 1, got {t.steps}")
        if t.activation_checkpointing == "every_k" and t.ac_every < 1:
            raise ConfigError(f"train.ac_every must be >= 1, got {t.ac_every}")
        if d.seq_len < 2 or d.micro_batch_size < 1:
            raise ConfigError(f"data.seq_len must be >= 2 and data.micro_batch_size >= 1, got {d.seq_len}, "
                              f"{d.micro_batch_size}")
        if bool(d.train_tokens) == bool(d.train_blend):
            raise ConfigError("data.train_tokens / data.train_blend: give exactly one (a dataset prefix, or "
                              "[[weight, prefix], ...])")
        if d.train_blend is not None:
            ok = isinstance(d.train_blend, list) and all(
                isinstance(x, (list, tuple)) and len(x) == 2 and isinstance(x[0], (int, float))
                and not isinstance(x[0], bool) and x[0] > 0 and isinstance(x[1], str) for x in d.train_blend)
            if not ok:
                raise ConfigError(f"data.train_blend must be a list of [weight > 0, dataset prefix] pairs, got "
                                  f"{d.train_blend!r}")
        if self.eval.every is not None and self.eval.every < 0:
            raise ConfigError(f"eval.every must be >= 0 (0: never; unset: every train.steps // 10 steps with "
                              f"data.val_tokens), got {self.eval.every}")
        if self.eval.every and not d.val_tokens:
            raise ConfigError("eval.every > 0 needs data.val_tokens (a held-out dataset prefix)")
        if not 0 <= self.schedule.min_lr_ratio <= 1:
            raise ConfigError(f"schedule.min_lr_ratio must be in [0, 1], got {self.schedule.min_lr_ratio}")
        if self.schedule.warmup_steps < 0 or self.schedule.warmup_steps > t.steps:
            raise ConfigError(f"schedule.warmup_steps must be in [0, train.steps={t.steps}], got "
                              f"{self.schedule.warmup_steps}")
        if self.optim.lr <= 0 or self.optim.grad_clip < 0:
            raise ConfigError(f"optim.lr must be > 0 and optim.grad_clip >= 0, got {self.optim.lr}, "
                              f"{self.optim.grad_clip}")
        c = self.checkpoint
        if c.resume not in ("none", "auto") and not os.path.isdir(c.resume):
            raise ConfigError(f"checkpoint.resume: no checkpoint folder {c.resume!r} (use none, auto or a step_<N> "
                              f"folder)")
        if (c.every or c.resume == "auto") and not c.dir:
            raise ConfigError("checkpoint.every / checkpoint.resume=auto need checkpoint.dir")
        if c.keep < 1:
            raise ConfigError(f"checkpoint.keep must be >= 1, got {c.keep}")
        for name, size in (("num_heads", model.num_heads), ("num_kv_heads", model.num_kv_heads),
                           ("vocab_size", model.vocab_size), ("intermediate_size", model.intermediate_size)):
            if size % p.tp:
                raise ConfigError(f"parallel.tp={p.tp} does not divide model {name}={size}: pick a tp that does")
        if p.cp_mode == "hybrid":
            if p.cp_ulysses < 2 or p.cp % p.cp_ulysses:
                raise ConfigError(f"parallel.cp_mode=hybrid needs parallel.cp_ulysses >= 2 dividing cp={p.cp}, got "
                                  f"{p.cp_ulysses}")
        elif p.cp_ulysses != 1:
            raise ConfigError(f"parallel.cp_ulysses={p.cp_ulysses} applies to cp_mode=hybrid only (cp_mode is "
                              f"{p.cp_mode}): set it to 1")
        heads_split = {"ulysses": p.cp, "hybrid": p.cp_ulysses}.get(p.cp_mode, 1)
        if model.num_heads % (heads_split * p.tp):
            raise ConfigError(f"parallel.cp_mode={p.cp_mode} splits heads: its degree {heads_split} x tp={p.tp} must "
                              f"divide num_heads={model.num_heads}; use cp_mode=ring")

    def check_paths(self) -> None:
        """Raise ConfigError naming the key for a dataset (data.train_tokens, each data.train_blend prefix,
        data.val_tokens) without its .bin or .idx, or a model.init_from that is not a model folder; run before any
        process group or model is built."""
        d = self.data
        if d.train_tokens:
            _check_dataset("data.train_tokens", d.train_tokens)
        for i, (_, prefix) in enumerate(d.train_blend or ()):
            _check_dataset(f"data.train_blend[{i}]", prefix)
        if d.val_tokens:
            _check_dataset("data.val_tokens", d.val_tokens)
        if self.model.init_from:
            from ..checkpoint.convert import folder_kind

            folder_kind(self.model.init_from, "model.init_from")

    def check_world(self, world_size: int) -> dict[str, int]:
        """Check that dp_replicate x dp_shard x cp x tp == world_size (ParallelDims resolves dp_shard=-1) and that
        the global batch divides. Returns the sizes {dp_replicate, dp_shard, cp, tp, cp_ulysses, accumulation,
        micro_batch_size}: with data.global_batch_tokens, the micro-batch is the largest size up to
        data.micro_batch_size that divides each replica's samples, the rest accumulated."""
        from ..parallel.context_parallel import sequence_layout
        from ..parallel.parallel_dims import ParallelDims

        p = self.parallel
        dims = ParallelDims(p.dp_replicate, p.dp_shard, p.cp, p.tp, world_size, cp_ulysses=p.cp_ulysses)
        dp_shard, dp = dims.dp_shard, dims.dp
        # cp_pad pads every sample for CP and sequence parallelism at once; without it (or without CP, where
        # sequence parallelism alone splits the sequence by tp) the length itself must divide.
        divisor = dims.seq_len_divisor(sequence_layout(p.cp_mode, p.cp_layout))
        if self.data.seq_len % divisor and (p.cp == 1 or not p.cp_pad):
            if p.cp == 1:
                raise ConfigError(f"data.seq_len={self.data.seq_len} does not divide over parallel.tp={p.tp} "
                                  f"(sequence parallelism splits each sample into tp pieces): use a data.seq_len "
                                  f"that is a multiple of {divisor}")
            raise ConfigError(f"data.seq_len={self.data.seq_len} does not divide over parallel.cp={p.cp} "
                              f"(cp_mode={p.cp_mode}, {sequence_layout(p.cp_mode, p.cp_layout)} layout, tp={p.tp}): "
                              f"each sample splits into {divisor} equal pieces, and parallel.cp_pad=false forbids "
                              f"padding; set parallel.cp_pad=true (pads with -100 labels) or use a data.seq_len that "
                              f"is a multiple of {divisor}")
        d = self.data
        micro, accumulation = d.micro_batch_size, 1
        if d.global_batch_tokens:
            per_replica, rest = divmod(d.global_batch_tokens, d.seq_len * dp)
            if rest or not per_replica:
                raise ConfigError(f"data.global_batch_tokens={d.global_batch_tokens} is not a multiple of seq_len x "
                                  f"dp = {d.seq_len} x {dp} = {d.seq_len * dp}: each of the dp={dp} replicas takes "
                                  f"whole samples of data.seq_len tokens; use a multiple")
            # micro_batch_size is the most samples a micro-batch holds: the largest that divides the replica's share
            micro = next(m for m in range(min(micro, per_replica), 0, -1) if per_replica % m == 0)
            accumulation = per_replica // micro
        return {"dp_replicate": p.dp_replicate, "dp_shard": dp_shard, "cp": p.cp, "tp": p.tp,
                "cp_ulysses": p.cp_ulysses, "accumulation": accumulation, "micro_batch_size": micro}


def _check_dataset(key: str, path: str) -> None:
    """ConfigError naming ``key`` unless dataset ``path`` (PREFIX, PREFIX.bin or PREFIX.idx) has both files."""
    from ..data.indexed import dataset_prefix

    prefix = dataset_prefix(path)
    missing = [f for f in (prefix + ".bin", prefix + ".idx") if not os.path.isfile(f)]
    if missing:
        where = "" if os.path.isabs(prefix) else f" (relative to {os.getcwd()})"
        raise ConfigError(f"{key}={path!r}: {' and '.join(missing)} not found{where}; write the dataset with "
                          f"`megatron-lc data tokenize` (or IndexedDatasetWriter), or set {key} to an existing "
                          f"PREFIX (PREFIX.bin + PREFIX.idx) or the path of either file")


def _check_task_keys(task: str, d: DataSection) -> None:
    """ConfigError for data.* keys that the other train.task would read (none is silently ignored)."""
    if task == "pretrain":
        given = [f"data.{k}={getattr(d, k)}" for k, default in (("sft_packing", "naive"), ("sft_truncate", "none"))
                 if getattr(d, k) != default]
        if given:
            raise ConfigError(f"{', '.join(given)} apply to SFT only, but train.task=pretrain: set train.task=sft "
                              f"(with an SFT dataset of `megatron-lc data sft`) or drop them")
    else:
        given = [f"data.{k}=true" for k in ("reset_position_ids", "eod_mask_loss") if getattr(d, k)]
        if given:
            raise ConfigError(f"{', '.join(given)} apply to pretraining only, but train.task=sft: SFT labels are "
                              f"-100 outside answers already; use data.sft_packing=reset for positions that restart "
                              f"at each chat, or drop them")


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key} must be one of {', '.join(allowed)}; got {value!r}")


def _section_class(name: str):
    return {"model": ModelSection, "parallel": ParallelSection, "optim": OptimSection,
            "schedule": ScheduleSection, "data": DataSection, "checkpoint": CheckpointSection,
            "logging": LoggingSection, "eval": EvalSection, "train": TrainSection}[name]


REQUIRED = "(required without model.preset)"  # how --list-keys shows a ModelConfig field without a default


def config_keys() -> list[tuple[str, str, Any, str]]:
    """(dotted key, type, default, one-line doc) of every config key, in the YAML's order; model.config.* are
    ModelConfig's fields (default REQUIRED where a preset or the YAML must give them)."""
    rows = []
    for section in dataclasses.fields(TrainConfig):
        cls = _section_class(section.name)
        for f in dataclasses.fields(cls):
            if section.name == "model" and f.name == "config":
                rows += [(f"model.config.{g.name}", *_type_default_doc(ModelConfig, g))
                         for g in dataclasses.fields(ModelConfig)]
            else:
                rows.append((f"{section.name}.{f.name}", *_type_default_doc(cls, f)))
    return rows


def _type_default_doc(cls, f: dataclasses.Field) -> tuple[str, Any, str]:
    from ..configtools import _field_types, field_docs, type_name

    if f.default_factory is not dataclasses.MISSING:
        default = f.default_factory()
    else:
        default = REQUIRED if f.default is dataclasses.MISSING else f.default
    return type_name(_field_types(cls)[f.name]), default, field_docs(cls)[f.name]


def _check_override_key(keys: list[str], item: str) -> None:
    """ConfigError for an override whose key names no config key, saying it is the command-line override and
    naming the closest valid key (``model.vocab_size`` -> ``model.config.vocab_size``)."""
    from ..configtools import _field_types

    valid = ["model.config"] + [row[0] for row in config_keys()]  # model.config=... gives the whole mapping
    path = ".".join(keys)
    head = ".".join(keys[:3] if keys[:2] == ["model", "config"] else keys[:2])
    ok = head in valid
    if ok and len(keys) > head.count(".") + 1:  # deeper: only into a mapping (train.kernels.attention=...)
        cls, name = (ModelConfig, keys[2]) if keys[:2] == ["model", "config"] else (_section_class(keys[0]), keys[1])
        ok = "dict" in str(_field_types(cls)[name])
    if not ok:
        close = closest_key(path, valid)
        hint = f"did you mean {close}? " if close else ""
        raise ConfigError(f"unknown key {path!r} in the command-line override {item}: {hint}(`megatron-lc train "
                          f"--list-keys` lists every key with its type and default)")


def to_yaml(cfg: TrainConfig) -> str:
    """The whole resolved config as YAML (every key, tuples as lists), loadable again with ``--config``."""
    def plain(value):
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return yaml.safe_dump(plain(cfg.to_dict()), sort_keys=False, default_flow_style=False, width=120)


def apply_override(data: dict, item: str) -> None:
    """Apply one ``section.key=value`` (or ``model.config.key=value``) to the nested dict ``data``; the value is
    parsed as YAML (numbers, booleans, null, lists)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value (e.g. optim.lr=1e-4)")
    path, raw = item.split("=", 1)
    keys = path.strip().split(".")
    if len(keys) < 2:
        raise ConfigError(f"override {item!r}: name a section and a key, e.g. train.steps=10")
    _check_override_key(keys, item)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: the value {raw!r} is not valid YAML ({yaml_problem(e)}): quote "
                          f"a string ({path.strip()}='\"...\"' in the shell) or close its brackets") from None
    node = data
    for key in keys[:-1]:
        if node.get(key) is None:  # `section:` with nothing under it in the YAML
            node[key] = {}
        node = node[key]
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {key} is not a section")
    node[keys[-1]] = value


def config_from_dict(data: dict[str, Any], where: str = "config") -> TrainConfig:
    """Build and check a TrainConfig from nested dicts; unknown keys fail naming the closest valid key."""
    check_keys(TrainConfig, data, where)
    sections = {}
    for name, value in data.items():
        cls = _section_class(name)
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {name} must be a mapping, got {type(value).__name__}")
        check_keys(cls, value, f"{where}: {name}")
        value = dict(value)
        sections[name] = cls(**value)  # value types: cfg.check()
    cfg = TrainConfig(**sections)
    cfg.check()
    return cfg


def load_train_config(path: str | os.PathLike | None, overrides: list[str] = (),
                      check_paths: bool = True) -> TrainConfig:
    """Read a YAML run config (or start from defaults when path is None), apply ``section.key=value`` overrides,
    build and check it; ``check_paths`` also checks that its datasets and model.init_from exist (off: a config
    checked on another machine than the one that trains)."""
    data = load_yaml(path) if path else {}
    for item in overrides:
        apply_override(data, item)
    cfg = config_from_dict(data, where=str(path) if path else "config")
    if check_paths:
        cfg.check_paths()
    return cfg
