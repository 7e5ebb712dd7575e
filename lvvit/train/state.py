"""Where a run is, as one object the checkpoint saves and a resume restores.

``TrainState`` follows torch.distributed.checkpoint's ``Stateful`` protocol
(``state_dict``/``load_state_dict``); its dict is our part (``lvvit``) of DeepSpeed's
client state, beside the MLflow run id and the model's arguments. The optimizer step is
DeepSpeed's (``engine.global_steps``, restored with the engine); the state keeps a copy so
the checkpoint reads whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Stateful(Protocol):
    """What a checkpoint saves and restores (torch.distributed.checkpoint's protocol)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class GlobalBatchMismatch(ValueError):
    """A checkpoint trained at another global batch: its lr schedule and epoch positions
    count steps of that batch, so resuming would silently train another recipe."""


@dataclass
class TrainState:
    """Optimizer steps completed (``step``), the epoch, steps completed in it, the global
    batch those steps were taken at (``None`` when nothing is trained, as under
    ``--eval-only``: any checkpoint's is taken), and under ``--sampling epoch`` every rank's
    loader position (``lvvit.loader.pipeline.BatchLoader.position``), rank by rank."""

    global_batch: int | None
    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    data_positions: list[dict[str, Any]] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                "global_batch": self.global_batch, "data_positions": self.data_positions}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from a checkpoint's dict; one saved at another global batch is refused
        (``GlobalBatchMismatch``) before anything changes. Checkpoints from before the
        global batch was recorded carry none and are taken as they are."""
        saved = state.get("global_batch")
        if saved is not None and self.global_batch is not None and saved != self.global_batch:
            raise GlobalBatchMismatch(
                f"the checkpoint was trained at global batch {saved}, this run's is {self.global_batch}; "
                f"resume with micro batch x grad accum x ranks = {saved} (--micro-batch, --grad-accum)")
        self.step = int(state.get("step", 0))
        self.epoch = int(state.get("epoch", 0))
        self.step_in_epoch = int(state.get("step_in_epoch", 0))
        positions = state.get("data_positions")
        self.data_positions = positions if isinstance(positions, list) and all(
            isinstance(p, dict) for p in positions) else None

    def advance(self, step: int, steps_per_epoch: int) -> bool:
        """One optimizer step done (``step`` is the engine's count); whether it ended the epoch."""
        self.step = step
        self.step_in_epoch += 1
        return self.step_in_epoch == steps_per_epoch

    def next_epoch(self) -> None:
        self.epoch += 1
        self.step_in_epoch = 0


__all__ = ["GlobalBatchMismatch", "Stateful", "TrainState"]
