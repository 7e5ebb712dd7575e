"""Samples of a WebDataset tar as groups of raw members: the one bounded tar reader.

Every stage that streams shard samples reads them here: the labeler (which adds one member
per sample and must keep every other member exactly as it was, bytes and header fields, so
it works on ``tarfile`` members), ``lvvit-shards info/preview`` and the training and eval
loaders (through :meth:`TarSample.as_dict`, webdataset's sample dict). It exists, rather
than webdataset's ``tar_file_iterator``, because that reads every member whole, whatever
size its header declares: here each member is checked against its kind's bound first. Grouping is WebDataset's own rule (``base_plus_ext``, the one
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
from typing import BinaryIO, NamedTuple

from webdataset.tariterators import base_plus_ext

from lvvit.data.members import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, oversized

log = logging.getLogger(__name__)


class ShardReadError(RuntimeError):
    """A shard that cannot be read to its end (damaged or truncated); the message names the file."""


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
        """WebDataset's sample dict: ``__key__`` and one bytes value per extension (lower
        case, as webdataset's ``group_by_keys`` gives them)."""
        return {"__key__": self.key, **{base_plus_ext(info.name)[1].lower(): data for info, data in self.members}}


HEADER_BYTES = 1 << 20
"""Most bytes read between two members: tar headers, PAX and long-name records (which
tarfile reads whole before it returns the member) and the skipped data of non-file members."""
_READ_AHEAD = 64 << 10
"""Slack for tarfile's stream buffer (it reads 10 KiB records past what it returns)."""


class _BoundedReader:
    """The stream under tarfile's stream mode: counts the bytes read, to tell a tar that
    ends with its end-of-archive block from one cut at a member boundary (which tarfile
    accepts), and refuses to read past an allowance set before each header and each
    member, so no header or member a shard declares can make the reader hold more."""

    def __init__(self, stream: BinaryIO) -> None:
        self.stream, self.count = stream, 0
        self.limit, self.what = HEADER_BYTES, "the first tar header"

    def allow(self, size: int, what: str) -> None:
        self.limit, self.what = self.count + size + _READ_AHEAD, what

    def read(self, size: int = -1) -> bytes:
        if size < 0 or self.count + size > self.limit:
            size = self.limit - self.count + 1
        data = self.stream.read(size)
        self.count += len(data)
        if self.count > self.limit:
            raise tarfile.ReadError(f"{self.what} runs past {self.limit - _READ_AHEAD:,} bytes")
        return data


def _open_shard(shard: str | Path, opener: Callable[[str], BinaryIO] | None) -> BinaryIO:
    return open(shard, "rb") if opener is None else opener(str(shard))


def iter_tar_samples(
    shard: str | Path, opener: Callable[[str], BinaryIO] | None = None, max_pixels: int = DEFAULT_MAX_PIXELS
) -> Iterator[TarSample]:
    """Stream the samples of ``shard`` in file order, opened by ``opener`` (e.g. a
    ``ShardSource.open``; default: a local file). A damaged, truncated or unreachable tar,
    or a member larger than its kind allows (``lvvit.data.members``, images by
    ``max_pixels``), raises ``ShardReadError`` naming the shard (and the member)."""
    try:
        with _open_shard(shard, opener) as stream:
            yield from read_tar_samples(stream, str(shard), max_pixels)
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ShardReadError(f"cannot read shard {shard}: {type(e).__name__}: {e}") from e


def count_tar_samples(
    shard: str | Path, opener: Callable[[str], BinaryIO] | None = None, max_pixels: int = DEFAULT_MAX_PIXELS
) -> int:
    """The samples ``iter_tar_samples`` would give, counted from the member headers to the
    end-of-archive block without holding any member's data; errors as ``iter_tar_samples``."""
    count, last = 0, None
    try:
        with _open_shard(shard, opener) as stream:
            for key, _, _ in _keyed_members(stream, str(shard), max_pixels, read=False):
                count, last = count + (key != last), key
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ShardReadError(f"cannot read shard {shard}: {type(e).__name__}: {e}") from e
    return count


def verify_shard(
    shard: str | Path, expected: int | None, opener: Callable[[str], BinaryIO] | None = None, listed_in: str = "manifest.json"
) -> int:
    """The sample count of ``shard`` read to its end; raises ``ShardReadError`` naming the
    shard when it is missing, truncated, damaged or holds other than the ``expected``
    samples that ``listed_in`` (the manifest) gives."""
    if opener is None and not Path(shard).is_file():
        raise ShardReadError(f"shard {shard} does not exist")
    count = count_tar_samples(shard, opener)
    if expected is not None and count != expected:
        raise ShardReadError(f"shard {shard} holds {count} samples, {listed_in} says {expected}")
    return count


def _members(
    tar: tarfile.TarFile, reader: _BoundedReader, name: str, max_pixels: int, read: bool
) -> Iterator[tarfile.TarInfo]:
    """The file members of ``tar``, each checked against its kind's size before any of its
    data is read (the reader then allows exactly that much when ``read``; tarfile skips, in
    chunks, the data of members that are not files or not read)."""
    skip = 0
    while True:
        reader.allow(skip + HEADER_BYTES, "a tar header")
        info = tar.next()
        if info is None:
            return
        refused = oversized(info.name, base_plus_ext(info.name)[1], info.size, max_pixels)
        if refused is not None:  # a damaged tar, as the readers' callers treat one
            raise tarfile.ReadError(refused)
        skip = 0 if info.isfile() and read else info.size
        if info.isfile():
            if read:
                reader.allow(info.size, f"member {info.name}")
            yield info


def _keyed_members(
    stream: BinaryIO, name: str, max_pixels: int, read: bool
) -> Iterator[tuple[str, tarfile.TarInfo, bytes | None]]:
    """Sample key, header and (when ``read``) data of each file member of the tar ``stream``,
    in file order, then the check that the tar ends with its end-of-archive block."""
    reader = _BoundedReader(stream)
    with tarfile.open(fileobj=reader, mode="r|") as tar:
        for info in _members(tar, reader, name, max_pixels, read):
            key, _ = base_plus_ext(info.name)
            if key is None:
                log.warning("%s: member %r has no extension and belongs to no sample; dropped", name, info.name)
                continue
            yield key, info, tar.extractfile(info).read() if read else None
        end = tar.offset
    if reader.count < end + tarfile.BLOCKSIZE:
        raise tarfile.ReadError(f"no end-of-archive block at byte {end}: the file is truncated")


def read_tar_samples(stream: BinaryIO, name: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Iterator[TarSample]:
    """The samples of the open tar ``stream`` (called ``name`` in messages), in file order.
    A damaged or truncated tar, or an oversized member, raises ``tarfile.ReadError``; the
    stream's own errors (``OSError``, e.g. ``ShardUnavailable``) pass through as raised."""
    current: TarSample | None = None
    for key, info, data in _keyed_members(stream, name, max_pixels, read=True):
        if current is not None and current.key != key:
            yield current
            current = None
        if current is None:
            current = TarSample(key, [])
        current.members.append((info, data))
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


SHARD_KEY = "<shard>"
"""``SkippedSample.key`` of a whole shard that could not be read."""


class SkippedSample(NamedTuple):
    """A sample (or, with key ``<shard>``, a whole shard) left out, and why; the one skip
    record of the loaders and the labeler."""

    shard: str
    key: str
    reason: str
