"""Atomic file and folder replacement: the one place that writes under a temporary name and renames.

A reader (or a resumed job) must never see a half-written file or folder under its final
name, so everything the stack writes whole goes through here. The temporary name carries
the process id because several ranks may write the same file at once; ``os.replace`` is
atomic on POSIX file systems, so the last complete write wins and nothing partial is
visible. The data is fsync'd before the rename and the folder after it, so a power cut
leaves either the old file or the complete new one, never a complete-looking empty one.
A temporary left by a killed process is never renamed: its writer is the only one that
commits it.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def temp_name(path: Path) -> Path:
    """The hidden, per-process temporary name ``path`` is written under before the rename."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def temporaries(path: Path) -> list[Path]:
    """Every temporary ``path`` is being or was written under, by any process: after a
    kill, what a resumed single-writer job removes (never renames)."""
    path = Path(path)
    return sorted(path.parent.glob(f".{glob.escape(path.name)}.*.tmp"))


def fsync_path(path: Path) -> None:
    """Flush ``path`` (a file, or a folder's entries) to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit(tmp: Path, path: Path) -> None:
    """Rename the finished file ``tmp`` to ``path``: its data first, then the rename, made durable."""
    fsync_path(tmp)
    os.replace(tmp, path)
    fsync_path(Path(path).parent)


@contextlib.contextmanager
def atomic_path(path: Path, tmp: Path | None = None) -> Iterator[Path]:
    """Yield a temporary path to write (``tmp``, default ``temp_name(path)``); on success
    commit it to ``path``, on error remove it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path) if tmp is None else Path(tmp)
    try:
        yield tmp
        commit(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=1) + "\n")


def _fsync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            fsync_path(Path(folder) / name)
        fsync_path(Path(folder))


def replace_dir(stage: Path, target: Path) -> None:
    """Make the finished folder ``stage`` (a sibling of ``target``) the folder ``target``:
    its files are fsync'd, an existing ``target`` is moved aside, ``stage`` renamed into
    place, and the old folder removed only after the swap."""
    _fsync_tree(stage)
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, old / target.name)
    os.replace(stage, target)
    fsync_path(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staged_dir(target: Path) -> Iterator[Path]:
    """Yield an empty hidden staging folder beside ``target``; on success it replaces
    ``target`` (``replace_dir``), on any error it is removed, so a reader sees the previous
    complete folder or the new complete one, never a half-written one."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{target.name}.staging-", dir=target.parent))
    try:
        yield stage
        replace_dir(stage, target)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
