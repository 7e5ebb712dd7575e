"""The validator: the weights' and the EMA's eval on the eval shards, as ``eval/*`` and
``eval_ema/*``. Every rank takes part (``lvvit.train.evaluate``)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from lvvit.train.ema import ModelEma
from lvvit.train.evaluate import evaluate

Batches = Iterable[dict[str, torch.Tensor]]


class Validator:
    """Evaluates ``model`` (and ``ema``, swapped in for its own pass) on fresh eval batches
    from ``batches()``, each pass with its own loader."""

    def __init__(self, model: nn.Module, ema: ModelEma | None, batches: Callable[[], Batches],
                 device: torch.device, dtype: torch.dtype) -> None:
        self.model = model
        self.ema = ema
        self.batches = batches
        self.device = device
        self.dtype = dtype

    def __call__(self) -> dict[str, float]:
        """Collective: ``eval/*`` for the weights, ``eval_ema/*`` for the EMA."""
        metrics = {f"eval/{k}": v for k, v in self.evaluate().items()}
        if self.ema is not None:
            with self.ema.applied():
                metrics.update({f"eval_ema/{k}": v for k, v in self.evaluate().items()})
        return metrics

    def evaluate(self) -> dict[str, float]:
        return evaluate(self.model, self.batches(), self.device, self.dtype)


__all__ = ["Validator"]
