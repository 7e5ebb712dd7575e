"""LV-ViT variants by name: ``create_model("lvvit_s", img_size=384, checkpoint=...)``, each
variant's official recipe (``recipe_for("lvvit_s")``) and its analytic training FLOPs."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from lvvit.models.checkpoint import (
    Checkpoint,
    CheckpointError,
    ClassCountMismatch,
    load_checkpoint,
    load_weights,
    read_checkpoint,
    read_state_dict,
    resize_pos_embed,
)
from lvvit.models.flops import forward_flops_per_image, train_flops_per_image
from lvvit.models.lvvit import LVViT, LVViTConfig
from lvvit.models.recipe import RECIPES, REFERENCE_BATCH, Recipe, recipe_for


def _variant(name: str, **arch) -> LVViTConfig:
    """An architecture with its recipe's default stochastic depth and eval crop."""
    recipe = RECIPES[name]
    return LVViTConfig(**arch, drop_path_rate=recipe.drop_path_rate, crop_pct=recipe.crop_pct)


MODEL_CONFIGS: dict[str, LVViTConfig] = {
    "lvvit_t": _variant("lvvit_t", embed_dim=240, depth=12, num_heads=4, skip_lam=1.0),
    "lvvit_s": _variant("lvvit_s", embed_dim=384, depth=16, num_heads=6, skip_lam=2.0),
    "lvvit_m": _variant("lvvit_m", embed_dim=512, depth=20, num_heads=8, skip_lam=2.0),
    "lvvit_l": _variant("lvvit_l", embed_dim=768, depth=24, num_heads=12, skip_lam=3.0, stem_width=128),
}
"""The architectures; the training and eval recipe of each is ``RECIPES`` (:func:`recipe_for`)."""


def list_models() -> list[str]:
    return sorted(MODEL_CONFIGS)


def model_config(name: str, **overrides) -> LVViTConfig:
    """The named variant's config with any field replaced (e.g. ``depth=2`` for tests)."""
    if name not in MODEL_CONFIGS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(list_models())}")
    return replace(MODEL_CONFIGS[name], **{k: v for k, v in overrides.items() if v is not None})


def create_model(
    name: str,
    img_size: int = 224,
    num_classes: int = 1000,
    drop_path_rate: float | None = None,
    checkpoint: str | Path | None = None,
    use_ema: bool = False,
    mix_generator: torch.Generator | None = None,
    **overrides,
) -> LVViT:
    """Build a variant; with ``checkpoint``, load weights from it (official or ours).

    ``overrides`` replace architecture fields (``embed_dim``, ``depth``, ``num_heads``,
    ``stem_width``, ``mix_token`` ...), which is how tests and the demo get tiny models.
    """
    cfg = model_config(
        name, img_size=img_size, num_classes=num_classes, drop_path_rate=drop_path_rate, **overrides
    )
    model = LVViT(cfg, mix_generator=mix_generator)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint, use_ema=use_ema)
    return model


def model_from_checkpoint(
    name: str,
    checkpoint: Checkpoint | None,
    img_size: int = 224,
    num_classes: int | None = None,
    keep_classes: bool = True,
    **kwargs,
) -> LVViT:
    """The one way every stage turns a checkpoint it has read into a model: training
    (``--finetune``, ``--eval-only``), export and the labeling teacher.

    ``num_classes=None`` lets the file's classifier decide (1000 without a checkpoint). With
    ``keep_classes`` a file whose class count differs is a ``ClassCountMismatch``: a model
    that is evaluated, exported or asked for labels with re-initialised heads gives
    plausible-looking nonsense. Without it (fine-tuning to a new label set) the heads are
    re-initialised. ``kwargs`` go to ``create_model`` (architecture overrides, drop path).
    """
    found = checkpoint.num_classes if checkpoint is not None else None
    wanted = num_classes or found or 1000
    if keep_classes and found is not None and found != wanted:
        raise ClassCountMismatch(checkpoint.path, found, wanted)
    model = create_model(name, img_size=img_size, num_classes=wanted, **kwargs)
    if checkpoint is not None:
        load_weights(model, checkpoint)
    return model


__all__ = [
    "MODEL_CONFIGS",
    "RECIPES",
    "REFERENCE_BATCH",
    "Checkpoint",
    "CheckpointError",
    "ClassCountMismatch",
    "LVViT",
    "LVViTConfig",
    "Recipe",
    "create_model",
    "forward_flops_per_image",
    "list_models",
    "load_checkpoint",
    "load_weights",
    "model_config",
    "model_from_checkpoint",
    "read_checkpoint",
    "read_state_dict",
    "recipe_for",
    "resize_pos_embed",
    "train_flops_per_image",
]
