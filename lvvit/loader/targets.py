"""Token-label targets: teacher top-k score maps -> class and per-token soft targets.

Each sample's map covers ``map_box`` of the original image on an ``H x W`` grid; the
training crop is ``crop_box`` of that image, possibly mirrored. The crop is cut out of
the map with RoIAlign (``aligned=True``: map cell ``i`` spans ``[i, i + 1)``, its centre
at ``i + 0.5``) to ``S x S`` token targets and ``1 x 1`` for the class target, then
softmax and label smoothing, as in the official TokenLabeling code but with two of its
quirks fixed: boxes are given as ``(x0, y0, x1, y1)`` (the official call passes
``(top, left, bottom, right)``, mirroring non-square crops about the diagonal) and crop
coordinates are mapped through the box the map actually covers.

RoIAlign is linear in the map and its bilinear weights factor into a row part and a
column part, so pooling a sample is ``rows [S, H] @ map [H, W] @ cols[S, W]^T`` for every
class at once: two batched matmuls over the whole batch, no per-sample loop, and about
``(H + S) / (S * H)`` of the work of multiplying by the full ``(S*S) x (H*W)`` matrix.

Sampling follows ``torchvision.ops.roi_align`` exactly (CPU/CUDA kernels):

* ``sampling_ratio=-1`` (default, as in the official code) averages
  ``ceil(roi_height / S) x ceil(roi_width / S)`` bilinear samples per bin, counted in
  map cells; the class target (``1 x 1``) thus averages the whole crop densely.
  A positive ``sampling_ratio`` uses that many samples per bin and axis.
* Sample points more than one cell outside the map contribute zero (they still count
  in the average, so logits shrink toward 0 there); points within one cell of the
  edge take the edge value.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


class CropWeights(NamedTuple):
    """RoIAlign factors of a batch of crops: ``rows [B, S, H]`` and ``cols [B, S, W]`` for
    the token targets, the same at ``S = 1`` for the class target (float64)."""

    cls_rows: Tensor
    cls_cols: Tensor
    token_rows: Tensor
    token_cols: Tensor

    def to(self, device: torch.device | str, non_blocking: bool = False) -> CropWeights:
        return CropWeights(*(w.to(device, non_blocking=non_blocking) for w in self))


@torch.no_grad()
def build_token_targets(
    values: Tensor,
    indices: Tensor,
    map_boxes: Tensor,
    crop_boxes: Tensor,
    flips: Tensor,
    num_classes: int,
    out_size: int,
    smoothing: float = 0.1,
    sampling_ratio: int = -1,
) -> tuple[Tensor, Tensor]:
    """Soft targets ``cls [B, C]`` and ``tokens [B, S*S, C]`` (row-major token grid).

    ``values``/``indices`` are the teacher's top-k logits and class indices ``[B, k, H, W]``;
    classes outside the top-k get logit 0, as in the official code. ``map_boxes`` and
    ``crop_boxes`` are ``[B, 4]`` normalised image boxes ``(x0, y0, x1, y1)``; ``flips[b]``
    says the crop was mirrored left-right after cropping, so its token columns are
    reversed. The results live on ``values.device`` in ``values``' float type (at least
    float32). Targets are constants: no autograd graph.

    This is :func:`check_target_inputs`, :func:`crop_weights` and
    :func:`targets_from_weights` in one call. The training step calls them apart: the
    checks and the weights on the loader's CPU tensors (their data-dependent sizes and
    verdicts cost no device synchronisation there), the last on the device.

    Memory: the scattered map is held densely as ``[B, H, W, C]`` (166 MB for an 18x18
    map at B = 128, C = 1000, fp32), next to the ``[B, S*S, C]`` result (100 MB at S = 14,
    524 MB at S = 32) and one ``[B, S, W, C]`` intermediate; softmax and smoothing run in
    place. Scatter-adding each top-k entry's pooling weights straight into the result
    would skip the dense map, but must materialise ``k * H * W * S * S`` contributions
    per sample (as much as the dense map at k = 5, S = 14; 5x at S = 32) and relies on
    atomics that are non-deterministic on GPU.
    """
    check_target_inputs(values, indices, map_boxes, crop_boxes, flips, num_classes, out_size, smoothing)
    weights = crop_weights(map_boxes, crop_boxes, flips, tuple(values.shape[2:]), out_size, sampling_ratio)
    return targets_from_weights(values, indices, weights.to(values.device), num_classes, smoothing)


def crop_weights(
    map_boxes: Tensor,
    crop_boxes: Tensor,
    flips: Tensor,
    map_size: tuple[int, int],
    out_size: int,
    sampling_ratio: int = -1,
) -> CropWeights:
    """The RoIAlign factors of each crop out of an ``H x W`` map, for the class target
    (``1 x 1``) and the token targets (``out_size x out_size``), on the boxes' device.

    The adaptive sample grid is sized from the data (``int(count.max())``): keep the boxes
    on the CPU, where they come from the loader, so that costs no device synchronisation.
    """
    boxes = (map_boxes, crop_boxes, flips, map_size)
    return CropWeights(*_roi_align_weights(*boxes, 1, sampling_ratio),
                       *_roi_align_weights(*boxes, out_size, sampling_ratio))


@torch.no_grad()
def targets_from_weights(
    values: Tensor, indices: Tensor, weights: CropWeights, num_classes: int, smoothing: float = 0.1
) -> tuple[Tensor, Tensor]:
    """``cls [B, C]`` and ``tokens [B, S*S, C]`` from the top-k maps and the crops' weights.

    Tensor operations only, shapes fixed by the inputs: no host synchronisation and no
    data-dependent Python control flow, so ``torch.compile(fullgraph=True)`` takes it
    whole. Indices are assumed in range (:func:`check_target_inputs` on the CPU).
    """
    dtype = torch.promote_types(values.dtype, torch.float32)
    dense = _scatter_top_k(values, indices, num_classes, dtype)
    cls_logits = _pool(dense, weights.cls_rows, weights.cls_cols)[:, 0]
    token_logits = _pool(dense, weights.token_rows, weights.token_cols)
    return _smooth_(_softmax_(cls_logits), smoothing), _smooth_(_softmax_(token_logits), smoothing)


def _scatter_top_k(values: Tensor, indices: Tensor, num_classes: int, dtype: torch.dtype) -> Tensor:
    """Dense logits ``[B, H, W, C]``: top-k values at their classes, 0 elsewhere."""
    dense = values.new_zeros(values.shape[0], *values.shape[2:], num_classes, dtype=dtype)
    class_last = (0, 2, 3, 1)
    return dense.scatter_add_(
        3, indices.long().permute(class_last), values.to(dtype).permute(class_last)
    )


def _pool(dense: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """RoIAlign of each crop out of ``dense [B, H, W, C]`` to ``[B, S*S, C]``.

    Per class, ``rows [S, H] @ map [H, W] @ cols [S, W]^T``: one bmm over rows, one
    broadcast matmul over columns.
    """
    batch, height, width, classes = dense.shape
    out_size = rows.shape[1]
    by_rows = torch.bmm(rows.to(dense), dense.view(batch, height, width * classes))
    by_rows = by_rows.view(batch, out_size, width, classes)
    return torch.matmul(cols.to(dense).unsqueeze(1), by_rows).view(batch, out_size**2, classes)


def _softmax_(logits: Tensor) -> Tensor:
    """Softmax over the last dim in place: the token logits can be hundreds of MB."""
    logits.sub_(logits.amax(dim=-1, keepdim=True)).exp_()
    return logits.div_(logits.sum(dim=-1, keepdim=True))


def _smooth_(probs: Tensor, smoothing: float) -> Tensor:
    return probs.mul_(1.0 - smoothing).add_(smoothing / probs.shape[-1])


def _roi_align_weights(
    map_boxes: Tensor,
    crop_boxes: Tensor,
    flips: Tensor,
    map_size: tuple[int, int],
    out_size: int,
    sampling_ratio: int,
) -> tuple[Tensor, Tensor]:
    """Per-sample RoIAlign factors ``rows [B, out, H]`` and ``cols [B, out, W]`` (float64).

    Computed on the boxes' device: boxes usually come from the loader on the CPU, where
    sizing the adaptive sample grid costs no device synchronisation.
    """
    height, width = map_size
    crop = crop_boxes.to(torch.float64)
    cover = map_boxes.to(torch.float64)
    # Crop edges in map cells: the map's cell i spans [i, i + 1) of this axis.
    scale_x = width / (cover[:, 2] - cover[:, 0])
    scale_y = height / (cover[:, 3] - cover[:, 1])
    cols = _axis_weights(
        (crop[:, 0] - cover[:, 0]) * scale_x,
        (crop[:, 2] - cover[:, 0]) * scale_x,
        width,
        out_size,
        sampling_ratio,
    )
    rows = _axis_weights(
        (crop[:, 1] - cover[:, 1]) * scale_y,
        (crop[:, 3] - cover[:, 1]) * scale_y,
        height,
        out_size,
        sampling_ratio,
    )
    flipped = flips.to(device=cols.device, dtype=torch.bool).view(-1, 1, 1)
    return rows, torch.where(flipped, cols.flip(1), cols)


def _axis_weights(lo: Tensor, hi: Tensor, size: int, out_size: int, sampling_ratio: int) -> Tensor:
    """RoIAlign along one axis: ``[B, out_size, size]`` averaged bilinear weights.

    ``lo``/``hi`` are the crop's edges in map cells. Mirrors torchvision's kernel:
    ``aligned=True`` offset of half a cell, samples beyond one cell outside the map
    weigh zero, samples within it are clamped to the edge cell.
    """
    length = hi - lo
    bin_size = length / out_size
    if sampling_ratio > 0:
        count = torch.full_like(length, sampling_ratio, dtype=torch.long)
    else:
        count = torch.ceil(bin_size).long().clamp_(min=1)
    grid = int(count.max()) if count.numel() else 1
    step = torch.arange(grid, device=lo.device, dtype=lo.dtype)
    bins = torch.arange(out_size, device=lo.device, dtype=lo.dtype)
    count_f = count.to(lo.dtype).view(-1, 1, 1)
    pos = (lo - 0.5).view(-1, 1, 1) + bin_size.view(-1, 1, 1) * (
        bins.view(1, -1, 1) + (step.view(1, 1, -1) + 0.5) / count_f
    )  # [B, out, grid] sample positions in cell-index coordinates
    used = (step.view(1, 1, -1) < count.view(-1, 1, 1)) & (pos >= -1.0) & (pos <= size)
    pos = pos.clamp(min=0.0)
    low = pos.floor().clamp(max=size - 1)
    frac = torch.where(low >= size - 1, torch.zeros_like(pos), pos - low)
    low = low.long()
    high = (low + 1).clamp(max=size - 1)
    scale = used.to(lo.dtype) / count_f
    weights = F.one_hot(low, size) * ((1.0 - frac) * scale).unsqueeze(-1)
    weights += F.one_hot(high, size) * (frac * scale).unsqueeze(-1)
    return weights.sum(dim=2)


def check_target_inputs(
    values: Tensor,
    indices: Tensor,
    map_boxes: Tensor,
    crop_boxes: Tensor,
    flips: Tensor,
    num_classes: int,
    out_size: int,
    smoothing: float,
) -> None:
    """Fail with the offending argument named: a bad index on GPU is an opaque device assert.

    The verdicts read the data (box edges, index range): on the loader's CPU tensors that
    costs no device synchronisation, so the training step checks before moving them.
    """
    if values.dim() != 4 or not values.is_floating_point():
        raise ValueError(
            f"values must be a float [B, k, H, W] tensor, got {values.dtype} {tuple(values.shape)}"
        )
    if indices.shape != values.shape or indices.is_floating_point() or indices.dtype == torch.bool:
        raise ValueError(
            f"indices must be an integer tensor shaped like values {tuple(values.shape)}, "
            f"got {indices.dtype} {tuple(indices.shape)}"
        )
    batch = values.shape[0]
    for name, box in (("map_boxes", map_boxes), ("crop_boxes", crop_boxes)):
        if box.shape != (batch, 4):
            raise ValueError(f"{name} must be [B, 4] = [{batch}, 4], got {tuple(box.shape)}")
        empty = ~((box[:, 2] > box[:, 0]) & (box[:, 3] > box[:, 1]))
        if bool(empty.any()):
            row = int(empty.nonzero()[0, 0])
            raise ValueError(
                f"{name}[{row}] = {box[row].tolist()} is not a box (x0, y0, x1, y1) "
                "with x1 > x0 and y1 > y0"
            )
    if flips.shape != (batch,):
        raise ValueError(f"flips must be [B] = [{batch}], got {tuple(flips.shape)}")
    if num_classes < 1 or out_size < 1:
        raise ValueError(f"num_classes and out_size must be >= 1, got {num_classes} and {out_size}")
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
    if indices.numel():
        low, high = (int(v) for v in torch.aminmax(indices))
        if low < 0 or high >= num_classes:
            raise ValueError(
                f"indices must lie in [0, {num_classes}), found values in [{low}, {high}]"
            )
