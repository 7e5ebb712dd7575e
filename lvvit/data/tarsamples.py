"""Samples of a WebDataset tar as groups of raw members: the one bounded tar reader.

Every stage that streams shard samples reads them here: the labeler (which adds one member
per sample and must keep every other member exactly as it was, bytes and header fields, so
it works on ``tarfile`` members), ``lvvit-shards info/preview`` and the training and eval
loaders (through :meth:`TarSample.as_dict`, webdataset's sample dict). It exists, rather
than webdataset's ``tar_file_iterator``, because that reads every member whole, whatever
size its header declares: here each member is checked against its kind's bound first. Grouping is WebDataset's own rule (``base_plus_ext``, the one
used everywhere): consecutive members whose names share the part before the first dot of
the file name form one sample. The tar is read as a stream, so any shard source works.
The training loader's exact-epoch reader (:func:`scan_tar_samples`) parses the 512-byte
headers itself, with the same bounds, rather than through tarfile: it passes over many
samples by header, and tarfile's header machinery was most of that cost.
"""

from __future__ import annotations

import io
import logging
import struct
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


# ---------------------------------------------------------------- the lean scan


_BLOCK = tarfile.BLOCKSIZE
_ZERO_BLOCK = bytes(_BLOCK)
_FILE_TYPES = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE)
_PAX_TYPES = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE)
_META_TYPES = (*_PAX_TYPES, tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK)
_SKIP_CHUNK = 1 << 20
"""Most bytes read at once to pass over data a stream cannot seek past."""


def _text(field: bytes) -> str:
    """A name field or record as tarfile decodes it (up to the first NUL, UTF-8, undecodable
    bytes kept as surrogates)."""
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _number(field: bytes, offset: int) -> int:
    """A numeric header field as tarfile reads it: octal text, or GNU base-256."""
    if field[0] in (0o200, 0o377):
        value = int.from_bytes(field[1:], "big")
        return value - 256 ** (len(field) - 1) if field[0] == 0o377 else value
    try:
        return int(field.split(b"\0", 1)[0].decode("ascii").strip() or "0", 8)
    except ValueError:
        raise tarfile.ReadError(f"invalid number {field!r} in the tar header at byte {offset:,}") from None


def _pax_records(data: bytes, offset: int) -> dict[str, str]:
    """The ``LENGTH KEY=VALUE\\n`` records of a PAX header (POSIX.1-2001); the NUL padding
    after the last one ends them."""
    records: dict[str, str] = {}
    pos = 0
    while pos < len(data) and data[pos] != 0:
        space = data.find(b" ", pos, pos + 21)
        try:
            length = int(data[pos:space]) if space > pos else 0
        except ValueError:
            length = 0
        record = data[pos : pos + length]
        if length <= space - pos or len(record) < length or not record.endswith(b"\n") or b"=" not in record:
            raise tarfile.ReadError(f"a malformed PAX record in the tar header at byte {offset:,}")
        keyword, value = record[space - pos + 1 : -1].split(b"=", 1)
        records[keyword.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return records


class _ScanReader:
    """The stream under :func:`scan_tar_samples`: reads exactly what it is asked (headers,
    the members' data, each size checked before), and passes over data by seeking where
    the stream can (a local file), else by reading it in bounded chunks and dropping them."""

    def __init__(self, stream: BinaryIO) -> None:
        self.stream, self.offset = stream, 0
        seekable = getattr(stream, "seekable", None)
        self.seekable = bool(seekable and seekable())

    def read(self, size: int, what: str) -> bytes:
        data = self.stream.read(size)
        while len(data) < size:  # a raw stream may return less
            more = self.stream.read(size - len(data))
            if not more:
                raise tarfile.ReadError(f"{what} at byte {self.offset:,} is cut short: the file is truncated")
            data += more
        self.offset += size
        return data

    def skip(self, size: int, what: str) -> None:
        if size <= 0:
            return
        if self.seekable:  # a cut past here shows as a cut header next
            self.stream.seek(size, io.SEEK_CUR)
            self.offset += size
            return
        while size > 0:
            chunk = min(size, _SKIP_CHUNK)
            self.read(chunk, what)
            size -= chunk

    def header(self, start: int, meta: bool) -> bytes | None:
        """The next 512-byte header block, checked; ``None`` at the end-of-archive block."""
        block = self.stream.read(_BLOCK)
        if len(block) < _BLOCK:
            if not block and self.offset == 0:
                raise tarfile.ReadError("empty file")
            raise tarfile.ReadError(f"no end-of-archive block at byte {self.offset:,}: the file is truncated")
        at, self.offset = self.offset, self.offset + _BLOCK
        if block == _ZERO_BLOCK:
            if meta:
                raise tarfile.ReadError(f"the member after the extended header at byte {start:,} is missing")
            return None
        checksum = _number(block[148:156], at)
        if checksum != 256 + sum(block) - sum(block[148:156]) and checksum != 256 + sum(
                struct.unpack_from("148b8x356b", block)):
            raise tarfile.ReadError(f"bad checksum in the tar header at byte {at:,}")
        return block


def _scan_members(
    stream: BinaryIO, name: str, max_pixels: int, read: Callable[[str], bool]
) -> Iterator[tuple[str, str, int, bytes | None]]:
    """Key, name, size and (when ``read(key)``) data of each file member of the tar
    ``stream``, in file order, to its end-of-archive block. The headers are parsed as
    tarfile parses them (ustar prefix, GNU long names, PAX ``path`` and ``size``, global
    PAX headers; of two that set a field, the first in the file wins, as tarfile's nesting
    has it) with the bounds of :func:`_members`: no header run longer than
    ``HEADER_BYTES``, no member larger than its kind allows. Sparse members are refused;
    a bad checksum or a cut anywhere is a ``tarfile.ReadError`` (tarfile ends a stream
    quietly at a bad header after the first)."""
    reader = _ScanReader(stream)
    global_pax: dict[str, str] = {}
    while True:
        start = reader.offset
        path: str | None = None
        size: int | None = None
        block = reader.header(start, meta=False)
        while block is not None and block[156:157] in _META_TYPES:
            kind, length = block[156:157], _number(block[124:136], reader.offset - _BLOCK)
            if length < 0 or reader.offset + length - start > HEADER_BYTES:
                raise tarfile.ReadError(f"a tar header at byte {start:,} runs past {HEADER_BYTES:,} bytes")
            data = reader.read(length + -length % _BLOCK, "an extended header")[:length]
            if kind == tarfile.GNUTYPE_LONGNAME:
                path = _text(data) if path is None else path
            elif kind in _PAX_TYPES:
                records = _pax_records(data, start)
                if any(k.startswith("GNU.sparse.") for k in records):
                    raise tarfile.ReadError(f"a sparse member at byte {start:,}: not supported in a shard")
                if kind == tarfile.XGLTYPE:
                    global_pax.update(records)
                else:
                    records = {**global_pax, **records}
                    path = records["path"].rstrip("/") if path is None and "path" in records else path
                    if size is None and "size" in records:
                        if not records["size"].isdigit():
                            raise tarfile.ReadError(f"invalid PAX size {records['size']!r} at byte {start:,}")
                        size = int(records["size"])
            block = reader.header(start, meta=True)
        if block is None:
            return
        kind = block[156:157]
        if kind == tarfile.GNUTYPE_SPARSE:
            raise tarfile.ReadError(f"a sparse member at byte {start:,}: not supported in a shard")
        member = _text(block[0:100])
        if kind == tarfile.AREGTYPE and member.endswith("/"):
            kind = tarfile.DIRTYPE
        if kind == tarfile.DIRTYPE:
            member = member.rstrip("/")
        prefix = _text(block[345:500])
        if prefix:
            member = f"{prefix}/{member}"
        header_size = _number(block[124:136], reader.offset - _BLOCK)
        if path is None and "path" in global_pax:
            path = global_pax["path"].rstrip("/")
        if path is not None:
            member = path.rstrip("/") if kind == tarfile.DIRTYPE else path
        size = header_size if size is None else size
        if size < 0:
            raise tarfile.ReadError(f"member {member} declares a negative size")
        key, ext = base_plus_ext(member)
        refused = oversized(member, ext, size, max_pixels)
        if refused is not None:
            raise tarfile.ReadError(refused)
        if kind not in _FILE_TYPES:
            reader.skip(size + -size % _BLOCK if kind not in tarfile.SUPPORTED_TYPES else 0, "a member")
            continue
        if key is None:
            log.warning("%s: member %r has no extension and belongs to no sample; dropped", name, member)
            reader.skip(size + -size % _BLOCK, f"member {member}")
            continue
        if read(key):
            data = reader.read(size, f"member {member}")
            reader.skip(-size % _BLOCK, f"member {member}")
            yield key, member, size, data
        else:
            reader.skip(size + -size % _BLOCK, f"member {member}")
            yield key, member, size, None


def scan_tar_samples(
    stream: BinaryIO, name: str, wanted: Callable[[int], bool], max_pixels: int = DEFAULT_MAX_PIXELS
) -> Iterator[tuple[int, TarSample | None]]:
    """``(index, sample)`` for each sample of the open tar ``stream``, in file order, index
    counting from 0 (the training loader's reader). A sample for which ``wanted(index)`` is
    false comes as ``(index, None)``: passed over by its headers (its data skipped by a
    seek, or read in bounded chunks and dropped from a stream; never held, never decoded).

    The headers are read by a lean parser of the 512-byte blocks (:func:`_scan_members`),
    not tarfile: tarfile spends ~80 us on a PAX-headed member's headers, about all of the
    cost of passing over a sample, and a resume passes over thousands. The bounds are
    ``read_tar_samples``'s, and so are the samples (keys, members, bytes) of any shard
    both can read. It is stricter: a damaged header after the first is an error where
    tarfile would end the stream there. A caller that stops iterating early (it has the
    samples it needs) reads no further and leaves the end-of-archive check out. The
    members' ``TarInfo`` hold name and size only."""
    state = {"key": None, "index": -1, "wanted": False}

    def read(key: str) -> bool:
        if key != state["key"]:
            state["key"], state["index"] = key, state["index"] + 1
            state["wanted"] = wanted(state["index"])
        return state["wanted"]

    current: TarSample | None = None
    index, last = -1, None
    for key, member, size, data in _scan_members(stream, name, max_pixels, read):
        if key != last:
            if last is not None:
                yield index, current
            index, last = state["index"], key
            current = TarSample(key, []) if data is not None else None
        if current is not None:
            info = tarfile.TarInfo(member)
            info.size = size
            current.members.append((info, data))
    if last is not None:
        yield index, current


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
