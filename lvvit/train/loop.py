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
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from lvvit import atomic
from lvvit.train import config as C
from lvvit.train.checkpointing import WEIGHTS_FILE, Checkpointer, SavePolicy
from lvvit.train.engine import (
    build_engine,
    engine_dtype,
    init_distributed,
    seed_everything,
    weights_finite,
)
from lvvit.train.metrics import NonFinitePolicy, StepMetrics, log_line
from lvvit.train.output_lock import lock_output
from lvvit.train.preemption import (
    PREEMPTED_EXIT,
    Preempted,
    Preemption,
    Terminated,
    end_status,
    exit_now,
    parse_signals,
    raise_on_sigterm,
)
from lvvit.train.state import TrainState
from lvvit.train.step import Objective, train_step
from lvvit.train.tracking import flatten, git_commit, make_tracker, read_run_file
from lvvit.train.validate import Validator

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


def train_seed(seed: int, epoch: int, skip_steps: int) -> int:
    """The data stream's seed for ``epoch`` entered after ``skip_steps`` steps (a resume): each
    (epoch, resume point) draws its own shards, order and augmentations, so a resumed epoch
    never replays the stream its preempted segment trained on (for resume points below
    1,000,003 steps into an epoch)."""
    return seed + 1_000_003 * epoch + skip_steps


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


def ema_from_file(args: argparse.Namespace, num_classes: int, module: torch.nn.Module) -> ModelEma | None:
    """The EMA weights of ``--finetune`` as the run's EMA (``None`` when it has none), adapted
    to the model like the raw weights (pos_embed at another resolution)."""
    from lvvit.models.checkpoint import CheckpointError, load_weights, read_checkpoint
    from lvvit.train.ema import ModelEma

    try:
        checkpoint = read_checkpoint(args.finetune, use_ema=True)
    except CheckpointError:
        log.info("%s has no EMA weights: evaluating the raw weights only", args.finetune)
        return None
    model, _ = build_model(args, num_classes, load=False)
    load_weights(model, checkpoint)
    ema = ModelEma(module, args.ema_decay)
    ema.load_full_state_dict(model.state_dict())
    return ema


def build_objective(args: argparse.Namespace, num_classes: int, engine, device: torch.device) -> Objective:
    """Loss and target geometry for ``train_step``; the token grid is the model's own
    (``img_size // patch_size``)."""
    from lvvit.train.loss import TokenLabelingLoss

    loss_fn = TokenLabelingLoss(cls_weight=args.cls_weight, dense_weight=args.dense_weight,
                                smoothing=args.smoothing, ground_truth=args.ground_truth)
    return Objective(loss_fn=torch.compile(loss_fn) if args.compile else loss_fn, num_classes=num_classes,
                     token_grid=engine.module.cfg.grid_size, smoothing=args.smoothing, device=device,
                     dtype=engine_dtype(engine))


def engine_for(args: argparse.Namespace, run_config: C.RunConfig, num_classes: int,
               rank: int) -> tuple[Any, dict[str, Any]]:
    """The model (identical initial weights on every rank) inside a DeepSpeed engine whose
    lr follows our schedule per optimizer step; compiled under ``--compile``."""
    from lvvit.train.schedule import WarmupCosineSchedule

    seed_everything(args.seed)
    model, model_args = build_model(args, num_classes)
    schedule = WarmupCosineSchedule(
        lr=run_config.lr, min_lr=args.min_lr, warmup_lr=args.warmup_lr, warmup_epochs=args.warmup_epochs,
        epochs=args.epochs, steps_per_epoch=run_config.steps_per_epoch)
    engine = build_engine(model, run_config.ds_config, args.weight_decay, schedule)
    seed_everything(args.seed + rank)  # different augmentation, drop path, mixing per rank
    if args.compile:
        engine.compile()  # the module in place: state_dict keys (checkpoints) stay the same
    return engine, model_args


def ema_for(args: argparse.Namespace, num_classes: int, module: torch.nn.Module) -> ModelEma | None:
    """The EMA of the weights; under ``--eval-only --finetune FILE``, the file's EMA."""
    from lvvit.train.ema import ModelEma

    if not args.model_ema:
        return None
    if args.eval_only and args.finetune is not None:
        return ema_from_file(args, num_classes, module)
    return ModelEma(module, args.ema_decay)


def train_batches(trainer: Trainer, epoch: int, skip_steps: int):
    """This epoch's remaining micro batches, drawn with ``train_seed``."""
    from lvvit.loader.pipeline import train_loader
    from lvvit.loader.transforms import RandAugment

    a, t = trainer.args, trainer
    ops = C.RANDAUG_OPS.get(a.model, 2) if a.randaug_ops is None else a.randaug_ops
    randaugment = RandAugment(num_ops=ops, magnitude=a.randaug_magnitude,
                              magnitude_std=a.randaug_mstd) if ops > 0 else None
    return train_loader(
        t.train_source, batch_size=t.plan.micro_batch, img_size=a.img_size,
        num_workers=a.workers, erase_prob=a.reprob, world_size=t.world,
        randaugment=randaugment, scale=tuple(a.scale), hflip=a.hflip,
        steps_per_epoch=(t.steps_per_epoch - skip_steps) * t.plan.grad_accum,
        seed=train_seed(a.seed, epoch, skip_steps), pin_memory=t.device.type == "cuda")


def resume_choice(args: argparse.Namespace, directory: Path) -> str | None:
    """The checkpoint ``--resume`` names; ``auto`` is ``latest`` when there is one, else a
    fresh start, so that a requeued job runs the same command line."""
    which = args.resume
    if which != "auto":
        return which
    name = "latest_universal" if args.universal else "latest"
    if (directory / name).is_file():
        log.info("--resume auto: resuming from %s", directory / name)
        return "latest"
    if args.eval_only:
        raise SystemExit(f"--resume auto: no checkpoint to evaluate in {directory} (no '{name}' file)")
    log.info("--resume auto: no checkpoint in %s (no '%s' file), starting fresh", directory, name)
    return None


def run_tags(args: argparse.Namespace, ds_config: dict, world: int, dtype: torch.dtype) -> dict[str, str]:
    zero = ds_config.get("zero_optimization", {}).get("stage", 0)
    precision = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")
    return {"git_commit": git_commit(), "mlflow.source.git.commit": git_commit(),
            "world_size": str(world), "zero_stage": str(zero), "model": args.model,
            "precision": precision, "img_size": str(args.img_size)}


def log_setup(trainer: Trainer, ds_path: Path) -> None:
    """The run's options, resolved numbers and DeepSpeed JSON as MLflow params and artifacts."""
    t, plan = trainer, trainer.plan
    opts = {k: (str(v) if isinstance(v, Path | list | dict) or v is None else v)
            for k, v in vars(t.args).items() if k not in ("local_rank",)}
    derived = {"global_batch": plan.global_batch, "micro_batch": plan.micro_batch,
               "grad_accum": plan.grad_accum, "micro_batch_source": plan.sources["micro_batch"],
               "grad_accum_source": plan.sources["grad_accum"], "peak_lr": t.lr,
               "steps_per_epoch": t.steps_per_epoch, "num_classes": t.num_classes,
               "deepspeed_config_file": str(ds_path)}
    if t.rank == 0:
        log.info("batch: micro %d (%s) x accum %d (%s) x %d ranks = %d; peak lr %.3g; %d steps/epoch",
                 plan.micro_batch, plan.sources["micro_batch"], plan.grad_accum,
                 plan.sources["grad_accum"], t.world, plan.global_batch, t.lr, t.steps_per_epoch)
    t.tracker.log_params({**opts, **{f"resolved.{k}": v for k, v in derived.items()},
                          **{f"ds.{k}": v for k, v in flatten(t.ds_config).items()}})
    t.tracker.log_dict(t.ds_config, "ds_config.json")
    if t.args.config is not None:
        t.tracker.log_artifact(t.args.config)


class Trainer:
    """One run from options to consolidated weights, wired from components: the engine
    (``lvvit.train.engine``), the ``Checkpointer`` with the ``TrainState``, ``StepMetrics``,
    ``NonFinitePolicy``, the ``Validator``, ``Preemption`` and the tracker.
    ``run()`` returns the final eval metrics."""

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
        self.engine, self.model_args = engine_for(args, run_config, self.num_classes, self.rank)
        self.dtype = engine_dtype(self.engine)
        self.ema = ema_for(args, self.num_classes, self.engine.module)
        self.state = TrainState(None if args.eval_only else self.plan.global_batch)
        self.checkpointer = Checkpointer(self.engine, args.output / "checkpoints", args.keep, self.ema,
                                         self.state, SavePolicy(args.save_every, args.max_steps))
        self.objective = build_objective(args, self.num_classes, self.engine, self.device)
        self.validator = Validator(self.engine, self.ema, self.eval_batches, self.device, self.dtype)
        self.resume_from = resume_choice(args, self.checkpointer.directory)
        run_id = self.resume(self.resume_from) if self.resume_from is not None else None
        self.tracker = make_tracker(
            args.mlflow, self.rank, args.experiment,
            args.run_name or f"{args.model}-{args.img_size}{'-eval' if args.eval_only else ''}", args.output,
            run_tags(args, self.ds_config, self.world, self.dtype), None if args.eval_only else run_id,
            args.system_metrics, record=not args.eval_only, strict=args.strict_tracking)
        self.metrics = StepMetrics(self.device, args.log_every, self.plan.global_batch)
        self.nan_policy = NonFinitePolicy(args.nan_policy)
        log_setup(self, run_config.ds_path)

    def resume(self, which: str) -> str | None:
        """Engine, EMA, RNG and state from ``which``; returns the MLflow run to continue."""
        ours = self.checkpointer.resume(which)
        log.info("resumed at step %d (epoch %d, step %d in it)", self.engine.global_steps,
                 self.state.epoch, self.state.step_in_epoch)
        run_id = ours.get("mlflow_run_id")
        return run_id if run_id is not None else (read_run_file(self.args.output) or {}).get("run_id")

    def eval_batches(self):
        """A fresh eval loader, its first batch fetched with the preemption signals blocked."""
        from lvvit.loader.pipeline import eval_loader

        a = self.args
        return self.preemption.shielded(eval_loader(
            self.eval_source, batch_size=a.eval_batch or self.plan.micro_batch,
            img_size=a.img_size, crop_pct=self.engine.module.cfg.crop_pct, num_workers=a.workers,
            world_size=self.world, rank=self.rank, pin_memory=self.device.type == "cuda"))

    def save(self) -> str:
        tag = self.checkpointer.save({"mlflow_run_id": self.tracker.run_id, "model_args": self.model_args})
        self.broadcast_run_id()
        return tag

    def broadcast_run_id(self) -> None:
        """Only rank 0 knows the MLflow run; the others need it for their checkpoint files."""
        box = [self.tracker.run_id]
        dist.broadcast_object_list(box, src=0)
        if self.rank != 0:  # rank 0's sender may set it meanwhile, when the server comes back
            self.tracker.run_id = box[0]

    def run(self) -> dict[str, float]:
        """Epochs until done (or ``--max-steps``); returns the last eval metrics."""
        self.broadcast_run_id()
        self.preemption.install()
        metrics: dict[str, float] = {}
        while self.state.epoch < self.total_epochs:
            if not self.train_epoch():
                log.info("stopped at --max-steps %d; resume with --resume", self.engine.global_steps)
                self.tracker.finish("KILLED")
                return metrics
            metrics = self.end_epoch()
            if self.state.epoch < self.total_epochs and self.preemption.settle():
                self.stop_preempted()
        if not self.checkpointer.weights_written:  # resumed from the last epoch's checkpoint
            self.checkpointer.write_weights(self.args.output / WEIGHTS_FILE, self.model_args)
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
        policy = self.checkpointer.policy
        # closed on the way out: a stop mid-epoch shuts the loader's workers down now
        with contextlib.closing(self.step_batches()) as steps:
            for micro_batches in steps:
                stats = train_step(self.engine, self.objective, micro_batches)
                if self.ema is not None:
                    self.ema.update()
                step = self.engine.global_steps
                epoch_done = self.state.advance(step, self.steps_per_epoch)
                self.metrics.add(stats)
                preempted = self.preemption.poll()
                must_save = policy.due(step, epoch_done)
                if must_save or preempted or self.metrics.due(step, epoch_done):
                    self.read_metrics(step)
                if must_save:
                    self.save()
                if preempted:
                    self.stop_preempted()
                if policy.stops(step):
                    return False
        return True

    def stop_preempted(self) -> None:
        """Checkpoint the current step (unless it is saved already), report, raise ``Preempted``."""
        started = time.perf_counter()
        if not self.checkpointer.saved_current():
            self.save()
        self.preemption.report(self.engine.global_steps, self.checkpointer.last_tag, time.perf_counter() - started)
        raise Preempted(self.engine.global_steps, self.checkpointer.last_tag)

    def step_batches(self) -> Iterator[Iterator[dict[str, torch.Tensor]]]:
        """The rest of the epoch as one lazy group of ``grad_accum`` micro batches per step.
        Closing it closes the loader (its workers end now, not at interpreter exit)."""
        remaining = self.steps_per_epoch - self.state.step_in_epoch
        if remaining <= 0:
            return
        loader = self.preemption.shielded(train_batches(self, self.state.epoch, self.state.step_in_epoch))
        batches = self.metrics.waited_on(loader)
        try:
            for _ in range(remaining):
                first = next(batches, None)
                if first is None:
                    return
                yield itertools.chain([first], itertools.islice(batches, self.plan.grad_accum - 1))
        finally:
            batches.close()
            loader.close()

    def read_metrics(self, step: int) -> None:
        """Read the steps since the last read (all ranks), apply ``--nan-policy``, log."""
        totals = self.metrics.read()
        where = self.nan_policy.check(int(totals.stats["non_finite_micro_batches"]), step - totals.steps + 1, step)
        if where is not None:
            self.stop_on_non_finite(where)
        grad_norm = self.engine.get_global_grad_norm()
        metrics = self.metrics.named(
            totals, lr=self.engine.get_lr()[0], grad_norm=None if grad_norm is None else float(grad_norm),
            epoch=self.state.epoch + self.state.step_in_epoch / self.steps_per_epoch,
            skipped=self.nan_policy.skipped)
        self.tracker.log_metrics(metrics, step=step)
        if self.rank == 0:
            log.info(log_line(step, metrics))

    def stop_on_non_finite(self, where: str) -> None:
        """Keep the current state if its weights are finite (the non-finite micro batches added
        nothing to them), then stop."""
        if weights_finite(self.engine, self.device):
            self.save()
        raise NonFiniteLoss(
            f"non-finite loss in {where} (epoch {self.state.epoch}); it was not applied (zero gradient). "
            f"Last good checkpoint: {self.checkpointer.last_tag or 'none'} in {self.args.output / 'checkpoints'}. "
            "Resume with --resume (lower --lr, set --clip-grad) or run with --nan-policy skip.")

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
        epoch = self.state.epoch
        last = epoch + 1 == self.total_epochs
        metrics = {} if last else self.eval_epoch(epoch)
        self.state.next_epoch()
        self.save()
        if last:
            self.checkpointer.write_weights(self.args.output / WEIGHTS_FILE, self.model_args)
            metrics = self.eval_epoch(epoch)
        return metrics

    def eval_epoch(self, epoch: int) -> dict[str, float]:
        if not (self.args.eval and self.args.eval_shards):
            return {}
        metrics = self.validator()
        self.tracker.log_metrics(metrics, step=self.engine.global_steps)
        if self.rank == 0:
            log.info("epoch %d eval %s", epoch, metrics)
        return metrics

    def eval_only(self) -> dict[str, float]:
        """Evaluate what was loaded, write ``OUTPUT/eval.json`` (rank 0) and close the run.

        Nothing is trained and nothing saved: the optimizer exists only because DeepSpeed
        builds the engine (and, under ZeRO-3, partitions the weights) with it.
        """
        a = self.args
        source = self.checkpointer.loaded_from if self.resume_from is not None else a.finetune
        metrics = self.validator()
        self.tracker.log_metrics(metrics, step=self.engine.global_steps)
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
