"""What one shard member may weigh, by kind: checked from its tar header, before it is read.

A tar header declares its member's size, so a reader can refuse a member without reading
a byte of it; a streamed member that declares 2 GB would otherwise be read whole into
memory. The bounds follow from what the member is: an image from the pixel cap (no
8-bit image of ``max_pixels`` pixels needs more than 4 bytes a pixel, as raw RGBA), a
``tlm`` record from its grid bound (``labelmap.MAX_RECORD_BYTES``), a class index is a
few digits, and anything else (json, txt, keys) is small metadata.
"""

from __future__ import annotations

from lvvit.data.labelmap import MAX_RECORD_BYTES

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "bmp", "webp", "tif", "tiff")
"""Image file suffixes read from an ImageFolder and image members of a shard sample, in order
of preference (``jpg`` is the shard contract's)."""
DEFAULT_MAX_PIXELS = 40_000_000
"""Images with more pixels are downscaled to this many: ImageNet's largest photo has
about 10 MP, and a 144 MP one would cost ~430 MB per decode in every training epoch."""
IMAGE_BYTES_PER_PIXEL = 4
IMAGE_HEADER_BYTES = 1 << 20
"""Room for an image file's own headers and metadata (EXIF, ICC profile) beyond its pixels."""
CLS_BYTES = 64
OTHER_BYTES = 1 << 20
"""Any member that is not an image, ``tlm`` or ``cls`` (json, txt, ...)."""


def image_bytes(max_pixels: int = DEFAULT_MAX_PIXELS) -> int:
    """Largest image member: ``max_pixels`` at 4 bytes each plus ``IMAGE_HEADER_BYTES``
    (160 MB at the default 40 MP)."""
    return IMAGE_BYTES_PER_PIXEL * max_pixels + IMAGE_HEADER_BYTES


def member_limit(ext: str | None, max_pixels: int = DEFAULT_MAX_PIXELS) -> int:
    """Most bytes a member with extension ``ext`` (webdataset's, e.g. ``jpg`` or
    ``seg.png``: the last part decides) may declare."""
    kind = (ext or "").rsplit(".", 1)[-1].lower()
    if kind in IMAGE_EXTENSIONS:
        return image_bytes(max_pixels)
    if kind == "tlm":
        return MAX_RECORD_BYTES
    if kind == "cls":
        return CLS_BYTES
    return OTHER_BYTES


def oversized(name: str, ext: str | None, size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> str | None:
    """Why member ``name`` of ``size`` declared bytes is refused, or ``None`` when it fits."""
    limit = member_limit(ext, max_pixels)
    if size <= limit:
        return None
    return f"member {name} declares {size:,} bytes, more than the {limit:,} allowed for a .{ext} member"
