"""Samples of a WebDataset tar as groups of raw members, for rewriting shards losslessly.

The labeler adds one member per sample and must keep every other member exactly as
it was (bytes and header fields), so it works on ``tarfile`` members rather than on
WebDataset's decoded dicts. Grouping follows WebDataset: consecutive members whose
names share the part before the first dot of the file name form one sample.
"""

from __future__ import annotations

import io
import logging
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from webdataset.tariterators import base_plus_ext

from lvvit.data.shards import ShardReadError, check_tar_end

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


@dataclass
class TarSample:
    key: str
    members: list[tuple[tarfile.TarInfo, bytes]]
    error: str | None = None  # why the sample could not even be read; it will be skipped

    def image(self) -> bytes:
        """The image bytes (``jpg`` per the shard contract; other image types accepted)."""
        if self.error is not None:
            raise ValueError(self.error)
        for ext in IMAGE_EXTENSIONS:
            for info, data in self.members:
                if base_plus_ext(info.name)[1] == ext:
                    return data
        raise KeyError(f"no image member ({'/'.join(IMAGE_EXTENSIONS)}) in sample")


def iter_tar_samples(path: str | Path) -> Iterator[TarSample]:
    """Stream the samples of ``path`` in file order; a damaged tar raises ``ShardReadError``."""
    try:
        yield from _iter_tar_samples(path)
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ShardReadError(f"cannot read shard {path}: {type(e).__name__}: {e}") from e


def _iter_tar_samples(path: str | Path) -> Iterator[TarSample]:
    current: TarSample | None = None
    with tarfile.open(path, "r:") as tar:
        for info in tar:
            if not info.isfile():
                continue
            key, _ = base_plus_ext(info.name)
            if key is None:
                log.warning("%s: member %r has no extension and belongs to no sample; dropped", path, info.name)
                continue
            data = tar.extractfile(info).read()
            if current is not None and current.key != key:
                yield current
                current = None
            if current is None:
                current = TarSample(key, [])
            current.members.append((info, data))
        end = tar.offset
    check_tar_end(path, end)
    if current is not None:
        yield current


def add_member(tar: tarfile.TarFile, info: tarfile.TarInfo, data: bytes) -> None:
    tar.addfile(info, io.BytesIO(data))


def new_member(name: str, data: bytes, like: tarfile.TarInfo) -> tarfile.TarInfo:
    """A header for a new member with the ownership, mode and time of a sibling."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime, info.mode = like.mtime, like.mode
    info.uid, info.gid, info.uname, info.gname = like.uid, like.gid, like.uname, like.gname
    return info
