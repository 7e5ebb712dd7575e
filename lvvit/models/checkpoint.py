"""Loading official and our checkpoints into LV-ViT (implemented under issue 2)."""

from __future__ import annotations

from pathlib import Path

from torch import nn


def load_checkpoint(model: nn.Module, path: str | Path, use_ema: bool = False) -> None:
    raise NotImplementedError("being written")
