"""lvvit/atomic.py: files and folders replaced whole, fsync'd, and left intact when a write fails."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lvvit import atomic


@pytest.fixture
def fsynced(monkeypatch) -> list[Path]:
    """The paths ``os.fsync`` was called on, in order: a spy, the real fsync still runs
    (durability itself cannot be observed without cutting the power)."""
    calls: list[Path] = []
    real = os.fsync

    def record(fd: int) -> None:
        calls.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
        real(fd)

    monkeypatch.setattr(os, "fsync", record)
    return calls


def test_file_is_fsynced_then_its_folder(tmp_path, fsynced):
    target = tmp_path / "a.json"
    atomic.write_json(target, {"x": 1})
    assert target.read_text() == '{\n "x": 1\n}\n'
    assert fsynced[0].name.startswith(".a.json.") and fsynced[0].name.endswith(".tmp")
    assert fsynced[-1] == tmp_path
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_error_mid_write_keeps_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "shard.tar"
    target.write_bytes(b"old")
    partial = tmp_path / "shard.tar.partial"
    with pytest.raises(RuntimeError, match="cut"), atomic.atomic_path(target, partial) as tmp:
        assert tmp == partial
        tmp.write_bytes(b"half")
        raise RuntimeError("cut")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["shard.tar"]


def test_folder_replaced_whole_and_fsynced(tmp_path, fsynced):
    target = tmp_path / "export"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with atomic.staged_dir(target) as stage:
        (stage / "sub").mkdir()
        (stage / "sub" / "model.onnx").write_bytes(b"new")
        assert not (target / "sub").exists()  # nothing new is visible before the swap
    assert sorted(p.relative_to(target).as_posix() for p in target.rglob("*")) == ["sub", "sub/model.onnx"]
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no staging or old folder left
    assert "model.onnx" in [p.name for p in fsynced]  # the data, before the rename
    assert fsynced[-1] == tmp_path


def test_error_in_staged_folder_keeps_the_old_folder(tmp_path):
    target = tmp_path / "repo" / "model"
    target.mkdir(parents=True)
    (target / "config.pbtxt").write_text("old")
    with pytest.raises(KeyboardInterrupt), atomic.staged_dir(target) as stage:
        (stage / "config.pbtxt").write_text("new")
        raise KeyboardInterrupt
    assert (target / "config.pbtxt").read_text() == "old"
    assert [p.name for p in target.parent.iterdir()] == ["model"]
