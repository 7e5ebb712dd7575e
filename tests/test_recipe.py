"""The per-variant recipe table (``lvvit.models.recipe_for``): today's values, one source."""

from __future__ import annotations

import dataclasses

import pytest

from lvvit.data.decode import IMAGENET_MEAN, IMAGENET_STD
from lvvit.loader.transforms import RandAugment
from lvvit.models import MODEL_CONFIGS, RECIPES, Recipe, list_models, model_config, recipe_for

# variant: (base lr per 1024, RandAugment ops, drop path, eval crop_pct), as the code used them
EXPECTED = {
    "lvvit_t": (1.6e-3, 2, 0.1, 0.9),
    "lvvit_s": (1.6e-3, 2, 0.1, 0.9),
    "lvvit_m": (1.6e-3, 2, 0.2, 1.0),
    "lvvit_l": (1e-3, 3, 0.3, 1.0),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_variant_recipe_equals_todays_values(name):
    recipe = recipe_for(name)
    base_lr, ops, drop_path, crop = EXPECTED[name]
    assert (recipe.base_lr, recipe.randaug_ops, recipe.drop_path_rate, recipe.crop_pct) == (
        base_lr, ops, drop_path, crop)
    assert (recipe.randaug_magnitude, recipe.randaug_mstd) == (9, 0.5)
    assert recipe.mean == IMAGENET_MEAN and recipe.std == IMAGENET_STD
    assert (recipe.weight_decay, recipe.epochs, recipe.cooldown_epochs, recipe.warmup_epochs) == (0.05, 300, 10, 5)
    assert (recipe.warmup_lr, recipe.min_lr, recipe.reprob, recipe.smoothing, recipe.ema_decay) == (
        1e-6, 1e-5, 0.25, 0.1, 0.99992)


def test_every_model_has_a_recipe_and_its_config_takes_drop_path_and_crop_from_it():
    assert sorted(RECIPES) == list_models()
    for name, cfg in MODEL_CONFIGS.items():
        recipe = recipe_for(name)
        assert (cfg.drop_path_rate, cfg.crop_pct) == (recipe.drop_path_rate, recipe.crop_pct)
        assert model_config(name, drop_path_rate=0.0).drop_path_rate == 0.0  # still overridable


def test_recipe_is_frozen_and_unknown_names_are_refused():
    with pytest.raises(dataclasses.FrozenInstanceError):
        recipe_for("lvvit_s").base_lr = 1.0  # type: ignore[misc]
    with pytest.raises(ValueError, match=r"unknown model 'vit_b'.*lvvit_l"):
        recipe_for("vit_b")
    assert isinstance(recipe_for("lvvit_t"), Recipe)


@pytest.mark.parametrize(("name", "global_batch", "lr"), [
    ("lvvit_s", 1024, 1.6e-3), ("lvvit_s", 256, 4e-4), ("lvvit_t", 2048, 3.2e-3), ("lvvit_l", 512, 5e-4),
    ("lvvit_l", 1024, 1e-3),
])
def test_peak_lr_scales_the_base_rate_linearly_from_1024(name, global_batch, lr):
    assert recipe_for(name).lr_at(global_batch) == pytest.approx(lr, rel=1e-12)


def test_recipe_agrees_with_the_randaugment_defaults():
    plain, recipe = RandAugment(), recipe_for("lvvit_s")
    assert (plain.num_ops, plain.magnitude, plain.magnitude_std) == (
        recipe.randaug_ops, recipe.randaug_magnitude, recipe.randaug_mstd)
