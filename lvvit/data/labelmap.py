"""The token-label map record (``tlm``): a teacher's top-k logits on an H x W grid.

The record is a small versioned binary (spec in docs/format.md) rather than a pickle or
``.pt`` file, so shards stay safe to open and any tool with numpy can read them. Most of
its size comes from the fp16 logits; neighbouring cells share classes, which the
per-image class palette and deflate turn into bytes saved (about 0.4x of the official
``torch.save`` maps on photo-like maps, and never more than raw storage on noise).
"""

from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass

import numpy as np

from lvvit.errors import DataError

MAGIC = b"LVTL"
VERSION = 1
CODEC_RAW = 0
CODEC_PALETTE_DEFLATE = 1
# magic, version, codec, k, H, W, box (4 x f32), palette size, flags, payload length, crc32
_HEADER = struct.Struct("<4sBBHHH4fHHII")
HEADER_SIZE = _HEADER.size  # 40 bytes
_U16_MAX = 0xFFFF
MAX_CELLS = 1 << 20
"""Most entries (k * H * W) a record may hold: 650x the official maps' 5 x 18 x 18, so
any real teacher fits, while a record is never more than ``MAX_RECORD_BYTES``."""
MAX_RECORD_BYTES = HEADER_SIZE + 4 * MAX_CELLS
"""Largest ``tlm`` record: the header plus the raw codec's payload (codec 1 is written
only when smaller), the bound a shard reader puts on a ``tlm`` member."""


class LabelMapError(DataError, ValueError):
    """A ``tlm`` record or label map that cannot be read or written; names the sample."""


@dataclass
class LabelMap:
    """Top-k teacher logits over a grid plus the normalised image box the grid covers."""

    values: np.ndarray  # float16 [k, H, W], teacher logits, best first
    indices: np.ndarray  # uint16 [k, H, W], class indices
    box: tuple[float, float, float, float]  # (x0, y0, x1, y1) in [0, 1]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.values.shape)  # type: ignore[return-value]


def centre_square_box(width: int, height: int) -> tuple[float, float, float, float]:
    """The centre square of a ``width x height`` image in normalised coordinates: the
    region an eval-style centre crop (and the official TokenLabeling maps) covers."""
    if width >= height:
        return ((width - height) / 2 / width, 0.0, (width + height) / 2 / width, 1.0)
    return (0.0, (height - width) / 2 / height, 1.0, (height + width) / 2 / height)


def _checked(label_map: LabelMap, key: str) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """Validate a map before encoding, so a bad map fails where it is made, not in training."""
    values = np.asarray(label_map.values)
    indices = np.asarray(label_map.indices)
    if values.ndim != 3 or values.shape != indices.shape:
        raise LabelMapError(
            f"label map for sample {key!r}: values {values.shape} and indices {indices.shape} "
            "must both be [k, H, W]"
        )
    if min(values.shape) < 1 or max(values.shape) > _U16_MAX or values.size > MAX_CELLS:
        raise LabelMapError(f"label map for sample {key!r}: shape {values.shape} out of range "
                            f"(each side 1..{_U16_MAX}, at most {MAX_CELLS} entries)")
    if values.dtype != np.float16:
        raise LabelMapError(
            f"label map for sample {key!r}: values must be float16, got {values.dtype} "
            "(cast explicitly: the record stores fp16 bit patterns)"
        )
    if not np.issubdtype(indices.dtype, np.integer):
        raise LabelMapError(f"label map for sample {key!r}: indices must be integers, got {indices.dtype}")
    if indices.size and (int(indices.min()) < 0 or int(indices.max()) > _U16_MAX):
        raise LabelMapError(f"label map for sample {key!r}: class indices must fit in uint16")
    box = tuple(float(b) for b in label_map.box)
    if (
        len(box) != 4
        or not all(math.isfinite(b) and 0.0 <= b <= 1.0 for b in box)
        or not (box[0] < box[2] and box[1] < box[3])
    ):
        raise LabelMapError(
            f"label map for sample {key!r}: box {label_map.box} must be (x0, y0, x1, y1) "
            "in [0, 1] with x0 < x1 and y0 < y1"
        )
    return values, indices.astype(np.uint16), box


def _byte_planes(words: np.ndarray) -> bytes:
    """High bytes of all words, then low bytes: the high bytes (sign, exponent, class
    id hundreds) repeat a lot and deflate well once apart from the noisy low bytes."""
    words = words.astype(np.uint16, copy=False).ravel()
    return (words >> 8).astype(np.uint8).tobytes() + (words & 0xFF).astype(np.uint8).tobytes()


def _from_byte_planes(data: bytes, n: int) -> np.ndarray:
    planes = np.frombuffer(data, dtype=np.uint8, count=2 * n)
    return (planes[:n].astype(np.uint16) << 8) | planes[n:].astype(np.uint16)


def _palette_body(values: np.ndarray, indices: np.ndarray) -> tuple[int, bytes]:
    palette, cell_index = np.unique(indices, return_inverse=True)
    palette_deltas = np.diff(palette, prepend=np.uint16(0)).astype(np.uint16)
    if len(palette) <= 256:
        cell_bytes = cell_index.astype(np.uint8).tobytes()
    else:
        cell_bytes = _byte_planes(cell_index)
    # Top-k is sorted best first, so each rank's bit pattern minus the next is small.
    words = values.view(np.uint16).copy()
    words[1:] = values.view(np.uint16)[:-1] - values.view(np.uint16)[1:]
    return len(palette), _byte_planes(palette_deltas) + cell_bytes + _byte_planes(words)


def encode_tlm(label_map: LabelMap, key: str = "<unknown>") -> bytes:
    """Encode a label map as a ``tlm`` record (bit-exact for every fp16 value)."""
    values, indices, box = _checked(label_map, key)
    k, h, w = values.shape
    raw = values.astype("<f2").tobytes() + indices.astype("<u2").tobytes()
    palette_size, body = _palette_body(values, indices)
    packed = zlib.compress(body, 9)
    if len(packed) < len(raw):
        codec, payload = CODEC_PALETTE_DEFLATE, packed
    else:
        codec, payload, palette_size = CODEC_RAW, raw, 0
    header = _HEADER.pack(
        MAGIC, VERSION, codec, k, h, w, *box, palette_size, 0, len(payload), zlib.crc32(payload)
    )
    return header + payload


def _palette_body_size(n: int, palette_size: int) -> int:
    """Bytes of a codec-1 body for ``n`` entries and a palette of ``palette_size``."""
    return 2 * palette_size + (1 if palette_size <= 256 else 2) * n + 2 * n


def _inflate(payload: bytes, expected: int, fail) -> bytes:
    """The deflate body, inflated to at most one byte past the ``expected`` size the header
    implies: a small record that would inflate to gigabytes stops there, in kilobytes."""
    inflater = zlib.decompressobj()
    try:
        body = inflater.decompress(payload, expected + 1)
    except zlib.error as exc:
        fail(f"deflate stream is damaged ({exc})")
    if len(body) > expected or inflater.unconsumed_tail:
        fail(f"deflate body inflates past the {expected} bytes expected from its header")
    if not inflater.eof:
        fail("deflate stream is damaged (it ends before its end marker)")
    return body


def _decode_palette_body(body: bytes, k: int, h: int, w: int, palette_size: int, fail) -> tuple:
    n = k * h * w
    cell_width = 1 if palette_size <= 256 else 2
    expected = _palette_body_size(n, palette_size)
    if len(body) != expected:
        fail(f"body holds {len(body)} bytes, expected {expected} for k={k} H={h} W={w} palette={palette_size}")
    palette = np.cumsum(_from_byte_planes(body, palette_size), dtype=np.uint32)
    if palette_size and palette[-1] > _U16_MAX:
        fail("palette runs past uint16")
    offset = 2 * palette_size
    if cell_width == 1:
        cell_index = np.frombuffer(body, dtype=np.uint8, count=n, offset=offset)
    else:
        cell_index = _from_byte_planes(body[offset : offset + 2 * n], n)
    if n and int(cell_index.max()) >= palette_size:
        fail("a cell points past the class palette")
    indices = palette[cell_index].astype(np.uint16).reshape(k, h, w)
    words = _from_byte_planes(body[offset + cell_width * n :], n).reshape(k, h, w)
    # Undo the rank deltas: v[j] = v[j-1] - d[j] (mod 2**16).
    words = np.cumsum(
        np.concatenate([words[:1], (-words[1:].astype(np.int64)) & _U16_MAX]), axis=0
    ).astype(np.uint16)
    return words.view(np.float16), indices


def decode_tlm(data: bytes, key: str = "<unknown>") -> LabelMap:
    """Decode a ``tlm`` record; any damage raises ``LabelMapError`` naming ``key``."""

    def fail(reason: str):
        raise LabelMapError(f"tlm record for sample {key!r}: {reason}")

    data = bytes(data)
    if len(data) < HEADER_SIZE:
        fail(f"truncated: {len(data)} bytes, shorter than the {HEADER_SIZE}-byte header")
    magic, version, codec, k, h, w, *rest = _HEADER.unpack_from(data)
    box, (palette_size, _flags, length, crc) = tuple(rest[:4]), rest[4:]
    if magic != MAGIC:
        fail(f"bad magic {magic!r} (not a tlm record)")
    if version != VERSION:
        fail(f"unsupported version {version} (this reader knows version {VERSION})")
    payload = data[HEADER_SIZE:]
    if len(payload) != length:
        state = "truncated" if len(payload) < length else "trailing bytes"
        fail(f"{state}: payload is {len(payload)} bytes, header says {length}")
    if zlib.crc32(payload) != crc:
        fail("payload checksum mismatch (corrupt record)")
    if min(k, h, w) < 1:
        fail(f"empty shape k={k} H={h} W={w}")
    n = k * h * w
    if n > MAX_CELLS:
        fail(f"k={k} H={h} W={w} is {n} entries, more than the {MAX_CELLS} a record may hold")
    if codec == CODEC_RAW:
        if length != 4 * n:
            fail(f"raw payload is {length} bytes, expected {4 * n} for k={k} H={h} W={w}")
        values = np.frombuffer(payload, dtype="<f2", count=n).astype(np.float16).reshape(k, h, w)
        indices = np.frombuffer(payload, dtype="<u2", offset=2 * n).astype(np.uint16).reshape(k, h, w)
    elif codec == CODEC_PALETTE_DEFLATE:
        body = _inflate(payload, _palette_body_size(n, palette_size), fail)
        values, indices = _decode_palette_body(body, k, h, w, palette_size, fail)
    else:
        fail(f"unknown codec {codec}")
    if not all(0.0 <= b <= 1.0 for b in box) or not (box[0] < box[2] and box[1] < box[3]):
        fail(f"box {box} is not a valid normalised (x0, y0, x1, y1)")
    return LabelMap(values=values, indices=indices, box=tuple(float(b) for b in box))
