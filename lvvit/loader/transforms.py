"""Per-sample image transforms for training and evaluation, on PIL and numpy.

Training order (one sample), timm's RandomResizedCrop -> RandAugment -> flip -> erasing:
read the JPEG header size -> sample the crop box -> decode only what the crop needs (DCT
scaling down to the smallest size that keeps the crop at least the output size, and no
rows below the crop) -> crop + antialiased resize (random bilinear/bicubic) ->
RandAugment on the crop (magnitudes
relative to the crop, as in timm and the official recipe) -> horizontal flip -> random
erasing -> uint8. The label map is never cropped here: the geometric RandAugment ops are
re-expressed in the map's own grid through the crop box (:func:`warp_label_map`), and the
crop box (normalised coordinates of the image) and flip flag travel with the batch to
``lvvit.loader.targets``, which RoIAligns the map on the device. Running RandAugment after the
crop also costs a fraction of running it on the whole decoded image.

Images leave the worker as uint8 (4x fewer bytes through the DataLoader and to the
device than float32); :func:`normalize` runs on the device.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance, ImageOps

from lvvit.data.decode import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Box,
    draft_decode,
    draft_factor,
    jpeg_top_rows,
    open_image,
)

if TYPE_CHECKING:
    from lvvit.data.labelmap import LabelMap

FILL = tuple(round(255 * m) for m in IMAGENET_MEAN)
"""Fill colour of geometric ops: the dataset mean, as timm passes ``img_mean``."""

RANDOM_INTERPOLATION = (Image.Resampling.BILINEAR, Image.Resampling.BICUBIC)


def sample_crop_box(
    width: int,
    height: int,
    rng: random.Random,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """RandomResizedCrop box ``(left, top, width, height)`` in pixels, timm's algorithm:
    10 attempts at a random area and log-uniform aspect ratio, then a centre-crop fallback."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = rng.uniform(*scale) * area
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, width - w), rng.randint(0, height - h), w, h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        w, h = round(height * max(ratio)), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def decode_for_crop(data: bytes, img: Image.Image, crop: tuple[int, int, int, int], out_size: int) -> tuple[Image.Image, int]:
    """Decode only what a ``(left, top, width, height)`` crop resized to ``out_size`` needs:
    DCT scaling while the crop stays >= ``out_size`` (:func:`draft_factor`), and no rows
    below the crop but one MCU row for chroma upsampling (:func:`jpeg_top_rows`): every
    decoded pixel of the crop is bit-identical to the whole image's.
    ``img`` is ``data`` opened (header only). Returns the image and its scale factor."""
    _, top, width, height = crop
    factor = draft_factor((width, height), out_size)
    if img.format == "JPEG":
        rows = -(-(top + height + 16) // 16) * 16  # + the MCU row chroma upsampling reads
        short = jpeg_top_rows(data, rows) if rows < img.height else None
        if short is not None:
            try:
                return draft_decode(open_image(short), factor)
            except (OSError, SyntaxError):
                pass  # an unusual stream: decode it whole below
    return draft_decode(img, factor)


RESIZE_MODES = {Image.Resampling.BILINEAR: "bilinear", Image.Resampling.BICUBIC: "bicubic"}


def scaled_region(box: tuple[int, int, int, int], factor: int, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """A pixel box ``(x0, y0, x1, y1)`` of the original image in whole pixels of the image
    decoded at 1/``factor`` of ``size``, at least one pixel wide and tall."""
    x0, y0 = min(round(box[0] / factor), size[0] - 1), min(round(box[1] / factor), size[1] - 1)
    x1, y1 = min(max(round(box[2] / factor), x0 + 1), size[0]), min(max(round(box[3] / factor), y0 + 1), size[1])
    return x0, y0, x1, y1


def crop_resize(img: Image.Image, region: tuple[int, int, int, int], size: int, resample: Image.Resampling) -> np.ndarray:
    """``img.crop(region).resize((size, size), resample)`` -> uint8 HWC, computed by torch's
    antialiased uint8 kernels (Pillow-compatible filters, vectorised: about 3x faster
    than Pillow's resize, which otherwise costs as much as decoding)."""
    pixels = torch.from_numpy(np.array(img.crop(region))).permute(2, 0, 1)[None]
    out = F.interpolate(pixels, size=(size, size), mode=RESIZE_MODES[resample], antialias=True)
    return out[0].permute(1, 2, 0).numpy()


# ---------------------------------------------------------------- RandAugment

Affine = np.ndarray
"""3x3 matrix mapping output pixel coordinates to input ones (PIL's AFFINE convention)."""


def _about_centre(linear: np.ndarray, width: float, height: float) -> Affine:
    centre = np.array([width / 2, height / 2])
    matrix = np.eye(3)
    matrix[:2, :2] = linear
    matrix[:2, 2] = centre - linear @ centre
    return matrix


def _rotation(degrees: float, width: float, height: float) -> Affine:
    """Counter-clockwise rotation about the centre, as ``Image.rotate`` does it."""
    theta = -math.radians(degrees)
    cos, sin = math.cos(theta), math.sin(theta)
    return _about_centre(np.array([[cos, sin], [-sin, cos]]), width, height)


def _translation(dx: float, dy: float) -> Affine:
    return np.array([[1.0, 0.0, dx], [0.0, 1.0, dy], [0.0, 0.0, 1.0]])


def _signed(value: float, rng: random.Random) -> float:
    return -value if rng.random() < 0.5 else value


def _posterize(img: Image.Image, bits: int) -> Image.Image:
    """Keep ``bits`` high bits; 0 bits (magnitude 10) is black, as older Pillow gave timm."""
    if bits <= 0:
        return Image.new(img.mode, img.size)
    return img if bits >= 8 else ImageOps.posterize(img, bits)


def _solarize_add(img: Image.Image, add: int, threshold: int = 128) -> Image.Image:
    lut = [min(255, i + add) if i < threshold else i for i in range(256)]
    return img.point(lut * len(img.getbands()))


def _enhance(kind: type) -> Callable[[Image.Image, float, random.Random], Image.Image]:
    """timm's increasing enhance ops: factor 1 +/- 0.9 * m / 10, floored at 0.1."""
    return lambda img, m, rng: kind(img).enhance(max(0.1, 1.0 + _signed(m / 10 * 0.9, rng)))


# Colour ops: (image, magnitude in [0, 10], rng) -> image. Level-to-argument rules are
# timm's "increasing" variants (rand-...-inc1), which the official recipe uses.
COLOUR_OPS: dict[str, Callable[[Image.Image, float, random.Random], Image.Image]] = {
    "AutoContrast": lambda img, m, rng: ImageOps.autocontrast(img),
    "Equalize": lambda img, m, rng: ImageOps.equalize(img),
    "Invert": lambda img, m, rng: ImageOps.invert(img),
    "PosterizeIncreasing": lambda img, m, rng: _posterize(img, 4 - int(m / 10 * 4)),
    "SolarizeIncreasing": lambda img, m, rng: ImageOps.solarize(img, 256 - int(m / 10 * 256)),
    "SolarizeAdd": lambda img, m, rng: _solarize_add(img, int(m / 10 * 110)),
    "ColorIncreasing": _enhance(ImageEnhance.Color),
    "ContrastIncreasing": _enhance(ImageEnhance.Contrast),
    "BrightnessIncreasing": _enhance(ImageEnhance.Brightness),
    "SharpnessIncreasing": _enhance(ImageEnhance.Sharpness),
}

# Geometric ops: (magnitude, rng, width, height) -> output-to-input affine. They move the
# label map as well. Rotation and shear act about the image centre (timm shears about the
# top-left corner; about the centre keeps the content, and the map, in view).
GEOMETRIC_OPS: dict[str, Callable[[float, random.Random, float, float], Affine]] = {
    "Rotate": lambda m, rng, w, h: _rotation(_signed(m / 10 * 30, rng), w, h),
    "ShearX": lambda m, rng, w, h: _about_centre(np.array([[1, _signed(m / 10 * 0.3, rng)], [0, 1]]), w, h),
    "ShearY": lambda m, rng, w, h: _about_centre(np.array([[1, 0], [_signed(m / 10 * 0.3, rng), 1]]), w, h),
    "TranslateXRel": lambda m, rng, w, h: _translation(_signed(m / 10 * 0.45, rng) * w, 0.0),
    "TranslateYRel": lambda m, rng, w, h: _translation(0.0, _signed(m / 10 * 0.45, rng) * h),
}

# timm's `_RAND_INCREASING_TRANSFORMS`, in its order.
RAND_OPS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
    "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
    "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
)  # fmt: skip


def warp_image(img: Image.Image, matrix: Affine, resample: Image.Resampling, fill: tuple[int, ...] = FILL) -> Image.Image:
    return img.transform(img.size, Image.Transform.AFFINE, tuple(matrix[:2].ravel()), resample, fillcolor=fill)


@dataclass
class RandAugment:
    """timm's ``rand-m9-mstd0.5-inc1``: ``num_ops`` ops drawn with replacement from
    ``ops`` (default :data:`RAND_OPS`), each applied with probability ``prob`` at magnitude
    ``N(magnitude, magnitude_std)`` clipped to [0, 10]."""

    num_ops: int = 2
    magnitude: float = 9.0
    magnitude_std: float = 0.5
    prob: float = 0.5
    fill: tuple[int, ...] = FILL
    ops: tuple[str, ...] = RAND_OPS

    def __post_init__(self) -> None:
        unknown = set(self.ops) - set(COLOUR_OPS) - set(GEOMETRIC_OPS)
        if unknown:
            raise ValueError(f"unknown RandAugment ops {sorted(unknown)}; known: {', '.join(RAND_OPS)}")

    def __call__(self, img: Image.Image, rng: random.Random) -> tuple[Image.Image, list[Affine]]:
        """Returns the augmented image and the output-to-input affines of the geometric
        ops applied, in order, for :func:`warp_label_map`."""
        warps = []
        for name in rng.choices(self.ops, k=self.num_ops):
            if rng.random() > self.prob:
                continue
            m = self.magnitude
            if self.magnitude_std > 0:
                m = rng.gauss(m, self.magnitude_std)
            m = min(max(m, 0.0), 10.0)
            if name in GEOMETRIC_OPS:
                matrix = GEOMETRIC_OPS[name](m, rng, *img.size)
                img = warp_image(img, matrix, rng.choice(RANDOM_INTERPOLATION), self.fill)
                warps.append(matrix)
            else:
                img = COLOUR_OPS[name](img, m, rng)
        return img, warps


def warp_label_map(
    label_map: LabelMap,
    warps: Sequence[Affine],
    size: tuple[float, float],
    frame: Box = (0.0, 0.0, 1.0, 1.0),
) -> LabelMap:
    """Move a label map with the warps (output-to-input affines, in the order applied)
    done to a picture of ``size`` (w, h) pixels that shows ``frame`` (a normalised box,
    e.g. the training crop) of the image the map refers to. Each cell centre goes from
    image coordinates to picture pixels, back through the warps, and to the source cell,
    so the map stays on its own grid and box. Nearest cell for both indices and values
    (they are paired top-k lists). Cells get values 0 (the logit non-top-k classes get)
    where the source lies outside the map, or left the picture at any step: there the
    picture shows fill colour, even if a later warp brought that position back."""
    _, rows, cols = label_map.values.shape
    x0, y0, x1, y1 = label_map.box
    fx0, fy0, fx1, fy1 = frame
    width, height = size
    xs = (x0 + (np.arange(cols) + 0.5) / cols * (x1 - x0) - fx0) / (fx1 - fx0) * width
    ys = (y0 + (np.arange(rows) + 0.5) / rows * (y1 - y0) - fy0) / (fy1 - fy0) * height
    px, py = np.meshgrid(xs, ys)
    inside = np.ones(px.shape, dtype=bool)
    for matrix in reversed(warps):
        px, py = (
            matrix[0, 0] * px + matrix[0, 1] * py + matrix[0, 2],
            matrix[1, 0] * px + matrix[1, 1] * py + matrix[1, 2],
        )
        inside &= (px >= 0) & (px < width) & (py >= 0) & (py < height)
    col = np.floor((fx0 + px / width * (fx1 - fx0) - x0) / (x1 - x0) * cols).astype(np.int64)
    row = np.floor((fy0 + py / height * (fy1 - fy0) - y0) / (y1 - y0) * rows).astype(np.int64)
    inside &= (col >= 0) & (col < cols) & (row >= 0) & (row < rows)
    row, col = row.clip(0, rows - 1), col.clip(0, cols - 1)
    values = label_map.values[:, row, col]
    values[:, ~inside] = 0
    return dataclasses.replace(label_map, values=values, indices=label_map.indices[:, row, col])


# ---------------------------------------------------------------- random erasing


def random_erase(
    image: np.ndarray,
    rng: random.Random,
    prob: float = 0.25,
    area: tuple[float, float] = (0.02, 1 / 3),
    aspect: tuple[float, float] = (0.3, 1 / 0.3),
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
) -> None:
    """timm's RandomErasing (mode 'pixel', one box, 10 attempts), in place on uint8 HWC.
    timm fills normalised images with N(0, 1) noise; here the same noise is mapped back
    to pixels (mean + std * z) and clipped to [0, 255], so erasing can run in the worker
    and the batch stays uint8."""
    if rng.random() >= prob:
        return
    height, width = image.shape[:2]
    log_aspect = (math.log(aspect[0]), math.log(aspect[1]))
    for _ in range(10):
        target = rng.uniform(*area) * height * width
        ratio = math.exp(rng.uniform(*log_aspect))
        h, w = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if w < width and h < height:
            top, left = rng.randint(0, height - h), rng.randint(0, width - w)
            noise = np.random.default_rng(rng.getrandbits(64)).standard_normal((h, w, image.shape[2]))
            pixels = (np.asarray(mean) + np.asarray(std) * noise) * 255
            image[top : top + h, left : left + w] = pixels.round().clip(0, 255).astype(np.uint8)
            return


# ---------------------------------------------------------------- sample transforms


class TrainSample(NamedTuple):
    image: np.ndarray  # uint8 [S, S, 3]
    crop_box: Box  # normalised x0, y0, x1, y1 of the image the crop was taken from
    flip: bool
    label_map: LabelMap | None  # moved with the geometric ops (same grid and box), not cropped


@dataclass
class TrainTransform:
    """The training recipe of one sample (see the module docstring for the order)."""

    img_size: int = 224
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    randaugment: RandAugment | None = field(default_factory=RandAugment)
    erase_prob: float = 0.25
    fast_decode: bool = True  # decode_for_crop; False: full decode, as the naive path

    def __call__(self, data: bytes, label_map: LabelMap | None, rng: random.Random) -> TrainSample:
        img = open_image(data)
        width, height = img.size
        left, top, w, h = sample_crop_box(width, height, rng, self.scale, self.ratio)
        if self.fast_decode:
            img, factor = decode_for_crop(data, img, (left, top, w, h), self.img_size)
        else:
            img, factor = draft_decode(img, 1)
        region = scaled_region((left, top, left + w, top + h), factor, img.size)
        image = crop_resize(img, region, self.img_size, rng.choice(RANDOM_INTERPOLATION))
        # The crop actually taken (the region rounded to whole pixels of the decoded image).
        crop_box = tuple(min(1.0, v * factor / s) for v, s in zip(region, (width, height) * 2, strict=True))
        if self.randaugment is not None:
            augmented, warps = self.randaugment(Image.fromarray(image), rng)
            image = np.array(augmented)
            if warps and label_map is not None:
                label_map = warp_label_map(label_map, warps, augmented.size, frame=crop_box)
        flip = rng.random() < self.hflip
        if flip:
            image = np.ascontiguousarray(image[:, ::-1])
        if self.erase_prob > 0:
            random_erase(image, rng, self.erase_prob)
        return TrainSample(image, crop_box, flip, label_map)
