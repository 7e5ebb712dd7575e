"""The model to export: architecture from flags (or the checkpoint's own record), weights
from an official TokenLabeling file, our consolidated fp32 file, or a DeepSpeed folder."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from lvvit.models import LVViT, LVViTConfig, model_from_checkpoint
from lvvit.models.checkpoint import Checkpoint, CheckpointError, ClassCountMismatch, read_checkpoint

from .errors import ExportError

ARCH_FIELDS = {f.name for f in fields(LVViTConfig)} - {"img_size", "num_classes"}


@dataclass
class ModelSpec:
    """What to build: variant name, input size, classes and architecture overrides."""

    name: str = "lvvit_s"
    img_size: int = 224
    num_classes: int | None = None
    """``None``: the checkpoint's head decides (1000 without a checkpoint)."""
    overrides: dict[str, Any] = field(default_factory=dict)


def is_deepspeed_checkpoint(path: Path) -> bool:
    """A DeepSpeed save folder (with ``latest``) or one of its tag folders."""
    return path.is_dir() and (
        (path / "latest").is_file() or any(path.glob("*model_states.pt"))
    )


def consolidate_deepspeed(path: Path, out: Path) -> Path:
    """Gather a DeepSpeed checkpoint into one fp32 file (our layout, EMA included when saved).

    ``path`` is the folder DeepSpeed saved into (its ``latest`` tag is used) or a tag folder.
    """
    from lvvit.train.checkpointing import consolidate

    directory, tag = (path, None) if (path / "latest").is_file() else (path.parent, path.name)
    try:
        return consolidate(directory, tag, out)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise ExportError(f"{path}: cannot consolidate the DeepSpeed checkpoint: {err}") from err


def read_weights(path: Path, use_ema: bool = False) -> Checkpoint:
    """The weights file, read once as data: its tensors and recorded ``model_args`` (empty
    for official files) decide the spec and fill the model."""
    try:
        return read_checkpoint(path, use_ema=use_ema)
    except (CheckpointError, FileNotFoundError) as err:
        raise ExportError(str(err)) from err


def spec_from_model_args(model_args: dict[str, Any]) -> dict[str, Any]:
    """The ``ModelSpec`` fields implied by the ``model_args`` that training records
    (``{"name", "img_size", "num_classes", **architecture overrides}``)."""
    spec: dict[str, Any] = {}
    name = model_args.get("model", model_args.get("name"))
    if isinstance(name, str):
        spec["name"] = name
    for key in ("img_size", "num_classes"):
        if isinstance(model_args.get(key), int):
            spec[key] = model_args[key]
    arch = {k: v for k, v in model_args.items() if k in ARCH_FIELDS and k != "drop_path_rate"}
    if arch:
        spec["overrides"] = arch
    return spec


@contextmanager
def weights_file(checkpoint: Path) -> Iterator[Path]:
    """A single weights file for ``checkpoint``; DeepSpeed folders are consolidated into a
    temporary file that lives as long as the context."""
    if not is_deepspeed_checkpoint(checkpoint):
        if checkpoint.is_dir():
            raise ExportError(
                f"{checkpoint}: a folder but not a DeepSpeed checkpoint (no 'latest' file and no "
                "*model_states.pt); pass the DeepSpeed save folder, a tag folder, or a weights file"
            )
        yield checkpoint
        return
    with tempfile.TemporaryDirectory(prefix="lvvit-export-") as tmp:
        yield consolidate_deepspeed(checkpoint, Path(tmp) / "weights.pth")


def build_model(spec: ModelSpec, checkpoint: Checkpoint | None) -> LVViT:
    """The eval-mode model with the weights of ``checkpoint`` (random weights without one).

    A class-count mismatch is an error here, not a head re-initialisation: an exported
    model with a random classifier would serve nonsense that still looks plausible.
    """
    unknown = set(spec.overrides) - ARCH_FIELDS
    if unknown:
        raise ExportError(
            f"unknown model argument(s) {', '.join(sorted(unknown))}; "
            f"valid: {', '.join(sorted(ARCH_FIELDS))}"
        )
    try:
        model = model_from_checkpoint(spec.name, checkpoint, img_size=spec.img_size,
                                      num_classes=spec.num_classes, drop_path_rate=0.0,
                                      **spec.overrides)
    except ClassCountMismatch as err:
        raise ExportError(f"{err}; export with --num-classes {err.found}") from err
    except CheckpointError as err:
        raise ExportError(str(err)) from err
    except (ValueError, TypeError) as err:
        raise ExportError(f"cannot build {spec.name}: {err}") from err
    return model.eval()
