"""Learning-rate schedule of the official recipe, evaluated per optimizer step.

The official script (timm ``CosineLRScheduler``, ``warmup_prefix=False``) changes the
rate once per epoch: linear warmup from ``warmup_lr`` for ``warmup_epochs``, a cosine
from ``lr`` to ``min_lr`` whose clock starts at step 0 and spans ``epochs``, then
``cooldown_epochs`` at ``min_lr``. We evaluate the same curve at fractional epochs so
the rate moves every step: no jump of 1/300 of the range at each epoch boundary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class WarmupCosineSchedule:
    """``lr(step)``; an object rather than a closure so ``LambdaLR.state_dict`` keeps it."""

    lr: float
    min_lr: float
    warmup_lr: float
    warmup_epochs: float
    epochs: float
    steps_per_epoch: int

    def lr_at(self, step: int) -> float:
        t = step / self.steps_per_epoch
        if t < self.warmup_epochs:
            return self.warmup_lr + (self.lr - self.warmup_lr) * t / self.warmup_epochs
        if t >= self.epochs:
            return self.min_lr
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1.0 + math.cos(math.pi * t / self.epochs))

    def __call__(self, step: int) -> float:
        """Factor on the optimizer's base rate, the form ``torch.optim.lr_scheduler.LambdaLR`` wants."""
        return self.lr_at(step) / self.lr
