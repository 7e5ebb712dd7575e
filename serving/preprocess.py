"""Image bytes -> model input rows, with the evaluation pipeline's own transform, bounded.

``lvvit.data.transforms.EvalTransform`` (JPEG decoded at a DCT scale-down that keeps the
shorter side at least ``floor(img_size / crop_pct)``, bicubic resize, centre crop) and
``normalize`` are reused as they are, so a served image gets the pixels it gets in
evaluation. What this adds is what a server needs: every file's header is read and its
pixel count checked against the per-image and per-request limits before any pixel is
decoded (PIL knows the size without decoding), and undecodable, truncated or corrupt files
become ``ImageDecodeError``.
"""

from __future__ import annotations

import ctypes
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from lvvit.serving.protocol import IMAGE_BYTES, InvalidInput
from PIL import Image, UnidentifiedImageError

from lvvit.data.decode import EvalTransform, normalize, open_image

MEGAPIXEL = 1_000_000
_MALLOC_TRIM = getattr(ctypes.CDLL(None), "malloc_trim", None)  # glibc only


class ImageDecodeError(ValueError):
    """The bytes are not an image PIL can fully decode."""


@dataclass(frozen=True)
class PixelLimits:
    """Source pixels (width x height from the header) one image, and all images of one
    request together, may have. They bound the CPU time a request costs; the decode
    threads bound the memory."""

    per_image: int
    per_request: int


def _mp(pixels: int) -> str:
    return f"{pixels / MEGAPIXEL:.1f} MP"


def open_header(data: bytes, where: str) -> Image.Image:
    """Parse one file's header (format, size); no pixels are decoded. PIL's own
    decompression-bomb warning is left to the explicit limits (:func:`open_checked`); its
    hard error (over twice ``Image.MAX_IMAGE_PIXELS``) is a client error too."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return open_image(data)
    except Image.DecompressionBombError as err:
        raise InvalidInput(f"{where}: {err}") from err
    except UnidentifiedImageError as err:
        raise InvalidInput(f"{where}: cannot decode image (not an image format PIL can read: "
                           f"JPEG, PNG, ...)") from err
    except (OSError, ValueError, SyntaxError) as err:  # a corrupt header
        raise InvalidInput(f"{where}: cannot decode image ({err})") from err


def open_checked(files: list[bytes], limits: PixelLimits) -> list[Image.Image]:
    """Every file of an ``image_bytes`` input opened (header only) and checked against the
    pixel limits, in order, before anything is decoded: a request over a limit costs a few
    header reads, and the error names the element where the limit was crossed."""
    opened, total = [], 0
    for i, data in enumerate(files):
        where = f"input '{IMAGE_BYTES}' element {i}"
        img = open_header(data, where)
        pixels = img.width * img.height
        if pixels > limits.per_image:
            raise InvalidInput(f"{where}: {img.width}x{img.height} image ({_mp(pixels)}) is over "
                               f"this server's per-image limit of {_mp(limits.per_image)} "
                               f"(--max-image-mpix)")
        total += pixels
        if total > limits.per_request:
            raise InvalidInput(f"{where}: the request's images reach {_mp(total)} here, over this "
                               f"server's per-request limit of {_mp(limits.per_request)} "
                               f"(--max-request-mpix); split the request")
        opened.append(img)
    return opened


def crop(img: Image.Image, transform: EvalTransform) -> np.ndarray:
    """Opened image -> uint8 ``[3, S, S]``; any decoding failure is an ``ImageDecodeError``."""
    try:
        hwc = transform.crop(img)
    except (OSError, ValueError, SyntaxError) as err:  # truncated or corrupt
        raise ImageDecodeError(str(err)) from err
    return np.ascontiguousarray(hwc.transpose(2, 0, 1))


def preprocess(img: Image.Image, transform: EvalTransform, mean: tuple[float, ...] | None,
               std: tuple[float, ...] | None) -> np.ndarray:
    """One opened image -> one model input row: uint8 when ``mean`` is None (the graph
    normalises), else float32 normalised with the export's mean/std. The image is closed
    here, so its decoded pixels are freed now, not when the whole request is answered."""
    try:
        chw = crop(img, transform)
    finally:
        img.close()
    if mean is None:
        return chw
    return normalize(torch.from_numpy(chw[None]), mean, std)[0].numpy()


def return_freed_memory() -> None:
    """Give the heap pages freed by decoding back to the OS (glibc ``malloc_trim``). glibc
    keeps freed blocks in per-thread arenas: 8 full-size decodes of 9000 x 9000 JPEGs left
    the process 4.6 GB larger until trimmed. Scaled JPEG decodes free little, but PNGs and
    other formats still decode whole. A no-op where the C library has no ``malloc_trim``."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)
