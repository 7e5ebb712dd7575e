"""The demo's built-in data: scikit-learn's handwritten digits as an ImageFolder of JPEGs.

The 1,797 real 8x8 scans ship inside scikit-learn, so the demo needs no download.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from lvvit import atomic

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def digit_image(pixels: np.ndarray, size: int) -> Image.Image:
    """An 8x8 scan (values 0..16, ink high) as a dark-on-light RGB image of ``size`` px."""
    grey = (255 - pixels.reshape(8, 8) * (255 / 16)).astype(np.uint8)
    return Image.fromarray(grey, mode="L").resize((size, size), Image.BICUBIC).convert("RGB")


def write_digits_imagefolder(
    root: Path, size: int = 64, holdout: float = 0.2, seed: int = 0, limit: int | None = None
) -> dict[str, int]:
    """Write ``root/{train,val}/<class>/<n>.jpg`` with a stratified held-out split.

    Returns the number of images per split. The split is fixed by ``seed`` so the teacher,
    the student and the server are all scored on the same held-out images.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    counts = {"train": 0, "val": 0}
    for cls in range(10):
        idx = rng.permutation(np.flatnonzero(digits.target == cls))
        if limit is not None:
            idx = idx[: max(2, limit // 10)]
        n_val = max(1, round(len(idx) * holdout))
        for split, members in (("val", idx[:n_val]), ("train", idx[n_val:])):
            folder = root / split / f"{cls}_{DIGIT_NAMES[cls]}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in members:
                with atomic.atomic_path(folder / f"{i:04d}.jpg") as tmp:
                    digit_image(digits.images[i], size).save(tmp, format="JPEG", quality=95)
                counts[split] += 1
    atomic.write_json(root / "split.json", {**counts, "size": size, "seed": seed})
    return counts
