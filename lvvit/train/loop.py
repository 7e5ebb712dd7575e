"""The training run: DeepSpeed engine, token-labeling loss, EMA, eval, checkpoints, MLflow.

Every collective (loss reduction, non-finite check, eval, checkpoint save, EMA gather)
runs on all ranks in the same order; only MLflow calls and file writes of shared outputs
are rank 0's.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist

from lvvit import atomic
from lvvit.train import config as C
from lvvit.train.checkpointing import WEIGHTS_FILE, Checkpointer, consolidate
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


class NonFiniteLoss(RuntimeError):
    """Raised under ``--nan-policy stop``; the message names the checkpoint to resume from."""


def ensure_dist_env() -> None:
    """Defaults so ``python train.py`` runs as one rank without the launcher (no mpi4py probe)."""
    if "RANK" in os.environ:
        return
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])


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


def shard_folder(shards: str) -> Path:
    """The folder holding ``manifest.json``: given as is, or the parent of a shard pattern.

    The manifest lists the shards a run reads (equal steps per rank need its counts).
    """
    path = Path(shards)
    return path if path.is_dir() else path.parent


def read_classes(shards: str) -> list[dict] | None:
    path = shard_folder(shards) / "classes.json"
    return json.loads(path.read_text()) if path.exists() else None


def engine_dtype(engine) -> torch.dtype:
    if engine.bfloat16_enabled():
        return torch.bfloat16
    return torch.float16 if engine.fp16_enabled() else torch.float32


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
    from lvvit.models import create_model
    from lvvit.models.checkpoint import CheckpointError, load_checkpoint, read_state_dict

    model_args = {"name": args.model, "img_size": args.img_size, "num_classes": num_classes,
                  **args.model_overrides}
    model = create_model(**model_args, drop_path_rate=args.drop_path, mix_token=args.mix_token)
    if args.finetune is not None and load:
        try:
            if args.eval_only:
                head = read_state_dict(args.finetune).get("head.weight")
                if head is not None and head.shape[0] != num_classes:
                    raise SystemExit(f"--eval-only: {args.finetune} has {head.shape[0]} classes, the eval set "
                                     f"{num_classes} (set --num-classes)")
            load_checkpoint(model, args.finetune)
        except (CheckpointError, FileNotFoundError) as err:
            raise SystemExit(f"--finetune: {err}") from None
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model, model_args


class Trainer:
    """One run from options to consolidated weights. ``run()`` returns the final eval metrics."""

    def __init__(self, args: argparse.Namespace) -> None:
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        from lvvit.loss import TokenLabelingLoss
        from lvvit.train.ema import ModelEma
        from lvvit.train.schedule import WarmupCosineSchedule

        self.args = args
        ensure_dist_env()
        deepspeed.init_distributed()
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        if self.rank != 0:
            logging.getLogger("lvvit").setLevel(logging.WARNING)
        # before any tensor is placed: DeepSpeed only selects the rank's GPU inside initialize()
        get_accelerator().set_device(int(os.environ.get("LOCAL_RANK", 0)))
        self.device = torch.device(get_accelerator().current_device_name())

        run_config = C.prepare(args, self.world)  # every config check, before the model exists
        args.output.mkdir(parents=True, exist_ok=True)
        ds_path, self.ds_config = run_config.ds_path, run_config.ds_config
        self.plan, self.lr, self.steps_per_epoch = run_config.plan, run_config.lr, run_config.steps_per_epoch
        self.total_epochs = args.epochs + args.cooldown_epochs
        self.classes = read_classes(args.train_shards or args.eval_shards)
        self.num_classes = args.num_classes or (len(self.classes) if self.classes else 1000)

        seed_everything(args.seed)  # identical initial weights on every rank
        model, self.model_args = build_model(args, self.num_classes)
        self.schedule = WarmupCosineSchedule(
            lr=self.lr, min_lr=args.min_lr, warmup_lr=args.warmup_lr, warmup_epochs=args.warmup_epochs,
            epochs=args.epochs, steps_per_epoch=self.steps_per_epoch)
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, model_parameters=param_groups(model, args.weight_decay), config=self.ds_config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, self.schedule))
        seed_everything(args.seed + self.rank)  # different augmentation, drop path, mixing per rank
        self.dtype = engine_dtype(self.engine)
        self.ema = ModelEma(self.engine.module, args.ema_decay) if args.model_ema else None
        if args.eval_only and args.finetune is not None:
            self.ema = self.ema_from_file(args.finetune) if self.ema is not None else None
        self.checkpointer = Checkpointer(self.engine, args.output / "checkpoints", args.keep, self.ema)
        self.loss_fn = TokenLabelingLoss(cls_weight=args.cls_weight, dense_weight=args.dense_weight,
                                         smoothing=args.smoothing, ground_truth=args.ground_truth)
        self.position = Position()
        self.skipped = 0  # micro batches dropped under --nan-policy skip
        self.weights_written = False
        run_id = None
        if args.resume is not None:
            state = self.checkpointer.resume(args.resume).get("lvvit", {})
            self.position = Position(state.get("epoch", 0), state.get("step_in_epoch", 0))
            run_id = state.get("mlflow_run_id")
            log.info("resumed at step %d (epoch %d, step %d in it)", self.engine.global_steps,
                     self.position.epoch, self.position.step_in_epoch)
        if run_id is None and args.resume is not None:
            run_id = (read_run_file(args.output) or {}).get("run_id")
        run_name = args.run_name or f"{args.model}-{args.img_size}{'-eval' if args.eval_only else ''}"
        self.tracker = make_tracker(
            args.mlflow, self.rank, args.experiment, run_name, args.output, self.tags(),
            None if args.eval_only else run_id, args.system_metrics, record=not args.eval_only,
            strict=args.strict_tracking)
        self.log_setup(ds_path)

    def ema_from_file(self, path: Path) -> ModelEma | None:
        """The file's EMA weights as the run's EMA (``None`` when it has none), adapted to the
        model like the raw weights (pos_embed at another resolution)."""
        from lvvit.models.checkpoint import CheckpointError, load_checkpoint, read_state_dict
        from lvvit.train.ema import ModelEma

        try:
            read_state_dict(path, use_ema=True)
        except CheckpointError:
            log.info("%s has no EMA weights: evaluating the raw weights only", path)
            return None
        model, _ = build_model(self.args, self.num_classes, load=False)
        load_checkpoint(model, path, use_ema=True)
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
        """This epoch's remaining micro batches; the seed moves with the epoch and the resume
        point, so a resumed epoch does not replay the samples it already trained on."""
        from lvvit.data.pipeline import train_loader
        from lvvit.data.transforms import RandAugment

        a = self.args
        ops = C.RANDAUG_OPS.get(a.model, 2) if a.randaug_ops is None else a.randaug_ops
        randaugment = RandAugment(num_ops=ops, magnitude=a.randaug_magnitude,
                                  magnitude_std=a.randaug_mstd) if ops > 0 else None
        return train_loader(
            shard_folder(a.train_shards), batch_size=self.plan.micro_batch, img_size=a.img_size,
            num_workers=a.workers, erase_prob=a.reprob, world_size=self.world,
            randaugment=randaugment, scale=tuple(a.scale), hflip=a.hflip,
            steps_per_epoch=(self.steps_per_epoch - skip_steps) * self.plan.grad_accum,
            seed=a.seed + 1_000_003 * epoch + skip_steps, pin_memory=self.device.type == "cuda")

    def eval_batches(self):
        from lvvit.data.pipeline import eval_loader

        a = self.args
        return eval_loader(
            shard_folder(a.eval_shards), batch_size=a.eval_batch or self.plan.micro_batch,
            img_size=a.img_size, crop_pct=self.engine.module.cfg.crop_pct, num_workers=a.workers,
            world_size=self.world, rank=self.rank, pin_memory=self.device.type == "cuda")

    # ----------------------------------------------------------------- steps
    def forward_loss(self, batch: dict[str, torch.Tensor]):
        from lvvit.data.transforms import normalize
        from lvvit.targets import build_token_targets

        d = self.device
        images = normalize(batch["images"].to(d, non_blocking=True)).to(self.dtype)
        labels = batch["labels"].to(d, non_blocking=True)
        cls_target = token_target = None
        if "tlm_values" in batch:
            cls_target, token_target = build_token_targets(
                batch["tlm_values"].to(d), batch["tlm_indices"].to(d), batch["map_boxes"].to(d),
                batch["crop_boxes"].to(d), batch["flips"].to(d), self.num_classes,
                out_size=self.args.img_size // 16, smoothing=self.args.smoothing)
        return self.loss_fn(self.engine(images), labels, cls_target, token_target)

    def all_finite(self, loss: torch.Tensor) -> bool:
        """Every rank's verdict, so all of them skip or stop together."""
        bad = (~torch.isfinite(loss.detach())).float().reshape(1)
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        return bad.item() == 0

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
        metrics: dict[str, float] = {}
        while self.position.epoch < self.total_epochs:
            if not self.train_epoch():
                log.info("stopped at --max-steps %d; resume with --resume", self.engine.global_steps)
                self.tracker.finish("KILLED")
                return metrics
            metrics = self.end_epoch()
        if not self.weights_written:  # resumed from the last epoch's checkpoint
            self.write_weights()
        self.finish()
        return metrics

    def train_epoch(self) -> bool:
        """The rest of the current epoch; ``False`` when ``--max-steps`` stopped it."""
        a, engine = self.args, self.engine
        engine.train()
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)  # loss, cls, aux, micro steps
        one = torch.ones((), dtype=torch.float64, device=self.device)
        remaining = self.steps_per_epoch - self.position.step_in_epoch
        batches = self.train_batches(self.position.epoch, self.position.step_in_epoch) if remaining > 0 else ()
        step_start = time.perf_counter()
        for batch in batches:
            parts = self.forward_loss(batch)
            if not self.all_finite(parts.loss):
                if a.nan_policy == "stop":
                    self.stop_on_non_finite(parts.loss)
                self.skipped += 1
                log.warning("skipping a micro batch with non-finite loss at step %d", engine.global_steps)
                continue
            engine.backward(parts.loss)
            before = engine.global_steps
            engine.step()
            sums += torch.stack([parts.loss.detach().double(), parts.cls_loss.detach().double(),
                                 parts.aux_loss.detach().double(), one])
            if engine.global_steps == before:
                continue  # inside an accumulation window
            if self.ema is not None:
                self.ema.update()
            self.position.step_in_epoch += 1
            now = time.perf_counter()
            step_time, step_start = now - step_start, now
            step = engine.global_steps
            epoch_done = self.position.step_in_epoch == self.steps_per_epoch
            if step % a.log_every == 0 or epoch_done:
                self.log_step(sums, step_time)
                sums.zero_()
            if a.max_steps is not None and step >= a.max_steps:
                self.save()
                return False
            if a.save_every and step % a.save_every == 0 and not epoch_done:  # end_epoch saves
                self.save()
        return True

    def stop_on_non_finite(self, loss: torch.Tensor) -> None:
        """Keep the current state if its weights are finite (the bad step was not applied), then stop."""
        if self.weights_finite():
            self.save()
        raise NonFiniteLoss(
            f"non-finite loss ({loss.item()}) at step {self.engine.global_steps} (epoch {self.position.epoch}); "
            f"it was not applied. Last good checkpoint: {self.checkpointer.last_tag or 'none'} in "
            f"{self.args.output / 'checkpoints'}. Resume with --resume (lower --lr, set --clip-grad) "
            "or run with --nan-policy skip.")

    def weights_finite(self) -> bool:
        bad = torch.zeros(1, device=self.device)
        for p in self.engine.module.parameters():
            local = p.ds_tensor if hasattr(p, "ds_tensor") else p.data
            if not torch.isfinite(local).all():
                bad.fill_(1)
                break
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        return bad.item() == 0

    def log_step(self, sums: torch.Tensor, step_time: float) -> None:
        reduced = sums.clone()
        dist.all_reduce(reduced)
        n = max(reduced[3].item(), 1.0)
        grad_norm = self.engine.get_global_grad_norm()
        metrics = {"train/loss": reduced[0].item() / n, "train/cls_loss": reduced[1].item() / n,
                   "train/aux_loss": reduced[2].item() / n, "train/lr": self.engine.get_lr()[0],
                   "train/step_time": step_time, "train/images_per_sec": self.plan.global_batch / step_time,
                   "train/epoch": self.position.epoch + self.position.step_in_epoch / self.steps_per_epoch,
                   "train/skipped_micro_batches": float(self.skipped)}
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
        source = self.checkpointer.loaded_from if a.resume is not None else a.finetune
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

        return evaluate(self.engine, self.eval_batches(), self.device, self.dtype)

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
    trainer = Trainer(args)
    try:
        if args.eval_only:
            trainer.eval_only()
        else:
            trainer.run()
    except BaseException as err:  # the MLflow run says FAILED or KILLED, never FINISHED
        trainer.tracker.finish(end_status(err))
        if isinstance(err, Terminated):
            raise SystemExit(128 + signal.SIGTERM) from None
        raise


__all__ = ["NonFiniteLoss", "Trainer", "main"]
