"""Token-labeling loss formulas on hand-computable cases, and gradients through a real model."""

from __future__ import annotations

import math

import pytest
import torch

from lvvit.loader.targets import build_token_targets
from lvvit.models import create_model
from lvvit.models.lvvit import box_mask
from lvvit.train.loss import (
    LossParts,
    TokenLabelingLoss,
    blend_ground_truth,
    mix_token_lam,
    smoothed_one_hot,
)


def _logits(*probs: list[float]) -> torch.Tensor:
    """Logits whose softmax is exactly ``probs``: log-probabilities."""
    return torch.tensor(probs).log()


def _ce(target: list[float], probs: list[float]) -> float:
    return -sum(t * math.log(p) for t, p in zip(target, probs, strict=True))


def test_smoothed_one_hot_values():
    target = smoothed_one_hot(torch.tensor([2, 0]), 4, smoothing=0.2)
    assert torch.allclose(
        target, torch.tensor([[0.05, 0.05, 0.85, 0.05], [0.85, 0.05, 0.05, 0.05]])
    )
    assert target.dtype == torch.float32


def test_plain_label_fallback_by_hand():
    """No maps: both heads learn the smoothed one-hot label; weights scale the parts."""
    cls = _logits([0.75, 0.25])
    aux = _logits([[0.5, 0.5], [0.25, 0.75]])
    loss_fn = TokenLabelingLoss(cls_weight=1.0, dense_weight=0.5, smoothing=0.1)
    parts = loss_fn((cls, aux, None), torch.tensor([0]))
    target = [0.95, 0.05]  # 1 - 0.1 + 0.1 / 2, 0.1 / 2
    cls_loss = _ce(target, [0.75, 0.25])
    aux_loss = (_ce(target, [0.5, 0.5]) + _ce(target, [0.25, 0.75])) / 2
    assert isinstance(parts, LossParts)
    assert parts.cls_loss.item() == pytest.approx(cls_loss, rel=1e-6)
    assert parts.aux_loss.item() == pytest.approx(aux_loss, rel=1e-6)
    assert parts.loss.item() == pytest.approx(cls_loss + 0.5 * aux_loss, rel=1e-6)


def test_mix_token_mixes_only_the_class_target():
    """Box of 1 token on a 2x2 grid: lam = 0.75 for the class target, tokens untouched."""
    assert mix_token_lam(box_mask((0, 0, 1, 1), 2, 2)).item() == 0.75
    assert mix_token_lam(box_mask((1, 0, 3, 2), 4, 4)).item() == 0.75
    probs = [[0.5, 0.25, 0.25], [0.2, 0.2, 0.6]]
    cls = _logits(*probs)
    aux = _logits([[0.5, 0.25, 0.25]] * 4, [[0.2, 0.2, 0.6]] * 4)
    cls_target = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    token_target = torch.tensor([[[0.6, 0.3, 0.1]] * 4, [[0.0, 0.5, 0.5]] * 4])
    parts = TokenLabelingLoss()(
        (cls, aux, box_mask((0, 0, 1, 1), 2, 2)), torch.tensor([0, 2]), cls_target, token_target
    )
    mixed = [[0.55, 0.175, 0.275], [0.25, 0.125, 0.625]]  # 0.75 * own + 0.25 * other sample's
    cls_loss = (_ce(mixed[0], probs[0]) + _ce(mixed[1], probs[1])) / 2
    aux_loss = (_ce([0.6, 0.3, 0.1], probs[0]) + _ce([0.0, 0.5, 0.5], probs[1])) / 2
    assert parts.cls_loss.item() == pytest.approx(cls_loss, rel=1e-6)
    assert parts.aux_loss.item() == pytest.approx(aux_loss, rel=1e-6)
    assert parts.loss.item() == pytest.approx(cls_loss + aux_loss, rel=1e-6)
    # An empty box leaves the class target alone.
    unmixed = TokenLabelingLoss()(
        (cls, aux, box_mask((1, 1, 1, 2), 2, 2)), torch.tensor([0, 2]), cls_target, token_target
    )
    assert unmixed.cls_loss.item() == pytest.approx(
        (_ce([0.7, 0.2, 0.1], probs[0]) + _ce([0.1, 0.1, 0.8], probs[1])) / 2, rel=1e-6
    )


def test_ground_truth_blend_both_ratios():
    teacher = torch.tensor([[0.6, 0.3, 0.1], [0.6, 0.3, 0.1]])
    one_hot = smoothed_one_hot(torch.tensor([0, 2]), 3, smoothing=0.0)
    blended = blend_ground_truth(teacher, one_hot, torch.tensor([0, 2]))
    # Sample 0: teacher agrees with label 0 -> ratio 0.5; sample 1: label 2 -> ratio 0.9.
    assert torch.allclose(blended, torch.tensor([[0.8, 0.15, 0.05], [0.54, 0.27, 0.19]]))


def test_ground_truth_blend_comes_before_mixing():
    probs = [[0.5, 0.25, 0.25], [0.2, 0.2, 0.6]]
    cls, aux = _logits(*probs), _logits([[1 / 3] * 3] * 4, [[1 / 3] * 3] * 4)
    teacher = torch.tensor([[0.6, 0.3, 0.1], [0.6, 0.3, 0.1]])
    tokens = torch.full((2, 4, 3), 1 / 3)
    loss_fn = TokenLabelingLoss(smoothing=0.0, ground_truth=True)
    parts = loss_fn((cls, aux, box_mask((0, 0, 1, 1), 2, 2)), torch.tensor([0, 2]), teacher, tokens)
    blended = [[0.8, 0.15, 0.05], [0.54, 0.27, 0.19]]
    mixed = [
        [0.75 * a + 0.25 * b for a, b in zip(blended[i], blended[1 - i], strict=True)]
        for i in (0, 1)
    ]
    expected = (_ce(mixed[0], probs[0]) + _ce(mixed[1], probs[1])) / 2
    assert parts.cls_loss.item() == pytest.approx(expected, rel=1e-6)
    # Without the flag the teacher target is used as is.
    plain = TokenLabelingLoss(smoothing=0.0)(
        (cls, aux, None), torch.tensor([0, 2]), teacher, tokens
    )
    assert plain.cls_loss.item() == pytest.approx(
        (_ce([0.6, 0.3, 0.1], probs[0]) + _ce([0.6, 0.3, 0.1], probs[1])) / 2, rel=1e-6
    )


def test_gradient_is_softmax_minus_target():
    """d(loss)/d(logits) = weight * (softmax - target) / count, for both heads."""
    gen = torch.Generator().manual_seed(0)
    cls = torch.randn(4, 5, generator=gen, requires_grad=True)
    aux = torch.randn(4, 6, 5, generator=gen, requires_grad=True)
    cls_target = torch.rand(4, 5, generator=gen).softmax(-1)
    token_target = torch.rand(4, 6, 5, generator=gen).softmax(-1)
    loss_fn = TokenLabelingLoss(cls_weight=0.7, dense_weight=0.3)
    loss_fn(
        (cls, aux, box_mask((0, 0, 2, 1), 2, 3)), torch.tensor([0, 1, 2, 3]), cls_target, token_target
    ).loss.backward()
    lam = 1 - 2 / 6
    mixed = lam * cls_target + (1 - lam) * cls_target.flip(0)
    assert torch.allclose(cls.grad, 0.7 * (cls.detach().softmax(-1) - mixed) / 4, atol=1e-7)
    assert torch.allclose(aux.grad, 0.3 * (aux.detach().softmax(-1) - token_target) / 24, atol=1e-7)


def test_low_precision_logits_are_cast_to_float32():
    gen = torch.Generator().manual_seed(1)
    cls = torch.randn(2, 5, generator=gen).bfloat16()
    aux = torch.randn(2, 4, 5, generator=gen).bfloat16()
    labels = torch.tensor([1, 3])
    low = TokenLabelingLoss()((cls, aux, None), labels)
    ref = TokenLabelingLoss()((cls.float(), aux.float(), None), labels)
    assert low.loss.dtype == torch.float32
    assert low.loss.item() == ref.loss.item()


def test_real_model_with_built_targets_backpropagates():
    torch.manual_seed(0)
    model = create_model(
        "lvvit_t", img_size=64, num_classes=10, embed_dim=48, depth=2, num_heads=2, stem_width=16
    ).train()
    images = torch.randn(4, 3, 64, 64)
    labels = torch.tensor([1, 4, 7, 9])
    gen = torch.Generator().manual_seed(2)
    values = torch.randn(4, 3, 5, 5, generator=gen)
    base = torch.randint(0, 10, (4, 1, 5, 5), generator=gen)
    indices = (base + torch.tensor([0, 3, 6]).view(1, 3, 1, 1)) % 10  # 3 distinct classes per cell
    cls_t, tok_t = build_token_targets(
        values,
        indices,
        torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 4),
        torch.tensor(
            [[0.1, 0.2, 0.8, 0.7], [0.0, 0.0, 1.0, 1.0], [0.3, 0.1, 0.9, 0.9], [0.2, 0.2, 0.6, 0.6]]
        ),
        torch.tensor([True, False, True, False]),
        num_classes=10,
        out_size=model.cfg.grid_size,
    )
    outputs = model(images)
    assert outputs[2] is not None  # MixToken on
    parts = TokenLabelingLoss(ground_truth=True)(outputs, labels, cls_t, tok_t)
    parts.loss.backward()
    assert torch.isfinite(parts.loss)
    for name in (
        "head.weight",
        "aux_head.weight",
        "patch_embed.conv1.weight",
        "pos_embed",
        "cls_token",
    ):
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert cls_t.grad_fn is None and tok_t.grad_fn is None  # targets are constants


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"cls_target": torch.full((2, 3), 1 / 3)}, "both or neither"),
        (
            {"cls_target": torch.full((2, 4), 0.25), "token_target": torch.full((2, 4, 3), 1 / 3)},
            "cls_target must be",
        ),
        (
            {"cls_target": torch.full((2, 3), 1 / 3), "token_target": torch.full((2, 9, 3), 1 / 3)},
            "token_target must be",
        ),
        ({"labels": torch.tensor([0, 1, 2])}, "labels must be"),
    ],
)
def test_bad_input_names_the_argument(kwargs, message):
    outputs = (torch.zeros(2, 3), torch.zeros(2, 4, 3), None)
    kwargs = {"labels": torch.tensor([0, 1]), **kwargs}
    with pytest.raises(ValueError, match=message):
        TokenLabelingLoss()(outputs, **kwargs)


def test_bad_weights_rejected():
    with pytest.raises(ValueError, match="positive sum"):
        TokenLabelingLoss(cls_weight=0.0, dense_weight=0.0)
    with pytest.raises(ValueError, match="smoothing"):
        TokenLabelingLoss(smoothing=1.0)
