"""``lvvit-shards`` passes no bad data on silently: pixel modes PIL mishandles, images
above the pixel cap, truncated tars, empty class folders, builds that keep nothing,
official map names with dots, and numeric class folders. Tiny folders made here; the
real CLI (``main`` in process, a subprocess where one-line stderr matters)."""

from __future__ import annotations

import io
import json
import pickle
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lvvit.data.cli import main
from lvvit.data.members import DEFAULT_MAX_PIXELS
from lvvit.data.tarsamples import iter_tar_samples
from lvvit.labeling.sources import plan_image_folder

RED, BLUE = (230, 20, 20), (20, 20, 230)


def _run(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    return exit_info.value.code


def _build(root: Path, out: Path, *extra: str) -> int:
    return _run(["build", str(root), "--out", str(out), "--workers", "1", "--quiet", *extra])


def _samples(out: Path) -> dict[str, dict]:
    manifest = json.loads((out / "manifest.json").read_text())
    return {s.key: s.as_dict() for e in manifest["shards"] for s in iter_tar_samples(out / e["name"])}


def _rgb(sample: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(sample["jpg"])).convert("RGB")).astype(float)


def _jpeg(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95, **options)
    return buffer.getvalue()


def _halves(left, right, mode: str = "RGB", size: int = 32) -> Image.Image:
    pixels = np.zeros((size, size, len(left)), np.uint8)
    pixels[:, : size // 2], pixels[:, size // 2 :] = left, right
    return Image.fromarray(pixels.squeeze(-1) if len(left) == 1 else pixels, mode)


def test_pixel_modes_become_rgb_or_are_refused_by_name(tmp_path, capsys):
    root = tmp_path / "root" / "a"
    root.mkdir(parents=True)
    gradient = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(gradient).save(root / "grey16.png")  # opens as I;16
    palette = Image.fromarray(np.repeat([[0] * 16 + [1] * 16], 32, axis=0).astype(np.uint8), "P")
    palette.putpalette([*RED, *BLUE] + [0] * 762)
    palette.save(root / "palette.png", transparency=0)  # index 0 (red) is transparent
    (root / "cmyk.jpg").write_bytes(_jpeg(Image.new("CMYK", (32, 32), (0, 255, 255, 0))))  # Adobe, inverted
    _halves((100, 255), (100, 0), "LA").save(root / "grey_alpha.png")
    Image.fromarray(np.full((16, 16), 0.5, np.float32)).save(root / "float.tif")

    assert _build(tmp_path / "root", tmp_path / "out") == 0
    samples = _samples(tmp_path / "out")
    grey16 = _rgb(samples["a/grey16"])
    assert abs(grey16.mean() - 127.5) < 3  # PIL's own convert gives ~254 (all white)
    palette_rgb = _rgb(samples["a/palette"])
    assert np.abs(palette_rgb[4:28, 2:12] - 255).max() < 8  # transparent -> white background
    assert np.abs(palette_rgb[4:28, 20:30] - BLUE).max() < 8
    assert np.abs(_rgb(samples["a/cmyk"]).mean(axis=(0, 1)) - (255, 0, 0)).max() < 8
    grey_alpha = _rgb(samples["a/grey_alpha"])
    assert np.abs(grey_alpha[4:28, 2:12] - 100).max() < 8 and np.abs(grey_alpha[4:28, 20:30] - 255).max() < 8
    assert "a/float" not in samples
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if "left out a/float" in x)
    assert str(root / "float.tif") in line and "mode F" in line


def test_image_above_the_pixel_cap_is_downscaled(tmp_path, capsys):
    root = tmp_path / "root" / "a"
    root.mkdir(parents=True)
    big = Image.new("RGB", (8000, 6000), (90, 140, 200))  # 48 MP, a few hundred KB as JPEG
    big.save(root / "big.jpg", quality=75)
    small = _jpeg(_halves(RED, BLUE))
    (root / "small.jpg").write_bytes(small)

    assert _build(tmp_path / "root", tmp_path / "out") == 0
    samples = _samples(tmp_path / "out")
    assert samples["a/small"]["jpg"] == small  # within the cap: original bytes
    image = Image.open(io.BytesIO(samples["a/big"]["jpg"]))
    assert image.width * image.height <= DEFAULT_MAX_PIXELS
    assert image.width * image.height > 0.99 * DEFAULT_MAX_PIXELS  # scaled to the cap, no further
    assert abs(image.width / image.height - 4 / 3) < 1e-3
    summary = json.loads((tmp_path / "out" / "train-summary.json").read_text())
    assert summary["downscaled"] == 1 and summary["settings"]["max_pixels"] == DEFAULT_MAX_PIXELS
    assert "1 downscaled" in capsys.readouterr().out


@pytest.fixture
def shards(tmp_path) -> Path:
    """Three shards of two samples each."""
    root = tmp_path / "root"
    for i in range(6):
        (root / "ab"[i % 2]).mkdir(parents=True, exist_ok=True)
        (root / "ab"[i % 2] / f"img{i}.jpg").write_bytes(_jpeg(_halves(RED, BLUE)))
    assert _build(root, tmp_path / "out", "--shard-size", "2") == 0
    return tmp_path / "out"


def _cut_mid_member(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


def _cut_at_member_boundary(path: Path) -> None:
    """Drop the end-of-archive blocks: what is left reads as a valid, shorter tar."""
    with tarfile.open(path) as tar:
        last = tar.getmembers()[-1]
    end = last.offset_data + -(-last.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    path.write_bytes(path.read_bytes()[:end])


def test_info_reads_every_tar_and_names_the_damaged_ones(shards, capsys):
    assert _run(["info", str(shards)]) == 0
    assert "shards: 3  samples: 6" in capsys.readouterr().out
    assert _run(["info", str(shards / "train-000001.tar")]) == 0
    assert "shards: 1  samples: 2 " in capsys.readouterr().out  # this tar's count, not the folder's

    _cut_mid_member(shards / "train-000001.tar")
    _cut_at_member_boundary(shards / "train-000002.tar")
    assert _run(["info", str(shards)]) == 1
    captured = capsys.readouterr()
    damaged = [line for line in captured.out.splitlines() if line.startswith("damaged:")]
    assert len(damaged) == 2
    assert str(shards / "train-000001.tar") in damaged[0] and str(shards / "train-000002.tar") in damaged[1]
    assert "truncated" in damaged[1]
    assert "samples: 2 " in captured.out  # only the intact shard is counted
    assert "2 of 3 shards are damaged" in captured.err
    assert _run(["info", str(shards / "train-000002.tar")]) == 1


def test_preview_of_a_truncated_tar_is_a_one_line_error(shards, tmp_path):
    tar = shards / "train-000000.tar"
    _cut_mid_member(tar)
    result = subprocess.run(
        [sys.executable, "-c", "from lvvit.data.cli import main; main()", "preview", str(tar),
         "--out", str(tmp_path / "p.png")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode != 0
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert str(tar) in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "p.png").exists()


def test_empty_class_folder_is_a_named_warning(tmp_path, capsys):
    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    (root / "a" / "x.jpg").write_bytes(_jpeg(_halves(RED, BLUE)))
    assert _build(root, tmp_path / "out") == 0
    err = capsys.readouterr().err
    assert f"class folder {root / 'b'} has no images" in err
    assert [c["wnid"] for c in json.loads((tmp_path / "out" / "classes.json").read_text())] == ["a", "b"]
    assert json.loads((tmp_path / "out" / "train-summary.json").read_text())["empty_classes"] == ["b"]


class _WritesMarker:
    """A pickle that creates ``marker`` when unpickled."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_build_that_keeps_nothing_writes_no_manifest(tmp_path, capsys):
    root, labels = tmp_path / "root", tmp_path / "labels"
    (root / "a").mkdir(parents=True)
    (labels / "a").mkdir(parents=True)
    good = _jpeg(_halves(RED, BLUE))
    (root / "a" / "broken.jpg").write_bytes(good[: len(good) // 2])
    torch.save(torch.zeros(2, 5, 4, 4).half(), labels / "a" / "broken.pt")
    (root / "a" / "evil.jpg").write_bytes(good)
    marker = tmp_path / "marker"
    (labels / "a" / "evil.pt").write_bytes(pickle.dumps(_WritesMarker(marker), protocol=2))

    assert _build(root, tmp_path / "out", "--label-root", str(labels)) != 0
    captured = capsys.readouterr()
    assert not marker.exists()
    assert str(labels / "a" / "evil.pt") in captured.out
    assert "every one of the 2 images" in captured.err and "no manifest" in captured.err
    assert not (tmp_path / "out" / "manifest.json").exists()
    assert not (tmp_path / "out" / "classes.json").exists()
    assert not list((tmp_path / "out").glob("*.tar"))
    assert json.loads((tmp_path / "out" / "train-summary.json").read_text())["complete"] is False


def test_official_maps_are_found_by_the_name_before_the_first_dot(tmp_path, capsys):
    root, labels = tmp_path / "root", tmp_path / "labels"
    (root / "a").mkdir(parents=True)
    (labels / "a").mkdir(parents=True)
    (root / "a" / "a_red_000.v2.jpg").write_bytes(_jpeg(_halves(RED, BLUE)))
    torch.save(torch.ones(2, 5, 4, 4).half(), labels / "a" / "a_red_000.pt")
    for i in range(3):
        (root / "a" / f"nomap{i}.jpg").write_bytes(_jpeg(_halves(RED, BLUE)))

    assert _build(root, tmp_path / "out", "--label-root", str(labels)) == 0
    samples = _samples(tmp_path / "out")
    assert set(samples) == {"a/a_red_000_v2"} and "tlm" in samples["a/a_red_000_v2"]
    out = capsys.readouterr().out
    assert f"3 images have no label map under {labels}, e.g. a/nomap" in out
    assert json.loads((tmp_path / "out" / "train-summary.json").read_text())["missing_label_maps"] == 3


def test_numeric_class_folders_in_natural_order(tmp_path):
    root = tmp_path / "root"
    for name in ["1", "2", "10"]:
        (root / name).mkdir(parents=True)
        (root / name / f"img{name}.jpg").write_bytes(_jpeg(_halves(RED, BLUE)))

    assert _build(root, tmp_path / "sorted") == 0
    assert _build(root, tmp_path / "natural", "--class-order", "natural") == 0
    for out, order in [("sorted", ["1", "10", "2"]), ("natural", ["1", "2", "10"])]:
        classes = json.loads((tmp_path / out / "classes.json").read_text())
        assert [c["wnid"] for c in classes] == order
        assert json.loads((tmp_path / out / "manifest.json").read_text())["class_order"] == out
        labels = {key.split("/")[0]: int(s["cls"]) for key, s in _samples(tmp_path / out).items()}
        assert labels == {name: order.index(name) for name in order}
    plan = plan_image_folder(root, "train", 10, 0, None, None, class_order="natural")  # lvvit-label's input
    assert json.loads(plan.classes) == json.loads((tmp_path / "natural" / "classes.json").read_text())
