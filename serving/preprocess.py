"""Image bytes -> model input row, with the evaluation pipeline's own transform.

``lvvit.data.transforms.EvalTransform`` (bicubic resize of the shorter side to
``floor(img_size / crop_pct)``, centre crop) and ``normalize`` are reused as they are, so
a served image gets the pixels it gets in evaluation. What this adds is what a server
needs: undecodable, truncated or decompression-bomb files become ``ImageDecodeError``.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from lvvit.data.transforms import EvalTransform, normalize


class ImageDecodeError(ValueError):
    """The bytes are not an image PIL can fully decode."""


def crop(data: bytes, transform: EvalTransform) -> np.ndarray:
    """Encoded file -> uint8 ``[3, S, S]``; any decoding failure is an ``ImageDecodeError``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            hwc = transform(data)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
        raise ImageDecodeError(str(err)) from err
    except UnidentifiedImageError as err:
        raise ImageDecodeError("not an image format PIL can read (JPEG, PNG, ...)") from err
    except (OSError, ValueError, SyntaxError) as err:  # truncated or corrupt
        raise ImageDecodeError(str(err)) from err
    return np.ascontiguousarray(hwc.transpose(2, 0, 1))


def preprocess(data: bytes, transform: EvalTransform, mean: tuple[float, ...] | None,
               std: tuple[float, ...] | None) -> np.ndarray:
    """One encoded image -> one model input row: uint8 when ``mean`` is None (the graph
    normalises), else float32 normalised with the export's mean/std."""
    chw = crop(data, transform)
    if mean is None:
        return chw
    return normalize(torch.from_numpy(chw[None]), mean, std)[0].numpy()
