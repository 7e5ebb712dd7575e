"""Samples of a WebDataset tar as groups of raw members, for rewriting shards losslessly.

The labeler adds one member per sample and must keep every other member exactly as
it was (bytes and header fields), so it works on ``tarfile`` members rather than on
WebDataset's decoded dicts. Grouping is WebDataset's own rule (``base_plus_ext``, the one
used everywhere): consecutive members whose names share the part before the first dot of
the file name form one sample. The tar is read as a stream, so any shard source works.
"""

from __future__ import annotations

import io
import logging
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from webdataset.tariterators import base_plus_ext

from lvvit.data.shards import IMAGE_EXTENSIONS, ShardReadError

log = logging.getLogger(__name__)


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

    def as_dict(self) -> dict[str, str | bytes]:
        """WebDataset's sample dict: ``__key__`` and one bytes value per extension."""
        return {"__key__": self.key, **{base_plus_ext(info.name)[1]: data for info, data in self.members}}


class _CountingReader:
    """Counts the bytes tarfile's stream mode reads, to tell a tar that ends with its
    end-of-archive block from one cut at a member boundary (which tarfile accepts)."""

    def __init__(self, stream: BinaryIO) -> None:
        self.stream, self.count = stream, 0

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.count += len(data)
        return data


def iter_tar_samples(shard: str | Path, opener: Callable[[str], BinaryIO] | None = None) -> Iterator[TarSample]:
    """Stream the samples of ``shard`` in file order, opened by ``opener`` (e.g. a
    ``ShardSource.open``; default: a local file). A damaged, truncated or unreachable tar
    raises ``ShardReadError`` naming it."""
    try:
        stream = open(shard, "rb") if opener is None else opener(str(shard))  # noqa: SIM115 (closed below)
        with stream:
            yield from _iter_tar_samples(stream, str(shard))
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ShardReadError(f"cannot read shard {shard}: {type(e).__name__}: {e}") from e


def _iter_tar_samples(stream: BinaryIO, name: str) -> Iterator[TarSample]:
    current: TarSample | None = None
    reader = _CountingReader(stream)
    with tarfile.open(fileobj=reader, mode="r|") as tar:
        for info in tar:
            if not info.isfile():
                continue
            key, _ = base_plus_ext(info.name)
            if key is None:
                log.warning("%s: member %r has no extension and belongs to no sample; dropped", name, info.name)
                continue
            data = tar.extractfile(info).read()
            if current is not None and current.key != key:
                yield current
                current = None
            if current is None:
                current = TarSample(key, [])
            current.members.append((info, data))
        end = tar.offset
    if reader.count < end + tarfile.BLOCKSIZE:
        raise tarfile.ReadError(f"no end-of-archive block at byte {end}: the file is truncated")
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
