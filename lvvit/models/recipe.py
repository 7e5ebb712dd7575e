"""The official training and evaluation recipe of each LV-ViT variant, beside the
architectures (``lvvit.models.MODEL_CONFIGS``), as timm keeps a ``_cfg`` per model.

One frozen :class:`Recipe` per variant holds what the TokenLabeling recipe fixes for it:
the base learning rate at global batch 1024 (scaled linearly to the run's batch), the
RandAugment setting, stochastic depth, the eval crop fraction and the normalisation. The
recipe-wide values (optimizer, schedule, regularisation, EMA) are the dataclass defaults,
equal to the defaults of ``train.py``'s options. Look one up with :func:`recipe_for`.
"""

from __future__ import annotations

from dataclasses import dataclass

from lvvit.data.decode import IMAGENET_MEAN, IMAGENET_STD

REFERENCE_BATCH = 1024
"""The global batch the base learning rates are given at (official: 8 GPUs x 128)."""


@dataclass(frozen=True)
class Recipe:
    """What the official recipe fixes for one variant (TokenLabeling @ 9dbfd59, arXiv 2104.10858).

    ``base_lr`` is AdamW's peak rate at a global batch of :data:`REFERENCE_BATCH`;
    :meth:`lr_at` scales it linearly. ``drop_path_rate`` is the stochastic depth of the last
    block (linear from 0 over the depth); ``crop_pct`` the eval resize: shorter side to
    ``floor(size / crop_pct)``, then a centre crop. RandAugment is timm's
    ``rand-m{magnitude}-mstd{mstd}-inc1`` with ``randaug_ops`` ops per image.
    """

    base_lr: float = 1.6e-3
    randaug_ops: int = 2
    randaug_magnitude: int = 9
    randaug_mstd: float = 0.5
    drop_path_rate: float = 0.1
    crop_pct: float = 0.9
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    weight_decay: float = 0.05
    epochs: int = 300
    cooldown_epochs: int = 10
    warmup_epochs: float = 5
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5
    reprob: float = 0.25
    smoothing: float = 0.1
    ema_decay: float = 0.99992

    def lr_at(self, global_batch: int) -> float:
        """The peak rate at ``global_batch``: ``base_lr`` scaled linearly from 1024 images."""
        return self.base_lr * global_batch / REFERENCE_BATCH


RECIPES: dict[str, Recipe] = {
    "lvvit_t": Recipe(drop_path_rate=0.1, crop_pct=0.9),
    "lvvit_s": Recipe(drop_path_rate=0.1, crop_pct=0.9),
    "lvvit_m": Recipe(drop_path_rate=0.2, crop_pct=1.0),
    "lvvit_l": Recipe(base_lr=1e-3, randaug_ops=3, drop_path_rate=0.3, crop_pct=1.0),
}
"""Per variant: the official rates (1e-3 for L), RandAugment ops (3 for L), stochastic
depth and eval crop. The architectures in ``MODEL_CONFIGS`` take their default
``drop_path_rate`` and ``crop_pct`` from here."""


def recipe_for(name: str) -> Recipe:
    """The official recipe of the variant ``name`` (``lvvit_t`` ... ``lvvit_l``)."""
    try:
        return RECIPES[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(sorted(RECIPES))}") from None


__all__ = ["RECIPES", "REFERENCE_BATCH", "Recipe", "recipe_for"]
