"""Decoding images and the one eval transform, shared by every stage that reads pixels:
the training loader (``lvvit.loader``), the labeler, offline evaluation and ``lvvit-serve``.

A JPEG is opened header-first and decoded at the largest DCT scale-down its use allows, so a
huge photo never costs its full pixel count; :func:`normalize` runs on the device.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


Box = tuple[float, float, float, float]


def normalize(
    images: torch.Tensor,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """uint8 ``[B, 3, H, W]`` -> ``(x / 255 - mean) / std``; meant to run on the device, where
    it is one fused elementwise pass instead of a float copy per image in the workers. The
    constants travel non-blocking: a blocking copy would make the host wait for the device."""
    scale = torch.tensor(std, dtype=dtype).view(1, -1, 1, 1).to(images.device, non_blocking=True) * 255
    shift = torch.tensor(mean, dtype=dtype).view(1, -1, 1, 1).to(images.device, non_blocking=True) * 255
    return (images.to(dtype) - shift) / scale


def open_image(data: bytes) -> Image.Image:
    """Parse the header only (size, format); pixels are decoded later, possibly scaled."""
    return Image.open(io.BytesIO(data))


def draft_factor(crop_size: tuple[int, int], out_size: int) -> int:
    """The largest JPEG DCT scale-down (8, 4, 2 or 1) that keeps a crop of ``crop_size``
    at least ``out_size`` pixels on each side."""
    return next(s for s in (8, 4, 2, 1) if min(crop_size) >= s * out_size or s == 1)


def draft_decode(img: Image.Image, factor: int) -> tuple[Image.Image, int]:
    """Decode an opened image as RGB, a JPEG at 1/``factor`` scale by DCT scaling (libjpeg
    computes the smaller image directly: less IDCT and colour work, no resize). Returns the
    image and the factor used (1 for other formats)."""
    used, width = 1, img.width
    if factor > 1 and img.format == "JPEG" and min(img.size) >= factor * factor:
        # Requesting size // factor makes PIL choose exactly this factor.
        drafted = img.draft("RGB", (width // factor, img.height // factor))
        used = round(width / drafted[1][2]) if drafted else 1
    img.load()
    return (img if img.mode == "RGB" else img.convert("RGB")), used


_SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})


def jpeg_top_rows(data: bytes, rows: int) -> bytes | None:
    """The same JPEG with a frame header that declares only its first ``rows`` rows.
    libjpeg then entropy-decodes and transforms just those (baseline or progressive)
    and skips the rest of each scan as extraneous data; the rows decode exactly as in
    the whole image except within the last 16, where chroma upsampling sees the cut.
    ``None`` when no frame header precedes the first scan."""
    i = 2
    while i + 9 <= len(data) and data[i] == 0xFF:
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
        elif marker in _SOF_MARKERS:
            return data[: i + 5] + rows.to_bytes(2, "big") + data[i + 7 :]
        elif marker == 0xDA:  # start of scan: no frame header before it
            return None
        else:
            i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    return None


@dataclass
class EvalTransform:
    """timm's eval transform: bicubic resize of the shorter side to
    ``floor(img_size / crop_pct)``, then a centre crop. A JPEG is decoded at the largest
    DCT scale-down that keeps its shorter side at least that size (:func:`draft_factor`),
    so a 9000 x 9000 photo costs a 1125 x 1125 decode instead of 243 MB of pixels; the
    bicubic resize then runs on the smaller image. Offline evaluation, the labeler and
    ``lvvit-serve`` all call this one transform, so they agree pixel for pixel."""

    img_size: int = 224
    crop_pct: float = 0.9

    def geometry(self, width: int, height: int) -> tuple[tuple[int, int], int, int]:
        """``(resized size, left, top)`` of the crop for a ``width x height`` image."""
        short = math.floor(self.img_size / self.crop_pct)
        if width <= height:
            size = (short, int(short * height / width))
        else:
            size = (int(short * width / height), short)
        return size, round((size[0] - self.img_size) / 2.0), round((size[1] - self.img_size) / 2.0)

    def box(self, width: int, height: int) -> Box:
        """The part of the image the crop keeps, normalised (the box a teacher's map covers)."""
        (new_w, new_h), left, top = self.geometry(width, height)
        return left / new_w, top / new_h, (left + self.img_size) / new_w, (top + self.img_size) / new_h

    def __call__(self, data: bytes) -> np.ndarray:
        return self.crop(open_image(data))

    def crop(self, img: Image.Image) -> np.ndarray:
        """An opened image (header parsed, pixels not decoded yet) -> uint8 ``[S, S, 3]``.
        Takes the opened image so a caller can check its size before paying for pixels."""
        width, height = img.size
        size, left, top = self.geometry(width, height)
        img, factor = draft_decode(img, draft_factor(img.size, min(size)))
        # A scaled decode is ceil(width / factor) wide: resize exactly the original extent.
        img = img.resize(size, Image.Resampling.BICUBIC, box=(0, 0, width / factor, height / factor))
        img = img.crop((left, top, left + self.img_size, top + self.img_size))
        return np.array(img, dtype=np.uint8)
