"""Per-sample transforms: crop sampling, draft decoding, RandAugment ops and the label
map moving with them, erasing, eval resize/crop, normalisation."""

from __future__ import annotations

import io
import math
import random

import numpy as np
import pytest
import torch
from PIL import Image

from lvvit.data.decode import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    draft_decode,
    draft_factor,
    jpeg_top_rows,
    normalize,
    open_image,
)
from lvvit.data.labelmap import LabelMap
from lvvit.loader.transforms import (
    COLOUR_OPS,
    FILL,
    GEOMETRIC_OPS,
    RandAugment,
    TrainTransform,
    crop_resize,
    decode_for_crop,
    random_erase,
    sample_crop_box,
    scaled_region,
    warp_image,
    warp_label_map,
)

# ---------------------------------------------------------------- painted test scene
# A 3 x 3 layout of flat colours (class 100 + block) and a label map over the lower two
# thirds of the image whose cell edges fall on the block edges, so the true class of
# every cell is exact and any misalignment shows up as a wrong class.

PALETTE = np.array(
    [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255),
     (0, 255, 255), (255, 255, 255), (0, 0, 0), (255, 128, 0)],
    dtype=np.float64,
)  # fmt: skip
MAP_BOX = (0.0, 1 / 3, 1.0, 1.0)
MAP_GRID = (6, 9)  # rows, cols: x edges at cols 3, 6; the y edge 2/3 at row 3
GEOMETRIC = tuple(GEOMETRIC_OPS)


def painted_array(width: int = 360, height: int = 270) -> np.ndarray:
    ys, xs = np.mgrid[0:height, 0:width]
    block = (ys * 3 // height) * 3 + xs * 3 // width
    return PALETTE[block].astype(np.uint8)


def painted_jpeg(width: int = 360, height: int = 270) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(painted_array(width, height)).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def painted_label_map() -> LabelMap:
    rows, cols = MAP_GRID
    x0, y0, x1, y1 = MAP_BOX
    cx = x0 + (np.arange(cols) + 0.5) / cols * (x1 - x0)
    cy = y0 + (np.arange(rows) + 0.5) / rows * (y1 - y0)
    block = (np.floor(cy * 3)[:, None] * 3 + np.floor(cx * 3)[None, :]).astype(np.int64)
    top1 = 100 + block
    indices = np.stack([top1, 100 + (block + 1) % 9]).astype(np.uint16)
    values = np.stack([np.full(block.shape, 6.0), np.full(block.shape, 1.0)]).astype(np.float16)
    return LabelMap(values=values, indices=indices, box=MAP_BOX)


def pixel_classes(image: np.ndarray) -> np.ndarray:
    """Class of each pixel by nearest palette colour; -1 for the fill colour."""
    colours = np.concatenate([PALETTE, np.array([FILL], dtype=np.float64)])
    dist = ((image[..., None, :].astype(np.float64) - colours) ** 2).sum(-1)
    nearest = dist.argmin(-1)
    return np.where(nearest == len(PALETTE), -1, 100 + nearest)


def map_cell_agreement(image: np.ndarray, label_map: LabelMap) -> tuple[float, int]:
    """Fraction of filled map cells whose top-1 class is the image's class at the cell
    centre, and how many cells were checked."""
    _, rows, cols = label_map.values.shape
    height, width = image.shape[:2]
    x0, y0, x1, y1 = label_map.box
    px = ((x0 + (np.arange(cols) + 0.5) / cols * (x1 - x0)) * width).astype(int)
    py = ((y0 + (np.arange(rows) + 0.5) / rows * (y1 - y0)) * height).astype(int)
    seen = pixel_classes(image)[np.ix_(py, px)]
    filled = label_map.values[0] > 0
    return float((seen == label_map.indices[0])[filled].mean()), int(filled.sum())


@pytest.mark.parametrize("name", GEOMETRIC)
def test_geometric_op_moves_the_map_with_the_image(name: str) -> None:
    image = Image.fromarray(painted_array())
    label_map = painted_label_map()
    assert map_cell_agreement(np.asarray(image), label_map) == (1.0, 54)
    matrix = GEOMETRIC_OPS[name](9.0, random.Random(3), *image.size)
    warped = np.asarray(warp_image(image, matrix, Image.Resampling.BILINEAR))
    moved = warp_label_map(label_map, [matrix], image.size)
    agreement, checked = map_cell_agreement(warped, moved)
    assert checked >= 15
    assert agreement >= 0.95
    # The op really moved the content: the unmoved map, or one moved the wrong way,
    # no longer matches the image.
    stale, _ = map_cell_agreement(warped, label_map)
    backwards, _ = map_cell_agreement(warped, warp_label_map(label_map, [np.linalg.inv(matrix)], image.size))
    assert stale < 0.9 and backwards < 0.85


def test_composed_ops_keep_the_map_aligned() -> None:
    """Four geometric ops in a row through RandAugment, including content pushed out of
    the frame by one op and back by a later one (fill colour in the image, zeros in the map)."""
    image = Image.fromarray(painted_array())
    augment = RandAugment(num_ops=4, prob=1.0, ops=GEOMETRIC)
    agreements = []
    for seed in range(6):
        warped, warps = augment(image, random.Random(seed))
        moved = warp_label_map(painted_label_map(), warps, image.size)
        agreement, checked = map_cell_agreement(np.asarray(warped), moved)
        if checked >= 10:
            agreements.append(agreement)
    assert len(agreements) >= 4
    assert np.mean(agreements) >= 0.95


def test_warped_map_fills_vacated_cells_with_zero() -> None:
    label_map = painted_label_map()
    shift = GEOMETRIC_OPS["TranslateXRel"](10.0, random.Random(0), 360, 270)
    moved = warp_label_map(label_map, [shift], (360, 270))
    dx = shift[0, 2] / 360 * MAP_GRID[1]  # shift in cells; content moves by -dx
    empty_cols = math.ceil(abs(dx) - 0.5)
    assert empty_cols >= 3
    cols = slice(MAP_GRID[1] - empty_cols, None) if dx > 0 else slice(0, empty_cols)
    assert (moved.values[:, :, cols] == 0).all()
    assert (moved.values[0] != 0).sum() == (MAP_GRID[1] - empty_cols) * MAP_GRID[0]
    assert moved.values.dtype == np.float16 and moved.indices.dtype == np.uint16


def test_train_transform_crop_box_and_flip_locate_the_map() -> None:
    """End to end through draft decoding, geometric RandAugment, crop and flip: the crop
    box (normalised, of the augmented image) and the flag lead from an output pixel back
    to the map cell of the same class."""
    transform = TrainTransform(
        img_size=64, scale=(0.4, 1.0), randaugment=RandAugment(prob=1.0, ops=GEOMETRIC), erase_prob=0.0
    )
    data = painted_jpeg()
    hits, flips = [], []
    for seed in range(24):
        out = transform(data, painted_label_map(), random.Random(seed))
        flips.append(out.flip)
        classes = pixel_classes(out.image)
        lm = out.label_map
        _, rows, cols = lm.values.shape
        mx0, my0, mx1, my1 = lm.box
        cx0, cy0, cx1, cy1 = out.crop_box
        for r in range(rows):
            for c in range(cols):
                if lm.values[0, r, c] == 0:
                    continue
                x = mx0 + (c + 0.5) / cols * (mx1 - mx0)
                y = my0 + (r + 0.5) / rows * (my1 - my0)
                u, v = (x - cx0) / (cx1 - cx0), (y - cy0) / (cy1 - cy0)
                if not (0.05 < u < 0.95 and 0.05 < v < 0.95):
                    continue
                u = 1 - u if out.flip else u
                hits.append(classes[int(v * 64), int(u * 64)] == lm.indices[0, r, c])
    assert 3 < sum(flips) < 21
    assert len(hits) >= 100
    assert np.mean(hits) >= 0.95


# ---------------------------------------------------------------- ops and magnitudes


def test_rotate_matches_pil_rotate() -> None:
    """Direction and centre: our affine is PIL's own rotation (counter-clockwise)."""
    image = Image.fromarray(painted_array())
    ours = warp_image(image, GEOMETRIC_OPS["Rotate"](10.0, random.Random(1), *image.size), Image.Resampling.BILINEAR)
    sign = 1 if random.Random(1).random() >= 0.5 else -1
    theirs = image.rotate(30 * sign, Image.Resampling.BILINEAR, fillcolor=FILL)
    assert np.abs(np.asarray(ours, np.int16) - np.asarray(theirs, np.int16)).max() <= 1


def test_colour_op_magnitudes_follow_timm() -> None:
    gradient = Image.fromarray(np.tile(np.arange(256, dtype=np.uint8), (4, 1))).convert("RGB")
    rng = random.Random(0)
    # PosterizeIncreasing at 9: 4 - int(3.6) = 1 bit kept.
    assert set(np.unique(np.asarray(COLOUR_OPS["PosterizeIncreasing"](gradient, 9.0, rng)))) == {0, 128}
    assert not np.asarray(COLOUR_OPS["PosterizeIncreasing"](gradient, 10.0, rng)).any()
    # SolarizeIncreasing at 10: threshold 0, every pixel inverted.
    solarized = np.asarray(COLOUR_OPS["SolarizeIncreasing"](gradient, 10.0, rng))
    assert (solarized == 255 - np.asarray(gradient)).all()
    # SolarizeAdd at 10: +110 below 128, clipped at 255.
    added = np.asarray(COLOUR_OPS["SolarizeAdd"](gradient, 10.0, rng))[0, :, 0]
    assert added[0] == 110 and added[127] == 237 and added[128] == 128 and added[200] == 200
    # Brightness at 10: factor 1.9 or 0.1.
    grey = Image.new("RGB", (4, 4), (100, 100, 100))
    seen = {int(np.asarray(COLOUR_OPS["BrightnessIncreasing"](grey, 10.0, random.Random(s)))[0, 0, 0]) for s in range(8)}
    assert seen == {10, 190}


def test_randaugment_rejects_unknown_ops() -> None:
    with pytest.raises(ValueError, match="Solarise"):
        RandAugment(ops=("Rotate", "Solarise"))


# ---------------------------------------------------------------- crops, decoding, erasing


def test_crop_box_follows_scale_ratio_and_fallback() -> None:
    rng = random.Random(0)
    for _ in range(300):
        left, top, w, h = sample_crop_box(500, 375, rng)
        assert min(left, top) >= 0 and left + w <= 500 and top + h <= 375
        assert 0.08 * 0.9 <= w * h / (500 * 375) <= 1.0
        assert 3 / 4 * 0.95 <= w / h <= 4 / 3 * 1.05
    # No attempt can fit: centre crop at the nearest allowed aspect ratio.
    assert sample_crop_box(1000, 100, rng, scale=(0.9, 1.0)) == ((1000 - 133) // 2, 0, 133, 100)
    assert sample_crop_box(300, 300, rng, scale=(2.0, 3.0)) == (0, 0, 300, 300)


def photo_jpeg(width: int, height: int) -> bytes:
    from sklearn.datasets import load_sample_images

    photo = Image.fromarray(load_sample_images().images[0]).resize((width, height), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    photo.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def test_draft_decode_is_close_to_full_decode_and_resize() -> None:
    data = photo_jpeg(1280, 856)
    drafted, factor = draft_decode(open_image(data), draft_factor((1280, 856), 200))
    assert factor == 4 and drafted.size == (320, 214) and drafted.mode == "RGB"
    full = Image.open(io.BytesIO(data)).convert("RGB").resize(drafted.size, Image.Resampling.BOX)
    diff = np.abs(np.asarray(drafted, np.float64) - np.asarray(full, np.float64))
    assert diff.mean() < 2.5, diff.mean()
    assert np.percentile(diff, 99) < 20


def test_draft_keeps_the_crop_at_least_the_output_size() -> None:
    data = photo_jpeg(1000, 750)
    rng = random.Random(0)
    factors = set()
    for _ in range(40):
        _, _, w, h = sample_crop_box(1000, 750, rng)
        img, factor = draft_decode(open_image(data), draft_factor((w, h), 160))
        factors.add(factor)
        assert w / factor >= 160 and h / factor >= 160
        assert factor == 1 or min(w, h) / (2 * factor) < 160  # and it is the largest such factor
        assert img.size == (math.ceil(1000 / factor), math.ceil(750 / factor))
    assert factors >= {1, 2, 4}


@pytest.mark.parametrize("progressive", [False, True])
def test_decode_for_crop_keeps_every_pixel_of_the_crop(progressive: bool) -> None:
    """Skipping the rows below the crop leaves every pixel of the crop exactly as in the
    whole decoded image."""
    photo = Image.open(io.BytesIO(photo_jpeg(900, 700)))
    buffer = io.BytesIO()
    photo.save(buffer, "JPEG", quality=90, progressive=progressive)
    data = buffer.getvalue()
    rng = random.Random(0)
    shortened = 0
    for out in (112, 224) * 12:
        left, top, w, h = sample_crop_box(900, 700, rng)
        img, factor = decode_for_crop(data, open_image(data), (left, top, w, h), out)
        whole, whole_factor = draft_decode(open_image(data), draft_factor((w, h), out))
        assert factor == whole_factor and img.width == whole.width
        shortened += img.height < whole.height
        read = min(whole.height, math.ceil((top + h) / factor) + 1)
        assert img.height >= read
        assert (np.asarray(img)[:read] == np.asarray(whole)[:read]).all()
    assert shortened >= 6


def test_jpeg_top_rows_patches_only_the_frame_height() -> None:
    data = photo_jpeg(320, 240)
    short = jpeg_top_rows(data, 100)
    assert len(short) == len(data) and open_image(short).size == (320, 100)
    assert jpeg_top_rows(b"\xff\xd8\xff\xda\x00\x02" + bytes(8), 10) is None
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "PNG")
    assert jpeg_top_rows(buffer.getvalue(), 4) is None


@pytest.mark.parametrize("resample", [Image.Resampling.BILINEAR, Image.Resampling.BICUBIC])
def test_crop_resize_matches_pillow(resample: Image.Resampling) -> None:
    photo = Image.open(io.BytesIO(photo_jpeg(640, 480))).convert("RGB")
    for region, size in [((40, 30, 500, 420), 224), ((0, 0, 640, 480), 160), ((300, 200, 380, 260), 224)]:
        ours = crop_resize(photo, region, size, resample)
        pillow = np.asarray(photo.crop(region).resize((size, size), resample))
        assert ours.shape == (size, size, 3) and ours.dtype == np.uint8
        diff = np.abs(ours.astype(int) - pillow)
        assert diff.mean() < 0.1 and (diff > 2).mean() < 0.002, (region, diff.mean())


def test_scaled_region_rounds_into_the_decoded_image() -> None:
    assert scaled_region((101, 50, 503, 375), 2, (250, 188)) == (50, 25, 250, 188)
    assert scaled_region((0, 0, 3, 3), 8, (10, 10)) == (0, 0, 1, 1)


def test_random_erase_fills_one_box_with_mean_centred_noise() -> None:
    image = np.full((64, 64, 3), 7, np.uint8)
    random_erase(image, random.Random(1), prob=1.0)
    erased = (image != 7).any(-1)
    rows, cols = np.nonzero(erased)
    box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    assert 0.02 * 64 * 64 * 0.8 <= box <= 64 * 64 / 3 * 1.1
    assert erased.sum() >= 0.95 * box  # one solid box (a noise pixel may hit 7 by chance)
    mean = image[erased].mean(0) / 255
    np.testing.assert_allclose(mean, IMAGENET_MEAN, atol=0.03)
    untouched = np.full((8, 8, 3), 7, np.uint8)
    random_erase(untouched, random.Random(1), prob=0.0)
    assert (untouched == 7).all()


def test_eval_transform_resizes_shorter_side_then_centre_crops() -> None:
    from lvvit.data.decode import EvalTransform

    data = photo_jpeg(400, 300)
    out = EvalTransform(img_size=224, crop_pct=0.9)(data)
    # floor(224 / 0.9) = 248 on the shorter side -> 330 x 248; centre crop from (53, 12).
    full = Image.open(io.BytesIO(data)).convert("RGB").resize((330, 248), Image.Resampling.BICUBIC)
    expected = np.asarray(full.crop((53, 12, 277, 236)))
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    assert (out == expected).all()


def test_eval_transform_decodes_large_jpegs_scaled_and_close_to_full() -> None:
    """A JPEG with a shorter side of at least twice the resize target is decoded at a DCT
    scale-down (here 1/4: 1600 / 4 >= 248 > 1600 / 8), and the crop stays within about a
    grey level of the full-resolution decode."""
    from lvvit.data.decode import EvalTransform

    data = photo_jpeg(2400, 1600)
    img = open_image(data)
    out = EvalTransform(img_size=224, crop_pct=0.9).crop(img)
    assert img.size == (600, 400)  # decoded in place at 1/4
    full = Image.open(io.BytesIO(data)).convert("RGB").resize((372, 248), Image.Resampling.BICUBIC)
    diff = np.abs(out.astype(int) - np.asarray(full.crop((74, 12, 298, 236))))
    assert out.shape == (224, 224, 3) and diff.mean() < 1.5 and np.percentile(diff, 99) < 12, diff.mean()


def test_normalize_matches_the_formula() -> None:
    images = torch.randint(0, 256, (2, 3, 5, 7), dtype=torch.uint8)
    out = normalize(images)
    assert out.dtype == torch.float32 and out.shape == images.shape
    for c in range(3):
        expected = (images[:, c].double() / 255 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
        torch.testing.assert_close(out[:, c].double(), expected, atol=1e-5, rtol=0)
    assert normalize(images, dtype=torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("magnitude", [0.0, 5.0, 10.0])
def test_every_op_runs_over_the_magnitude_range(magnitude: float) -> None:
    image = Image.fromarray(painted_array(48, 36))
    for name in RandAugment().ops:
        augment = RandAugment(num_ops=1, prob=1.0, magnitude=magnitude, magnitude_std=0.0, ops=(name,))
        out, warps = augment(image, random.Random(0))
        assert out.size == image.size and out.mode == "RGB", name
        assert len(warps) == (name in GEOMETRIC_OPS)
