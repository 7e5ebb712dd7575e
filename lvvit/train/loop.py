"""The training run: DeepSpeed engine, token-labeling loss, EMA, eval, checkpoints, MLflow.

Every collective (step statistics, eval, checkpoint save, EMA gather)
runs on all ranks in the same order; only MLflow calls and file writes of shared outputs
are rank 0's.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from lvvit import atomic
from lvvit.models import train_flops_per_image
from lvvit.train.build import (
    build_objective,
    ema_for,
    engine_for,
    popped_keys,
    resume_choice,
    step_seed,
    train_batches,
)
from lvvit.train.checkpointing import WEIGHTS_FILE, Checkpointer, SavePolicy
from lvvit.train.config import TrainConfig, open_source, prepare
from lvvit.train.engine import (
    engine_dtype,
    init_distributed,
    weights_finite,
)
from lvvit.train.metrics import NonFinitePolicy, StepMetrics, log_line
from lvvit.train.mfu import device_peak_flops
from lvvit.train.output_lock import lock_output
from lvvit.train.preemption import (
    PREEMPTED_EXIT,
    Preempted,
    Preemption,
    Terminated,
    end_status,
    exit_now,
    raise_on_sigterm,
)
from lvvit.train.sample_log import SampleLog
from lvvit.train.state import TrainState
from lvvit.train.step import train_step
from lvvit.train.tracking import make_tracker, read_run_file
from lvvit.train.validate import Validator

if TYPE_CHECKING:
    pass

log = logging.getLogger("lvvit.train")
EVAL_FILE = "eval.json"
TERMINATED_EXIT = 128 + signal.SIGTERM
"""Exit status on SIGTERM outside the training steps (set-up, eval-only): the shell's for a
process killed by it."""
FINISH_MARGIN = 5.0
"""Seconds of a preemption's grace period kept for the process to exit after MLflow's last send."""


class NonFiniteLoss(RuntimeError):
    """Raised under ``--nan-policy stop``; the message names the checkpoint to resume from."""


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``: one MLflow param per leaf."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_tags(config: TrainConfig, ds_config: dict, world: int, dtype: torch.dtype) -> dict[str, str]:
    zero = ds_config.get("zero_optimization", {}).get("stage", 0)
    precision = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")
    return {"git_commit": git_commit(), "mlflow.source.git.commit": git_commit(),
            "world_size": str(world), "zero_stage": str(zero), "model": config.model.name,
            "precision": precision, "img_size": str(config.model.img_size)}


def log_setup(trainer: Trainer, ds_path: Path) -> None:
    """The run's options, resolved numbers and DeepSpeed JSON as MLflow params and artifacts;
    the shards it reads as MLflow datasets (an ``--eval-only`` run reads no training shards)."""
    from lvvit.train.lineage import log_sources

    t, plan = trainer, trainer.plan
    opts = {k: (str(v) if isinstance(v, Path | list | tuple | dict) or v is None else v)
            for k, v in t.config.options().items()}
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
    if t.config.config_file is not None:
        t.tracker.log_artifact(t.config.config_file)
    log_sources(t.tracker, [(None if t.config.tracking.eval_only else t.train_source, "training"),
                            (t.eval_source, "eval")])


class Trainer:
    """One run from options to consolidated weights, wired from components: the engine
    (``lvvit.train.engine``), the ``Checkpointer`` with the ``TrainState``, ``StepMetrics``,
    ``NonFinitePolicy``, the ``Validator``, ``Preemption`` and the tracker.
    ``run()`` returns the final eval metrics."""

    def __init__(self, config: TrainConfig) -> None:
        self.config = c = config
        out = c.checkpoint.output
        self.rank, self.world, self.device = init_distributed()
        self.preemption = Preemption(c.preemption.signals, c.preemption.grace)
        run_config = prepare(c, self.world)  # every config check, before the model exists
        out.mkdir(parents=True, exist_ok=True)
        eval_only = c.tracking.eval_only
        self.output_lock = None if eval_only else lock_output(out, self.rank)  # before compute
        self.ds_config, self.plan = run_config.ds_config, run_config.plan
        self.lr, self.steps_per_epoch = run_config.lr, run_config.steps_per_epoch
        self.train_source, self.sampling = run_config.train_source, run_config.sampling
        self.sample_log = SampleLog(c.data.sample_log, self.rank) if c.data.sample_log and not eval_only else None
        self.loader = None  # the current epoch's (its position goes into checkpoints)
        self.eval_source = (open_source("--eval-shards", c.data.eval_shards, c.data.eval_manifest, c.data.access)
                            if c.data.eval_shards and c.tracking.eval else None)
        source = self.train_source or self.eval_source
        self.classes = source.classes if source is not None else None
        self.num_classes = c.model.num_classes or (len(self.classes) if self.classes else 1000)
        self.engine, self.model_args = engine_for(c, run_config, self.num_classes, self.rank)
        self.dtype = engine_dtype(self.engine)
        self.ema = ema_for(c, self.num_classes, self.engine.module)
        self.state = TrainState(None if eval_only else self.plan.global_batch)
        self.checkpointer = Checkpointer(self.engine, out / "checkpoints", c.checkpoint.keep, self.ema,
                                         self.state, SavePolicy(c.checkpoint.save_every, c.optim.max_steps))
        self.objective = build_objective(c, self.num_classes, self.engine, self.device)
        self.validator = Validator(self.engine, self.ema, self.eval_batches, self.device, self.dtype)
        self.resume_from = resume_choice(c, self.checkpointer.directory)
        run_id = self.resume(self.resume_from) if self.resume_from is not None else None
        t = c.tracking
        self.tracker = make_tracker(
            t.mlflow, self.rank, t.experiment,
            t.run_name or f"{c.model.name}-{c.model.img_size}{'-eval' if eval_only else ''}", out,
            run_tags(c, self.ds_config, self.world, self.dtype), None if eval_only else run_id,
            t.system_metrics, record=not eval_only, strict=t.strict_tracking)
        self.metrics = StepMetrics(
            self.device, t.log_every, self.plan.global_batch, world_size=self.world,
            flops_per_sample=train_flops_per_image(self.engine.module.cfg),  # model FLOPs: MFU, not HFU
            peak_flops=device_peak_flops(self.device, self.dtype))
        self.nan_policy = NonFinitePolicy(c.optim.nan_policy)
        log_setup(self, run_config.ds_path)

    def resume(self, which: str) -> str | None:
        """Engine, EMA, RNG and state from ``which``; returns the MLflow run to continue."""
        ours = self.checkpointer.resume(which)
        log.info("resumed at step %d (epoch %d, step %d in it)", self.engine.global_steps,
                 self.state.epoch, self.state.step_in_epoch)
        run_id = ours.get("mlflow_run_id")
        return run_id if run_id is not None else (read_run_file(self.config.checkpoint.output) or {}).get("run_id")

    def eval_batches(self):
        """A fresh eval loader, its first batch fetched with the preemption signals blocked."""
        from lvvit.loader.pipeline import eval_loader

        c = self.config
        return self.preemption.shielded(eval_loader(
            self.eval_source, batch_size=c.data.eval_batch or self.plan.micro_batch,
            img_size=c.model.img_size, crop_pct=self.engine.module.cfg.crop_pct, num_workers=c.data.workers,
            world_size=self.world, rank=self.rank, pin_memory=self.device.type == "cuda"))

    def save(self) -> str:
        """Collective: a checkpoint of this step, with every rank's loader position mid-epoch."""
        mid_epoch = self.sampling == "epoch" and self.loader is not None and self.state.step_in_epoch > 0
        positions = [None] * self.world if mid_epoch else None
        if positions is not None:
            dist.all_gather_object(positions, self.loader.position())
        self.state.data_positions = positions
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
        while self.state.epoch < self.config.schedule.total_epochs:
            if not self.train_epoch():
                log.info("stopped at --max-steps %d; resume with --resume", self.engine.global_steps)
                self.tracker.finish("KILLED")
                return metrics
            metrics = self.end_epoch()
            if self.state.epoch < self.config.schedule.total_epochs and self.preemption.settle():
                self.stop_preempted()
        if not self.checkpointer.weights_written:  # resumed from the last epoch's checkpoint
            self.checkpointer.write_weights(self.config.checkpoint.output / WEIGHTS_FILE, self.model_args)
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
                torch.manual_seed(step_seed(self.config.optim.seed, self.engine.global_steps + 1, self.rank))
                stats = train_step(self.engine, self.objective, micro_batches)
                if self.ema is not None:
                    self.ema.update()
                step = self.engine.global_steps
                if self.sample_log is not None:
                    self.sample_log.write(step)
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
        self.loader = train_batches(self, self.state.epoch, self.state.step_in_epoch)
        loader = self.preemption.shielded(self.loader)
        batches = popped_keys(self.metrics.waited_on(loader), self.sample_log)
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
            f"Last good checkpoint: {self.checkpointer.last_tag or 'none'} in {self.checkpointer.directory}. "
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
        last = epoch + 1 == self.config.schedule.total_epochs
        metrics = {} if last else self.eval_epoch(epoch)
        self.state.next_epoch()
        self.save()
        if last:
            self.checkpointer.write_weights(self.config.checkpoint.output / WEIGHTS_FILE, self.model_args)
            metrics = self.eval_epoch(epoch)
        return metrics

    def eval_epoch(self, epoch: int) -> dict[str, float]:
        if self.eval_source is None:
            return {}
        metrics = self.validator()
        self.tracker.log_metrics(metrics, step=self.engine.global_steps)
        if self.rank == 0:
            log.info("epoch %d eval %s", epoch, metrics)
        return metrics

    def finish(self) -> None:
        """The artifacts (``weights.pth`` is on disk already), then close the run."""
        out = self.config.checkpoint.output
        if self.rank == 0:
            self.tracker.log_artifact(out / WEIGHTS_FILE)
            if self.classes is not None:
                atomic.write_text(out / "classes.json", json.dumps(self.classes, indent=1) + "\n")
                self.tracker.log_artifact(out / "classes.json")
        dist.barrier()
        self.tracker.finish("FINISHED")


def evaluate_only(trainer: Trainer) -> dict[str, float]:
    """Evaluate what was loaded, write ``OUTPUT/eval.json`` (rank 0) and close the run.

    Nothing is trained and nothing saved: the optimizer exists only because DeepSpeed
    builds the engine (and, under ZeRO-3, partitions the weights) with it.
    """
    c = trainer.config
    source = trainer.checkpointer.loaded_from if trainer.resume_from is not None else c.model.finetune
    metrics = trainer.validator()
    trainer.tracker.log_metrics(metrics, step=trainer.engine.global_steps)
    if trainer.rank == 0:
        record = {"source": str(source), "step": trainer.engine.global_steps, "world_size": trainer.world,
                  "eval_shards": c.data.eval_shards, "metrics": metrics}
        path = c.checkpoint.output / EVAL_FILE
        atomic.write_json(path, record)
        trainer.tracker.log_params({"eval_source": str(source)})
        trainer.tracker.log_artifact(path)
        log.info("eval of %s: %s; wrote %s", source, metrics, path)
        print(json.dumps(record), flush=True)
    dist.barrier()
    trainer.tracker.finish("FINISHED")
    return metrics


def run(config: TrainConfig) -> None:
    """Train (or ``--eval-only``) under ``config``, and exit as the run ended: 75 after a
    preemption checkpoint, 143 on SIGTERM outside the steps; the MLflow run says FAILED or
    KILLED for every other way out, never FINISHED."""
    raise_on_sigterm()
    try:
        trainer = Trainer(config)
    except Terminated:  # before the first step nothing is lost (docs/training.md, "Preemption")
        log.warning("SIGTERM during set-up; exiting with %d", TERMINATED_EXIT)
        exit_now(TERMINATED_EXIT)
    try:
        if config.tracking.eval_only:
            evaluate_only(trainer)
        else:
            trainer.run()
    except Preempted:  # checkpoint saved on every rank: close the run inside the grace period
        trainer.tracker.finish("KILLED", wait=trainer.preemption.seconds_left() - FINISH_MARGIN)
        if trainer.output_lock is not None:  # exit_now skips atexit: the resume finds no stale holder
            trainer.output_lock.release()
        exit_now(PREEMPTED_EXIT)
    except BaseException as err:
        trainer.tracker.finish(end_status(err))
        if isinstance(err, Terminated):
            raise SystemExit(TERMINATED_EXIT) from None
        raise


__all__ = ["NonFiniteLoss", "Trainer", "evaluate_only", "run"]
