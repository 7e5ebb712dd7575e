"""``train.py``'s command line: the official recipe as defaults, a YAML file under the
command line, parsed once into a typed :class:`~lvvit.train.config.TrainConfig`; and the
entry point that runs it.

Precedence, lowest first: built-in defaults (the TokenLabeling recipe), ``--config
file.yaml`` (keys are option names, ``-`` or ``_``), the command line. Batch sizes follow
the same rule against the DeepSpeed JSON: the command line wins over the JSON, and the run
logs which source each value came from. This module and :mod:`lvvit.train.options` (the
option checks) are the only ones of the package that see argparse objects.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import yaml

from lvvit.data.cli import access_from_args, add_access_args
from lvvit.errors import ConfigError, LvvitError, exits_on_error
from lvvit.train.config import (
    SAMPLING_MODES,
    AugmentConfig,
    CheckpointConfig,
    DataConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    PreemptionConfig,
    ScheduleConfig,
    TrackingConfig,
    TrainConfig,
)
from lvvit.train.options import check_ranges, refuse, yaml_defaults
from lvvit.train.preemption import DEFAULT_GRACE, DEFAULT_SIGNALS, parse_signals

log = logging.getLogger("lvvit.train")


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
    g.add_argument("--sampling", choices=SAMPLING_MODES, default=None,
                   help="epoch: every sample once per epoch in a seeded order, resumed exactly; resampled: "
                   "shards drawn with replacement (default: epoch when the shards have a manifest)")
    g.add_argument("--sample-log", type=Path, default=None, metavar="DIR",
                   help="write DIR/rank{R}.jsonl: per optimizer step, the sample keys it trained on")

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


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """The options, with the YAML file's values as defaults so the command line wins, as a
    checked :class:`TrainConfig`; a bad value or combination exits with status 2 naming it."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.config is not None:
        parser.set_defaults(**yaml_defaults(parser, args.config))
        args = parser.parse_args(argv)
    check_ranges(parser, args)
    try:
        return to_config(args)
    except LvvitError as err:
        refuse(parser, str(err))


def parse_model_args(items: list[str]) -> dict[str, Any]:
    """``["depth=2", "mlp_ratio=4.0"]`` -> ``{"depth": 2, "mlp_ratio": 4.0}`` (YAML scalars)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--model-arg {item!r}: expected KEY=VALUE")
        out[key.strip()] = yaml.safe_load(value)
    return out


def _path(value: Any) -> Path | None:
    return None if value is None else Path(value)


def to_config(a: argparse.Namespace) -> TrainConfig:
    """The parsed options as typed sections (values the YAML file gave as strings or lists
    become paths and tuples here)."""
    try:
        signals = parse_signals(a.preempt_signals)
    except ValueError as err:
        raise ConfigError(f"--preempt-signals: {err}") from None
    return TrainConfig(
        model=ModelConfig(name=a.model, img_size=a.img_size, num_classes=a.num_classes,
                          overrides=parse_model_args(a.model_arg), drop_path=a.drop_path, mix_token=a.mix_token,
                          finetune=_path(a.finetune), grad_checkpointing=a.grad_checkpointing, compile=a.compile),
        data=DataConfig(train_shards=a.train_shards, eval_shards=a.eval_shards, train_manifest=a.train_manifest,
                        eval_manifest=a.eval_manifest, access=access_from_args(a, a.shard_cache),
                        steps_per_epoch=a.steps_per_epoch, eval_batch=a.eval_batch, workers=a.workers,
                        sampling=a.sampling, sample_log=_path(a.sample_log)),
        augment=AugmentConfig(randaug_magnitude=a.randaug_magnitude, randaug_mstd=a.randaug_mstd,
                              randaug_ops=a.randaug_ops, scale=tuple(a.scale), hflip=a.hflip, reprob=a.reprob),
        loss=LossConfig(smoothing=a.smoothing, cls_weight=a.cls_weight, dense_weight=a.dense_weight,
                        ground_truth=a.ground_truth),
        optim=OptimConfig(base_lr=a.base_lr, lr=a.lr, min_lr=a.min_lr, weight_decay=a.weight_decay,
                          clip_grad=a.clip_grad, micro_batch=a.micro_batch, grad_accum=a.grad_accum,
                          model_ema=a.model_ema, ema_decay=a.ema_decay, seed=a.seed, max_steps=a.max_steps,
                          nan_policy=a.nan_policy),
        schedule=ScheduleConfig(epochs=a.epochs, cooldown_epochs=a.cooldown_epochs,
                                warmup_epochs=a.warmup_epochs, warmup_lr=a.warmup_lr),
        checkpoint=CheckpointConfig(output=Path(a.output), save_every=a.save_every, keep=a.keep,
                                    resume=a.resume, universal=a.universal),
        preemption=PreemptionConfig(signals=signals, grace=a.preempt_grace),
        tracking=TrackingConfig(eval=a.eval, eval_only=a.eval_only, experiment=a.experiment,
                                run_name=a.run_name, mlflow=a.mlflow, strict_tracking=a.strict_tracking,
                                system_metrics=a.system_metrics, log_every=a.log_every),
        deepspeed_config=_path(a.deepspeed_config),
        config_file=_path(a.config),
    )


def main(argv: list[str] | None = None) -> None:
    """``train.py``: parse, then run (``lvvit.train.loop.run``); a ``LvvitError`` is one line
    on stderr and exit status 1."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = parse_config(argv)
    from lvvit.train.loop import run

    with exits_on_error():
        run(config)
