"""Label-map bytes: our ``tlm`` record against the official per-image ``.pt`` maps.

No ImageNet teacher can be downloaded here, so the photo-like maps come from a stand-in
teacher on real photographs (the two sample photos bundled with scikit-learn, cut into
random crops): each cell of the teacher's 18 x 18 grid gets colour and gradient
statistics of its patch, of its 3 x 3 neighbourhood and of the whole image (a crude
large receptive field), and a fixed random linear classifier over 1000 classes turns
them into logits. Its maps share classes between neighbouring cells, as a real
teacher's do, but they are noisier (about 28 distinct top-1 and 84 distinct top-5
classes per map), so the ratio measured here should be an upper bound for real maps.
Random maps (uniform fp16 bit patterns, uniform classes) bound the worst case.
"""

from __future__ import annotations

import io

import numpy as np

from lvvit.data.labelmap import LabelMap, encode_tlm

TEACHER = (
    "stand-in teacher: random linear 1000-class classifier over per-cell colour/gradient "
    "statistics (cell, 3x3 neighbourhood, whole image) of random crops of the scikit-learn "
    "sample photos"
)


def official_bytes(label_map: LabelMap) -> int:
    """Bytes of the official format: ``torch.save`` of ``[2, k, H, W]`` fp16 (values,
    then class indices as fp16)."""
    import torch

    values = torch.from_numpy(np.ascontiguousarray(label_map.values))
    indices = torch.from_numpy(label_map.indices.astype(np.float16))
    buffer = io.BytesIO()
    torch.save(torch.stack([values, indices]), buffer)
    return buffer.getbuffer().nbytes


def _photo_crops(n: int, rng: np.random.Generator) -> list:
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(a) for a in load_sample_images().images]
    crops = []
    for i in range(n):
        photo = photos[i % len(photos)]
        scale = rng.uniform(0.5, 1.0)
        w, h = int(photo.width * scale), int(photo.height * scale)
        x, y = rng.integers(0, photo.width - w + 1), rng.integers(0, photo.height - h + 1)
        crop = photo.crop((x, y, x + w, y + h))
        crops.append(crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else crop)
    return crops


def _cell_features(image, grid: int) -> np.ndarray:
    """Per-cell statistics of the centre square, as a teacher at ``grid`` cells sees it."""
    from PIL import Image

    side = min(image.size)
    x0, y0 = (image.width - side) // 2, (image.height - side) // 2
    square = image.crop((x0, y0, x0 + side, y0 + side)).resize((grid * 8, grid * 8), Image.BICUBIC)
    pixels = np.asarray(square, dtype=np.float32) / 255.0
    patches = pixels.reshape(grid, 8, grid, 8, 3).transpose(0, 2, 1, 3, 4)
    local = np.concatenate(
        [
            patches.mean((2, 3)),
            patches.std((2, 3)),
            np.abs(np.diff(patches, axis=3)).mean((2, 3)),
            np.abs(np.diff(patches, axis=2)).mean((2, 3)),
        ],
        axis=-1,
    )
    padded = np.pad(local, ((1, 1), (1, 1), (0, 0)), mode="edge")
    context = sum(padded[i : i + grid, j : j + grid] for i in range(3) for j in range(3)) / 9
    whole = np.broadcast_to(local.mean((0, 1)), local.shape)
    return np.concatenate([local, context, whole], axis=-1)


def _top_k(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """[H, W, C] logits -> best-first fp16 values and uint16 indices, both [k, H, W]."""
    order = np.argsort(-logits, axis=-1, kind="stable")[..., :k]
    values = np.take_along_axis(logits, order, axis=-1)
    return values.transpose(2, 0, 1).astype(np.float16), order.transpose(2, 0, 1).astype(np.uint16)


def photo_label_maps(
    n: int = 64, grid: int = 18, k: int = 5, num_classes: int = 1000, seed: int = 0
) -> list[LabelMap]:
    """Label maps from the stand-in teacher (see module docstring) on real photos."""
    rng = np.random.default_rng(seed)
    features = np.stack([_cell_features(c, grid) for c in _photo_crops(n, rng)])
    flat = features.reshape(-1, features.shape[-1])
    features = (features - flat.mean(0)) / (flat.std(0) + 1e-6)
    weight = rng.standard_normal((num_classes, features.shape[-1])) / np.sqrt(features.shape[-1])
    bias = rng.normal(0.0, 1.0, num_classes)
    logits = (features @ weight.T * 4.0 + bias).astype(np.float32)  # top-1 around 12, as teachers give
    return [LabelMap(*_top_k(m, k), box=(0.0, 0.0, 1.0, 1.0)) for m in logits]


def random_label_maps(
    n: int = 64, grid: int = 18, k: int = 5, num_classes: int = 1000, seed: int = 0
) -> list[LabelMap]:
    """Incompressible maps: every fp16 bit pattern and class equally likely."""
    rng = np.random.default_rng(seed)
    shape = (n, k, grid, grid)
    values = rng.integers(0, 1 << 16, shape, dtype=np.uint16).view(np.float16)
    indices = rng.integers(0, num_classes, shape).astype(np.uint16)
    return [LabelMap(v, i, box=(0.0, 0.0, 1.0, 1.0)) for v, i in zip(values, indices, strict=True)]


def _ratios(maps: list[LabelMap]) -> tuple[float, float, np.ndarray]:
    ours = np.array([len(encode_tlm(m)) for m in maps], dtype=np.float64)
    official = np.array([official_bytes(m) for m in maps], dtype=np.float64)
    return float(ours.mean()), float(official.mean()), ours / official


def label_bytes_report(
    n: int = 64, grid: int = 18, k: int = 5, num_classes: int = 1000, seed: int = 0
) -> dict:
    """Mean bytes per map of ``tlm`` and of the official format, on photo-like and on
    random maps, and their ratios (the targets: photo <= 0.5, random max <= 1.0)."""
    photo_ours, photo_official, photo_ratio = _ratios(photo_label_maps(n, grid, k, num_classes, seed))
    rand_ours, rand_official, rand_ratio = _ratios(random_label_maps(n, grid, k, num_classes, seed))
    return {
        "maps": n,
        "grid": grid,
        "k": k,
        "teacher": TEACHER,
        "official_bytes": photo_official,
        "photo_bytes": photo_ours,
        "photo_ratio": photo_ours / photo_official,
        "photo_ratio_max": float(photo_ratio.max()),
        "random_official_bytes": rand_official,
        "random_bytes": rand_ours,
        "random_ratio": rand_ours / rand_official,
        "random_ratio_max": float(rand_ratio.max()),
    }
