"""Training options: the official recipe as defaults, a YAML file under the command line.

Precedence, lowest first: built-in defaults (the TokenLabeling recipe), ``--config
file.yaml`` (keys are option names, ``-`` or ``_``), the command line. Batch sizes follow
the same rule against the DeepSpeed JSON: the command line wins over the JSON, and the run
logs which source each value came from.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO_DS_CONFIGS = Path(__file__).resolve().parents[2] / "ds_configs"

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
    g.add_argument("--img-size", type=int, default=224, help="training resolution; token-label size is img/16")
    g.add_argument("--num-classes", type=int, default=None,
                   help="default: length of classes.json beside the train shards, else 1000")
    g.add_argument("--drop-path", type=float, default=None, help="stochastic depth (default: per model)")
    g.add_argument("--no-mix-token", dest="mix_token", action="store_false", help="turn MixToken off")
    g.add_argument("--finetune", type=Path, help="initialise from a checkpoint (pos_embed resized)")
    g.add_argument("--grad-checkpointing", action="store_true", help="recompute block activations in backward")

    g = p.add_argument_group("data")
    g.add_argument("--train-shards", help="brace pattern of train shards, e.g. 'data/train-{000000..000999}.tar'")
    g.add_argument("--eval-shards", help="brace pattern of eval shards")
    g.add_argument("--steps-per-epoch", type=int, default=None,
                   help="optimizer steps per epoch (default: manifest.json total / global batch)")
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
                   help="resume from OUTPUT/checkpoints (latest, or a tag, or a tag folder)")
    g.add_argument("--universal", action="store_true",
                   help="the resumed checkpoint is a DeepSpeed universal one (other rank count)")

    g = p.add_argument_group("evaluation and tracking")
    g.add_argument("--no-eval", dest="eval", action="store_false", help="skip per-epoch evaluation")
    g.add_argument("--eval-only", action="store_true",
                   help="evaluate a checkpoint (--resume [TAG|DIR]) or a weights file (--finetune FILE, "
                   "its EMA too) on --eval-shards with all ranks, write OUTPUT/eval.json and exit: "
                   "no training, no checkpoint; MLflow logs to a new run")
    g.add_argument("--experiment", default="lvvit", help="MLflow experiment")
    g.add_argument("--run-name", default=None, help="MLflow run name (default: model-imgsize)")
    g.add_argument("--no-mlflow", dest="mlflow", action="store_false", help="no MLflow tracking")
    g.add_argument("--no-system-metrics", dest="system_metrics", action="store_false")
    g.add_argument("--log-every", type=int, default=10, help="per-step metrics every N steps")
    return p


def _yaml_defaults(parser: argparse.ArgumentParser, path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise SystemExit(f"--config {path}: {e}") from e
    if not isinstance(data, dict):
        raise SystemExit(f"--config {path}: expected a mapping of option: value")
    known = {a.dest for a in parser._actions}
    out = {}
    for key, value in data.items():
        dest = str(key).replace("-", "_")
        if dest not in known or dest in ("config", "help"):
            raise SystemExit(f"--config {path}: unknown option {key!r}")
        out[dest] = value
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Options with the YAML file's values as defaults, so the command line wins."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.config is not None:
        parser.set_defaults(**_yaml_defaults(parser, args.config))
        args = parser.parse_args(argv)
    for name in ("output", "finetune", "deepspeed_config"):
        value = getattr(args, name)
        if value is not None and not isinstance(value, Path):
            setattr(args, name, Path(value))
    if args.eval_only:
        check_eval_only(parser, args)
    elif not args.train_shards:
        parser.error("--train-shards is required")
    args.model_overrides = parse_model_args(args.model_arg)
    return args


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


def resolve_batch(args: argparse.Namespace, ds_config: dict, world_size: int) -> BatchPlan:
    """Micro batch and accumulation: command line, else the JSON, else 128 x 1 (official 8 x 128)."""
    sources = {}
    micro = args.micro_batch
    sources["micro_batch"] = "command line"
    if micro is None:
        micro = ds_config.get("train_micro_batch_size_per_gpu")
        sources["micro_batch"] = "deepspeed config"
    accum = args.grad_accum
    sources["grad_accum"] = "command line"
    if accum is None:
        accum = ds_config.get("gradient_accumulation_steps")
        sources["grad_accum"] = "deepspeed config"
    total = ds_config.get("train_batch_size")
    if micro is None and accum is not None and isinstance(total, int):
        micro, sources["micro_batch"] = total // (accum * world_size), "deepspeed config train_batch_size"
    if accum is None and micro is not None and isinstance(total, int):
        accum, sources["grad_accum"] = max(total // (micro * world_size), 1), "deepspeed config train_batch_size"
    if micro is None:
        micro, sources["micro_batch"] = 128, "default"
    if accum is None:
        accum, sources["grad_accum"] = 1, "default"
    return BatchPlan(int(micro), int(accum), world_size, sources)


def peak_lr(args: argparse.Namespace, global_batch: int) -> float:
    """``--lr`` as given, else the per-1024 base rate scaled linearly to the global batch."""
    if args.lr is not None:
        return args.lr
    base = args.base_lr if args.base_lr is not None else BASE_LR_AT_1024.get(args.model, DEFAULT_BASE_LR)
    return base * global_batch / 1024


def default_ds_config_path() -> Path:
    import torch

    name = "zero2.json" if torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR") != "cpu" else "cpu.json"
    return REPO_DS_CONFIGS / name


def load_ds_config(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"--deepspeed_config {path}: {e}") from e


def resolve_ds_config(
    args: argparse.Namespace, ds_config: dict, plan: BatchPlan, lr: float
) -> dict:
    """The JSON with the run's batch sizes, optimizer rate/decay and clipping filled in.

    The optimizer type and its other settings stay the JSON's (e.g. ``torch_adam``).
    """
    cfg = json.loads(json.dumps(ds_config))
    cfg["train_micro_batch_size_per_gpu"] = plan.micro_batch
    cfg["gradient_accumulation_steps"] = plan.grad_accum
    cfg["train_batch_size"] = plan.global_batch
    opt = cfg.setdefault("optimizer", {"type": "AdamW", "params": {}})
    params = opt.setdefault("params", {})
    params["lr"] = lr
    params["weight_decay"] = args.weight_decay
    if args.clip_grad is not None:
        cfg["gradient_clipping"] = args.clip_grad
    cfg.pop("scheduler", None)  # ours runs per step, see lvvit.train.schedule
    low = "bf16" if cfg.get("bf16", {}).get("enabled") else "fp16" if cfg.get("fp16", {}).get("enabled") else None
    if low is not None:
        # DeepSpeed casts parameters only; BatchNorm (the stem) then meets low-precision
        # weights with fp32 running statistics, which its kernels refuse.
        cfg.setdefault("data_types", {}).setdefault("buffer_dtype", low)
    if args.universal:
        cfg.setdefault("checkpoint", {})["load_universal"] = True
    return cfg


def steps_per_epoch_from_manifest(shards: str, global_batch: int) -> int:
    """``total / global batch`` from ``manifest.json`` beside the shards."""
    path = Path(shards)
    manifest = path if path.name == "manifest.json" else (path if path.is_dir() else path.parent) / "manifest.json"
    try:
        total = json.loads(manifest.read_text())["total"]
    except (OSError, json.JSONDecodeError, KeyError) as e:
        raise SystemExit(f"cannot size an epoch from {manifest} ({e}); pass --steps-per-epoch") from e
    steps = math.floor(total / global_batch)
    if steps < 1:
        raise SystemExit(f"{manifest}: {total} samples make no full global batch of {global_batch}")
    return steps
