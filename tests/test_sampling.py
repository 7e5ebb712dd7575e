"""Exact epochs and exact resume (``train_loader(sampling="epoch")``, lvvit.loader.sampling) on
tiny shards, with real DataLoader workers."""

from __future__ import annotations

import dataclasses
import io
import json
import tarfile
from pathlib import Path
from typing import BinaryIO

import pytest
import torch
from test_pipeline import write_shards

from lvvit.data.source import ShardSource, resolve
from lvvit.data.tarsamples import read_tar_samples, scan_tar_samples
from lvvit.loader.pipeline import train_loader
from lvvit.loader.sampling import EpochPlan, buffer_order, left_out

FAST = {"img_size": 32, "randaugment": None, "label_maps": False}


def keys_of(root: Path) -> set[str]:
    manifest = json.loads((root / "manifest.json").read_text())
    return {f"k{i:04d}" for i in range(manifest["total"])}


def run(loader, limit: int | None = None) -> list[dict]:
    out = []
    for batch in loader:
        out.append(batch)
        if limit is not None and len(out) == limit:
            break
    return out


def flat_keys(batches: list[dict]) -> list[str]:
    return [k for b in batches for k in b["keys"]]


def test_epochs_cover_every_sample_once_across_ranks_and_reproduce(tmp_path: Path) -> None:
    root = write_shards(tmp_path / "d", [5, 6, 7, 4, 6], tlm=False)  # 28 samples
    loaders = [train_loader(root, batch_size=3, num_workers=2, shuffle_buffer=4, seed=1, sampling="epoch",
                            world_size=2, rank=r, **FAST) for r in range(2)]
    assert [len(loader) for loader in loaders] == [4, 4]  # 28 // 2 = 14 per rank; 4 batches of 3
    epochs = []
    for epoch in range(2):
        ranks = []
        for loader in loaders:
            assert loader.epoch == epoch
            batches = run(loader)
            assert len(batches) == 4 and all(b["images"].shape == (3, 3, 32, 32) for b in batches)
            assert all(b["labels"].tolist() == [int(k[1:]) for k in b["keys"]] for b in batches)
            ranks.append(flat_keys(batches))
        seen = ranks[0] + ranks[1]
        assert len(seen) == len(set(seen)) == 28 - left_out(28, 2, 3) == 24
        assert set(seen) <= keys_of(root)
        epochs.append(ranks)
    assert epochs[0][0] != epochs[1][0] and set(epochs[0][0]) != set(epochs[1][0])
    again = train_loader(root, batch_size=3, num_workers=2, shuffle_buffer=4, seed=1, sampling="epoch",
                         world_size=2, rank=1, epoch=1, **FAST)
    head = run(again, limit=1)
    tail = run(train_loader(root, batch_size=3, num_workers=2, shuffle_buffer=4, seed=1, sampling="epoch",
                            world_size=2, rank=1, position=again.position(), **FAST))
    assert flat_keys(head + tail) == epochs[1][1]
    other_seed = train_loader(root, batch_size=3, num_workers=2, shuffle_buffer=4, seed=2, sampling="epoch",
                              world_size=2, rank=1, epoch=1, **FAST)
    assert flat_keys(run(other_seed)) != epochs[1][1]


@dataclasses.dataclass(frozen=True)
class ObservedSource(ShardSource):
    """A local source that appends every shard it opens to a log file (workers are processes)."""

    log_path: str = ""

    def open(self, url: str) -> BinaryIO:
        with open(self.log_path, "a") as log:
            log.write(url + "\n")
        return super().open(url)


def observed(root: Path, log_path: Path) -> ObservedSource:
    source = resolve(root)
    return ObservedSource(**{f.name: getattr(source, f.name) for f in dataclasses.fields(ShardSource)},
                          log_path=str(log_path))


def test_resume_mid_epoch_continues_the_exact_stream_without_opening_read_shards(tmp_path: Path) -> None:
    root = write_shards(tmp_path / "d", [4] * 8, tlm=False)  # 32 samples, 16 batches of 2, 8 per worker
    common = {"batch_size": 2, "num_workers": 2, "shuffle_buffer": 3, "seed": 5, "sampling": "epoch",
              "world_size": 1, "rank": 0, "img_size": 32, "label_maps": False}  # RandAugment on: seeded by key
    full = run(train_loader(root, epoch=3, **common))
    assert len(full) == 16
    first = train_loader(root, epoch=3, **common)
    taken = run(first, limit=11)  # odd: the next batch is due from worker 1
    position = json.loads(json.dumps(first.position()))
    assert position["epoch"] == 3 and position["batches"] == [6, 5] and position["num_workers"] == 2
    for got, want in zip(taken, full, strict=False):
        assert got["keys"] == want["keys"] and torch.equal(got["images"], want["images"])

    opened = tmp_path / "opened.txt"
    resumed = train_loader(observed(root, opened), position=position, **common)
    assert len(resumed) == 5
    rest = run(resumed)
    assert [b["keys"] for b in rest] == [b["keys"] for b in full[11:]]
    for got, want in zip(rest, full[11:], strict=True):
        assert torch.equal(got["images"], want["images"]) and torch.equal(got["crop_boxes"], want["crop_boxes"])
        assert torch.equal(got["flips"], want["flips"]) and torch.equal(got["labels"], want["labels"])
    # Only the shards holding samples not yet emitted were opened.
    plan = EpochPlan(resolve(root).counts, 5, 3, 1, 2, 2, 3)
    needed = {plan.locate(slot)[0] for w in range(2) for slot in plan.worker_order(0, w)[position["entries"][w]:]}
    urls = resolve(root).urls
    assert set(opened.read_text().split()) == {urls[s] for s in needed}
    assert len(needed) < 8
    assert resumed.position()["epoch"] == 4 and resumed.position()["entries"] == [0, 0]


def test_resume_on_another_layout_sees_each_remaining_sample_once(tmp_path: Path) -> None:
    root = write_shards(tmp_path / "d", [5, 7, 3, 9], tlm=False)  # 24 samples
    old = {"batch_size": 2, "num_workers": 2, "shuffle_buffer": 4, "seed": 0, "sampling": "epoch", "world_size": 2,
           "epoch": 1, **FAST}
    before, positions = [], []
    for rank, take in ((0, 2), (1, 1)):
        loader = train_loader(root, rank=rank, **old)
        before += flat_keys(run(loader, limit=take))
        positions.append(loader.position())
    assert len(before) == 6
    new = {**old, "world_size": 3, "num_workers": 1}
    after = []
    for rank in range(3):
        resumed = train_loader(root, position=json.loads(json.dumps(positions)), rank=rank, **new)
        assert len(resumed) == 3  # 18 samples left: 6 per rank, batches of 2
        after += flat_keys(run(resumed))
        assert resumed.position()["epoch"] == 2
    assert sorted(before + after) == sorted(keys_of(root))
    with pytest.raises(ValueError, match="positions of all 2 old ranks"):
        train_loader(root, position=positions[:1], rank=0, **new)


def test_corrupt_samples_use_spare_entries_and_are_reported(tmp_path: Path) -> None:
    root = write_shards(tmp_path / "d", [5, 6], tlm=False, bad_jpeg=(3,))
    loader = train_loader(root, batch_size=5, num_workers=0, shuffle_buffer=0, sampling="epoch", world_size=1, **FAST)
    batches = run(loader)
    assert len(batches) == 2
    assert "k0003" not in flat_keys(batches) and len(set(flat_keys(batches))) == 10
    assert [(s.shard, s.key) for s in loader.skipped] == [("s-000000.tar", "k0003")]


def test_epoch_sampling_needs_counts(tmp_path: Path) -> None:
    root = write_shards(tmp_path / "d", [3, 3], tlm=False)
    (root / "manifest.json").unlink()
    with pytest.raises(ValueError, match=r"per-shard sample counts of .*d"):
        train_loader(root, batch_size=2, sampling="epoch", world_size=1, **FAST)
    with pytest.raises(ValueError, match="sampling"):
        train_loader(root, batch_size=2, sampling="random", steps_per_epoch=1, **FAST)


def test_buffer_order_is_a_bounded_permutation() -> None:
    import random

    items = list(range(50))
    order = buffer_order(items, 8, random.Random(0))
    assert sorted(order) == items and order != items
    assert all(order[j] <= j + 7 for j in range(len(order)))  # emitted by the read of item j + 7
    assert left_out(1_281_167, 8, 128) == left_out(1_281_167, 64, 16) == 143


def test_scan_skips_unwanted_samples_by_header(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for i in range(4):
            for ext, data in (("jpg", bytes([i]) * 3000), ("cls", b"1")):
                info = tarfile.TarInfo(f"s{i}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    buffer.seek(0)
    got = list(scan_tar_samples(buffer, "t.tar", lambda index: index in (1, 3)))
    assert [i for i, _ in got] == [0, 1, 2, 3]
    assert got[0][1] is None and got[2][1] is None
    assert got[1][1].key == "s1" and got[1][1].as_dict()["jpg"] == bytes([1]) * 3000
    assert got[3][1].as_dict()["cls"] == b"1"


def _tar(fmt: int, names: list[str], pax_global: bool = False) -> bytes:
    """A tar in ``fmt`` of file members ``names`` (a trailing ``/``: a directory; a leading
    ``@``: a symlink), data told apart by member."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt) as tar:
        if pax_global:
            info = tarfile.TarInfo("global")
            info.type, info.pax_headers = tarfile.XGLTYPE, {"comment": "c"}
            tar.addfile(info)
        for i, name in enumerate(names):
            info = tarfile.TarInfo(name.lstrip("@"))
            if name.endswith("/"):
                info.type = tarfile.DIRTYPE
            elif name.startswith("@"):
                info.type, info.linkname = tarfile.SYMTYPE, "l" * 150
            data = b"" if info.type != tarfile.REGTYPE else bytes([i]) * (i if name.endswith(".cls") else 700 + 97 * i)
            info.size, info.mtime = len(data), 1.5 + i  # a float mtime: PAX headers, as webdataset writes them
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


class Trickle(io.RawIOBase):
    """A stream that cannot seek and returns at most 700 bytes a read (as a socket may)."""

    def __init__(self, data: bytes) -> None:
        self.data, self.count = io.BytesIO(data), 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        chunk = self.data.read(min(len(buffer), 700))
        buffer[: len(chunk)] = chunk
        self.count += len(chunk)
        return len(chunk)


def as_lists(samples) -> list[tuple[str, list[tuple[str, bytes]]]]:
    return [(s.key, [(info.name, data) for info, data in s.members]) for s in samples]


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_scan_reads_what_tarfile_reads(fmt: int) -> None:
    long = "d" * 120 + "/"  # ustar: prefix field; gnu: long name member; pax: path record
    names = ["a.jpg", "a.cls", "sub/", "b.jpg", "noext", "b.cls", long + "c.jpg", long + "c.cls", "e" * 95 + ".jpg",
             "f.ü.jpg", "f.ü.cls"]
    if fmt != tarfile.USTAR_FORMAT:
        names += ["@g.txt", "h" * 200 + ".jpg"]
    for raw in (_tar(fmt, names), _tar(fmt, names, pax_global=fmt == tarfile.PAX_FORMAT)):
        want = as_lists(read_tar_samples(io.BytesIO(raw), "t.tar"))
        assert len(want) == (5 if fmt == tarfile.USTAR_FORMAT else 6)
        for stream in (io.BytesIO(raw), io.BufferedReader(Trickle(raw))):
            assert as_lists(s for _, s in scan_tar_samples(stream, "t.tar", lambda i: True)) == want
        got = list(scan_tar_samples(Trickle(raw), "t.tar", lambda i: i % 2 == 1))
        assert [i for i, _ in got] == list(range(len(want)))
        assert as_lists(s for _, s in got if s is not None) == want[1::2]


def test_scan_keeps_the_bounds_and_refuses_damage() -> None:
    raw = _tar(tarfile.PAX_FORMAT, ["a.jpg", "a.cls", "b.jpg", "b.cls"])
    for cut, message in ((0, "empty file"), (300, "truncated"), (len(raw) // 3, "truncated"), (2048, "truncated")):
        with pytest.raises(tarfile.ReadError, match=message):
            list(scan_tar_samples(io.BytesIO(raw[:cut]), "t.tar", lambda i: True))
    flipped = bytearray(raw)
    flipped[raw.index(b"b.cls")] ^= 1  # a name byte of a later header
    with pytest.raises(tarfile.ReadError, match="bad checksum"):
        list(scan_tar_samples(io.BytesIO(bytes(flipped)), "t.tar", lambda i: False))

    def declared(name: str, size: int, kind: bytes = tarfile.REGTYPE) -> bytes:
        info = tarfile.TarInfo(name)
        info.size, info.type = size, kind
        return info.tobuf(tarfile.USTAR_FORMAT) + bytes(8 << 20)

    for data, message in ((declared("a.cls", 5_000_000), "more than the 64 allowed"),
                          (declared("././@PaxHeader", 2 << 20, tarfile.XHDTYPE), "runs past")):
        stream = Trickle(data)
        with pytest.raises(tarfile.ReadError, match=message):
            list(scan_tar_samples(stream, "t.tar", lambda i: True))
        assert stream.count <= 1024  # refused from its header, none of its bytes read
