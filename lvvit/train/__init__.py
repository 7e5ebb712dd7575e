"""DeepSpeed ZeRO training with token labeling, EMA, per-step schedules and MLflow tracking.

``main`` is the command line of ``train.py``; heavy imports (DeepSpeed, MLflow) happen
when a run starts, so ``--help`` and the schedule/config helpers stay light.
"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> None:
    from lvvit.train.cli import main as cli_main

    cli_main(argv)


__all__ = ["main"]
