"""``lvvit-shards preview``: see what the token labels say about each image.

Each tile is a sample with its label map drawn over the part of the image the map
covers: the top-1 class of every cell as a colour, its softmax score (over all classes,
non-top-k logits at 0 as the targets builder treats them) as opacity. With ``crop`` a
second tile shows one random training crop (RandomResizedCrop + flip) and the token
targets ``lvvit.loader.targets.build_token_targets`` gives it, drawn the same way, so a wrong
box, axis order or flip shows up as colours that no longer sit on the objects.
Colours go to the classes seen most in the grid; the legend names them.
"""

from __future__ import annotations

import io
import math
import random
from collections import Counter
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from lvvit import atomic
from lvvit.data.labelmap import LabelMap, decode_tlm
from lvvit.data.source import ShardSource, as_source
from lvvit.data.tarsamples import iter_tar_samples

# 24 well-separated colours (Tableau 20 and 4 more); classes beyond them are grey.
PALETTE = [
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (188, 189, 34), (23, 190, 207), (174, 199, 232),
    (255, 187, 120), (152, 223, 138), (255, 152, 150), (197, 176, 213), (196, 156, 148),
    (247, 182, 210), (219, 219, 141), (158, 218, 229), (0, 0, 128), (128, 0, 0),
    (0, 128, 128), (255, 255, 0), (0, 255, 127), (255, 0, 255),
]
OTHER = (127, 127, 127)
MAX_OPACITY = 0.7  # keep the photo visible under a fully confident cell
PAD, CAPTION, LEGEND_ROW, LEGEND_COLS, TITLE = 6, 30, 18, 4, 24


@dataclass
class Tile:
    image: Image.Image  # RGB, fitted into tile x tile
    classes: np.ndarray  # [rows, cols] top-1 class per cell (-1 where none)
    scores: np.ndarray  # [rows, cols] its probability
    grid_box: tuple[float, float, float, float]  # pixels of the tile the grid covers
    caption: str


def _font(size: int = 11):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType
        return ImageFont.load_default()


def top1_scores(label_map: LabelMap, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-1 class and its softmax probability per cell, with the classes outside the
    top-k at logit 0 (as the targets builder scatters them)."""
    values = label_map.values.astype(np.float64)
    k = values.shape[0]
    peak = np.maximum(values.max(axis=0), 0.0)
    denom = np.exp(values - peak).sum(axis=0) + max(num_classes - k, 0) * np.exp(-peak)
    best = values.argmax(axis=0)
    best_value = np.take_along_axis(values, best[None], axis=0)[0]
    classes = np.take_along_axis(label_map.indices, best[None], axis=0)[0].astype(np.int64)
    return classes, np.exp(best_value - peak) / denom


def _fit(image: Image.Image, tile: int) -> tuple[Image.Image, float, int, int]:
    """Image scaled to fit ``tile x tile``, centred: (canvas, scale, x offset, y offset)."""
    scale = tile / max(image.size)
    w, h = max(1, round(image.width * scale)), max(1, round(image.height * scale))
    canvas = Image.new("RGB", (tile, tile), (24, 24, 24))
    ox, oy = (tile - w) // 2, (tile - h) // 2
    canvas.paste(image.resize((w, h), Image.Resampling.BICUBIC), (ox, oy))
    return canvas, scale, ox, oy


def map_tile(image: Image.Image, label_map: LabelMap | None, num_classes: int, tile: int, caption: str) -> Tile:
    canvas, _, ox, oy = _fit(image, tile)
    w, h = canvas.width - 2 * ox, canvas.height - 2 * oy
    if label_map is None:
        return Tile(canvas, np.full((1, 1), -1), np.zeros((1, 1)), (ox, oy, ox + w, oy + h), caption + " (no map)")
    classes, scores = top1_scores(label_map, num_classes)
    x0, y0, x1, y1 = label_map.box
    return Tile(canvas, classes, scores, (ox + x0 * w, oy + y0 * h, ox + x1 * w, oy + y1 * h), caption)


def crop_tile(
    image: Image.Image,
    label_map: LabelMap,
    num_classes: int,
    tile: int,
    tokens: int,
    rng: random.Random,
    names: list[str] = (),
) -> Tile:
    """A random training crop and its token targets from the real targets builder."""
    import torch

    from lvvit.loader.targets import build_token_targets
    from lvvit.loader.transforms import sample_crop_box

    left, top, w, h = sample_crop_box(image.width, image.height, rng)
    flip = rng.random() < 0.5
    crop = image.crop((left, top, left + w, top + h)).resize((tile, tile), Image.Resampling.BICUBIC)
    if flip:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    crop_box = (left / image.width, top / image.height, (left + w) / image.width, (top + h) / image.height)
    cls_target, token_target = build_token_targets(
        torch.from_numpy(label_map.values.astype(np.float32))[None],
        torch.from_numpy(label_map.indices.astype(np.int64))[None],
        torch.tensor([label_map.box], dtype=torch.float32),
        torch.tensor([crop_box], dtype=torch.float32),
        torch.tensor([flip]),
        num_classes,
        tokens,
    )
    scores, classes = token_target[0].max(dim=-1)
    cls_score, cls_class = cls_target[0].max(dim=-1)
    name = names[int(cls_class)][:18] if int(cls_class) < len(names) else ""
    caption = f"crop{' flipped' if flip else ''}, class target:\n#{int(cls_class)} {name} p={float(cls_score):.2f}"
    return Tile(
        crop,
        classes.reshape(tokens, tokens).numpy(),
        scores.reshape(tokens, tokens).numpy(),
        (0, 0, tile, tile),
        caption,
    )


def _colours(tiles: list[Tile]) -> dict[int, tuple[int, int, int]]:
    counts = Counter(int(c) for t in tiles for c in t.classes.ravel() if c >= 0)
    return {c: PALETTE[i] for i, (c, _) in enumerate(counts.most_common(len(PALETTE)))}


def _draw_tile(canvas: Image.Image, at: tuple[int, int], t: Tile, colours: dict, font) -> None:
    overlay = Image.new("RGBA", t.image.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    rows, cols = t.classes.shape
    gx0, gy0, gx1, gy1 = t.grid_box
    cw, ch = (gx1 - gx0) / cols, (gy1 - gy0) / rows
    for r in range(rows):
        for c in range(cols):
            if t.classes[r, c] < 0:
                continue
            colour = colours.get(int(t.classes[r, c]), OTHER)
            alpha = round(255 * MAX_OPACITY * float(t.scores[r, c]))
            box = (gx0 + c * cw, gy0 + r * ch, gx0 + (c + 1) * cw - 1, gy0 + (r + 1) * ch - 1)
            draw.rectangle(box, fill=(*colour, alpha))
    draw.rectangle((gx0, gy0, gx1 - 1, gy1 - 1), outline=(255, 255, 255, 200))
    canvas.paste(Image.alpha_composite(t.image.convert("RGBA"), overlay).convert("RGB"), at)
    text = ImageDraw.Draw(canvas)
    text.multiline_text((at[0], at[1] + t.image.height + 2), t.caption, fill=(230, 230, 230), font=font)


def _caption(sample: dict, names: list[str]) -> str:
    label = int(sample["cls"]) if "cls" in sample else -1
    name = names[label] if 0 <= label < len(names) else str(label)
    key = sample["__key__"]
    return f"{key[-28:]}\n#{label} {name[:26]}"


def class_names(source: ShardSource) -> list[str]:
    """Names from ``classes.json`` beside the shards ([] when there is none)."""
    return [entry["name"] for entry in sorted(source.classes or [], key=lambda e: e["index"])]


def first_samples(source: ShardSource, n: int) -> list[dict]:
    """The first ``n`` samples of the source, read as a stream from its first shards."""
    samples: list[dict] = []
    for url in source.urls:
        shard = iter_tar_samples(url, source.open)
        samples += [sample.as_dict() for sample in islice(shard, n - len(samples))]
        shard.close()
        if len(samples) >= n:
            break
    return samples


def render_preview(
    shards: str | Path | ShardSource,
    out: str | Path,
    n: int = 16,
    crop: bool = False,
    tile: int = 192,
    tokens: int = 14,
    seed: int = 0,
) -> tuple[int, int]:
    """Write the preview grid of the first ``n`` samples of ``shards`` (a source or its
    spec) to ``out`` (PNG); returns its size."""
    source = as_source(shards)
    names = class_names(source)
    samples = first_samples(source, n)
    if not samples:
        raise ValueError(f"no samples in {source.spec}")
    num_classes = len(names) or 1000
    rng = random.Random(seed)
    panels: list[list[Tile]] = []
    for sample in samples:
        key = sample["__key__"]
        image = Image.open(io.BytesIO(sample["jpg"])).convert("RGB")
        label_map = decode_tlm(sample["tlm"], key) if "tlm" in sample else None
        if label_map is not None:
            num_classes = max(num_classes, int(label_map.indices.max()) + 1)
        panel = [map_tile(image, label_map, num_classes, tile, _caption(sample, names))]
        if crop and label_map is not None:
            panel.append(crop_tile(image, label_map, num_classes, tile, tokens, rng, names))
        panels.append(panel)
    colours = _colours([t for p in panels for t in p])
    return _compose(panels, colours, names, out, tile, crop, len(samples))


def _compose(panels, colours, names, out, tile, crop, count) -> tuple[int, int]:
    per_sample = 2 if crop else 1
    cols = math.ceil(math.sqrt(count / per_sample))  # roughly square: per_sample tiles per cell
    rows = math.ceil(count / cols)
    cell_w, cell_h = tile + PAD, tile + CAPTION + PAD
    legend = [(colour, f"#{c} {names[c] if c < len(names) else ''}") for c, colour in colours.items()]
    legend.append((OTHER, "other classes"))
    legend_rows = math.ceil(len(legend) / LEGEND_COLS)
    width = max(cols * per_sample * cell_w + PAD, LEGEND_COLS * 180 + PAD)
    height = TITLE + rows * cell_h + PAD + legend_rows * LEGEND_ROW + PAD
    canvas = Image.new("RGB", (width, height), (12, 12, 12))
    font = _font()
    draw = ImageDraw.Draw(canvas)
    draw.text((PAD, 5), "top-1 class per cell (colour), its softmax score (opacity); box = area the map covers",
              fill=(255, 255, 255), font=font)
    for i, panel in enumerate(panels):
        r, c = divmod(i, cols)
        for j, t in enumerate(panel):
            _draw_tile(canvas, (PAD + (c * per_sample + j) * cell_w, TITLE + r * cell_h), t, colours, font)
    top = TITLE + rows * cell_h + PAD
    for i, (colour, label) in enumerate(legend):
        r, c = divmod(i, LEGEND_COLS)
        x, y = PAD + c * 180, top + r * LEGEND_ROW
        draw.rectangle((x, y + 2, x + 12, y + 14), fill=colour)
        draw.text((x + 18, y + 2), label[:26], fill=(230, 230, 230), font=font)
    with atomic.atomic_path(Path(out)) as tmp:
        canvas.save(tmp, format="PNG")
    return canvas.size
