"""lvvit-label: dense teacher adapters, eval view + box, and labeling shards on two ranks."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lvvit.data.labelmap import decode_tlm
from lvvit.data.shards import BuildConfig, build_shards
from lvvit.data.tarsamples import TarSample, iter_tar_samples
from lvvit.errors import ConfigError
from lvvit.labeling.cli import SETTINGS_FILE, check_settings, parse_args
from lvvit.labeling.cli import label as label_job
from lvvit.labeling.cli import main as label_main
from lvvit.labeling.labeler import Labeler, eval_box
from lvvit.labeling.smallcnn import SmallCNN, SmallCNNConfig, load_small_cnn, save_small_cnn
from lvvit.labeling.teacher import (
    DenseCNNTeacher,
    LVViTDenseTeacher,
    TeacherOutputError,
    build_teacher,
)
from lvvit.models import ClassCountMismatch, create_model
from lvvit.ports import free_port

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent

IMG_SIZE = 32
TOPK = 4
NUM_CLASSES = 10
MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])

# (width, height) per sample: square, landscape and portrait images.
SHARD_SIZES = [
    [(48, 36), (40, 40), (36, 52), (64, 32)],
    [(50, 40), (33, 47), (40, 40), (45, 60)],
    [(70, 35), (40, 48), (38, 38)],
]
CORRUPT = {"s001-0001": "truncated", "s002-0000": "not_an_image"}


def _image(width: int, height: int, seed: int) -> Image.Image:
    """A smooth random picture (so the teacher's maps vary across space)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 1_700_000_000, 0o644
    tar.addfile(info, io.BytesIO(data))


def _make_shards(folder: Path) -> dict[str, bytes]:
    """Shards in the contract's layout; returns each key's JPEG bytes."""
    folder.mkdir()
    jpegs, manifest = {}, []
    for s, sizes in enumerate(SHARD_SIZES):
        name = f"train-{s:06d}.tar"
        with tarfile.open(folder / name, "w") as tar:
            for i, (w, h) in enumerate(sizes):
                key = f"s{s:03d}-{i:04d}"
                data = _jpeg(_image(w, h, seed=100 * s + i))
                if CORRUPT.get(key) == "truncated":
                    data = data[: len(data) // 3]
                elif CORRUPT.get(key) == "not_an_image":
                    data = b"this is not a JPEG"
                jpegs[key] = data
                _add(tar, f"{key}.jpg", data)
                _add(tar, f"{key}.cls", str(i % NUM_CLASSES).encode())
        manifest.append({"name": name, "samples": len(sizes)})
    (folder / "manifest.json").write_text(json.dumps({"shards": manifest, "total": 11}))
    classes = [{"index": i, "name": f"digit {i}", "wnid": f"n{i:08d}"} for i in range(NUM_CLASSES)]
    (folder / "classes.json").write_text(json.dumps(classes))
    return jpegs


def _reference_input(jpeg: bytes) -> tuple[torch.Tensor, tuple[float, ...]]:
    """The eval view computed here by hand: shorter side to IMG_SIZE (bicubic), centre square."""
    img = Image.open(io.BytesIO(jpeg)).convert("RGB")
    w, h = img.size
    new_w, new_h = (IMG_SIZE, int(IMG_SIZE * h / w)) if w <= h else (int(IMG_SIZE * w / h), IMG_SIZE)
    left, top = round((new_w - IMG_SIZE) / 2), round((new_h - IMG_SIZE) / 2)
    crop = img.resize((new_w, new_h), Image.Resampling.BICUBIC).crop(
        (left, top, left + IMG_SIZE, top + IMG_SIZE)
    )
    x = (np.asarray(crop, dtype=np.float64) / 255 - MEAN) / STD
    box = (left / new_w, top / new_h, (left + IMG_SIZE) / new_w, (top + IMG_SIZE) / new_h)
    return torch.from_numpy(x).permute(2, 0, 1).float(), box


def _assert_teacher_topk(label_map, jpeg: bytes, dense: torch.nn.Module, topk: int = TOPK) -> None:
    """The record holds the teacher's top-k on the eval view of ``jpeg``, in fp16."""
    x, box = _reference_input(jpeg)
    with torch.no_grad():
        logits = dense(x[None])[0]  # [C, 8, 8]: two stride-2 stages at 32 px
    assert label_map.values.dtype == np.float16 and label_map.indices.dtype == np.uint16
    assert label_map.values.shape == label_map.indices.shape == (topk, 8, 8)
    assert label_map.box == pytest.approx(box, abs=1e-6)
    values = label_map.values.astype(np.float32)
    # The true top-k values, best first (within fp16 rounding) ...
    top = logits.topk(topk, dim=0).values.numpy()
    np.testing.assert_allclose(values, top, rtol=1e-3, atol=1e-5)
    # ... stored with the classes that have them (robust to near-ties in the order).
    at_indices = logits.gather(0, torch.from_numpy(label_map.indices.astype(np.int64))).numpy()
    np.testing.assert_allclose(values, at_indices, rtol=1e-3, atol=1e-5)


def _members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def _small_cnn_file(path: Path, num_classes: int) -> Path:
    torch.manual_seed(0)
    model = SmallCNN(SmallCNNConfig(num_classes=num_classes, widths=(8, 16)))
    for m in model.modules():  # non-trivial BN statistics, so eval-mode BN matters
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    save_small_cnn(model, path)
    return path


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory) -> Path:
    return _small_cnn_file(tmp_path_factory.mktemp("teacher") / "smallcnn.pt", NUM_CLASSES)


def test_dense_cnn_adapter_is_fc_at_every_location():
    torch.manual_seed(0)
    model = SmallCNN(SmallCNNConfig(num_classes=7, widths=(8, 16, 24))).eval()
    x = torch.randn(2, 3, 64, 48)
    dense = DenseCNNTeacher(model.features, model.fc)(x)
    assert dense.shape == (2, 7, 8, 6)
    feats = model.features(x)
    for i, j in [(0, 0), (3, 5), (7, 2)]:
        torch.testing.assert_close(dense[:, :, i, j], model.fc(feats[:, :, i, j]), rtol=1e-5, atol=1e-5)
    # fc is affine, so the mean of the map is the classifier's own (pooled) output.
    torch.testing.assert_close(dense.mean(dim=(2, 3)), model(x), rtol=1e-5, atol=1e-5)


def test_lvvit_adapter_lays_aux_tokens_on_the_grid():
    torch.manual_seed(0)
    model = create_model(
        "lvvit_t", img_size=64, num_classes=NUM_CLASSES, embed_dim=48, depth=2, num_heads=2,
        stem_width=16, mix_token=False, drop_path_rate=0.0,
    )
    x = torch.randn(2, 3, 64, 64)
    model.eval()
    dense = LVViTDenseTeacher(model)(x)
    assert dense.shape == (2, NUM_CLASSES, 4, 4)
    # Train mode (BN kept in eval, no MixToken, no drop path) returns the aux tokens row-major.
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
    _, aux, box = model(x)
    assert box is None
    for n in range(16):
        torch.testing.assert_close(dense[:, :, n // 4, n % 4], aux[:, n], rtol=1e-5, atol=1e-5)
    # ... and the eval output combines the class head with the max over this map.
    model.eval()
    cls = model.head(model.forward_features(x)[:, 0])
    torch.testing.assert_close(model(x), cls + 0.5 * dense.amax(dim=(2, 3)), rtol=1e-5, atol=1e-5)


def test_lvvit_teacher_loads_from_checkpoint(tmp_path):
    torch.manual_seed(0)
    tiny = dict(embed_dim=48, depth=2, num_heads=2, stem_width=16)
    model = create_model("lvvit_t", img_size=64, num_classes=NUM_CLASSES, **tiny).eval()
    torch.save({"state_dict": model.state_dict()}, tmp_path / "lvvit.pt")
    teacher = build_teacher("lvvit_t", tmp_path / "lvvit.pt", img_size=64, num_classes=NUM_CLASSES, **tiny)
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(teacher(x), LVViTDenseTeacher(model)(x))
    # Without --num-classes the file's classifier decides; another count is refused, since a
    # re-initialised head would write noise into every label map.
    assert build_teacher("lvvit_t", tmp_path / "lvvit.pt", img_size=64, **tiny).model.num_classes == NUM_CLASSES
    with pytest.raises(ClassCountMismatch, match=rf"lvvit\.pt: the checkpoint has {NUM_CLASSES} classes"):
        build_teacher("lvvit_t", tmp_path / "lvvit.pt", img_size=64, num_classes=NUM_CLASSES + 1, **tiny)


def test_small_cnn_checkpoint_round_trip(tmp_path, teacher_file):
    model = load_small_cnn(teacher_file).eval()
    assert model.cfg == SmallCNNConfig(num_classes=NUM_CLASSES, widths=(8, 16))
    torch.save(model.state_dict(), tmp_path / "bare.pt")  # a bare state dict needs the architecture
    bare = load_small_cnn(tmp_path / "bare.pt", num_classes=NUM_CLASSES, widths=[8, 16]).eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(bare(x), model(x))
    with pytest.raises(ValueError, match="does not match SmallCNN"):
        load_small_cnn(tmp_path / "bare.pt", num_classes=NUM_CLASSES, widths=[8, 32])


@pytest.mark.parametrize(
    ("size", "crop_pct", "expected_box"),
    [
        ((60, 40), 1.0, (8 / 48, 0.0, 40 / 48, 1.0)),  # 60x40 -> 48x32, crop x 8..40
        ((40, 60), 1.0, (0.0, 8 / 48, 1.0, 40 / 48)),  # portrait: crop y 8..40 of 48
        ((60, 40), 0.8, (14 / 60, 4 / 40, 46 / 60, 36 / 40)),  # 60x40 kept, 32 px crop inside
        ((48, 36), 1.0, (5 / 42, 0.0, 37 / 42, 1.0)),  # 48x36 -> 42x32 (floored), crop x 5..37
    ],
)
def test_eval_box_is_the_region_the_crop_shows(size, crop_pct, expected_box):
    assert eval_box(*size, IMG_SIZE, crop_pct) == pytest.approx(expected_box)
    # The crop the labeler feeds the teacher is exactly that region, resized.
    img = _image(*size, seed=1)
    labeler = Labeler(torch.nn.Identity(), IMG_SIZE, crop_pct=crop_pct, workers=1)
    crop, box = labeler.view(TarSample("k", [(tarfile.TarInfo("k.jpg"), _jpeg(img))]))
    labeler.close()
    assert box == pytest.approx(expected_box)
    decoded = Image.open(io.BytesIO(_jpeg(img))).convert("RGB")
    # The box fixes the resized size (the crop is IMG_SIZE of it) and the crop offset.
    x0, y0, x1, y1 = expected_box
    resized = decoded.resize((round(IMG_SIZE / (x1 - x0)), round(IMG_SIZE / (y1 - y0))), Image.Resampling.BICUBIC)
    left, top = round(x0 * resized.width), round(y0 * resized.height)
    np.testing.assert_array_equal(crop, np.asarray(resized.crop((left, top, left + IMG_SIZE, top + IMG_SIZE))))


def _launch_two_ranks(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    cmd = [
        str(VENV_BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
        "--module", "lvvit.labeling.cli", *args,
    ]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_label_shards_on_two_ranks_then_resume(tmp_path, teacher_file):
    jpegs = _make_shards(tmp_path / "in")
    out = tmp_path / "out"
    args = [
        "--input", str(tmp_path / "in"), "--out", str(out), "--teacher", "smallcnn",
        "--teacher-checkpoint", str(teacher_file), "--img-size", str(IMG_SIZE), "--topk", str(TOPK),
        "--batch-size", "3", "--workers", "2", "--no-progress",
    ]
    proc = _launch_two_ranks(args)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log

    # Each rank took its own shards: rank 0 shards 0 and 2, rank 1 shard 1.
    assert "this rank (0 of 2) has 2" in log and "this rank (1 of 2) has 1" in log
    names = [f"train-{s:06d}.tar" for s in range(3)]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [*names, "classes.json", "manifest.json", "label-settings.json"]
    )
    assert (out / "classes.json").read_bytes() == (tmp_path / "in" / "classes.json").read_bytes()

    # Corrupt images are reported by key and reason, and left out.
    for key in CORRUPT:
        assert f"skipped sample '{key}'" in log
    assert "s001-0001" in log and "OSError" in log and "UnidentifiedImageError" in log

    teacher = load_small_cnn(teacher_file).eval()
    dense = DenseCNNTeacher(teacher.features, teacher.fc)
    counts = []
    for name in names:
        src, dst = _members(tmp_path / "in" / name), _members(out / name)
        keys = sorted({n.split(".")[0] for n in src} - set(CORRUPT))
        counts.append(len(keys))
        # Same members byte for byte, plus one tlm per good sample; corrupt ones gone.
        assert dst == {**{n: d for n, d in src.items() if n.split(".")[0] in keys}, **{
            f"{k}.tlm": dst[f"{k}.tlm"] for k in keys
        }}
        for key in keys:
            _assert_teacher_topk(decode_tlm(dst[f"{key}.tlm"], key), jpegs[key], dense)
    assert counts == [4, 3, 2]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest == {"shards": [{"name": n, "samples": c} for n, c in zip(names, counts, strict=True)], "total": 9}

    # The non-square box: 48x36 -> 42x32 at 32 px, so the map covers x in [5/42, 37/42].
    box = decode_tlm(_members(out / names[0])["s000-0000.tlm"]).box
    assert box == pytest.approx((5 / 42, 0.0, 37 / 42, 1.0), abs=1e-6)

    # A rerun finds every shard finished: nothing is relabeled, the manifest stays right.
    mtimes = {n: (out / n).stat().st_mtime_ns for n in names}
    assert label_main(args) == 0  # one process now, rank 0 of 1
    assert {n: (out / n).stat().st_mtime_ns for n in names} == mtimes
    assert json.loads((out / "manifest.json").read_text()) == manifest


class _SlowTeacher(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module, delay: float) -> None:
        super().__init__()
        self.inner, self.delay = inner, delay

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.delay)
        return self.inner(x)


def slow_teacher(checkpoint, img_size, **kwargs):
    """``--teacher test_labeling:slow_teacher``: a smallcnn slow enough to be killed mid-shard."""
    return _SlowTeacher(build_teacher("smallcnn", checkpoint, img_size, **kwargs), delay=0.5)


def _label_args(src: Path, out: Path, teacher: str, teacher_file: Path) -> list[str]:
    return [
        "--input", str(src), "--out", str(out), "--teacher", teacher, "--teacher-checkpoint",
        str(teacher_file), "--img-size", str(IMG_SIZE), "--topk", str(TOPK), "--batch-size", "1",
        "--workers", "1", "--no-progress",
    ]


@pytest.mark.slow
def test_killed_run_resumes_without_trusting_its_temp_file(tmp_path, teacher_file):
    jpegs = _make_shards(tmp_path / "in")
    out = tmp_path / "out"
    names = [f"train-{s:06d}.tar" for s in range(3)]
    args = _label_args(tmp_path / "in", out, "test_labeling:slow_teacher", teacher_file)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "tests")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lvvit.labeling.cli", *args],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:  # kill it hard once shard 0 is done and shard 1 is half written
        deadline = time.monotonic() + 120
        while not ((out / names[0]).exists() and (out / f"{names[1]}.partial").exists()):
            assert proc.poll() is None and time.monotonic() < deadline, "labeler ended before it was killed"
            time.sleep(0.02)
    finally:
        proc.kill()
        proc.wait()
    assert not (out / names[1]).exists() and not (out / "manifest.json").exists()
    mtime = (out / names[0]).stat().st_mtime_ns

    assert label_main(args) == 0  # the same command again resumes
    assert (out / names[0]).stat().st_mtime_ns == mtime  # finished shard not redone
    assert not list(out.glob("*.partial"))
    teacher = load_small_cnn(teacher_file).eval()
    dense = DenseCNNTeacher(teacher.features, teacher.fc)
    for name, count in zip(names, [4, 3, 2], strict=True):  # each shard complete, corrupt left out
        samples = list(iter_tar_samples(out / name))
        assert len(samples) == count
        for sample in samples:
            tlm = next(d for info, d in sample.members if info.name.endswith(".tlm"))
            _assert_teacher_topk(decode_tlm(tlm, sample.key), jpegs[sample.key], dense)
    assert json.loads((out / "manifest.json").read_text())["total"] == 9

    # Resuming with other settings would mix two kinds of labels in one folder: refused.
    with pytest.raises(ConfigError, match=rf"^{out} holds labels made with other settings \(topk differ"):
        label_job(parse_args([*args, "--topk", "3"]))


def test_damaged_input_shards_are_reported_and_others_finish(tmp_path, teacher_file, caplog):
    _make_shards(tmp_path / "in")
    inside, boundary = tmp_path / "in" / "train-000001.tar", tmp_path / "in" / "train-000002.tar"
    with tarfile.open(inside) as tar:
        jpg = tar.getmembers()[4]  # s001-0002.jpg
    inside.write_bytes(inside.read_bytes()[: jpg.offset_data + 100])  # cut inside a member
    with tarfile.open(boundary) as tar:
        cls = tar.getmembers()[5]  # s002-0002.cls, the last member
    boundary.write_bytes(boundary.read_bytes()[: cls.offset])  # cut between members
    out = tmp_path / "out"
    assert label_main(_label_args(tmp_path / "in", out, "smallcnn", teacher_file)) == 1
    assert f"cannot read shard {inside}: ReadError: unexpected end of data" in caplog.text
    assert f"cannot read shard {boundary}: ReadError: no end-of-archive block" in caplog.text
    assert sorted(p.name for p in out.glob("*.tar*")) == ["train-000000.tar"]  # no partials left
    assert not (out / "manifest.json").exists()

    # A shard with fewer samples than its manifest entry is not taken as complete either.
    manifest = json.loads((tmp_path / "in" / "manifest.json").read_text())
    manifest["shards"] = manifest["shards"][:1]
    manifest["shards"][0]["samples"] = 5
    (tmp_path / "in" / "manifest.json").write_text(json.dumps(manifest))
    caplog.clear()
    assert label_main(_label_args(tmp_path / "in", tmp_path / "out2", "smallcnn", teacher_file)) == 1
    assert "train-000000.tar not written: the input has 4 samples, expected 5" in caplog.text
    assert not list((tmp_path / "out2").glob("*.tar*"))


def test_label_image_folder_split_over_ranks(tmp_path, teacher_file, monkeypatch, caplog):
    root = tmp_path / "folder"
    files = {}
    for c, cls in enumerate(["cat", "dog"]):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            path = root / cls / f"img{i}.jpg"
            path.write_bytes(_jpeg(_image(40 + 8 * i, 36, seed=10 * c + i)))
            files[f"{cls}/img{i}"] = (path, c)
    _image(30, 50, seed=99).save(root / "dog" / "drawing.png")  # re-encoded to JPEG
    files["dog/drawing"] = (root / "dog" / "drawing.png", 1)
    (root / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    out = tmp_path / "out"
    args = [
        "--input", str(root), "--out", str(out), "--teacher", "smallcnn", "--img-size", str(IMG_SIZE),
        "--topk", "2", "--shard-size", "3", "--prefix", "pets", "--no-progress", "--workers", "1",
    ]
    # A teacher of 10 classes cannot label 2: refused on its first batch, nothing written.
    with pytest.raises(TeacherOutputError, match=r"smallcnn\.pt: the teacher's output has 10 classes, the dataset has 2"):
        label_job(parse_args([*args, "--teacher-checkpoint", str(teacher_file)]))
    assert not out.exists() or not any(out.iterdir())
    args += ["--teacher-checkpoint", str(_small_cnn_file(tmp_path / "pets.pt", 2))]
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        assert label_main([*args, f"--local_rank={rank}"]) == 0
        # The manifest appears only once every shard is done (after the second rank).
        assert (out / "manifest.json").exists() == (rank == 1)
    assert "skipped sample 'cat/broken'" in caplog.text and "cannot decode image" in caplog.text

    names = ["pets-000000.tar", "pets-000001.tar", "pets-000002.tar"]  # 8 inputs, 3 per shard
    assert sorted(p.name for p in out.glob("*.tar")) == names
    assert json.loads((out / "classes.json").read_text()) == [
        {"index": 0, "name": "cat", "wnid": "cat"}, {"index": 1, "name": "dog", "wnid": "dog"}
    ]
    teacher = load_small_cnn(tmp_path / "pets.pt").eval()
    dense = DenseCNNTeacher(teacher.features, teacher.fc)
    seen = {}
    for name in names:
        for sample in iter_tar_samples(out / name):
            members = {info.name.split(".", 1)[1]: data for info, data in sample.members}
            assert sorted(members) == ["cls", "jpg", "tlm"]
            path, label = files[sample.key]
            assert int(members["cls"]) == label
            assert Image.open(io.BytesIO(members["jpg"])).format == "JPEG"
            if path.suffix == ".jpg":
                assert members["jpg"] == path.read_bytes()  # original bytes kept
            _assert_teacher_topk(decode_tlm(members["tlm"], sample.key), members["jpg"], dense, topk=2)
            seen[sample.key] = name
    assert sorted(seen) == sorted(files)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["total"] == 7 and [s["name"] for s in manifest["shards"]] == names
    assert manifest["class_order"] == "sorted"  # docs/format.md: the order the cls indices follow

    # Shards made by lvvit-shards from the same folder get the same labels.
    build_shards(BuildConfig(root=str(root), out=str(tmp_path / "built"), shard_size=3), progress=False)
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    assert label_main(["--input", str(tmp_path / "built"), "--out", str(tmp_path / "built_out"), *args[4:]]) == 0
    folder_tlm = {s.key: s.members[-1][1] for n in names for s in iter_tar_samples(out / n)}
    built_tlm = {
        s.key: s.members[-1][1]
        for n in sorted((tmp_path / "built_out").glob("*.tar"))
        for s in iter_tar_samples(n)
    }
    assert built_tlm.keys() == folder_tlm.keys()
    # The labeled copy keeps the input manifest's class_order (one manifest writer for both).
    assert json.loads((tmp_path / "built_out" / "manifest.json").read_text())["class_order"] == "sorted"
    for key, tlm in built_tlm.items():
        np.testing.assert_array_equal(decode_tlm(tlm).indices, decode_tlm(folder_tlm[key]).indices)
        np.testing.assert_allclose(
            decode_tlm(tlm).values.astype(np.float32), decode_tlm(folder_tlm[key]).values.astype(np.float32),
            rtol=1e-3, atol=1e-5,
        )


def exit_line(capsys, call) -> str:
    """What an entry point does with our error: status 1 and the message as the last line of
    stderr (returned), no traceback."""
    with pytest.raises(SystemExit) as exited:
        call()
    assert exited.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def test_settings_of_another_job_or_unreadable_are_refused_by_file(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    check_settings(out, {"topk": 5})  # nothing recorded yet: any settings go
    path = out / SETTINGS_FILE
    path.write_text('{"topk": 5, "img_size": 32}')
    check_settings(out, {"topk": 5, "img_size": 32})
    with pytest.raises(ConfigError, match=re.escape(f"{out} holds labels made with other settings (img_size, topk "
                                                    f"differ, see {path}); choose another --out or empty it")):
        check_settings(out, {"topk": 3, "img_size": 64})
    for text, problem in (("[5]", "expected a JSON object, got an array"), ("{", "not valid JSON"),
                          ('{"topk": 5, "topk": 3}', "key 'topk' appears twice")):
        path.write_text(text)
        with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: {re.escape(problem)}.*"
                                              "; choose another --out or empty it$"):
            check_settings(out, {"topk": 5})


def test_a_refused_command_line_is_one_line_and_status_1(tmp_path, capsys, teacher_file):
    _make_shards(tmp_path / "in")
    args = ["--input", str(tmp_path / "in"), "--out", str(tmp_path / "in"), "--teacher", "smallcnn",
            "--teacher-checkpoint", str(teacher_file), "--no-progress"]
    with pytest.raises(ConfigError, match=r"^--out must differ from --input: input shards are never overwritten$"):
        label_job(parse_args(args))
    assert exit_line(capsys, lambda: label_main(args)) == (
        "--out must differ from --input: input shards are never overwritten")
    args[3] = str(tmp_path / "out")
    with pytest.raises(ConfigError, match=r"^--max-teacher-tensor-mib -1\.0: must be a positive number$"):
        label_job(parse_args([*args, "--max-teacher-tensor-mib", "-1"]))
    with pytest.raises(ConfigError, match=r"^--shard-retries -1: must be >= 0$"):
        label_job(parse_args([*args, "--shard-retries", "-1"]))
    assert not (tmp_path / "out").exists()
