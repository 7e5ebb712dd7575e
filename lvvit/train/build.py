"""What a run is built from, each piece from the typed config: the model (with
``--finetune`` weights), the DeepSpeed engine on our schedule, the EMA, the loss, the
train loader of an epoch, the checkpoint to resume, and the seeds that make a step's
randomness a function of where the run is.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lvvit.errors import ConfigError
from lvvit.train.config import RunConfig, TrainConfig, randaug_ops
from lvvit.train.engine import build_engine, engine_dtype, seed_everything
from lvvit.train.state import TrainState
from lvvit.train.step import Objective

if TYPE_CHECKING:
    from lvvit.train.ema import ModelEma
    from lvvit.train.loop import Trainer
    from lvvit.train.sample_log import SampleLog

log = logging.getLogger("lvvit.train")


def step_seed(seed: int, step: int, rank: int) -> int:
    """The torch seed of optimizer step ``step`` on ``rank`` (MixToken boxes, drop path): a
    function of the run's position, not of the RNG's history, so a resumed step draws what
    the uninterrupted one drew."""
    return ((seed * 1_000_003 + step) * 65_537 + rank) % (1 << 63)


def popped_keys(batches: Iterator[dict[str, Any]], log: SampleLog | None) -> Iterator[dict[str, Any]]:
    """The batches without their ``keys`` (host strings), which go to ``log``."""
    for batch in batches:
        keys = batch.pop("keys", None)
        if log is not None and keys is not None:
            log.add(keys)
        yield batch


def train_seed(seed: int, epoch: int, skip_steps: int) -> int:
    """The data stream's seed for ``epoch`` entered after ``skip_steps`` steps (a resume): each
    (epoch, resume point) draws its own shards, order and augmentations, so a resumed epoch
    never replays the stream its preempted segment trained on (for resume points below
    1,000,003 steps into an epoch)."""
    return seed + 1_000_003 * epoch + skip_steps


def build_model(
    config: TrainConfig, num_classes: int, load: bool = True
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The model, with ``--finetune`` weights unless ``load`` is off. Under ``--eval-only`` a
    class count that differs from the file's is an error: re-initialised heads would be
    evaluated as if trained."""
    from lvvit.models import model_from_checkpoint
    from lvvit.models.checkpoint import CheckpointError, ClassCountMismatch, read_checkpoint

    m = config.model
    model_args = {"name": m.name, "img_size": m.img_size, "num_classes": num_classes, **m.overrides}
    try:
        checkpoint = read_checkpoint(m.finetune) if m.finetune is not None and load else None
        model = model_from_checkpoint(
            checkpoint=checkpoint, keep_classes=config.tracking.eval_only, drop_path_rate=m.drop_path,
            mix_token=m.mix_token, **model_args)
    except ClassCountMismatch as err:
        raise ConfigError(f"--eval-only: {err} (set --num-classes {err.found})") from None
    except (CheckpointError, FileNotFoundError) as err:
        raise ConfigError(f"--finetune: {err}") from None
    if m.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model, model_args


def ema_from_file(config: TrainConfig, num_classes: int, module: torch.nn.Module) -> ModelEma | None:
    """The EMA weights of ``--finetune`` as the run's EMA (``None`` when it has none), adapted
    to the model like the raw weights (pos_embed at another resolution)."""
    from lvvit.models.checkpoint import CheckpointError, load_weights, read_checkpoint
    from lvvit.train.ema import ModelEma

    try:
        checkpoint = read_checkpoint(config.model.finetune, use_ema=True)
    except CheckpointError:
        log.info("%s has no EMA weights: evaluating the raw weights only", config.model.finetune)
        return None
    model, _ = build_model(config, num_classes, load=False)
    load_weights(model, checkpoint)
    ema = ModelEma(module, config.optim.ema_decay)
    ema.load_full_state_dict(model.state_dict())
    return ema


def build_objective(config: TrainConfig, num_classes: int, engine, device: torch.device) -> Objective:
    """Loss and target geometry for ``train_step``; the token grid is the model's own
    (``img_size // patch_size``)."""
    from lvvit.train.loss import TokenLabelingLoss

    loss = config.loss
    loss_fn = TokenLabelingLoss(cls_weight=loss.cls_weight, dense_weight=loss.dense_weight,
                                smoothing=loss.smoothing, ground_truth=loss.ground_truth)
    return Objective(loss_fn=torch.compile(loss_fn) if config.model.compile else loss_fn, num_classes=num_classes,
                     token_grid=engine.module.cfg.grid_size, smoothing=loss.smoothing, device=device,
                     dtype=engine_dtype(engine))


def engine_for(config: TrainConfig, run_config: RunConfig, num_classes: int,
               rank: int) -> tuple[Any, dict[str, Any]]:
    """The model (identical initial weights on every rank) inside a DeepSpeed engine whose
    lr follows our schedule per optimizer step; compiled under ``--compile``."""
    from lvvit.train.schedule import WarmupCosineSchedule

    seed = config.optim.seed
    seed_everything(seed)
    model, model_args = build_model(config, num_classes)
    s = config.schedule
    schedule = WarmupCosineSchedule(
        lr=run_config.lr, min_lr=config.optim.min_lr, warmup_lr=s.warmup_lr, warmup_epochs=s.warmup_epochs,
        epochs=s.epochs, steps_per_epoch=run_config.steps_per_epoch)
    engine = build_engine(model, run_config.ds_config, config.optim.weight_decay, schedule)
    seed_everything(seed + rank)  # different augmentation, drop path, mixing per rank
    if config.model.compile:
        engine.compile()  # the module in place: state_dict keys (checkpoints) stay the same
    return engine, model_args


def ema_for(config: TrainConfig, num_classes: int, module: torch.nn.Module) -> ModelEma | None:
    """The EMA of the weights; under ``--eval-only --finetune FILE``, the file's EMA."""
    from lvvit.train.ema import ModelEma

    if not config.optim.model_ema:
        return None
    if config.tracking.eval_only and config.model.finetune is not None:
        return ema_from_file(config, num_classes, module)
    return ModelEma(module, config.optim.ema_decay)


def train_batches(trainer: Trainer, epoch: int, skip_steps: int):
    """This epoch's remaining micro batches: under ``--sampling epoch`` the epoch's order from
    where the checkpoint left it; resampled, drawn with ``train_seed``."""
    from lvvit.loader.pipeline import train_loader
    from lvvit.loader.transforms import RandAugment

    c, t = trainer.config, trainer
    aug = c.augment
    ops = randaug_ops(c.model.name, aug)
    randaugment = RandAugment(num_ops=ops, magnitude=aug.randaug_magnitude,
                              magnitude_std=aug.randaug_mstd) if ops > 0 else None
    common = dict(batch_size=t.plan.micro_batch, img_size=c.model.img_size, num_workers=c.data.workers,
                  erase_prob=aug.reprob, world_size=t.world, randaugment=randaugment, scale=aug.scale,
                  hflip=aug.hflip, pin_memory=t.device.type == "cuda")
    if t.sampling == "epoch":
        return train_loader(t.train_source, sampling="epoch", epoch=epoch, rank=t.rank, seed=c.optim.seed,
                            steps_per_epoch=t.steps_per_epoch * t.plan.grad_accum,
                            position=resume_position(t.state), **common)
    return train_loader(t.train_source, steps_per_epoch=(t.steps_per_epoch - skip_steps) * t.plan.grad_accum,
                        seed=train_seed(c.optim.seed, epoch, skip_steps), keys=t.sample_log is not None, **common)


def resume_position(state: TrainState) -> list[dict] | None:
    """Every rank's saved loader position in the current epoch (``None``: start it). The
    loader takes its own rank's when the layout is the same (exact), else the samples no
    old rank had reached."""
    saved = state.data_positions
    if not saved or state.step_in_epoch == 0 or any(p.get("epoch") != state.epoch for p in saved):
        return None
    return saved


def resume_choice(config: TrainConfig, directory: Path) -> str | None:
    """The checkpoint ``--resume`` names; ``auto`` is ``latest`` when there is one, else a
    fresh start, so that a requeued job runs the same command line."""
    which = config.checkpoint.resume
    if which != "auto":
        return which
    name = "latest_universal" if config.checkpoint.universal else "latest"
    if (directory / name).is_file():
        log.info("--resume auto: resuming from %s", directory / name)
        return "latest"
    if config.tracking.eval_only:
        raise ConfigError(f"--resume auto: no checkpoint to evaluate in {directory} (no '{name}' file)")
    log.info("--resume auto: no checkpoint in %s (no '%s' file), starting fresh", directory, name)
    return None


__all__ = ["build_model", "build_objective", "ema_for", "engine_for", "popped_keys", "resume_choice",
           "resume_position", "step_seed", "train_batches", "train_seed"]
