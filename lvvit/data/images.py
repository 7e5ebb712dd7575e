"""Input images to shard JPEGs: decoded fully, converted to 8-bit RGB by explicit rules, downscaled.

Input files are untrusted: every image is decoded here (so corrupt files are caught when
shards are built, not in training), converted to 8-bit RGB by explicit rules (16-bit
scaled, alpha composited on white) or refused by mode, and downscaled above a pixel cap.
Used by ``lvvit-shards build`` and by ``lvvit-label`` on an ImageFolder.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from lvvit.data.members import DEFAULT_MAX_PIXELS

JPEG_QUALITY = 95
ALPHA_BACKGROUND = (255, 255, 255)
"""Transparent pixels are composited on white: the colour hidden under alpha 0 is arbitrary."""


class UnsupportedImage(ValueError):
    """An image whose pixel mode has no defined conversion to 8-bit RGB."""


@dataclass(frozen=True)
class EncodedImage:
    data: bytes  # JPEG bytes for the shard
    size: tuple[int, int]  # the original width, height (label-map boxes are relative to it)
    reencoded: bool
    downscaled: bool


def _jpeg_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def _sixteen_bit_to_rgb(image: Image.Image, source: str) -> Image.Image:
    """I;16* (and I, which PIL uses for some 16-bit files) hold 0..65535: scale by the
    value range (x / 257), not PIL's convert, which clips everything above 255 to white."""
    pixels = np.asarray(image).astype(np.int64)
    if pixels.size and (pixels.min() < 0 or pixels.max() > 0xFFFF):
        raise UnsupportedImage(f"{source}: image mode {image.mode} with values outside 0..65535 is not supported")
    return Image.fromarray(np.round(pixels / 257).astype(np.uint8), "L").convert("RGB")


def _composite(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def to_rgb(image: Image.Image, source: str) -> Image.Image:
    """8-bit RGB by explicit rules per mode; modes without a defined meaning (float,
    LAB, HSV, ...) raise ``UnsupportedImage`` naming ``source`` and the mode."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("L", "1", "CMYK", "YCbCr") or (mode == "P" and "transparency" not in image.info):
        return image.convert("RGB")  # CMYK: PIL undoes Adobe's inverted CMYK when reading
    if mode in ("LA", "La", "PA", "P", "RGBA", "RGBa"):
        return _composite(image)
    if mode == "I" or mode.startswith("I;16"):
        return _sixteen_bit_to_rgb(image, source)
    raise UnsupportedImage(f"{source}: image mode {mode} is not supported (no defined conversion to 8-bit RGB)")


def _target_size(size: tuple[int, int], max_size: int | None, max_pixels: int) -> tuple[int, int] | None:
    """The size to scale down to (aspect kept) or None when the image is within both limits."""
    width, height = size
    scale = min(1.0, (max_pixels / (width * height)) ** 0.5)
    if max_size is not None:
        scale = min(scale, max_size / max(width, height))
    if scale >= 1.0:
        return None
    return max(1, int(width * scale)), max(1, int(height * scale))


def encode_image(data: bytes, source: str, max_size: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> EncodedImage:
    """Decode fully (so corrupt files are caught here, not in training); keep the bytes
    of an RGB/grey JPEG within the limits, else convert to RGB, downscale and re-encode."""
    with Image.open(io.BytesIO(data)) as image:
        size = image.size
        target = _target_size(size, max_size, max_pixels)
        if target is not None and image.format == "JPEG":
            image.draft(None, target)  # decode at 1/2, 1/4 or 1/8 scale when that is still large enough
        image.load()
        if target is None and image.format == "JPEG" and image.mode in ("RGB", "L"):
            return EncodedImage(data, size, reencoded=False, downscaled=False)
        rgb = to_rgb(image, source)
        if target is not None:
            rgb = rgb.resize(target, Image.Resampling.LANCZOS)
        return EncodedImage(_jpeg_bytes(rgb), size, reencoded=True, downscaled=target is not None)
