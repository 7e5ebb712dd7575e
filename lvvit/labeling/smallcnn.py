"""A small CNN teacher for demos and tests (e.g. sklearn digits upscaled to 64-128 px).

Trained as a plain classifier (global average pooling, then ``fc``); at labeling time
``fc`` runs at every location of ``features`` (see ``DenseCNNTeacher``), giving a
score map with stride ``2 ** len(widths)``. The labeler feeds RGB crops normalised by
``lvvit.data.decode.normalize`` (ImageNet mean/std), so train it on the same.

Checkpoint format (``save_small_cnn``): a ``torch.save`` dict holding only tensors and
plain values, so it loads with ``weights_only=True``::

    {"arch": "smallcnn", "config": {"num_classes": 10, "in_chans": 3, "widths": [32, 64, 128]},
     "state_dict": {...}}
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lvvit import atomic


@dataclass(frozen=True)
class SmallCNNConfig:
    num_classes: int = 10
    in_chans: int = 3
    widths: tuple[int, ...] = field(default=(32, 64, 128))


def _stage(cin: int, cout: int) -> nn.Sequential:
    """Stride-2 conv then a 3x3 conv, each with BN and ReLU."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class SmallCNN(nn.Module):
    def __init__(self, cfg: SmallCNNConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg or SmallCNNConfig()
        chans = (self.cfg.in_chans, *self.cfg.widths)
        self.features = nn.Sequential(*(_stage(a, b) for a, b in pairwise(chans)))
        self.fc = nn.Linear(chans[-1], self.cfg.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean(dim=(2, 3)))


def save_small_cnn(model: SmallCNN, path: str | Path) -> None:
    """Write weights and architecture together, so the labeler needs no extra flags."""
    config = asdict(model.cfg)
    config["widths"] = list(config["widths"])
    torch.save({"arch": "smallcnn", "config": config, "state_dict": model.state_dict()}, path)


def load_small_cnn(path: str | Path, **overrides: Any) -> SmallCNN:
    """Build from a ``save_small_cnn`` file (or a bare state dict plus ``overrides``)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if "state_dict" in ckpt:
        if ckpt.get("arch", "smallcnn") != "smallcnn":
            raise ValueError(f"{path} holds a {ckpt['arch']!r} checkpoint, not a smallcnn")
        config, state = dict(ckpt.get("config", {})), ckpt["state_dict"]
    else:
        config, state = {}, ckpt
    config.update(overrides)
    if "widths" in config:
        config["widths"] = tuple(config["widths"])
    cfg = replace(SmallCNNConfig(), **config)
    model = SmallCNN(cfg)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{path} does not match SmallCNN{cfg}: {e}") from e
    return model


def export_small_cnn_onnx(checkpoint: str | Path, out: str | Path, img_size: int) -> None:
    """The saved SmallCNN as the plain classifier it was trained as (``[B, C]`` logits) in
    ONNX, batch dynamic and input ``img_size`` fixed: what a user's own exported teacher
    looks like, so ``lvvit-label --teacher onnx:`` makes it dense itself."""
    model = load_small_cnn(checkpoint).eval()
    example = torch.zeros(2, model.cfg.in_chans, img_size, img_size)
    with atomic.atomic_path(Path(out)) as tmp:
        torch.onnx.export(
            model, (example,), str(tmp), dynamo=True, external_data=False, input_names=["images"],
            output_names=["logits"], dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False,
        )
