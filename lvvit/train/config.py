"""The training run's configuration as typed, frozen sections, and every check of it that
needs no model: the batch arithmetic against the DeepSpeed JSON, the peak lr, the shard
sources and the epoch length.

The command line and the ``--config`` YAML become a :class:`TrainConfig` once, in
:mod:`lvvit.train.cli`; library code takes these sections, never an ``argparse.Namespace``.
Errors are :class:`~lvvit.errors.ConfigError`/:class:`~lvvit.errors.DataError` naming the
option or file; only entry points exit.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import math
import os
import signal
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lvvit.data.source import DEFAULT_ACCESS, Access, ShardSource, SourceError, resolve
from lvvit.errors import ConfigError, DataError
from lvvit.models.recipe import REFERENCE_BATCH, recipe_for
from lvvit.train.ds_config import check_ds_config, load_ds_config
from lvvit.train.preemption import DEFAULT_GRACE, DEFAULT_SIGNALS, parse_signals

DS_CONFIGS_PACKAGE = "lvvit.train.ds_configs"
"""The DeepSpeed JSONs ship as package data, so an installed ``lvvit`` finds its default;
``ds_configs/`` at the repository root holds identical copies for the documented command
line (a test keeps them identical)."""

SAMPLING_MODES = ("epoch", "resampled")


def _option(name: str) -> dict[str, Any]:
    """Field metadata: the command-line option (destination) a field comes from, where the
    field's own name differs; :meth:`TrainConfig.options` logs the option names."""
    return {"option": name}


@dataclass(frozen=True)
class ModelConfig:
    name: str = field(default="lvvit_s", metadata=_option("model"))
    img_size: int = 224
    num_classes: int | None = None
    overrides: Mapping[str, Any] = field(default_factory=dict, metadata=_option("model_arg"))
    drop_path: float | None = None
    mix_token: bool = True
    finetune: Path | None = None
    grad_checkpointing: bool = False
    compile: bool = False


@dataclass(frozen=True)
class DataConfig:
    train_shards: str | None = None
    eval_shards: str | None = None
    train_manifest: str | None = None
    eval_manifest: str | None = None
    access: Access = DEFAULT_ACCESS
    """Timeouts, retries, deadline and ``--shard-cache`` of every shard read."""
    steps_per_epoch: int | None = None
    eval_batch: int | None = None
    workers: int = 4
    sampling: str | None = None
    """``epoch`` (every sample once per epoch, exact resume), ``resampled`` (shards drawn with
    replacement), or ``None``: ``epoch`` when the train shards have a manifest."""
    sample_log: Path | None = None


@dataclass(frozen=True)
class AugmentConfig:
    randaug_magnitude: int = 9
    randaug_mstd: float = 0.5
    randaug_ops: int | None = None
    scale: tuple[float, float] = (0.08, 1.0)
    hflip: float = 0.5
    reprob: float = 0.25


@dataclass(frozen=True)
class LossConfig:
    smoothing: float = 0.1
    cls_weight: float = 1.0
    dense_weight: float = 1.0
    ground_truth: bool = False


@dataclass(frozen=True)
class OptimConfig:
    base_lr: float | None = None
    lr: float | None = None
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    clip_grad: float | None = None
    micro_batch: int | None = None
    grad_accum: int | None = None
    model_ema: bool = True
    ema_decay: float = 0.99992
    seed: int = 42
    max_steps: int | None = None
    nan_policy: str = "stop"


@dataclass(frozen=True)
class ScheduleConfig:
    epochs: int = 300
    cooldown_epochs: int = 10
    warmup_epochs: float = 5
    warmup_lr: float = 1e-6

    @property
    def total_epochs(self) -> int:
        return self.epochs + self.cooldown_epochs


@dataclass(frozen=True)
class CheckpointConfig:
    output: Path = Path("output")
    save_every: int = 1000
    keep: int = 3
    resume: str | None = None
    universal: bool = False


@dataclass(frozen=True)
class PreemptionConfig:
    signals: tuple[signal.Signals, ...] = field(default=parse_signals(DEFAULT_SIGNALS),
                                                metadata=_option("preempt_signals"))
    grace: float = field(default=DEFAULT_GRACE, metadata=_option("preempt_grace"))


@dataclass(frozen=True)
class TrackingConfig:
    eval: bool = True
    eval_only: bool = False
    experiment: str = "lvvit"
    run_name: str | None = None
    mlflow: bool = True
    strict_tracking: bool = False
    system_metrics: bool = True
    log_every: int = 10


@dataclass(frozen=True)
class TrainConfig:
    """One run's configuration: what ``train.py``'s options and ``--config`` file say, typed
    and checked (:func:`lvvit.train.cli.parse_config`). ``deepspeed_config`` ``None`` means the
    packaged default for the machine."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    preemption: PreemptionConfig = field(default_factory=PreemptionConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    deepspeed_config: Path | None = None
    config_file: Path | None = field(default=None, metadata=_option("config"))

    def __post_init__(self) -> None:
        check_combination(self)

    def options(self) -> dict[str, Any]:
        """Every setting by the option name a user types (``lr``, ``model``, ``shard_timeout``):
        the run's MLflow params."""
        out: dict[str, Any] = {}
        for section in dataclasses.fields(self):
            value = getattr(self, section.name)
            if dataclasses.is_dataclass(value):
                for f in dataclasses.fields(value):
                    item = getattr(value, f.name)
                    if isinstance(item, Access):
                        out.update(shard_timeout=item.timeout, shard_retries=item.retries,
                                   shard_deadline=item.deadline, shard_cache=item.cache_dir)
                    else:
                        out[f.metadata.get("option", f.name)] = item
            else:
                out[section.metadata.get("option", section.name)] = value
        out["preempt_signals"] = ",".join(s.name for s in self.preemption.signals) or "none"
        return out


def check_combination(config: TrainConfig) -> None:
    """Settings that cannot run together (ranges are the command line's, lvvit.train.options)."""
    tracking, data = config.tracking, config.data
    try:
        recipe_for(config.model.name)
    except ValueError as err:
        raise ConfigError(f"--model: {err}") from None
    if tracking.eval_only:
        if not data.eval_shards:
            raise ConfigError("--eval-only needs --eval-shards")
        if not tracking.eval:
            raise ConfigError("--eval-only contradicts --no-eval")
        if (config.checkpoint.resume is None) == (config.model.finetune is None):
            raise ConfigError("--eval-only needs exactly one of --resume [TAG|DIR] (a DeepSpeed checkpoint) "
                              "or --finetune FILE (a weights file such as OUTPUT/weights.pth)")
    elif not data.train_shards:
        raise ConfigError("--train-shards is required")
    if data.sampling not in (None, *SAMPLING_MODES):
        raise ConfigError(f"--sampling {data.sampling}: choose one of {', '.join(SAMPLING_MODES)}")


@dataclass(frozen=True)
class BatchPlan:
    micro_batch: int
    grad_accum: int
    world_size: int
    sources: dict[str, str]

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.world_size


MICRO_KEY, ACCUM_KEY, TOTAL_KEY = "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size"


def _batch_value(value: Any, name: str) -> int | None:
    """A batch setting as a positive int (``None`` when unset); ``name`` says where it came from."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name}: {value!r} is not a positive integer")
    return value


def resolve_batch(
    optim: OptimConfig, ds_config: dict, world_size: int, origin: str = "deepspeed config"
) -> BatchPlan:
    """Micro batch and accumulation: command line, else the JSON, else derived from the JSON's
    ``train_batch_size``, else 128 x 1 (official 8 x 128).

    A ``train_batch_size`` in the JSON must come out exactly as micro x accum x ranks:
    rounding it down would silently change the global batch (and the lr scaled from it),
    and DeepSpeed itself would only object after the model is built. ``origin`` names the
    JSON in errors.
    """
    sources = {"micro_batch": "command line", "grad_accum": "command line"}
    micro = _batch_value(optim.micro_batch, "--micro-batch")
    accum = _batch_value(optim.grad_accum, "--grad-accum")
    if micro is None:
        micro = _batch_value(ds_config.get(MICRO_KEY), f"{origin}: {MICRO_KEY}")
        sources["micro_batch"] = "deepspeed config"
    if accum is None:
        accum = _batch_value(ds_config.get(ACCUM_KEY), f"{origin}: {ACCUM_KEY}")
        sources["grad_accum"] = "deepspeed config"
    total = _batch_value(ds_config.get(TOTAL_KEY), f"{origin}: {TOTAL_KEY}")
    if total is not None:
        if micro is None and accum is None:
            accum, sources["grad_accum"] = 1, "default"
        if micro is None:
            micro = _exact_share(total, accum * world_size, f"{origin}: {TOTAL_KEY} {total}",
                                 f"grad accum {accum} x {world_size} rank(s)")
            sources["micro_batch"] = "deepspeed config train_batch_size"
        elif accum is None:
            accum = _exact_share(total, micro * world_size, f"{origin}: {TOTAL_KEY} {total}",
                                 f"micro batch {micro} x {world_size} rank(s)")
            sources["grad_accum"] = "deepspeed config train_batch_size"
        elif micro * accum * world_size != total:
            raise ConfigError(
                f"{origin}: {TOTAL_KEY} {total} != micro batch {micro} ({sources['micro_batch']}) x grad accum "
                f"{accum} ({sources['grad_accum']}) x {world_size} rank(s) = {micro * accum * world_size}")
    if micro is None:
        micro, sources["micro_batch"] = 128, "default"
    if accum is None:
        accum, sources["grad_accum"] = 1, "default"
    return BatchPlan(micro, accum, world_size, sources)


def _exact_share(total: int, divisor: int, what: str, by: str) -> int:
    """``total / divisor`` when it is a whole, positive number; else an error naming both."""
    if total % divisor:
        raise ConfigError(f"{what} is not divisible by {by} ({total} / {divisor} = {total / divisor:g})")
    return total // divisor


def peak_lr(model: str, optim: OptimConfig, global_batch: int) -> float:
    """``--lr`` as given, else ``--base-lr`` or the variant's recipe rate (per
    ``REFERENCE_BATCH`` images) scaled linearly to the global batch."""
    if optim.lr is not None:
        return optim.lr
    if optim.base_lr is not None:
        return optim.base_lr * global_batch / REFERENCE_BATCH
    return recipe_for(model).lr_at(global_batch)


def randaug_ops(model: str, augment: AugmentConfig) -> int:
    """``--randaug-ops`` as given, else the variant's recipe."""
    return recipe_for(model).randaug_ops if augment.randaug_ops is None else augment.randaug_ops


def default_ds_config_path() -> Path:
    import torch

    name = "zero2.json" if torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR") != "cpu" else "cpu.json"
    return packaged_ds_config(name)


def packaged_ds_config(name: str) -> Path:
    """One of the packaged DeepSpeed JSONs. A package installed as files (pip, editable or
    not) gives a real path, which the run records and DeepSpeed may be handed."""
    return Path(str(importlib.resources.files(DS_CONFIGS_PACKAGE) / name))


def resolve_ds_config(config: TrainConfig, ds_config: dict, plan: BatchPlan, lr: float) -> dict:
    """The JSON with the run's batch sizes, optimizer rate/decay and clipping filled in
    (``lvvit.train.engine.fill_ds_config``, which the benchmarks share)."""
    from lvvit.train.engine import fill_ds_config

    return fill_ds_config(ds_config, micro_batch=plan.micro_batch, grad_accum=plan.grad_accum,
                          global_batch=plan.global_batch, lr=lr, weight_decay=config.optim.weight_decay,
                          clip_grad=config.optim.clip_grad, universal=config.checkpoint.universal)


def open_source(option: str, spec: str, manifest: str | None, access: Access) -> ShardSource:
    """The shards of ``--train-shards``/``--eval-shards`` (``option``), resolved once: the one
    manifest resolution (lvvit.data.source) for epoch length, eval split and classes."""
    try:
        return resolve(spec, manifest, access)
    except (SourceError, FileNotFoundError) as e:
        raise DataError(f"{option} {spec}: {e}") from None


def steps_per_epoch_from_manifest(source: ShardSource, global_batch: int) -> int:
    """``total / global batch`` from the source's manifest counts."""
    if source.total is None:
        raise ConfigError(f"cannot size an epoch of {source.spec}: no manifest.json is reachable beside it; "
                          "pass --steps-per-epoch (or --train-manifest)")
    steps = math.floor(source.total / global_batch)
    if steps < 1:
        raise ConfigError(f"{source.manifest}: {source.total} samples make no full global batch of {global_batch}")
    return steps


def check_micro_batch_fits(source: ShardSource, plan: BatchPlan) -> None:
    """Each rank reads ``total / ranks`` samples; fewer than one micro batch would only repeat
    them (the loader resamples), so it is refused even with ``--steps-per-epoch``. Without
    counts (no manifest reachable) there is nothing to check."""
    if source.total is None:
        return
    per_rank = source.total // plan.world_size
    if per_rank < plan.micro_batch:
        raise ConfigError(
            f"{source.manifest}: {source.total} samples over {plan.world_size} rank(s) are {per_rank} per rank, "
            f"fewer than one micro batch of {plan.micro_batch} ({plan.sources['micro_batch']}); "
            "lower --micro-batch")


@dataclass(frozen=True)
class RunConfig:
    """What ``prepare`` resolved: the DeepSpeed JSON as passed to DeepSpeed, and the numbers."""

    ds_path: Path
    ds_config: dict
    plan: BatchPlan
    lr: float
    steps_per_epoch: int
    train_source: ShardSource | None
    sampling: str


def prepare(config: TrainConfig, world_size: int) -> RunConfig:
    """Every check of the run's configuration, before the model or engine exists: the
    DeepSpeed JSON's keys and sections, the batch arithmetic, and data enough for one micro
    batch per rank. ``--eval-only`` may have no train shards; its schedule is never stepped."""
    data = config.data
    ds_path = config.deepspeed_config or default_ds_config_path()
    origin = f"--deepspeed_config {ds_path}"
    raw = load_ds_config(ds_path)
    plan = resolve_batch(config.optim, raw, world_size, origin)
    train = (open_source("--train-shards", data.train_shards, data.train_manifest, data.access)
             if data.train_shards else None)
    if train is not None and not config.tracking.eval_only:
        check_micro_batch_fits(train, plan)
    lr = peak_lr(config.model.name, config.optim, plan.global_batch)
    ds_config = resolve_ds_config(config, raw, plan, lr)
    check_ds_config(ds_config, origin)  # the command line's values too (e.g. --clip-grad)
    steps = data.steps_per_epoch or (steps_per_epoch_from_manifest(train, plan.global_batch) if train else 1)
    return RunConfig(ds_path, ds_config, plan, lr, steps, train, sampling_mode(data.sampling, train))


def sampling_mode(asked: str | None, source: ShardSource | None) -> str:
    """``--sampling`` as given, else ``epoch`` for shards with per-shard counts (a manifest)
    and ``resampled`` for a stream without them; ``epoch`` without counts is refused."""
    counted = source is not None and source.counts is not None
    if asked == "epoch" and source is not None and not counted:
        raise ConfigError(f"--sampling epoch needs the per-shard counts of {source.spec} (no manifest.json "
                          "is reachable; pass --train-manifest or --sampling resampled)")
    return asked or ("epoch" if counted else "resampled")
