"""``lvvit-shards build/preview/info`` on a small ImageFolder made here, with official-format
``.pt`` label maps written by ``torch.save``; shards are read back with WebDataset."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from lvvit.data.cli import main
from lvvit.data.labelmap import centre_square_box, decode_tlm
from lvvit.loader import preview

RED, BLUE = (230, 20, 20), (20, 20, 230)


def _painted(width: int, height: int) -> Image.Image:
    """Left half red, right half blue: the map's classes follow the same split."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[:, : width // 2] = RED
    pixels[:, width // 2 :] = BLUE
    return Image.fromarray(pixels)


def _official_map(rng: np.random.Generator, grid: int = 4, k: int = 5) -> torch.Tensor:
    """[2, k, H, W] fp16 as the official maps: logits best first, then indices as fp16.
    Left columns say class 1, right columns class 2; the rest are spread up to 2047."""
    values = -np.sort(-rng.normal(4.0, 2.0, (k, grid, grid)), axis=0)
    values[0] = 12.0 + rng.random((grid, grid))
    indices = rng.choice(np.arange(3, 2048), size=(k, grid, grid))
    indices[0, :, : grid // 2], indices[0, :, grid // 2 :] = 1, 2
    return torch.stack([torch.tensor(values).half(), torch.tensor(indices).half()])


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def make_image_folder(root: Path, labels: Path, per_class: int = 4, sizes=((48, 32), (32, 48))) -> dict:
    """Two JPEG classes, plus: a PNG, an oversized image, a corrupt JPEG, one image
    without a map and one with a map of the wrong shape. Returns what a build must give."""
    rng = np.random.default_rng(0)
    expected, bad = {}, {}
    for label, wnid in enumerate(["n00000001", "n00000002"]):
        (root / wnid).mkdir(parents=True)
        (labels / wnid).mkdir(parents=True)
        for i in range(per_class):
            width, height = sizes[label]
            data = _jpeg(_painted(width, height))
            (root / wnid / f"{wnid}_{i}.JPEG").write_bytes(data)
            tensor = _official_map(rng)
            torch.save(tensor, labels / wnid / f"{wnid}_{i}.pt")
            expected[f"{wnid}/{wnid}_{i}"] = {"label": label, "jpg": data, "map": tensor, "size": (width, height)}
    extras = root / "n00000002"
    _painted(40, 30).save(extras / "drawing.v2.png")  # dot in the stem, PNG: re-encoded
    torch.save(t := _official_map(rng), labels / "n00000002" / "drawing.pt")  # official: name up to the first dot
    expected["n00000002/drawing_v2"] = {"label": 1, "jpg": None, "map": t, "size": (40, 30)}
    _painted(200, 120).save(extras / "big.jpg", quality=90)  # longer side above --max-size 64
    torch.save(t := _official_map(rng), labels / "n00000002" / "big.pt")
    expected["n00000002/big"] = {"label": 1, "jpg": None, "map": t, "size": (200, 120)}
    good = _jpeg(_painted(48, 32))
    (root / "n00000001" / "broken.jpg").write_bytes(good[: len(good) // 2])
    torch.save(_official_map(rng), labels / "n00000001" / "broken.pt")
    bad["n00000001/broken"] = "cannot decode"
    (root / "n00000001" / "unlabelled.jpg").write_bytes(good)
    bad["n00000001/unlabelled"] = "no label map"
    (root / "n00000001" / "wrongshape.jpg").write_bytes(good)
    torch.save(torch.zeros(5, 4, 4).half(), labels / "n00000001" / "wrongshape.pt")
    bad["n00000001/wrongshape"] = r"\[2, k, H, W\]"
    (root / "n00000001" / "notes.txt").write_text("not an image")  # ignored, not reported
    return {"good": expected, "bad": bad}


def _samples(out: Path) -> list[dict]:
    names = [e["name"] for e in json.loads((out / "manifest.json").read_text())["shards"]]
    dataset = wds.WebDataset([str(out / n) for n in names], shardshuffle=False, empty_check=False)
    return list(dataset)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> tuple[Path, Path, dict]:
    base = tmp_path_factory.mktemp("imagefolder")
    expected = make_image_folder(base / "train", base / "labels")
    return base / "train", base / "labels", expected


@pytest.fixture(scope="module")
def built(folder, tmp_path_factory) -> tuple[Path, dict]:
    root, labels, expected = folder
    out = tmp_path_factory.mktemp("shards")
    with pytest.raises(SystemExit) as exit_info:
        main(["build", str(root), "--out", str(out), "--shard-size", "3", "--label-root", str(labels),
              "--max-size", "64", "--workers", "2", "--quiet"])
    assert exit_info.value.code == 0
    return out, expected


def test_build_counts_manifest_and_classes(built):
    out, expected = built
    manifest = json.loads((out / "manifest.json").read_text())
    good = len(expected["good"])
    assert manifest["total"] == good == 10
    assert [s["samples"] for s in manifest["shards"]] == [3, 3, 3, 1]
    assert [s["name"] for s in manifest["shards"]] == [f"train-{i:06d}.tar" for i in range(4)]
    assert sorted(p.name for p in out.glob("*.tar")) == [s["name"] for s in manifest["shards"]]
    assert not list(out.glob("*.tmp"))
    classes = json.loads((out / "classes.json").read_text())
    assert classes == [{"index": 0, "name": "n00000001", "wnid": "n00000001"},
                       {"index": 1, "name": "n00000002", "wnid": "n00000002"}]


def test_bad_samples_are_reported_and_left_out(built):
    out, expected = built
    summary = json.loads((out / "train-summary.json").read_text())
    assert summary["complete"] is True
    reasons = {entry["key"]: entry["reason"] for entry in summary["skipped"]}
    assert set(reasons) == set(expected["bad"])
    for key, pattern in expected["bad"].items():
        assert re.search(pattern, reasons[key]), reasons[key]
    assert summary["reencoded"] == 2  # the PNG and the oversized JPEG
    keys = {s["__key__"] for s in _samples(out)}
    assert keys == set(expected["good"])


def test_records_decode_to_the_imported_maps_and_boxes(built):
    out, expected = built
    for sample in _samples(out):
        key = sample["__key__"]
        want = expected["good"][key]
        assert int(sample["cls"]) == want["label"]
        label_map = decode_tlm(sample["tlm"], key)
        values, indices = want["map"][0].numpy(), want["map"][1].numpy()
        assert np.array_equal(label_map.values.view(np.uint16), values.view(np.uint16))
        assert label_map.indices.dtype == np.uint16
        assert np.array_equal(label_map.indices, indices.astype(np.int64))
        assert int(label_map.indices.max()) > 256  # 2-byte palette cells exercised
        assert label_map.box == pytest.approx(centre_square_box(*want["size"]), abs=1e-7)
        image = Image.open(io.BytesIO(sample["jpg"]))
        assert image.format == "JPEG"
        if want["jpg"] is not None:
            assert sample["jpg"] == want["jpg"]  # original bytes kept
        else:
            assert max(image.size) <= 64
            width, height = want["size"]
            assert abs(image.width / image.height - width / height) < 0.05


def test_same_seed_same_bytes_other_seed_other_order(folder, tmp_path):
    root, _, _ = folder
    runs = {}
    for name, seed in [("a", 5), ("b", 5), ("c", 6)]:
        with pytest.raises(SystemExit):
            main(["build", str(root), "--out", str(tmp_path / name), "--seed", str(seed), "--workers", "1",
                  "--shard-size", "100", "--quiet"])
        runs[name] = (tmp_path / name / "train-000000.tar").read_bytes()
    assert runs["a"] == runs["b"]
    order = lambda name: [s["__key__"] for s in _samples(tmp_path / name)]  # noqa: E731
    assert order("a") != order("c") and sorted(order("a")) == sorted(order("c"))
    classes = {int(s["cls"]) for s in _samples(tmp_path / "a")[:6]}
    assert classes == {0, 1}  # shuffled, not class by class


def test_shard_bytes_bound(folder, tmp_path):
    root, _, expected = folder
    with pytest.raises(SystemExit):
        main(["build", str(root), "--out", str(tmp_path), "--shard-bytes", "20K", "--workers", "1", "--quiet"])
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["total"] == len(expected["good"]) + 2  # no maps needed: unlabelled, wrongshape kept
    assert len(manifest["shards"]) > 1
    for entry in manifest["shards"]:
        assert (tmp_path / entry["name"]).stat().st_size <= 20 * 1024


def test_other_build_in_same_folder_is_refused_then_overwritten(folder, tmp_path, capsys):
    root, _, _ = folder
    args = ["build", str(root), "--out", str(tmp_path), "--workers", "1", "--shard-size", "4", "--quiet"]
    with pytest.raises(SystemExit):
        main(args)
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--seed", "9"])
    assert exit_info.value.code == 2
    assert "--overwrite" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--seed", "9", "--overwrite"])
    assert exit_info.value.code == 0
    assert json.loads((tmp_path / "train-summary.json").read_text())["settings"]["seed"] == 9


def test_a_resumed_build_removes_what_a_killed_one_was_writing(folder, tmp_path):
    """Temporaries a SIGKILL left (a tar, the summary, the manifest) are gone after the next
    run of the same build; nothing else is touched."""
    root, _, _ = folder
    args = ["build", str(root), "--out", str(tmp_path), "--workers", "1", "--shard-size", "4", "--quiet"]
    with pytest.raises(SystemExit):
        main(args)
    stale = [tmp_path / ".train-summary.json.4000001.tmp", tmp_path / ".manifest.json.4000002.tmp",
             tmp_path / "train-000099.tar.tmp"]
    for path in stale:
        path.write_text("half")
    (tmp_path / "notes.tmp").write_text("the user's")
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 0
    assert not any(path.exists() for path in stale) and (tmp_path / "notes.tmp").read_text() == "the user's"


def test_killed_build_leaves_no_complete_looking_tar_and_resumes(tmp_path):
    """SIGKILL mid-build (while a slow oversized image is being re-encoded), then re-run:
    the result is byte-identical to an uninterrupted build."""
    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir(parents=True)
    for i in range(12):
        (root / "ab"[i % 2] / f"img{i:02d}.jpg").write_bytes(_jpeg(_painted(40, 30)))
    gradient = np.linspace(0, 255, 6000, dtype=np.float32)
    huge = Image.fromarray(np.broadcast_to(gradient[None, :, None], (4000, 6000, 3)).astype(np.uint8))
    for i in range(6):  # small files, slow to decode: at least 4 come after the first shard
        huge.save(root / "b" / f"huge{i}.jpg", quality=80)
    command = [sys.executable, "-c", "from lvvit.data.cli import main; main()", "build", str(root),
               "--shard-size", "2", "--max-size", "64", "--workers", "1", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([*command, "--out", str(tmp_path / "out")], env=env)
    summary = tmp_path / "out" / "train-summary.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if summary.is_file() and json.loads(summary.read_text())["shards"]:
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    out = tmp_path / "out"
    assert not (out / "manifest.json").exists()
    state = json.loads(summary.read_text())
    assert not state["complete"]
    listed = {s["name"] for s in state["shards"]}
    assert listed and {p.name for p in out.glob("*.tar")} <= listed | {f"train-{len(listed):06d}.tar"}
    assert len(listed) < 9  # it was killed before the end
    done = {name: (out / name).stat().st_mtime_ns for name in listed}

    subprocess.run([*command, "--out", str(out)], env=env, check=True)
    subprocess.run([*command, "--out", str(tmp_path / "clean")], env=env, check=True)
    assert {name: (out / name).stat().st_mtime_ns for name in listed} == done  # kept, not rewritten
    assert not list(out.glob("*.tmp"))
    clean = sorted(p.name for p in (tmp_path / "clean").glob("*.tar"))
    assert sorted(p.name for p in out.glob("*.tar")) == clean and len(clean) == 9
    for name in clean:
        assert (out / name).read_bytes() == (tmp_path / "clean" / name).read_bytes()
    assert json.loads((out / "manifest.json").read_text()) == json.loads((tmp_path / "clean" / "manifest.json").read_text())
    assert json.loads(summary.read_text())["resumed_shards"] == len(listed)


def test_preview_draws_maps_over_the_box_they_cover(built, tmp_path):
    out, _ = built
    png = tmp_path / "grid.png"
    with pytest.raises(SystemExit) as exit_info:
        main(["preview", str(out), "--out", str(png), "--n", "5", "--crop", "--tile", "96"])
    assert exit_info.value.code == 0
    image = Image.open(png)
    cols, rows = 2, 3  # ceil(sqrt(5 / 2)) samples per row, 2 tiles each
    width = max(cols * 2 * (96 + preview.PAD) + preview.PAD, preview.LEGEND_COLS * 180 + preview.PAD)
    assert image.format == "PNG" and image.width == width
    assert image.height >= preview.TITLE + rows * (96 + preview.CAPTION + preview.PAD) + preview.LEGEND_ROW


def test_preview_pixels_follow_the_map_box(built, tmp_path):
    """One wide sample: its map covers the centre square; left cells class 1, right
    class 2. Inside the box the photo is tinted by the class colour in proportion to the
    cell's score; the margins outside the box are untouched."""
    out, expected = built
    key, sample = next((s["__key__"], s) for s in _samples(out) if expected["good"][s["__key__"]]["size"] == (48, 32))
    single = tmp_path / "one.tar"
    with wds.TarWriter(str(single)) as writer:
        writer.write({"__key__": key, "jpg": sample["jpg"], "cls": sample["cls"], "tlm": sample["tlm"]})
    tile = 96
    preview.render_preview(single, tmp_path / "one.png", n=1, tile=tile)
    image = np.asarray(Image.open(tmp_path / "one.png").convert("RGB")).astype(float)
    label_map = decode_tlm(sample["tlm"], key)
    classes, scores = preview.top1_scores(label_map, num_classes=2048)
    assert set(classes[:, :2].ravel()) == {1} and set(classes[:, 2:].ravel()) == {2}
    # 48x32 fitted into 96x96: 96x64 at y offset 16; the map box spans x 16..80.
    x0, y0 = preview.PAD, preview.TITLE + 16
    photo = np.asarray(Image.open(io.BytesIO(sample["jpg"])).convert("RGB").resize((96, 64), Image.BICUBIC)).astype(float)
    colours = {1: np.array(preview.PALETTE[0]), 2: np.array(preview.PALETTE[1])}
    for row, col in [(1, 0), (2, 1), (0, 2), (3, 3)]:
        x, y = 16 + col * 16 + 8, row * 16 + 8
        alpha = round(255 * preview.MAX_OPACITY * scores[row, col]) / 255
        want = photo[y, x] * (1 - alpha) + colours[int(classes[row, col])] * alpha
        assert np.abs(image[y0 + y, x0 + x] - want).max() <= 3, (row, col)
    for x in (4, 91):  # outside the centre square: the photo as it is
        assert np.abs(image[y0 + 30, x0 + x] - photo[30, x]).max() <= 3


def test_info_prints_shape(built, capsys):
    out, _ = built
    with pytest.raises(SystemExit):
        main(["info", str(out)])
    text = capsys.readouterr().out
    assert "samples: 10" in text and "k=5 H=4 W=4" in text


def test_access_options_out_of_range_are_one_line_naming_the_option(built, capsys):
    import argparse

    from lvvit.data.cli import access_from_args
    from lvvit.errors import ConfigError

    def access(timeout=5.0, retries=0, deadline=None):
        return access_from_args(argparse.Namespace(shard_timeout=timeout, shard_retries=retries,
                                                   shard_deadline=deadline))

    assert access().retries == 0
    with pytest.raises(ConfigError, match=r"^--shard-timeout 0\.0: must be a finite number > 0$"):
        access(timeout=0.0)
    with pytest.raises(ConfigError, match=r"^--shard-deadline nan: must be a finite number > 0$"):
        access(deadline=float("nan"))
    with pytest.raises(ConfigError, match=r"^--shard-retries -1: must be >= 0$"):
        access(retries=-1)
    out, _ = built
    with pytest.raises(SystemExit) as exit_info:  # the entry point: status 1, the message alone
        main(["info", str(out), "--shard-retries", "-1"])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.strip().splitlines() == ["--shard-retries -1: must be >= 0"]
