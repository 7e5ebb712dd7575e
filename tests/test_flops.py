"""The analytic FLOPs of an LV-ViT (``lvvit.models.train_flops_per_image``) against a
measured count: ``torch.utils.flop_counter.FlopCounterMode`` on tiny models, forward and
forward + backward, under the math attention backend (the fused CPU kernel is not counted)."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from lvvit.models import create_model, forward_flops_per_image, model_config, train_flops_per_image
from lvvit.models.flops import block_flops

TINY = [
    {"embed_dim": 48, "depth": 2, "num_heads": 2, "stem_width": 16, "img_size": 64, "num_classes": 10},
    {"embed_dim": 64, "depth": 3, "num_heads": 4, "stem_width": 8, "img_size": 96, "num_classes": 7,
     "mlp_ratio": 4.0, "patch_size": 8},
]


def measured(model: torch.nn.Module, images: torch.Tensor, train: bool) -> float:
    """FLOPs per image counted by torch."""
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter:
        if train:
            cls, aux, _ = model.train()(images)
            (cls.sum() + aux.sum()).backward()
        else:
            with torch.no_grad():
                model.eval()(images)
    return counter.get_total_flops() / images.shape[0]


@pytest.mark.parametrize("arch", TINY)
def test_analytic_flops_match_the_flop_counter(arch):
    torch.manual_seed(0)
    model = create_model("lvvit_t", mix_token=False, drop_path_rate=0.0, **arch)
    images = torch.randn(2, 3, arch["img_size"], arch["img_size"])
    assert forward_flops_per_image(model.cfg) == pytest.approx(measured(model, images, train=False), rel=0.02)
    assert train_flops_per_image(model.cfg) == pytest.approx(measured(model, images, train=True), rel=0.02)


def test_mix_token_and_drop_path_add_no_matmul_flops():
    arch = TINY[0]
    torch.manual_seed(0)
    model = create_model("lvvit_t", drop_path_rate=0.3, **arch)
    images = torch.randn(4, 3, arch["img_size"], arch["img_size"])
    assert train_flops_per_image(model.cfg) == pytest.approx(measured(model, images, train=True), rel=0.02)


def test_recompute_counts_the_blocks_forward_again():
    cfg = model_config("lvvit_s")
    assert train_flops_per_image(cfg, recompute=True) - train_flops_per_image(cfg) == cfg.depth * block_flops(cfg)


def test_real_variants_match_the_published_size():
    """LV-ViT-S @224 is 6.6 G multiply-adds per image in the paper."""
    cfg = model_config("lvvit_s")
    assert forward_flops_per_image(cfg) / 2 == pytest.approx(6.6e9, rel=0.01)
    # the image size argument wins over the config's, and is checked against the patch size
    assert forward_flops_per_image(cfg, 384) == forward_flops_per_image(model_config("lvvit_s", img_size=384))
    with pytest.raises(ValueError, match="multiple of patch_size"):
        train_flops_per_image(cfg, 230)
