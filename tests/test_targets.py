"""Token-label targets against a plain per-sample RoIAlign written here from scratch."""

from __future__ import annotations

import math

import pytest
import torch

from lvvit.loader.targets import build_token_targets


def _bilinear(dense: torch.Tensor, y: float, x: float) -> torch.Tensor:
    """torchvision's roi_align bilinear sample of ``dense [C, H, W]`` at index coords (y, x)."""
    _, height, width = dense.shape
    if y < -1.0 or y > height or x < -1.0 or x > width:
        return torch.zeros(dense.shape[0], dtype=dense.dtype)
    y, x = max(y, 0.0), max(x, 0.0)
    y_low, x_low = int(y), int(x)
    if y_low >= height - 1:
        y_low = y_high = height - 1
        y = float(y_low)
    else:
        y_high = y_low + 1
    if x_low >= width - 1:
        x_low = x_high = width - 1
        x = float(x_low)
    else:
        x_high = x_low + 1
    ly, lx = y - y_low, x - x_low
    return (
        (1 - ly) * (1 - lx) * dense[:, y_low, x_low]
        + (1 - ly) * lx * dense[:, y_low, x_high]
        + ly * (1 - lx) * dense[:, y_high, x_low]
        + ly * lx * dense[:, y_high, x_high]
    )


def _reference(values, indices, map_box, crop_box, flip, num_classes, out, smoothing, ratio=-1):
    """One sample, float64, loops: returns ``[out * out, C]`` smoothed soft targets.

    Works in image coordinates: each sample point of the (possibly mirrored) crop is put
    in the image, then carried into the map's cell-index coordinates (cell centres at
    integers, i.e. aligned=True).
    """
    k, height, width = values.shape
    dense = torch.zeros(num_classes, height, width, dtype=torch.float64)
    for j in range(k):
        for h in range(height):
            for w in range(width):
                dense[int(indices[j, h, w]), h, w] = float(values[j, h, w])
    mx0, my0, mx1, my1 = (float(v) for v in map_box)
    cx0, cy0, cx1, cy1 = (float(v) for v in crop_box)
    # roi extent in map cells decides the adaptive sample count, as torchvision does.
    roi_w = (cx1 - cx0) / (mx1 - mx0) * width
    roi_h = (cy1 - cy0) / (my1 - my0) * height
    grid_x = ratio if ratio > 0 else max(math.ceil(roi_w / out), 1)
    grid_y = ratio if ratio > 0 else max(math.ceil(roi_h / out), 1)
    result = torch.zeros(out * out, num_classes, dtype=torch.float64)
    for p in range(out):
        for q in range(out):
            acc = torch.zeros(num_classes, dtype=torch.float64)
            for iy in range(grid_y):
                for ix in range(grid_x):
                    u = (q + (ix + 0.5) / grid_x) / out  # fraction across the crop as shown
                    v = (p + (iy + 0.5) / grid_y) / out
                    img_x = cx1 - u * (cx1 - cx0) if flip else cx0 + u * (cx1 - cx0)
                    img_y = cy0 + v * (cy1 - cy0)
                    map_x = (img_x - mx0) / (mx1 - mx0) * width - 0.5
                    map_y = (img_y - my0) / (my1 - my0) * height - 0.5
                    acc += _bilinear(dense, map_y, map_x)
            result[p * out + q] = acc / (grid_x * grid_y)
    return result.softmax(-1) * (1 - smoothing) + smoothing / num_classes


def _random_maps(batch, k, height, width, num_classes, gen):
    values = torch.randn(batch, k, height, width, generator=gen) * 4
    indices = (
        torch.stack(
            [torch.randperm(num_classes, generator=gen)[:k] for _ in range(batch * height * width)]
        )
        .view(batch, height, width, k)
        .permute(0, 3, 1, 2)
    )
    return values, indices


# Non-square, off-centre crops; maps covering a sub-box of the image; crops reaching
# past the map (zero / clamp zone of RoIAlign); one crop inside a single cell. No crop
# spans a whole number of cells per bin, where the adaptive sample count would hinge on
# the last bit of float rounding.
MAP_BOXES = [
    [0.0, 0.0, 1.0, 1.0],
    [0.1, 0.05, 0.9, 0.85],
    [0.2, 0.1, 0.7, 0.95],
    [0.0, 0.0, 1.0, 1.0],
    [0.25, 0.25, 0.75, 0.75],
    [0.05, 0.3, 0.95, 0.7],
]
CROP_BOXES = [
    [0.1, 0.3, 0.55, 0.95],
    [0.0, 0.0, 1.0, 1.0],
    [0.33, 0.12, 0.61, 0.48],
    [0.71, 0.02, 0.99, 0.9],
    [0.05, 0.1, 0.95, 0.62],
    [0.4, 0.41, 0.43, 0.45],
]
FLIPS = [False, True, True, False, True, False]


@pytest.mark.parametrize(("out_size", "ratio"), [(4, -1), (5, -1), (3, 2), (1, -1)])
def test_matches_per_sample_reference(out_size, ratio):
    gen = torch.Generator().manual_seed(out_size * 10 + ratio)
    num_classes, k, height, width = 12, 3, 7, 6
    values, indices = _random_maps(len(FLIPS), k, height, width, num_classes, gen)
    map_boxes, crop_boxes = torch.tensor(MAP_BOXES), torch.tensor(CROP_BOXES)
    cls_t, tok_t = build_token_targets(
        values,
        indices,
        map_boxes,
        crop_boxes,
        torch.tensor(FLIPS),
        num_classes,
        out_size,
        smoothing=0.1,
        sampling_ratio=ratio,
    )
    assert cls_t.shape == (len(FLIPS), num_classes)
    assert tok_t.shape == (len(FLIPS), out_size * out_size, num_classes)
    assert cls_t.dtype == tok_t.dtype == torch.float32
    for b in range(len(FLIPS)):
        args = (values[b], indices[b], map_boxes[b], crop_boxes[b], FLIPS[b], num_classes)
        ref_tok = _reference(*args, out_size, 0.1, ratio)
        ref_cls = _reference(*args, 1, 0.1, ratio)[0]
        assert (tok_t[b].double() - ref_tok).abs().max() <= 1e-5, f"sample {b}"
        assert (cls_t[b].double() - ref_cls).abs().max() <= 1e-5, f"sample {b}"


def test_flip_and_sub_box_geometry_by_hand():
    """Map covers the full image; class 3 scores 10 on the left half, class 5 on the right."""
    num_classes, eps = 8, 0.1
    values = torch.full((1, 1, 4, 4), 10.0)
    indices = torch.full((1, 1, 4, 4), 5)
    indices[..., :2] = 3
    full = torch.tensor([[0.0, 0.0, 1.0, 1.0]])

    def targets(crop, flip, out_size):
        return build_token_targets(
            values,
            indices,
            full,
            torch.tensor([crop]),
            torch.tensor([flip]),
            num_classes,
            out_size,
            smoothing=eps,
        )

    # Samples land on cell centres, so every logit is exactly 10 or 0, or 5 and 5 when a
    # 1x1 bin averages both halves evenly.
    peak = math.exp(10) / (math.exp(10) + num_classes - 1)
    rest = 1 / (math.exp(10) + num_classes - 1)
    one = torch.tensor([peak, rest]) * (1 - eps) + eps / num_classes
    half = (math.exp(5) / (2 * math.exp(5) + num_classes - 2)) * (1 - eps) + eps / num_classes

    cls_t, tok_t = targets([0.0, 0.0, 0.5, 1.0], False, 2)  # left half: class 3 everywhere
    assert torch.allclose(tok_t[0, :, 3], one[0].expand(4), atol=1e-6)
    assert torch.allclose(tok_t[0, :, 5], one[1].expand(4), atol=1e-6)
    assert torch.allclose(cls_t[0, 3], one[0], atol=1e-6)

    cls_t, tok_t = targets([0.0, 0.0, 1.0, 1.0], False, 4)
    grid = tok_t[0].argmax(-1).view(4, 4)
    assert grid.tolist() == [[3, 3, 5, 5]] * 4
    assert torch.allclose(cls_t[0, [3, 5]], torch.tensor([half, half]), atol=1e-6)

    _, tok_flipped = targets([0.0, 0.0, 1.0, 1.0], True, 4)  # mirrored: class 3 on the right
    assert tok_flipped[0].argmax(-1).view(4, 4).tolist() == [[5, 5, 3, 3]] * 4
    assert torch.equal(tok_flipped[0].view(4, 4, -1), tok_t[0].view(4, 4, -1).flip(1))

    # A wide crop of the top right (x 0.5..1, y 0..0.25) is class 5; read in the official
    # (top, left, bottom, right) order it would be x 0..0.25, y 0.5..1: class 3.
    _, tok_t = targets([0.5, 0.0, 1.0, 0.25], False, 2)
    assert tok_t[0].argmax(-1).tolist() == [5, 5, 5, 5]


def test_rows_are_distributions_on_input_dtype():
    gen = torch.Generator().manual_seed(0)
    values, indices = _random_maps(3, 2, 5, 5, 20, gen)
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 3)
    crops = torch.tensor([[0.1, 0.2, 0.6, 0.9], [0.0, 0.0, 1.0, 1.0], [0.5, 0.5, 0.9, 0.7]])
    flips = torch.tensor([True, False, True])
    cls_t, tok_t = build_token_targets(values.double(), indices, boxes, crops, flips, 20, 3)
    assert cls_t.dtype == tok_t.dtype == torch.float64
    assert torch.allclose(tok_t.sum(-1), torch.ones(3, 9, dtype=torch.float64))
    assert torch.allclose(cls_t.sum(-1), torch.ones(3, dtype=torch.float64))
    assert tok_t.min() >= 0.1 / 20
    half_cls, _ = build_token_targets(values.half(), indices, boxes, crops, flips, 20, 3)
    assert half_cls.dtype == torch.float32  # half maps are pooled in float32
    assert (half_cls.double() - cls_t).abs().max() < 1e-2


def test_no_smoothing_and_batch_independence():
    """A sample's targets do not depend on the rest of the batch (grid sizing included)."""
    gen = torch.Generator().manual_seed(1)
    values, indices = _random_maps(2, 2, 6, 6, 10, gen)
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 2)
    crops = torch.tensor([[0.2, 0.1, 0.4, 0.3], [0.0, 0.0, 1.0, 1.0]])  # 1 vs 2 samples per bin
    flips = torch.tensor([False, True])
    cls_t, tok_t = build_token_targets(values, indices, boxes, crops, flips, 10, 3, smoothing=0.0)
    for b in range(2):
        one_cls, one_tok = build_token_targets(
            values[b : b + 1],
            indices[b : b + 1],
            boxes[b : b + 1],
            crops[b : b + 1],
            flips[b : b + 1],
            10,
            3,
            smoothing=0.0,
        )
        assert torch.allclose(one_tok[0], tok_t[b], atol=1e-6)
        assert torch.allclose(one_cls[0], cls_t[b], atol=1e-6)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"indices": torch.full((2, 1, 3, 3), 7)}, r"indices must lie in \[0, 5\)"),
        (
            {"indices": torch.zeros(2, 1, 3, 2, dtype=torch.long)},
            "indices must be an integer tensor",
        ),
        ({"values": torch.zeros(2, 3, 3)}, "values must be a float"),
        (
            {"crop_boxes": torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.5, 0.2, 0.5, 0.9]])},
            r"crop_boxes\[1\]",
        ),
        ({"map_boxes": torch.zeros(2, 3)}, r"map_boxes must be \[B, 4\]"),
        ({"flips": torch.zeros(3, dtype=torch.bool)}, "flips must be"),
    ],
)
def test_bad_input_names_the_argument(change, message):
    args = {
        "values": torch.zeros(2, 1, 3, 3),
        "indices": torch.zeros(2, 1, 3, 3, dtype=torch.long),
        "map_boxes": torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 2),
        "crop_boxes": torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 2),
        "flips": torch.zeros(2, dtype=torch.bool),
    }
    args.update(change)
    with pytest.raises(ValueError, match=message):
        build_token_targets(**args, num_classes=5, out_size=2)
