"""The training run: DeepSpeed engine, token-labeling loss, EMA, eval, checkpoints, MLflow.

Every collective (step statistics, eval, checkpoint save, EMA gather)
runs on all ranks in the same order; only MLflow calls and file writes of shared outputs
are rank 0's.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import logging
import os
import random
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist

from lvvit import atomic
from lvvit.ports import free_port
from lvvit.train import config as C
from lvvit.train.checkpointing import WEIGHTS_FILE, Checkpointer, consolidate, step_tag
from lvvit.train.output_lock import lock_output
from lvvit.train.preemption import PREEMPTED_EXIT, Preempted, Preemption, exit_now, parse_signals
from lvvit.train.step import STEP_STATS, Objective, train_step
from lvvit.train.tracking import (
    Terminated,
    end_status,
    flatten,
    git_commit,
    make_tracker,
    raise_on_sigterm,
    read_run_file,
)

if TYPE_CHECKING:
    from lvvit.train.ema import ModelEma

log = logging.getLogger("lvvit.train")
EVAL_FILE = "eval.json"
TERMINATED_EXIT = 128 + signal.SIGTERM
"""Exit status on SIGTERM outside the training steps (set-up, eval-only): the shell's for a
process killed by it."""
FINISH_MARGIN = 5.0
"""Seconds of a preemption's grace period kept for the process to exit after MLflow's last send."""


class NonFiniteLoss(RuntimeError):
    """Raised under ``--nan-policy stop``; the message names the checkpoint to resume from."""


def ensure_dist_env() -> None:
    """Defaults so ``python train.py`` runs as one rank without the launcher (no mpi4py probe)."""
    if "RANK" in os.environ:
        return
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No decay on ``model.no_weight_decay()``, biases and every 1-D tensor (norms)."""
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") or name in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def engine_dtype(engine) -> torch.dtype:
    if engine.bfloat16_enabled():
        return torch.bfloat16
    return torch.float16 if engine.fp16_enabled() else torch.float32


def train_seed(seed: int, epoch: int, skip_steps: int) -> int:
    """The data stream's seed for ``epoch`` entered after ``skip_steps`` steps (a resume): each
    (epoch, resume point) draws its own shards, order and augmentations, so a resumed epoch
    never replays the stream its preempted segment trained on (for resume points below
    1,000,003 steps into an epoch)."""
    return seed + 1_000_003 * epoch + skip_steps


@dataclass
class Position:
    """Where the run is: optimizer steps completed in ``epoch`` (the data position)."""

    epoch: int = 0
    step_in_epoch: int = 0


def build_model(
    args: argparse.Namespace, num_classes: int, load: bool = True
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The model, with ``--finetune`` weights unless ``load`` is off. Under ``--eval-only`` a
    class count that differs from the file's is an error: re-initialised heads would be
    evaluated as if trained."""
    from lvvit.models import model_from_checkpoint
    from lvvit.models.checkpoint import CheckpointError, ClassCountMismatch, read_checkpoint

    model_args = {"name": args.model, "img_size": args.img_size, "num_classes": num_classes,
                  **args.model_overrides}
    try:
        checkpoint = read_checkpoint(args.finetune) if args.finetune is not None and load else None
        model = model_from_checkpoint(
            checkpoint=checkpoint, keep_classes=args.eval_only, drop_path_rate=args.drop_path,
            mix_token=args.mix_token, **model_args)
    except ClassCountMismatch as err:
        raise SystemExit(f"--eval-only: {err} (set --num-classes {err.found})") from None
    except (CheckpointError, FileNotFoundError) as err:
        raise SystemExit(f"--finetune: {err}") from None
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model, model_args


def init_distributed() -> tuple[int, int, torch.device]:
    """Process group, this rank's device, quiet logs off rank 0: ``(rank, world, device)``."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    ensure_dist_env()
    deepspeed.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    if rank != 0:
        logging.getLogger("lvvit").setLevel(logging.WARNING)
    # before any tensor is placed: DeepSpeed only selects the rank's GPU inside initialize()
    get_accelerator().set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return rank, world, torch.device(get_accelerator().current_device_name())


@dataclass(frozen=True)
class StepTotals:
    """Step statistics summed over ranks and the steps since the last read (``STEP_STATS``),
    how many steps that was, and their mean wall time."""

    stats: dict[str, float]
    steps: int
    step_time: float


class StepMetrics:
    """The step statistics since the last read, kept on the device.

    Reading them (one all-reduce and one copy to the host) is the loop's only per-step
    synchronisation: at every ``--log-every`` step, at epoch ends and before a checkpoint.
    Step time is the wall time between reads over the steps read, which on a GPU counts
    the queued work once it has drained, not the time to queue it.
    """

    def __init__(self, device: torch.device, log_every: int) -> None:
        self.sums = torch.zeros(len(STEP_STATS), dtype=torch.float64, device=device)
        self.log_every = log_every
        self.steps = 0
        self.started = time.perf_counter()

    def restart_clock(self) -> None:
        """Time from here: an epoch's first steps are not charged with the eval before them."""
        self.started = time.perf_counter()

    def add(self, stats: torch.Tensor) -> None:
        self.sums += stats
        self.steps += 1

    def due(self, step: int, epoch_done: bool) -> bool:
        return step % self.log_every == 0 or epoch_done

    def read(self) -> StepTotals:
        """Collective: every rank calls it at the same steps."""
        reduced = self.sums.clone()
        dist.all_reduce(reduced)
        now = time.perf_counter()
        totals = StepTotals(dict(zip(STEP_STATS, reduced.tolist(), strict=True)), self.steps,
                            (now - self.started) / max(self.steps, 1))
        self.sums.zero_()
        self.steps, self.started = 0, now
        return totals


@dataclass(frozen=True)
class SavePolicy:
    """Which steps end in a checkpoint: every ``--save-every`` (epoch ends save anyway) and
    ``--max-steps``, where the run stops."""

    every: int
    max_steps: int | None

    def stops(self, step: int) -> bool:
        return self.max_steps is not None and step >= self.max_steps

    def due(self, step: int, epoch_done: bool) -> bool:
        return self.stops(step) or bool(self.every and step % self.every == 0 and not epoch_done)


class NonFinitePolicy:
    """``--nan-policy``, applied where the step statistics are read (before any checkpoint).

    A non-finite micro batch has already added zero to the gradient (``train_step``);
    ``skip`` counts and reports it, ``stop`` calls ``stop(where)``, which ends the run.
    """

    def __init__(self, policy: str, stop: Callable[[str], None]) -> None:
        self.policy = policy
        self.stop = stop
        self.skipped = 0  # non-finite micro batches so far

    def apply(self, non_finite: int, first_step: int, last_step: int) -> None:
        if not non_finite:
            return
        self.skipped += non_finite
        where = f"{non_finite} micro batch(es) of steps {first_step}..{last_step}"
        if self.policy == "stop":
            self.stop(where)
        log.warning("skipping a micro batch with non-finite loss: %s, with zero gradient", where)


class Trainer:
    """One run from options to consolidated weights. ``run()`` returns the final eval metrics."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rank, self.world, self.device = init_distributed()
        self.preemption = Preemption(parse_signals(args.preempt_signals), args.preempt_grace)
        run_config = C.prepare(args, self.world)  # every config check, before the model exists
        args.output.mkdir(parents=True, exist_ok=True)
        self.output_lock = None if args.eval_only else lock_output(args.output, self.rank)  # before compute
        self.ds_config, self.plan = run_config.ds_config, run_config.plan
        self.lr, self.steps_per_epoch = run_config.lr, run_config.steps_per_epoch
        self.total_epochs = args.epochs + args.cooldown_epochs
        self.train_source = run_config.train_source
        self.eval_source = (C.open_source("--eval-shards", args.eval_shards, args.eval_manifest, args)
                            if args.eval_shards and args.eval else None)
        source = self.train_source or self.eval_source
        self.classes = source.classes if source is not None else None
        self.num_classes = args.num_classes or (len(self.classes) if self.classes else 1000)
        self.engine, self.model_args = self.build_engine()
        self.dtype = engine_dtype(self.engine)
        self.ema = self.build_ema()
        self.checkpointer = Checkpointer(self.engine, args.output / "checkpoints", args.keep, self.ema)
        self.objective = self.build_objective()
        self.position = Position()
        self.weights_written = False
        self.resume_from = self.resume_choice()
        run_id = self.resume(self.resume_from) if self.resume_from is not None else None
        self.tracker = self.build_tracker(run_id)
        self.metrics = StepMetrics(self.device, args.log_every)
        self.saves = SavePolicy(args.save_every, args.max_steps)
        self.nan_policy = NonFinitePolicy(args.nan_policy, self.stop_on_non_finite)
        self.log_setup(run_config.ds_path)

    # ----------------------------------------------------------------- builders
    def build_engine(self) -> tuple[Any, dict[str, Any]]:
        """The model (identical initial weights on every rank) inside a DeepSpeed engine whose
        lr follows our schedule per optimizer step; compiled under ``--compile``."""
        import deepspeed

        from lvvit.train.schedule import WarmupCosineSchedule

        a = self.args
        seed_everything(a.seed)
        model, model_args = build_model(a, self.num_classes)
        schedule = WarmupCosineSchedule(
            lr=self.lr, min_lr=a.min_lr, warmup_lr=a.warmup_lr, warmup_epochs=a.warmup_epochs,
            epochs=a.epochs, steps_per_epoch=self.steps_per_epoch)
        engine, _, _, _ = deepspeed.initialize(
            model=model, model_parameters=param_groups(model, a.weight_decay), config=self.ds_config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule))
        seed_everything(a.seed + self.rank)  # different augmentation, drop path, mixing per rank
        if a.compile:
            engine.compile()  # the module in place: state_dict keys (checkpoints) stay the same
        return engine, model_args

    def build_ema(self) -> ModelEma | None:
        """The EMA of the weights; under ``--eval-only --finetune FILE``, the file's EMA."""
        from lvvit.train.ema import ModelEma

        if not self.args.model_ema:
            return None
        if self.args.eval_only and self.args.finetune is not None:
            return self.ema_from_file(self.args.finetune)
        return ModelEma(self.engine.module, self.args.ema_decay)

    def build_objective(self) -> Objective:
        """Loss and target geometry for ``train_step``; the token grid is the model's own
        (``img_size // patch_size``)."""
        from lvvit.loss import TokenLabelingLoss

        a = self.args
        loss_fn = TokenLabelingLoss(cls_weight=a.cls_weight, dense_weight=a.dense_weight,
                                    smoothing=a.smoothing, ground_truth=a.ground_truth)
        return Objective(loss_fn=torch.compile(loss_fn) if a.compile else loss_fn,
                         num_classes=self.num_classes, token_grid=self.engine.module.cfg.grid_size,
                         smoothing=a.smoothing, device=self.device, dtype=self.dtype)

    def resume_choice(self) -> str | None:
        """The checkpoint ``--resume`` names; ``auto`` is ``latest`` when there is one, else a
        fresh start, so that a requeued job runs the same command line."""
        which = self.args.resume
        if which != "auto":
            return which
        directory = self.checkpointer.directory
        name = "latest_universal" if self.args.universal else "latest"
        if (directory / name).is_file():
            log.info("--resume auto: resuming from %s", directory / name)
            return "latest"
        if self.args.eval_only:
            raise SystemExit(f"--resume auto: no checkpoint to evaluate in {directory} (no '{name}' file)")
        log.info("--resume auto: no checkpoint in %s (no '%s' file), starting fresh", directory, name)
        return None

    def resume(self, which: str) -> str | None:
        """Engine, EMA, RNG and position from ``which``; returns the MLflow run to continue."""
        state = self.checkpointer.resume(which).get("lvvit", {})
        self.position = Position(state.get("epoch", 0), state.get("step_in_epoch", 0))
        log.info("resumed at step %d (epoch %d, step %d in it)", self.engine.global_steps,
                 self.position.epoch, self.position.step_in_epoch)
        run_id = state.get("mlflow_run_id")
        return run_id if run_id is not None else (read_run_file(self.args.output) or {}).get("run_id")

    def build_tracker(self, run_id: str | None):
        a = self.args
        run_name = a.run_name or f"{a.model}-{a.img_size}{'-eval' if a.eval_only else ''}"
        return make_tracker(
            a.mlflow, self.rank, a.experiment, run_name, a.output, self.tags(),
            None if a.eval_only else run_id, a.system_metrics, record=not a.eval_only,
            strict=a.strict_tracking)

    def ema_from_file(self, path: Path) -> ModelEma | None:
        """The file's EMA weights as the run's EMA (``None`` when it has none), adapted to the
        model like the raw weights (pos_embed at another resolution)."""
        from lvvit.models.checkpoint import CheckpointError, load_weights, read_checkpoint
        from lvvit.train.ema import ModelEma

        try:
            checkpoint = read_checkpoint(path, use_ema=True)
        except CheckpointError:
            log.info("%s has no EMA weights: evaluating the raw weights only", path)
            return None
        model, _ = build_model(self.args, self.num_classes, load=False)
        load_weights(model, checkpoint)
        ema = ModelEma(self.engine.module, self.args.ema_decay)
        ema.load_full_state_dict(model.state_dict())
        return ema

    # ----------------------------------------------------------------- setup records
    def tags(self) -> dict[str, str]:
        zero = self.ds_config.get("zero_optimization", {}).get("stage", 0)
        precision = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(engine_dtype(self.engine), "fp32")
        return {"git_commit": git_commit(), "mlflow.source.git.commit": git_commit(),
                "world_size": str(self.world), "zero_stage": str(zero), "model": self.args.model,
                "precision": precision, "img_size": str(self.args.img_size)}

    def log_setup(self, ds_path: Path) -> None:
        opts = {k: (str(v) if isinstance(v, Path | list | dict) or v is None else v)
                for k, v in vars(self.args).items() if k not in ("local_rank",)}
        derived = {"global_batch": self.plan.global_batch, "micro_batch": self.plan.micro_batch,
                   "grad_accum": self.plan.grad_accum, "micro_batch_source": self.plan.sources["micro_batch"],
                   "grad_accum_source": self.plan.sources["grad_accum"], "peak_lr": self.lr,
                   "steps_per_epoch": self.steps_per_epoch, "num_classes": self.num_classes,
                   "deepspeed_config_file": str(ds_path)}
        if self.rank == 0:
            log.info("batch: micro %d (%s) x accum %d (%s) x %d ranks = %d; peak lr %.3g; %d steps/epoch",
                     self.plan.micro_batch, self.plan.sources["micro_batch"], self.plan.grad_accum,
                     self.plan.sources["grad_accum"], self.world, self.plan.global_batch, self.lr,
                     self.steps_per_epoch)
        self.tracker.log_params({**opts, **{f"resolved.{k}": v for k, v in derived.items()},
                                 **{f"ds.{k}": v for k, v in flatten(self.ds_config).items()}})
        self.tracker.log_dict(self.ds_config, "ds_config.json")
        if self.args.config is not None:
            self.tracker.log_artifact(self.args.config)

    # ----------------------------------------------------------------- data
    def train_batches(self, epoch: int, skip_steps: int):
        """This epoch's remaining micro batches, drawn with ``train_seed``."""
        from lvvit.data.pipeline import train_loader
        from lvvit.data.transforms import RandAugment

        a = self.args
        ops = C.RANDAUG_OPS.get(a.model, 2) if a.randaug_ops is None else a.randaug_ops
        randaugment = RandAugment(num_ops=ops, magnitude=a.randaug_magnitude,
                                  magnitude_std=a.randaug_mstd) if ops > 0 else None
        return train_loader(
            self.train_source, batch_size=self.plan.micro_batch, img_size=a.img_size,
            num_workers=a.workers, erase_prob=a.reprob, world_size=self.world,
            randaugment=randaugment, scale=tuple(a.scale), hflip=a.hflip,
            steps_per_epoch=(self.steps_per_epoch - skip_steps) * self.plan.grad_accum,
            seed=train_seed(a.seed, epoch, skip_steps), pin_memory=self.device.type == "cuda")

    def eval_batches(self):
        from lvvit.data.pipeline import eval_loader

        a = self.args
        return eval_loader(
            self.eval_source, batch_size=a.eval_batch or self.plan.micro_batch,
            img_size=a.img_size, crop_pct=self.engine.module.cfg.crop_pct, num_workers=a.workers,
            world_size=self.world, rank=self.rank, pin_memory=self.device.type == "cuda")

    # ----------------------------------------------------------------- steps
    def client_state(self) -> dict[str, Any]:
        """Ours under ``lvvit``; the empty ``universal_checkpoint_info`` tells DeepSpeed's
        ``ds_to_universal`` that plain data-parallel weights need no re-sharding rules."""
        ours = {"epoch": self.position.epoch, "step_in_epoch": self.position.step_in_epoch,
                "mlflow_run_id": self.tracker.run_id, "model_args": self.model_args,
                "global_batch": self.plan.global_batch}
        return {"universal_checkpoint_info": {}, "lvvit": ours}

    def save(self) -> str:
        tag = self.checkpointer.save(self.client_state())
        self.broadcast_run_id()
        return tag

    def broadcast_run_id(self) -> None:
        """Only rank 0 knows the MLflow run; the others need it for their checkpoint files."""
        box = [self.tracker.run_id]
        dist.broadcast_object_list(box, src=0)
        if self.rank != 0:  # rank 0's sender may set it meanwhile, when the server comes back
            self.tracker.run_id = box[0]

    # ----------------------------------------------------------------- run
    def run(self) -> dict[str, float]:
        """Epochs until done (or ``--max-steps``); returns the last eval metrics."""
        self.broadcast_run_id()
        self.preemption.install()
        metrics: dict[str, float] = {}
        while self.position.epoch < self.total_epochs:
            if not self.train_epoch():
                log.info("stopped at --max-steps %d; resume with --resume", self.engine.global_steps)
                self.tracker.finish("KILLED")
                return metrics
            metrics = self.end_epoch()
            if self.position.epoch < self.total_epochs and self.preemption.settle():
                self.stop_preempted()
        if not self.weights_written:  # resumed from the last epoch's checkpoint
            self.write_weights()
        self.finish()
        return metrics

    def train_epoch(self) -> bool:
        """The rest of the current epoch; ``False`` when ``--max-steps`` stopped it.

        Each step is queued without a host synchronisation; the step statistics are read
        (and ``--nan-policy`` applied) only at logging steps and before a checkpoint. A
        preemption the ranks agreed on stops every rank at the same step (``Preempted``).
        """
        self.engine.train()
        self.metrics.restart_clock()
        # closed on the way out: a stop mid-epoch shuts the loader's workers down now
        with contextlib.closing(self.step_batches()) as steps:
            for micro_batches in steps:
                stats = train_step(self.engine, self.objective, micro_batches)
                step, epoch_done = self.finish_step()
                self.metrics.add(stats)
                preempted = self.preemption.poll()
                must_save = self.saves.due(step, epoch_done)
                if must_save or preempted or self.metrics.due(step, epoch_done):
                    self.read_metrics(step)
                if must_save:
                    self.save()
                if preempted:
                    self.stop_preempted()
                if self.saves.stops(step):
                    return False
        return True

    def stop_preempted(self) -> None:
        """Checkpoint the current step (unless it is saved already), report, raise ``Preempted``."""
        started = time.perf_counter()
        if self.checkpointer.last_tag != step_tag(self.engine.global_steps):
            self.save()
        self.preemption.report(self.engine.global_steps, self.checkpointer.last_tag, time.perf_counter() - started)
        raise Preempted(self.engine.global_steps, self.checkpointer.last_tag)

    def step_batches(self) -> Iterator[Iterator[dict[str, torch.Tensor]]]:
        """The rest of the epoch as one lazy group of ``grad_accum`` micro batches per step.
        Closing it closes the loader (its workers end now, not at interpreter exit)."""
        remaining = self.steps_per_epoch - self.position.step_in_epoch
        if remaining <= 0:
            return
        batches = self.preemption.shielded(self.train_batches(self.position.epoch, self.position.step_in_epoch))
        try:
            for _ in range(remaining):
                first = next(batches, None)
                if first is None:
                    return
                yield itertools.chain([first], itertools.islice(batches, self.plan.grad_accum - 1))
        finally:
            batches.close()

    def finish_step(self) -> tuple[int, bool]:
        """EMA and position after an optimizer step; the step number and whether it ended the epoch."""
        if self.ema is not None:
            self.ema.update()
        self.position.step_in_epoch += 1
        return self.engine.global_steps, self.position.step_in_epoch == self.steps_per_epoch

    def read_metrics(self, step: int) -> None:
        """Read the steps since the last read (all ranks), apply ``--nan-policy``, log."""
        totals = self.metrics.read()
        self.nan_policy.apply(int(totals.stats["non_finite_micro_batches"]), step - totals.steps + 1, step)
        self.log_step(totals)

    def stop_on_non_finite(self, where: str) -> None:
        """Keep the current state if its weights are finite (the non-finite micro batches added
        nothing to them), then stop."""
        if self.weights_finite():
            self.save()
        raise NonFiniteLoss(
            f"non-finite loss in {where} (epoch {self.position.epoch}); it was not applied (zero gradient). "
            f"Last good checkpoint: {self.checkpointer.last_tag or 'none'} in {self.args.output / 'checkpoints'}. "
            "Resume with --resume (lower --lr, set --clip-grad) or run with --nan-policy skip.")

    def weights_finite(self) -> bool:
        bad = torch.zeros(1, device=self.device)
        for p in self.engine.module.parameters():
            local = p.ds_tensor if hasattr(p, "ds_tensor") else p.data
            if not torch.isfinite(local).all():
                bad.fill_(1)
                break
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        return bad.item() == 0

    def log_step(self, totals: StepTotals) -> None:
        stats, n = totals.stats, max(totals.stats["finite_micro_batches"], 1.0)
        grad_norm = self.engine.get_global_grad_norm()
        metrics = {"train/loss": stats["loss"] / n, "train/cls_loss": stats["cls_loss"] / n,
                   "train/aux_loss": stats["aux_loss"] / n, "train/lr": self.engine.get_lr()[0],
                   "train/step_time": totals.step_time,
                   "train/images_per_sec": self.plan.global_batch / totals.step_time,
                   "train/epoch": self.position.epoch + self.position.step_in_epoch / self.steps_per_epoch,
                   "train/skipped_micro_batches": float(self.nan_policy.skipped)}
        if grad_norm is not None:
            metrics["train/grad_norm"] = float(grad_norm)
        self.tracker.log_metrics(metrics, step=self.engine.global_steps)
        if self.rank == 0:
            log.info("step %d loss %.4f lr %.3g %.1f img/s", self.engine.global_steps, metrics["train/loss"],
                     metrics["train/lr"], metrics["train/images_per_sec"])

    def end_epoch(self) -> dict[str, float]:
        """Synchronise BatchNorm statistics, evaluate (and the EMA), checkpoint.

        Mid-run the eval comes first: its RNG draws (loader seeds) are then part of the saved
        state, so a run resumed from this checkpoint continues like an uninterrupted one.
        After the last epoch the checkpoint and ``weights.pth`` come first, so that a failing
        final eval (or tracker) cannot cost the trained weights.
        """
        from lvvit.train.ema import average_buffers

        average_buffers(b for b in self.engine.module.buffers() if b.dtype.is_floating_point)
        if self.ema is not None:
            self.ema.reduce_buffers()
        epoch = self.position.epoch
        last = epoch + 1 == self.total_epochs
        metrics = {} if last else self.eval_epoch(epoch)
        self.position = Position(epoch + 1, 0)
        self.save()
        if last:
            self.write_weights()
            metrics = self.eval_epoch(epoch)
        return metrics

    def eval_epoch(self, epoch: int) -> dict[str, float]:
        if not (self.args.eval and self.args.eval_shards):
            return {}
        metrics = self.eval_all()
        if self.rank == 0:
            log.info("epoch %d eval %s", epoch, metrics)
        return metrics

    def eval_all(self) -> dict[str, float]:
        """``eval/*`` for the weights and ``eval_ema/*`` for the EMA, logged at the current step."""
        metrics = {f"eval/{k}": v for k, v in self.evaluate().items()}
        if self.ema is not None:
            with self.ema.applied():
                metrics.update({f"eval_ema/{k}": v for k, v in self.evaluate().items()})
        self.tracker.log_metrics(metrics, step=self.engine.global_steps)
        return metrics

    def eval_only(self) -> dict[str, float]:
        """Evaluate what was loaded, write ``OUTPUT/eval.json`` (rank 0) and close the run.

        Nothing is trained and nothing saved: the optimizer exists only because DeepSpeed
        builds the engine (and, under ZeRO-3, partitions the weights) with it.
        """
        a = self.args
        source = self.checkpointer.loaded_from if self.resume_from is not None else a.finetune
        metrics = self.eval_all()
        if self.rank == 0:
            record = {"source": str(source), "step": self.engine.global_steps, "world_size": self.world,
                      "eval_shards": a.eval_shards, "metrics": metrics}
            path = a.output / EVAL_FILE
            atomic.write_json(path, record)
            self.tracker.log_params({"eval_source": str(source)})
            self.tracker.log_artifact(path)
            log.info("eval of %s: %s; wrote %s", source, metrics, path)
            print(json.dumps(record), flush=True)
        dist.barrier()
        self.tracker.finish("FINISHED")
        return metrics

    def evaluate(self) -> dict[str, float]:
        from lvvit.train.evaluate import evaluate

        return evaluate(self.engine, self.preemption.shielded(self.eval_batches()), self.device, self.dtype)

    def write_weights(self) -> None:
        """Consolidated fp32 weights (+ EMA) of the last checkpoint, ``OUTPUT/weights.pth``."""
        if self.rank == 0:
            path = consolidate(self.args.output / "checkpoints", self.checkpointer.last_tag,
                               self.args.output / WEIGHTS_FILE, self.model_args)
            log.info("wrote %s", path)
        dist.barrier()
        self.weights_written = True

    def finish(self) -> None:
        """The artifacts (``weights.pth`` is on disk already), then close the run."""
        out = self.args.output
        if self.rank == 0:
            self.tracker.log_artifact(out / WEIGHTS_FILE)
            if self.classes is not None:
                atomic.write_text(out / "classes.json", json.dumps(self.classes, indent=1) + "\n")
                self.tracker.log_artifact(out / "classes.json")
        dist.barrier()
        self.tracker.finish("FINISHED")


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = C.parse_args(argv)
    raise_on_sigterm()
    try:
        trainer = Trainer(args)
    except Terminated:  # before the first step nothing is lost (docs/training.md, "Preemption")
        log.warning("SIGTERM during set-up; exiting with %d", TERMINATED_EXIT)
        exit_now(TERMINATED_EXIT)
    try:
        if args.eval_only:
            trainer.eval_only()
        else:
            trainer.run()
    except Preempted:  # checkpoint saved on every rank: close the run inside the grace period
        trainer.tracker.finish("KILLED", wait=trainer.preemption.seconds_left() - FINISH_MARGIN)
        if trainer.output_lock is not None:  # exit_now skips atexit: the resume finds no stale holder
            trainer.output_lock.release()
        exit_now(PREEMPTED_EXIT)
    except BaseException as err:  # the MLflow run says FAILED or KILLED, never FINISHED
        trainer.tracker.finish(end_status(err))
        if isinstance(err, Terminated):
            raise SystemExit(TERMINATED_EXIT) from None
        raise


__all__ = ["NonFiniteLoss", "Trainer", "main", "train_seed"]
