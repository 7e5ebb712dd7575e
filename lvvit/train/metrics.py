"""The training metrics: step statistics kept on the device, their names, throughput, the
share of wall time spent waiting for data, model FLOPs utilisation (MFU, when the model's
FLOPs and the device's peak are known), peak device memory, the log line, and
``--nan-policy`` applied where the statistics are read.

Reading the statistics (one all-reduce and one copy to the host) is the loop's only
per-step synchronisation: at every ``--log-every`` step, at epoch ends and before a
checkpoint. Step time is the wall time between reads over the steps read, which on a GPU
counts the queued work once it has drained, not the time to queue it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

from lvvit.train.mfu import model_flops_utilization
from lvvit.train.step import STEP_STATS

log = logging.getLogger("lvvit.train")
T = TypeVar("T")
_END = object()


@dataclass(frozen=True)
class StepTotals:
    """Step statistics summed over ranks and the steps since the last read (``STEP_STATS``),
    how many steps that was, their mean wall time, and this rank's seconds spent waiting
    for the loader over those steps."""

    stats: dict[str, float]
    steps: int
    step_time: float
    data_wait: float = 0.0


class StepMetrics:
    """The step statistics since the last read, and the ``train/*`` metrics made of them.

    ``flops_per_sample``: the model's training FLOPs per image
    (``lvvit.models.train_flops_per_image``); with it the metrics carry
    ``train/tflops_per_device``, the model TFLOP/s achieved per device. ``peak_flops``: the
    dense peak FLOP/s of one device (``lvvit.train.mfu.device_peak_flops``, or given by the
    user); with both, ``train/mfu`` (a fraction) and the log line's ``MFU``. Either unknown
    (``None``, as on the CPU): left out, not zero. ``world_size``: the devices the global
    batch runs on, which share it.
    """

    def __init__(self, device: torch.device, log_every: int, global_batch: int, *,
                 flops_per_sample: float | None = None, peak_flops: float | None = None,
                 world_size: int = 1) -> None:
        if world_size < 1:
            raise ValueError(f"world_size must be at least 1, got {world_size}")
        if peak_flops is not None and peak_flops <= 0:
            raise ValueError(f"peak_flops must be positive, got {peak_flops}")
        self.device = device
        self.sums = torch.zeros(len(STEP_STATS), dtype=torch.float64, device=device)
        self.log_every = log_every
        self.global_batch = global_batch
        self.flops_per_sample = flops_per_sample
        self.peak_flops = peak_flops
        self.world_size = world_size
        self.steps = 0
        self.data_wait = 0.0
        self.started = time.perf_counter()

    def restart_clock(self) -> None:
        """Time from here: an epoch's first steps are not charged with the eval before them."""
        self.started = time.perf_counter()
        self.data_wait = 0.0

    def waited_on(self, items: Iterator[T]) -> Iterator[T]:
        """``items``, with the wall time spent fetching each counted as data wait (on the host:
        no device synchronisation)."""
        while True:
            start = time.perf_counter()
            item = next(items, _END)
            self.data_wait += time.perf_counter() - start
            if item is _END:
                return
            yield item

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
                            (now - self.started) / max(self.steps, 1), self.data_wait)
        self.sums.zero_()
        self.steps, self.started, self.data_wait = 0, now, 0.0
        return totals

    def named(self, totals: StepTotals, lr: float, grad_norm: float | None, epoch: float,
              skipped: int) -> dict[str, float]:
        """The ``train/*`` metrics of a read: mean losses over the finite micro batches,
        throughput of the global batch, data-wait share, achieved model TFLOP/s per device
        and MFU where known, peak memory on a GPU."""
        stats, n = totals.stats, max(totals.stats["finite_micro_batches"], 1.0)
        wall = totals.step_time * max(totals.steps, 1)
        metrics = {"train/loss": stats["loss"] / n, "train/cls_loss": stats["cls_loss"] / n,
                   "train/aux_loss": stats["aux_loss"] / n, "train/lr": lr,
                   "train/step_time": totals.step_time,
                   "train/images_per_sec": self.global_batch / totals.step_time,
                   "train/data_wait_share": totals.data_wait / wall if wall > 0 else 0.0,
                   "train/epoch": epoch, "train/skipped_micro_batches": float(skipped)}
        if grad_norm is not None:
            metrics["train/grad_norm"] = float(grad_norm)
        metrics.update(self.utilization(metrics["train/images_per_sec"]))
        if self.device.type == "cuda":
            metrics["train/peak_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        return metrics

    def utilization(self, images_per_sec: float) -> dict[str, float]:
        """``train/tflops_per_device`` when the model's FLOPs are known, and ``train/mfu``
        when the device's peak is known too; nothing otherwise."""
        if self.flops_per_sample is None:
            return {}
        per_device = images_per_sec / self.world_size
        out = {"train/tflops_per_device": self.flops_per_sample * per_device / 1e12}
        if self.peak_flops is not None:
            out["train/mfu"] = model_flops_utilization(self.flops_per_sample, per_device, self.peak_flops)
        return out


def log_line(step: int, metrics: dict[str, float]) -> str:
    """The console line of a logging step (with ``MFU x.x%`` when it is known)."""
    line = (f"step {step} loss {metrics['train/loss']:.4f} lr {metrics['train/lr']:.3g} "
            f"{metrics['train/images_per_sec']:.1f} img/s")
    if "train/mfu" in metrics:
        line += f" MFU {100 * metrics['train/mfu']:.1f}%"
    return line


class NonFinitePolicy:
    """``--nan-policy``, applied where the step statistics are read (before any checkpoint).

    A non-finite micro batch has already added zero to the gradient (``train_step``);
    ``skip`` counts and reports it; under ``stop``, ``check`` returns where it happened and
    the trainer ends the run.
    """

    def __init__(self, policy: str) -> None:
        self.policy = policy
        self.skipped = 0  # non-finite micro batches so far

    def check(self, non_finite: int, first_step: int, last_step: int) -> str | None:
        """``None`` to go on, else the steps at fault (``stop``)."""
        if not non_finite:
            return None
        self.skipped += non_finite
        where = f"{non_finite} micro batch(es) of steps {first_step}..{last_step}"
        if self.policy == "stop":
            return where
        log.warning("skipping a micro batch with non-finite loss: %s, with zero gradient", where)
        return None


__all__ = ["NonFinitePolicy", "StepMetrics", "StepTotals", "log_line"]
