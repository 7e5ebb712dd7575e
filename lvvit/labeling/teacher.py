"""Dense teachers: modules that map images ``[B, 3, H, W]`` to class logits ``[B, C, h, w]``.

Token labeling needs a score for every location, not one per image, so a classifier
is turned into a dense one by applying its final linear layer at every location of
its last feature map (what the official NFNet-F6 maps did) or, for an LV-ViT, by
reading its aux head on the patch tokens. Any other ``nn.Module`` with that output
shape can be plugged in through ``"package.module:factory"``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lvvit.errors import LvvitError
from lvvit.labeling.smallcnn import load_small_cnn
from lvvit.models import LVViT, list_models, model_from_checkpoint, read_checkpoint


class DenseCNNTeacher(nn.Module):
    """A CNN classifier made dense: ``fc`` applied as a 1x1 conv on the pre-pool features.

    For a network trained with global average pooling followed by ``fc``, the mean of
    this map over locations equals the image logits, so each location's scores are
    that location's contribution to the decision.
    """

    def __init__(self, features: nn.Module, fc: nn.Linear) -> None:
        super().__init__()
        self.features = features
        self.fc = fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.features(x)
        weight = self.fc.weight[:, :, None, None].to(feats.dtype)
        bias = None if self.fc.bias is None else self.fc.bias.to(feats.dtype)
        return F.conv2d(feats, weight, bias)


class LVViTDenseTeacher(nn.Module):
    """An LV-ViT's aux head on its patch tokens, laid out on the token grid."""

    def __init__(self, model: LVViT) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patch = self.model.cfg.patch_size
        h, w = x.shape[-2] // patch, x.shape[-1] // patch
        tokens = self.model.forward_features(x)[:, 1:]
        logits = self.model.aux_head(tokens)
        return logits.transpose(1, 2).reshape(x.shape[0], -1, h, w)


TeacherFactory = Callable[..., nn.Module]


def _lvvit_teacher(name: str) -> TeacherFactory:
    def build(checkpoint: str | Path, img_size: int, **kwargs: Any) -> nn.Module:
        # The file's classifier sets the class count (a re-initialised head would label noise);
        # its pos_embed is resized to the labeling resolution on load.
        model = model_from_checkpoint(name, read_checkpoint(checkpoint), img_size=img_size, **kwargs)
        return LVViTDenseTeacher(model)

    return build


def _small_cnn_teacher(checkpoint: str | Path, img_size: int, **kwargs: Any) -> nn.Module:
    model = load_small_cnn(checkpoint, **kwargs)
    return DenseCNNTeacher(model.features, model.fc)


TEACHERS: dict[str, TeacherFactory] = {name: _lvvit_teacher(name) for name in list_models()}
TEACHERS["smallcnn"] = _small_cnn_teacher


def _import_factory(spec: str) -> TeacherFactory:
    module_name, _, attr = spec.partition(":")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot import teacher factory {spec!r}: {e}") from e


def build_teacher(
    name: str, checkpoint: str | Path, img_size: int, **kwargs: Any
) -> nn.Module:
    """A dense teacher in eval mode with weights from a local file; nothing is downloaded.

    ``name`` is a built-in (``lvvit_t/s/m/l``, ``smallcnn``) or ``"package.module:factory"``,
    a callable taking ``(checkpoint, img_size, **kwargs)`` and returning a module whose
    output is ``[B, C, h, w]``; ``kwargs`` are architecture overrides (``--teacher-args``).
    """
    if not Path(checkpoint).is_file():
        raise FileNotFoundError(f"teacher checkpoint {checkpoint} does not exist")
    if name in TEACHERS:
        factory = TEACHERS[name]
    elif ":" in name:
        factory = _import_factory(name)
    else:
        raise ValueError(
            f"unknown teacher {name!r}; choose one of {', '.join(sorted(TEACHERS))} "
            "or give 'package.module:factory'"
        )
    return factory(checkpoint=checkpoint, img_size=img_size, **kwargs).eval()


class TeacherOutputError(LvvitError, ValueError):
    """A teacher whose output cannot be labels for this dataset; the message names its file."""


def check_logits(logits: torch.Tensor, num_classes: int | None, where: str) -> None:
    """Finite float logits with ``num_classes`` classes on dim 1 (when known).

    Anything else would label silently and fail in training at step 1 (indices out of
    range) or train on NaN, after the whole labeling job: refused on the first batch.
    """
    if not logits.is_floating_point():
        raise TeacherOutputError(f"{where}: the teacher's output is {logits.dtype}, not float logits")
    if logits.ndim < 2:
        raise TeacherOutputError(f"{where}: the teacher's output has shape {list(logits.shape)}, no class dimension")
    if num_classes is not None and logits.shape[1] != num_classes:
        raise TeacherOutputError(
            f"{where}: the teacher's output has {logits.shape[1]} classes, the dataset has {num_classes}"
        )
    bad = int((~torch.isfinite(logits)).sum())
    if bad:
        raise TeacherOutputError(f"{where}: the teacher's output holds {bad} NaN or infinite values of {logits.numel()}")


def dense_topk(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of dense logits ``[B, C, h, w]`` over classes, best first: fp16 values, uint16-ready indices."""
    if logits.ndim != 4:
        raise ValueError(f"a dense teacher must return [B, C, h, w], got shape {tuple(logits.shape)}")
    num_classes = logits.shape[1]
    if num_classes > 65536:
        raise ValueError(f"{num_classes} classes do not fit uint16 indices")
    if not 0 < k <= num_classes:
        raise ValueError(f"top-k {k} must be in 1..{num_classes} (the teacher's class count)")
    values, indices = logits.float().topk(k, dim=1)
    return values.half(), indices
