"""One optimizer step: ``grad_accum`` micro batches through targets, model, loss and
backward, then the update. ``train.py`` and ``lvvit-bench train`` both run this function.

Nothing here reads a device value on the host, so a GPU step is queued without waiting:

* the batch arrives from the loader on the CPU; the label-map checks and the crops'
  RoIAlign weights (whose sample grid is sized from the data) are computed there, and
  only tensors are copied over (``non_blocking``);
* whether a micro batch's loss is finite is a device tensor. A non-finite micro batch
  adds exactly zero to the gradient (its teacher logits are zeroed where non-finite and
  its loss is replaced by 0 with ``torch.where`` before backward), so nothing has to be
  read before the update. The loop reads the counts at its logging and saving steps and
  applies ``--nan-policy`` there (see ``lvvit.train.metrics.NonFinitePolicy``).

The step's optimizer update still happens when a micro batch is zeroed: AdamW moves on its
moments (and weight decay) alone for a step whose every micro batch was non-finite. A loss
made non-finite by the model itself (non-finite activations) gives non-finite gradients
that no mask removes; the loop's check at the next read stops the run under ``stop``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lvvit.data.decode import normalize
from lvvit.loader.targets import check_target_inputs, crop_weights, targets_from_weights
from lvvit.train.loss import LossParts

STEP_STATS = ("loss", "cls_loss", "aux_loss", "finite_micro_batches", "non_finite_micro_batches")
"""The entries of the float64 vector ``train_step`` returns: loss sums over the finite
micro batches, their count, and the count of non-finite ones."""


@dataclass(frozen=True)
class Objective:
    """What turns a loader batch into a loss: the loss module (compiled or not), the target
    geometry (``token_grid`` is the model's grid side, ``img_size // patch_size``), and the
    device and dtype the model runs in."""

    loss_fn: Callable[..., LossParts]
    num_classes: int
    token_grid: int
    smoothing: float
    device: torch.device
    dtype: torch.dtype
    sampling_ratio: int = -1


class PlainEngine:
    """DeepSpeed's engine protocol over a module and a torch optimizer, so one ``train_step``
    serves both: ``backward`` scales the loss by ``1 / grad_accum`` and ``step`` applies
    the update on every ``grad_accum``-th call, as ``deepspeed.DeepSpeedEngine`` does."""

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, grad_accum: int = 1) -> None:
        self.module = module
        self.optimizer = optimizer
        self.grad_accum = grad_accum
        self.micro_steps = 0
        self.global_steps = 0

    def __call__(self, *inputs: Any) -> Any:
        return self.module(*inputs)

    def backward(self, loss: Tensor) -> None:
        (loss / self.grad_accum).backward()

    def step(self) -> None:
        self.micro_steps += 1
        if self.micro_steps % self.grad_accum == 0:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.global_steps += 1


def train_step(engine: Any, objective: Objective, micro_batches: Iterable[dict[str, Tensor]]) -> Tensor:
    """Forward, backward and ``engine.step()`` for each micro batch of one optimizer step.

    ``engine`` is a DeepSpeed engine or a :class:`PlainEngine`; pass exactly its
    ``grad_accum`` micro batches. Returns the step's statistics as a float64 device tensor
    laid out as :data:`STEP_STATS`, unread.
    """
    stats = torch.zeros(len(STEP_STATS), dtype=torch.float64, device=objective.device)
    for batch in micro_batches:
        parts, finite = micro_batch_loss(engine, objective, batch)
        engine.backward(torch.where(finite, parts.loss, 0.0))
        engine.step()  # DeepSpeed applies the update at the end of the accumulation window only
        losses = torch.stack([parts.loss, parts.cls_loss, parts.aux_loss]).detach().double()
        stats += torch.cat([torch.where(finite, losses, 0.0), finite.double().view(1), (~finite).double().view(1)])
    return stats


def micro_batch_loss(engine: Any, objective: Objective, batch: dict[str, Tensor]) -> tuple[LossParts, Tensor]:
    """The micro batch's loss parts and a device bool: loss finite and teacher logits finite."""
    d = objective.device
    images = normalize(batch["images"].to(d, non_blocking=True)).to(objective.dtype)
    labels = batch["labels"].to(d, non_blocking=True)
    cls_target = token_target = None
    finite = torch.ones((), dtype=torch.bool, device=d)
    if "tlm_values" in batch:
        cls_target, token_target, finite = token_targets(objective, batch)
    parts = objective.loss_fn(engine(images), labels, cls_target, token_target)
    return parts, finite & torch.isfinite(parts.loss)


def token_targets(objective: Objective, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """Class and token targets on the device, and whether the teacher logits were finite.

    Checks and crop weights run on the batch's CPU tensors; non-finite teacher logits are
    zeroed on the device so the targets, and the gradient of a masked loss, stay finite.
    """
    o, d = objective, objective.device
    values, indices = batch["tlm_values"], batch["tlm_indices"]
    map_boxes, crop_boxes, flips = batch["map_boxes"], batch["crop_boxes"], batch["flips"]
    check_target_inputs(values, indices, map_boxes, crop_boxes, flips, o.num_classes, o.token_grid, o.smoothing)
    weights = crop_weights(map_boxes, crop_boxes, flips, tuple(values.shape[2:]), o.token_grid, o.sampling_ratio)
    values = values.to(d, non_blocking=True)
    finite_values = torch.isfinite(values)
    values = torch.where(finite_values, values, 0.0)
    cls_target, token_target = targets_from_weights(
        values, indices.to(d, non_blocking=True), weights.to(d, non_blocking=True), o.num_classes, o.smoothing)
    return cls_target, token_target, finite_values.all()


__all__ = ["STEP_STATS", "Objective", "PlainEngine", "micro_batch_loss", "train_step"]
