"""Training options: the official recipe as defaults, a YAML file under the command line.

Precedence, lowest first: built-in defaults (the TokenLabeling recipe), ``--config
file.yaml`` (keys are option names, ``-`` or ``_``), the command line. Batch sizes follow
the same rule against the DeepSpeed JSON: the command line wins over the JSON, and the run
logs which source each value came from.
"""

from __future__ import annotations

import argparse
import importlib.resources
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lvvit.data.cli import access_from_args, add_access_args
from lvvit.data.source import (
    ShardSource,
    SourceError,
    resolve,
)
from lvvit.train.ds_config import check_ds_config, load_ds_config
from lvvit.train.options import check_ranges, yaml_defaults
from lvvit.train.preemption import DEFAULT_GRACE, DEFAULT_SIGNALS, parse_signals

DS_CONFIGS_PACKAGE = "lvvit.train.ds_configs"
"""The DeepSpeed JSONs ship as package data, so an installed ``lvvit`` finds its default;
``ds_configs/`` at the repository root holds identical copies for the documented command
line (a test keeps them identical)."""

BASE_LR_AT_1024 = {"lvvit_l": 1e-3}
"""Official base rates per 1024 images where they differ from 1.6e-3."""
DEFAULT_BASE_LR = 1.6e-3
RANDAUG_OPS = {"lvvit_l": 3}
"""RandAugment ops per image where they differ from 2 (the official L recipe uses 3)."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train.py",
        description="Train LV-ViT with token labeling under DeepSpeed ZeRO, tracked in MLflow. "
        "Run with `deepspeed train.py --deepspeed_config ds_configs/zero2.json ...` "
        "or `python train.py ...` for one process.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--config", type=Path, help="YAML file of options (command line wins)")
    p.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config", type=Path,
                   help="DeepSpeed JSON (default: ds_configs/zero2.json on GPU, ds_configs/cpu.json on CPU)")
    p.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=None,
                   help=argparse.SUPPRESS)

    g = p.add_argument_group("model")
    g.add_argument("--model", default="lvvit_s", help="lvvit_t | lvvit_s | lvvit_m | lvvit_l")
    g.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="override an architecture field, e.g. depth=2 (repeatable)")
    g.add_argument("--img-size", type=int, default=224,
                   help="training resolution; token-label size is img / patch size (16)")
    g.add_argument("--num-classes", type=int, default=None,
                   help="default: length of classes.json beside the train shards, else 1000")
    g.add_argument("--drop-path", type=float, default=None, help="stochastic depth (default: per model)")
    g.add_argument("--no-mix-token", dest="mix_token", action="store_false", help="turn MixToken off")
    g.add_argument("--finetune", type=Path, help="initialise from a checkpoint (pos_embed resized)")
    g.add_argument("--grad-checkpointing", action="store_true", help="recompute block activations in backward")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the model (training and eval) and the loss; the first steps compile")

    g = p.add_argument_group("data")
    g.add_argument("--train-shards",
                   help="shard source: a folder with manifest.json, a brace pattern naming a subset "
                   "('data/train-{000000..000999}.tar'), http(s):// patterns, pipe:COMMAND, s3:// or gs:// URLs")
    g.add_argument("--eval-shards", help="shard source of the eval set (as --train-shards)")
    g.add_argument("--train-manifest", default=None,
                   help="manifest.json with the train shards' sample counts (default: the one beside them)")
    g.add_argument("--eval-manifest", default=None, help="manifest.json of the eval shards (default: beside them)")
    g.add_argument("--shard-cache", default=None, metavar="DIR",
                   help="node-local folder caching remote shards: one download per node, later epochs read disk")
    add_access_args(g, "is skipped (training) or an error (evaluation)")
    g.add_argument("--steps-per-epoch", type=int, default=None,
                   help="optimizer steps per epoch (default: manifest.json total / global batch; "
                   "needed when no manifest is reachable)")
    g.add_argument("--eval-batch", type=int, default=None, help="eval batch per rank (default: micro batch)")
    g.add_argument("--workers", type=int, default=4, help="loader processes per rank")

    g = p.add_argument_group("augmentation and targets")
    g.add_argument("--randaug-magnitude", type=int, default=9)
    g.add_argument("--randaug-mstd", type=float, default=0.5)
    g.add_argument("--randaug-ops", type=int, default=None,
                   help="ops per image (default: 2, 3 for L; 0 turns RandAugment off)")
    g.add_argument("--scale", type=float, nargs=2, default=(0.08, 1.0), metavar=("MIN", "MAX"),
                   help="RandomResizedCrop area fraction range")
    g.add_argument("--hflip", type=float, default=0.5, help="horizontal flip probability")
    g.add_argument("--reprob", type=float, default=0.25, help="random erasing probability")
    g.add_argument("--smoothing", type=float, default=0.1)
    g.add_argument("--cls-weight", type=float, default=1.0)
    g.add_argument("--dense-weight", type=float, default=1.0)
    g.add_argument("--ground-truth", action="store_true", help="blend the class target with the label")

    g = p.add_argument_group("optimization")
    g.add_argument("--epochs", type=int, default=300, help="cosine length in epochs")
    g.add_argument("--cooldown-epochs", type=int, default=10, help="epochs at min lr after the cosine")
    g.add_argument("--warmup-epochs", type=float, default=5)
    g.add_argument("--warmup-lr", type=float, default=1e-6)
    g.add_argument("--base-lr", type=float, default=None,
                   help="lr at global batch 1024, scaled linearly (default 1.6e-3, 1e-3 for L)")
    g.add_argument("--lr", type=float, default=None, help="absolute peak lr (no scaling)")
    g.add_argument("--min-lr", type=float, default=1e-5)
    g.add_argument("--weight-decay", type=float, default=0.05)
    g.add_argument("--clip-grad", type=float, default=None, help="max grad norm (default: the JSON's, else off)")
    g.add_argument("--micro-batch", type=int, default=None, help="per-rank micro batch (wins over the JSON)")
    g.add_argument("--grad-accum", type=int, default=None, help="accumulation steps (wins over the JSON)")
    g.add_argument("--no-model-ema", dest="model_ema", action="store_false", help="turn EMA off")
    g.add_argument("--ema-decay", type=float, default=0.99992)
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--max-steps", type=int, default=None,
                   help="stop after this many optimizer steps (checkpoint kept; resume with --resume)")
    g.add_argument("--nan-policy", choices=("stop", "skip"), default="stop",
                   help="non-finite loss: stop (last good checkpoint kept) or skip the step")

    g = p.add_argument_group("checkpoints")
    g.add_argument("--output", type=Path, default=Path("output"), help="run folder")
    g.add_argument("--save-every", type=int, default=1000, help="checkpoint every N steps (0: epoch ends only)")
    g.add_argument("--keep", type=int, default=3, help="checkpoints kept")
    g.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="resume from OUTPUT/checkpoints (latest, or a tag, or a tag folder); 'auto': "
                        "latest if there is one, else start fresh (requeued jobs)")
    g.add_argument("--universal", action="store_true",
                   help="the resumed checkpoint is a DeepSpeed universal one (other rank count)")
    g.add_argument("--preempt-signals", default=DEFAULT_SIGNALS, metavar="SIG[,SIG...]",
                   help="signals that stop every rank at the next step boundary with a checkpoint, "
                        "exit status 75 ('none': off)")
    g.add_argument("--preempt-grace", type=float, default=DEFAULT_GRACE, metavar="SECONDS",
                   help="a rank still running this long after the signal ends (SIGALRM)")

    g = p.add_argument_group("evaluation and tracking")
    g.add_argument("--no-eval", dest="eval", action="store_false", help="skip per-epoch evaluation")
    g.add_argument("--eval-only", action="store_true",
                   help="evaluate a checkpoint (--resume [TAG|DIR]) or a weights file (--finetune FILE, "
                   "its EMA too) on --eval-shards with all ranks, write OUTPUT/eval.json and exit: "
                   "no training, no checkpoint; MLflow logs to a new run")
    g.add_argument("--experiment", default="lvvit", help="MLflow experiment")
    g.add_argument("--run-name", default=None, help="MLflow run name (default: model-imgsize)")
    g.add_argument("--no-mlflow", dest="mlflow", action="store_false", help="no MLflow tracking")
    g.add_argument("--strict-tracking", action="store_true",
                   help="exit before training when the MLflow server does not answer (default: warn, "
                   "keep records in OUTPUT/mlflow-spool.jsonl and send them when it answers)")
    g.add_argument("--no-system-metrics", dest="system_metrics", action="store_false")
    g.add_argument("--log-every", type=int, default=10, help="per-step metrics every N steps")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Options with the YAML file's values as defaults, so the command line wins."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.config is not None:
        parser.set_defaults(**yaml_defaults(parser, args.config))
        args = parser.parse_args(argv)
    check_ranges(parser, args)
    for name in ("output", "finetune", "deepspeed_config"):
        value = getattr(args, name)
        if value is not None and not isinstance(value, Path):
            setattr(args, name, Path(value))
    check_preemption(parser, args)
    if args.eval_only:
        check_eval_only(parser, args)
    elif not args.train_shards:
        parser.error("--train-shards is required")
    args.model_overrides = parse_model_args(args.model_arg)
    return args


def check_preemption(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``--preempt-signals`` names catchable signals (``--preempt-grace`` is in ``options.RANGES``)."""
    try:
        parse_signals(args.preempt_signals)
    except ValueError as err:
        parser.error(f"--preempt-signals: {err}")


def check_eval_only(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``--eval-only`` needs eval shards and exactly one source of weights."""
    if not args.eval_shards:
        parser.error("--eval-only needs --eval-shards")
    if not args.eval:
        parser.error("--eval-only contradicts --no-eval")
    if (args.resume is None) == (args.finetune is None):
        parser.error("--eval-only needs exactly one of --resume [TAG|DIR] (a DeepSpeed checkpoint) "
                     "or --finetune FILE (a weights file such as OUTPUT/weights.pth)")


def parse_model_args(items: list[str]) -> dict[str, Any]:
    """``["depth=2", "mlp_ratio=4.0"]`` -> ``{"depth": 2, "mlp_ratio": 4.0}`` (YAML scalars)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--model-arg {item!r}: expected KEY=VALUE")
        out[key.strip()] = yaml.safe_load(value)
    return out


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
        raise SystemExit(f"{name}: {value!r} is not a positive integer")
    return value


def resolve_batch(
    args: argparse.Namespace, ds_config: dict, world_size: int, origin: str = "deepspeed config"
) -> BatchPlan:
    """Micro batch and accumulation: command line, else the JSON, else derived from the JSON's
    ``train_batch_size``, else 128 x 1 (official 8 x 128).

    A ``train_batch_size`` in the JSON must come out exactly as micro x accum x ranks:
    rounding it down would silently change the global batch (and the lr scaled from it),
    and DeepSpeed itself would only object after the model is built. ``origin`` names the
    JSON in errors.
    """
    sources = {"micro_batch": "command line", "grad_accum": "command line"}
    micro = _batch_value(args.micro_batch, "--micro-batch")
    accum = _batch_value(args.grad_accum, "--grad-accum")
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
            raise SystemExit(
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
        raise SystemExit(f"{what} is not divisible by {by} ({total} / {divisor} = {total / divisor:g})")
    return total // divisor


def peak_lr(args: argparse.Namespace, global_batch: int) -> float:
    """``--lr`` as given, else the per-1024 base rate scaled linearly to the global batch."""
    if args.lr is not None:
        return args.lr
    base = args.base_lr if args.base_lr is not None else BASE_LR_AT_1024.get(args.model, DEFAULT_BASE_LR)
    return base * global_batch / 1024


def default_ds_config_path() -> Path:
    import torch

    name = "zero2.json" if torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR") != "cpu" else "cpu.json"
    return packaged_ds_config(name)


def packaged_ds_config(name: str) -> Path:
    """One of the packaged DeepSpeed JSONs. A package installed as files (pip, editable or
    not) gives a real path, which the run records and DeepSpeed may be handed."""
    return Path(str(importlib.resources.files(DS_CONFIGS_PACKAGE) / name))


def resolve_ds_config(
    args: argparse.Namespace, ds_config: dict, plan: BatchPlan, lr: float
) -> dict:
    """The JSON with the run's batch sizes, optimizer rate/decay and clipping filled in
    (``lvvit.train.engine.fill_ds_config``, which the benchmarks share)."""
    from lvvit.train.engine import fill_ds_config

    return fill_ds_config(ds_config, micro_batch=plan.micro_batch, grad_accum=plan.grad_accum,
                          global_batch=plan.global_batch, lr=lr, weight_decay=args.weight_decay,
                          clip_grad=args.clip_grad, universal=args.universal)


def open_source(option: str, spec: str, manifest: str | None, args: argparse.Namespace) -> ShardSource:
    """The shards of ``--train-shards``/``--eval-shards`` (``option``), resolved once: the one
    manifest resolution (lvvit.data.source) for epoch length, eval split and classes."""
    access = access_from_args(args, args.shard_cache)
    try:
        return resolve(spec, manifest, access)
    except (SourceError, FileNotFoundError) as e:
        raise SystemExit(f"{option} {spec}: {e}") from None


def steps_per_epoch_from_manifest(source: ShardSource, global_batch: int) -> int:
    """``total / global batch`` from the source's manifest counts."""
    if source.total is None:
        raise SystemExit(f"cannot size an epoch of {source.spec}: no manifest.json is reachable beside it; "
                         "pass --steps-per-epoch (or --train-manifest)")
    steps = math.floor(source.total / global_batch)
    if steps < 1:
        raise SystemExit(f"{source.manifest}: {source.total} samples make no full global batch of {global_batch}")
    return steps


def check_micro_batch_fits(source: ShardSource, plan: BatchPlan) -> None:
    """Each rank reads ``total / ranks`` samples; fewer than one micro batch would only repeat
    them (the loader resamples), so it is refused even with ``--steps-per-epoch``. Without
    counts (no manifest reachable) there is nothing to check."""
    if source.total is None:
        return
    per_rank = source.total // plan.world_size
    if per_rank < plan.micro_batch:
        raise SystemExit(
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


def prepare(args: argparse.Namespace, world_size: int) -> RunConfig:
    """Every check of the run's configuration, before the model or engine exists: the
    DeepSpeed JSON's keys and sections, the batch arithmetic, and data enough for one micro
    batch per rank. ``--eval-only`` may have no train shards; its schedule is never stepped."""
    ds_path = args.deepspeed_config or default_ds_config_path()
    origin = f"--deepspeed_config {ds_path}"
    raw = load_ds_config(ds_path)
    plan = resolve_batch(args, raw, world_size, origin)
    train = open_source("--train-shards", args.train_shards, args.train_manifest, args) if args.train_shards else None
    if train is not None and not args.eval_only:
        check_micro_batch_fits(train, plan)
    lr = peak_lr(args, plan.global_batch)
    ds_config = resolve_ds_config(args, raw, plan, lr)
    check_ds_config(ds_config, origin)  # the command line's values too (e.g. --clip-grad)
    steps = args.steps_per_epoch or (steps_per_epoch_from_manifest(train, plan.global_batch) if train else 1)
    return RunConfig(ds_path, ds_config, plan, lr, steps, train)
