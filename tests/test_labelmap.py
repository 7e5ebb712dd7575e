"""The ``tlm`` record: bit-exact round trips, size against the official format, damage."""

from __future__ import annotations

import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest

from lvvit.data.label_bytes import label_bytes_report, official_bytes, random_label_maps
from lvvit.data.labelmap import (
    CODEC_PALETTE_DEFLATE,
    CODEC_RAW,
    HEADER_SIZE,
    LabelMap,
    LabelMapError,
    centre_square_box,
    decode_tlm,
    encode_tlm,
)

SPECIAL_BITS = [
    0x0000,  # +0
    0x8000,  # -0
    0x7C00,  # +inf
    0xFC00,  # -inf
    0x0001,  # smallest subnormal
    0x83FF,  # largest negative subnormal
    0x7E00,  # quiet NaN
    0x7C01,  # signalling NaN
    0xFE5A,  # negative NaN with payload
    0x7BFF,  # largest finite
]


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype == np.float16 and np.array_equal(a.view(np.uint16), b.view(np.uint16))


def _photo_like(rng: np.random.Generator, k=5, h=18, w=18, classes=1000) -> LabelMap:
    """Sorted logits, a few classes repeated over neighbouring cells."""
    base = rng.choice(classes, size=(k + 3,), replace=False)
    indices = np.empty((k, h, w), np.uint16)
    for r in range(h):
        for c in range(w):
            shift = (r // 6 + c // 6) % 3
            indices[:, r, c] = base[shift : shift + k]
    values = -np.sort(-rng.normal(5, 3, (k, h, w)), axis=0)
    return LabelMap(values.astype(np.float16), indices, (0.125, 0.0, 0.875, 1.0))


def _roundtrip(label_map: LabelMap) -> LabelMap:
    decoded = decode_tlm(encode_tlm(label_map), "k")
    assert _same_bits(decoded.values, label_map.values)
    assert decoded.indices.dtype == np.uint16
    assert np.array_equal(decoded.indices, label_map.indices)
    assert decoded.box == pytest.approx(label_map.box, abs=1e-7)
    return decoded


def test_special_values_round_trip_bit_exact_in_both_codecs():
    bits = np.array(SPECIAL_BITS * 10, dtype=np.uint16).reshape(5, 4, 5)
    values = bits.view(np.float16)
    # Few repeated classes -> palette codec; every class distinct at k=1, 1x1 -> raw.
    indices = np.tile(np.array([3, 65535, 0, 7, 1000], np.uint16)[:, None, None], (1, 4, 5))
    record = encode_tlm(LabelMap(values, indices, (0.0, 0.0, 1.0, 1.0)))
    assert record[5] == CODEC_PALETTE_DEFLATE
    _roundtrip(LabelMap(values, indices, (0.0, 0.0, 1.0, 1.0)))
    tiny = LabelMap(np.array([[[np.float16(-0.0)]]]), np.array([[[65535]]], np.uint16), (0.2, 0.1, 0.9, 0.8))
    assert encode_tlm(tiny)[5] == CODEC_RAW
    assert len(encode_tlm(tiny)) == HEADER_SIZE + 4
    assert _roundtrip(tiny).values.view(np.uint16)[0, 0, 0] == 0x8000


@pytest.mark.parametrize("shape", [(5, 18, 18), (1, 3, 7), (10, 24, 12)])
def test_every_bit_pattern_round_trips(shape):
    rng = np.random.default_rng(sum(shape))
    n = int(np.prod(shape))
    values = rng.integers(0, 1 << 16, n, dtype=np.uint16).view(np.float16).reshape(shape)
    indices = rng.integers(0, 1 << 16, n).astype(np.uint16).reshape(shape)  # > 256 classes: 2-byte cells
    _roundtrip(LabelMap(values, indices, (0.0, 0.25, 1.0, 0.75)))
    _roundtrip(_photo_like(rng, *shape))


def test_all_65536_patterns_in_one_map():
    values = np.arange(1 << 16, dtype=np.uint16).view(np.float16).reshape(16, 64, 64)
    indices = (np.arange(1 << 16) % 300).astype(np.uint16).reshape(16, 64, 64)
    _roundtrip(LabelMap(values, indices, (0.0, 0.0, 1.0, 1.0)))


def test_random_maps_never_larger_than_official_format():
    for grid, k in [(18, 5), (14, 5), (24, 5), (4, 2)]:
        for label_map in random_label_maps(n=8, grid=grid, k=k, seed=grid):
            assert len(encode_tlm(label_map)) <= official_bytes(label_map)


def test_photo_maps_at_most_half_the_official_bytes():
    report = label_bytes_report(n=12, grid=18, k=5)
    assert 7000 < report["official_bytes"] < 9000  # torch.save of [2, 5, 18, 18] fp16
    assert report["photo_ratio"] <= 0.5
    assert report["photo_ratio_max"] <= 0.5
    assert report["random_ratio_max"] <= 1.0


def test_palette_codec_beats_raw_on_shared_classes():
    label_map = _photo_like(np.random.default_rng(0))
    assert len(encode_tlm(label_map)) < 0.5 * official_bytes(label_map)


def _record(label_map=None) -> bytes:
    return encode_tlm(label_map or _photo_like(np.random.default_rng(1)))


def _with_header(record: bytes, **fields) -> bytes:
    names = ["magic", "version", "codec", "k", "h", "w", "x0", "y0", "x1", "y1", "palette", "flags", "length", "crc"]
    header = dict(zip(names, struct.unpack_from("<4sBBHHH4fHHII", record), strict=True))
    header.update(fields)
    return struct.pack("<4sBBHHH4fHHII", *header.values()) + record[HEADER_SIZE:]


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda r: r[:10], "truncated"),
        (lambda r: r[:HEADER_SIZE], "truncated"),
        (lambda r: r[:-1], "truncated"),
        (lambda r: r + b"\0", "trailing"),
        (lambda r: b"PK\x03\x04" + r[4:], "magic"),
        (lambda r: _with_header(r, version=2), "version 2"),
        (lambda r: _with_header(r, codec=9), "codec 9"),
        (lambda r: _with_header(r, k=4), "expected"),
        (lambda r: _with_header(r, h=19), "expected"),
        (lambda r: _with_header(r, palette=2), "expected"),
        (lambda r: _with_header(r, x0=0.9, x1=0.1), "box"),
        (lambda r: r[:-5] + bytes([r[-5] ^ 0xFF]) + r[-4:], "checksum"),
    ],
)
def test_damaged_records_name_the_sample(damage, message):
    with pytest.raises(LabelMapError, match=message) as info:
        decode_tlm(damage(_record()), key="n01440764/n01440764_10026")
    assert "n01440764/n01440764_10026" in str(info.value)


def test_raw_record_with_wrong_sizes_is_refused():
    tiny = LabelMap(np.zeros((1, 1, 2), np.float16), np.array([[[1, 2]]], np.uint16), (0.0, 0.0, 1.0, 1.0))
    record = encode_tlm(tiny)
    assert record[5] == CODEC_RAW
    with pytest.raises(LabelMapError, match="'s1': raw payload is 8 bytes, expected 12"):
        decode_tlm(_with_header(record, w=3), "s1")


def test_damaged_deflate_stream_with_matching_checksum_is_refused():
    record = _record()
    payload = bytearray(record[HEADER_SIZE:])
    payload[2:6] = b"\xff\xff\xff\xff"
    with pytest.raises(LabelMapError, match="'s2'"):
        decode_tlm(_with_header(record[:HEADER_SIZE] + bytes(payload), crc=zlib.crc32(payload)), "s2")


def test_cell_pointing_past_palette_is_refused():
    body = struct.pack(">H", 0)[:1] + b"\x05" + bytes([0, 1]) + bytes(4)  # palette [5], cells 0 and 1
    payload = zlib.compress(body)
    header = struct.pack("<4sBBHHH4fHHII", b"LVTL", 1, 1, 1, 1, 2, 0, 0, 1, 1, 1, 0, len(payload), zlib.crc32(payload))
    with pytest.raises(LabelMapError, match="past the class palette"):
        decode_tlm(header + payload, "s3")


def test_encode_refuses_bad_maps_by_key():
    good = _photo_like(np.random.default_rng(2))
    cases = [
        (LabelMap(good.values.astype(np.float32), good.indices, good.box), "float16"),
        (LabelMap(good.values, good.indices[:, :3], good.box), r"\[k, H, W\]"),
        (LabelMap(good.values, good.indices.astype(np.int64) + 70000, good.box), "uint16"),
        (LabelMap(good.values, good.indices, (0.5, 0.0, 0.5, 1.0)), "box"),
        (LabelMap(good.values, good.indices, (0.0, 0.0, 1.5, 1.0)), "box"),
    ]
    for label_map, message in cases:
        with pytest.raises(LabelMapError, match=message) as info:
            encode_tlm(label_map, key="cls/img7")
        assert "cls/img7" in str(info.value)


def test_centre_square_box():
    assert centre_square_box(640, 427) == pytest.approx(((640 - 427) / 2 / 640, 0.0, (640 + 427) / 2 / 640, 1.0))
    assert centre_square_box(300, 500) == pytest.approx((0.0, 0.2, 1.0, 0.8))
    assert centre_square_box(64, 64) == (0.0, 0.0, 1.0, 1.0)


def test_decodes_with_numpy_alone(tmp_path):
    record_path = tmp_path / "r.tlm"
    label_map = _photo_like(np.random.default_rng(3))
    record_path.write_bytes(encode_tlm(label_map))
    np.save(tmp_path / "values.npy", label_map.values)
    script = (
        "import sys; sys.modules['torch'] = None; sys.modules['PIL'] = None\n"
        "import numpy as np\n"
        "from lvvit.data.labelmap import decode_tlm\n"
        f"m = decode_tlm(open({str(record_path)!r}, 'rb').read())\n"
        f"assert np.array_equal(m.values.view(np.uint16), np.load({str(tmp_path / 'values.npy')!r}).view(np.uint16))\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_format_doc_decoder_matches_the_records():
    """docs/format.md's numpy decoder reads what encode_tlm writes, in every codec path."""
    import re
    from pathlib import Path

    doc = (Path(__file__).parents[1] / "docs" / "format.md").read_text()
    source = re.search(r"### Decoding with numpy\n\n```python\n(.*?)```", doc, re.S).group(1)
    rng = np.random.default_rng(4)
    tiny = LabelMap(np.array([[[1.5]]], np.float16), np.array([[[9]]], np.uint16), (0.0, 0.0, 1.0, 1.0))
    maps = [_photo_like(rng), *random_label_maps(n=1, seed=4), tiny]  # palette <= 256, > 256, raw
    assert sorted(encode_tlm(m)[5] for m in maps) == [CODEC_RAW, CODEC_PALETTE_DEFLATE, CODEC_PALETTE_DEFLATE]
    for label_map in maps:
        scope = {"rec": encode_tlm(label_map)}
        exec(source, scope)
        assert _same_bits(np.ascontiguousarray(scope["values"]), label_map.values)
        assert np.array_equal(scope["indices"], label_map.indices)
