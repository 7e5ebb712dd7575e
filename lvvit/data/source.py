"""Shard sources: where a stage's shards come from, with their sample counts and classes.

A source spec is any of

* a local folder (its ``manifest.json`` lists the shards, else its ``*.tar`` files),
  a local ``manifest.json``, one local tar, or a local brace pattern naming a subset;
* ``http://`` / ``https://`` URLs, with brace patterns, or a folder URL (``.../train/``)
  whose ``manifest.json`` lists the shards;
* ``pipe:COMMAND`` (the command writes one shard to stdout; braces expand as in
  webdataset, e.g. ``pipe:aws s3 cp s3://bucket/train-{000000..000009}.tar -``);
* ``s3://`` and ``gs://`` URLs (patterns and folder URLs as for HTTP), GETs signed by
  boto3 and google-auth (credentials chain, ``AWS_PROFILE``, ``AWS_ENDPOINT_URL_S3`` /
  ``AWS_ENDPOINT_URL`` for S3-compatible stores, ``STORAGE_EMULATOR_HOST``) and read by the
  HTTP reader of ``lvvit.data.streams`` (``lvvit.data.objectstore``).

Only the string the user typed is read as a scheme: a local spec becomes an absolute
path at once, so the shards a folder holds or a manifest lists, and the ``classes.json``
beside them, are always paths, whatever their names spell (``pipe:...`` included).

The manifest (sample counts per shard: equal steps per rank, the exact eval split) and
``classes.json`` are looked up beside the shards by the same scheme, or taken from an
explicit manifest location; a pattern that names a subset gets the counts of exactly
those shards. Both files are untrusted data: read with a size bound (and, remote, the
time bounds of ``lvvit.data.streams``), parsed as JSON and checked field by field, counts
against what the shards can hold; nothing is unpickled. Opening a shard is
``lvvit.data.streams``: retries, per-read timeouts, a whole-shard deadline.

With a shard cache (``Access.cache_dir``), a remote manifest and ``classes.json`` are still
read from the store every time (they are small, and may change), and a copy of each is kept
in the cache beside the shards. When the store cannot be reached and the cache holds a copy,
the store is tried once (no retries) and the copy is used: a run whose cache is warm rides
out a store outage, and the log says so in one warning. A store that answers no (404, 403)
is believed: a cached copy never stands in for a file that is gone.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, NamedTuple

from braceexpand import braceexpand

from lvvit import atomic, jsonload
from lvvit.data.imagefolder import CLASS_ORDERS
from lvvit.data.streams import (
    DEFAULT_ACCESS,
    Access,
    ShardUnavailable,
    cache_path,
    is_remote,
    open_url,
    shard_name,
)
from lvvit.data.streams import DEFAULT_RETRIES as DEFAULT_RETRIES
from lvvit.data.streams import DEFAULT_TIMEOUT as DEFAULT_TIMEOUT
from lvvit.errors import DataError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
CLASSES = "classes.json"
MAX_JSON_BYTES = 32 << 20
"""Largest manifest or classes.json read: ImageNet's are ~60 KB and ~80 KB."""
MIN_SAMPLE_BYTES = 512
"""A sample has at least one tar member, and every member has a 512-byte header."""
MAX_SHARD_SAMPLES = 10_000_000
"""Most samples a manifest may list for one shard (webdataset shards hold thousands; ten
million is a whole dataset in one tar); remote shards, whose sizes are unknown, get this
bound alone."""


class SourceError(DataError, ValueError):
    """A spec, manifest or classes.json that cannot be used; the message names it."""


@dataclass(frozen=True)
class ShardSource:
    """The shards a stage reads, in order, with their sample counts when a manifest gave them."""

    spec: str
    urls: tuple[str, ...]
    counts: tuple[int, ...] | None  # per shard; None when no manifest was reachable
    manifest: str | None  # where the counts came from
    classes_json: bytes | None  # classes.json as found beside the shards (checked JSON)
    access: Access = DEFAULT_ACCESS
    class_order: str | None = None  # the manifest's class_order (docs/format.md), when it has one

    @property
    def total(self) -> int | None:
        return None if self.counts is None else sum(self.counts)

    @property
    def classes(self) -> list[dict] | None:
        return None if self.classes_json is None else json.loads(self.classes_json)

    def open(self, url: str) -> BinaryIO:
        """One shard as a binary stream (see ``open_url``)."""
        return open_url(url, self.access)


def sibling(url: str, name: str) -> str | None:
    """``name`` in the folder of ``url``, by the same scheme; ``None`` when a pipe command
    has no single word naming a ``.tar`` (or the manifest) to replace."""
    if url.startswith("pipe:"):
        words = shlex.split(url[5:])
        tars = [i for i, w in enumerate(words) if w.endswith((".tar", f"/{MANIFEST}"))]
        if len(tars) != 1:
            return None
        word = words[tars[0]]
        words[tars[0]] = f"{word.rsplit('/', 1)[0]}/{name}" if "/" in word else name
        return "pipe:" + shlex.join(words)
    if is_remote(url):
        return f"{url.rsplit('/', 1)[0]}/{name}"
    return str(Path(url).parent / name)


# ---------------------------------------------------------------- resolving a spec


def resolve(spec: str | Path, manifest: str | Path | None = None, access: Access = DEFAULT_ACCESS) -> ShardSource:
    """The shards ``spec`` names, with counts from ``manifest`` (else the one beside them).

    Raises ``FileNotFoundError`` for local files that do not exist and ``SourceError`` for a
    spec or manifest that cannot be used. A manifest beside a pattern that is absent (or,
    remote, unreachable) leaves the counts unknown: training then needs ``--steps-per-epoch``.
    """
    typed = str(spec)
    urls, beside, parsed = _shards_of(_located(typed), access)
    listing = beside
    if manifest is not None:
        listing = _located(str(manifest))
        parsed = _manifest_entries(listing, access, required=True)
    elif parsed is None and beside is not None:
        parsed = _manifest_entries(beside, access, required=False)
    counts = None if parsed is None else _subset_counts(urls, parsed.entries, listing, typed)
    if not is_remote(typed):
        missing = [url for url in urls if not Path(url).is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} shard(s) of {typed} are missing: {', '.join(missing)}")
        if counts is not None:
            _check_counts_fit(urls, counts, listing)
    classes_at = sibling(listing if listing is not None else urls[0], CLASSES)
    classes = _read_classes(classes_at, access) if classes_at is not None else None
    return ShardSource(typed, tuple(urls), counts, listing if counts is not None else None, classes, access,
                       None if parsed is None else parsed.class_order)


def _located(spec: str) -> str:
    """``spec`` as typed when it names a command or URL, else as an absolute path. Every
    name later joined to it (the shards a folder or manifest lists, ``classes.json``) is
    then an absolute path too, so no file name, however it is spelled (``pipe:...``,
    ``http://...``), is ever read as a command or URL."""
    return spec if is_remote(spec) else os.path.join(os.getcwd(), spec)


def _check_counts_fit(urls: list[str], counts: tuple[int, ...], listing: str) -> None:
    """A local shard holds at most one sample per tar header block: a count above that is
    a manifest that lies (a sample count of 10**18 would make epochs that never end)."""
    for url, count in zip(urls, counts, strict=True):
        size = os.path.getsize(url)
        if count > size // MIN_SAMPLE_BYTES:
            raise SourceError(f"{listing}: shard {shard_name(url)} lists {count} samples, more than its {size} "
                              f"bytes can hold (every sample takes at least {MIN_SAMPLE_BYTES} bytes)")


def as_source(data: str | Path | ShardSource) -> ShardSource:
    """``data`` as a source: given as one, else resolved from its spec with default access."""
    return data if isinstance(data, ShardSource) else resolve(data)


def _folder_manifest(spec: str) -> str | None:
    """The manifest that lists the shards of a folder spec (or the spec itself)."""
    if spec.endswith(MANIFEST):
        return spec
    if is_remote(spec):
        folder = not (spec.startswith("pipe:") or spec.endswith(".tar") or "{" in spec)
        return f"{spec.rstrip('/')}/{MANIFEST}" if folder else None
    return str(Path(spec) / MANIFEST) if Path(spec).is_dir() else None


def _shards_of(spec: str, access: Access) -> tuple[list[str], str | None, Manifest | None]:
    """Shard URLs of ``spec``, the manifest beside them (``None``: none to look for) and the
    manifest when it was read already (a folder spec)."""
    folder = _folder_manifest(spec)
    if folder is not None and not is_remote(spec) and not Path(folder).is_file() and Path(spec).is_dir():
        return _local_folder_without_manifest(Path(spec)), None, None
    if folder is not None:
        parsed = _manifest_entries(folder, access, required=True)
        if not parsed.entries:
            raise SourceError(f"{folder} lists no shards")
        return [sibling(folder, name) for name in parsed.entries], folder, parsed
    urls = list(braceexpand(spec))
    folders = {sibling(url, MANIFEST) for url in urls}
    return urls, folders.pop() if len(folders) == 1 else None, None


def _local_folder_without_manifest(folder: Path) -> list[str]:
    tars = sorted(folder.glob("*.tar"))
    if not tars:
        raise FileNotFoundError(f"no {MANIFEST} or .tar shards in {folder}")
    return [str(path) for path in tars]


class Manifest(NamedTuple):
    entries: dict[str, int]  # shard name -> samples, in manifest order
    class_order: str | None


def _manifest_entries(url: str, access: Access, required: bool) -> Manifest | None:
    data = _read_json_bytes(url, access, required)
    return None if data is None else _parse_manifest(data, url)


def _subset_counts(urls: list[str], entries: dict[str, int], listing: str, spec: str) -> tuple[int, ...]:
    """The listed counts of exactly the shards ``urls`` names (a pattern may name a subset)."""
    unlisted = [url for url in urls if shard_name(url) not in entries]
    if unlisted:
        raise SourceError(f"{listing} does not list {len(unlisted)} shard(s) of {spec}: {', '.join(unlisted[:5])}")
    return tuple(entries[shard_name(url)] for url in urls)


def _parse_manifest(data: bytes, where: str) -> Manifest:
    """Shard name -> samples, in manifest order, and the class order, every field checked."""
    try:
        manifest = jsonload.loads(data)
    except ValueError as e:
        raise SourceError(f"{where}: not valid JSON ({e})") from None
    shards = manifest.get("shards") if isinstance(manifest, dict) else None
    if not isinstance(shards, list):
        raise SourceError(f"{where}: expected an object with a 'shards' list")
    entries: dict[str, int] = {}
    for i, entry in enumerate(shards):
        name = entry.get("name") if isinstance(entry, dict) else None
        samples = entry.get("samples") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not name or "/" in name or name in (".", ".."):
            raise SourceError(f"{where}: shards[{i}].name {name!r} is not a file name")
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 0:
            raise SourceError(f"{where}: shards[{i}].samples {samples!r} is not a sample count")
        if samples > MAX_SHARD_SAMPLES:
            raise SourceError(f"{where}: shards[{i}].samples {samples} for shard {name} is more than "
                              f"{MAX_SHARD_SAMPLES:,}, the most one shard may hold")
        if name in entries:
            raise SourceError(f"{where}: shard {name} is listed twice")
        entries[name] = samples
    order = manifest.get("class_order")
    if order is not None and order not in CLASS_ORDERS:
        raise SourceError(f"{where}: class_order {order!r} is not one of {', '.join(CLASS_ORDERS)}")
    return Manifest(entries, order)


def _read_classes(url: str, access: Access) -> bytes | None:
    data = _read_json_bytes(url, access, required=False)
    if data is None:
        return None
    try:
        classes = jsonload.loads(data)
    except ValueError as e:
        raise SourceError(f"{url}: not valid JSON ({e})") from None
    if not isinstance(classes, list) or not all(
        isinstance(c, dict) and type(c.get("index")) is int and isinstance(c.get("name"), str) for c in classes
    ):
        raise SourceError(f"{url}: expected a list of {{'index': int, 'name': str, ...}}")
    problem = class_index_problem([c["index"] for c in classes])
    if problem:
        raise SourceError(f"{url}: {problem}")
    return data


def class_index_problem(indices: list[int]) -> str | None:
    """Why ``indices`` are not 0..n-1, each once (``None`` when they are): an index is a row
    of the model's head, so a negative, huge, repeated or missing one mislabels a class."""
    seen: set[int] = set()
    for index in indices:
        if index in seen:
            return f"class index {index} appears twice"
        if not 0 <= index < len(indices):
            return f"class index {index} is outside 0..{len(indices) - 1}"
        seen.add(index)
    return None


_CACHE_WARNED: set[str] = set()
"""Shard caches this process has said it runs from (one warning each)."""


def _read_json_bytes(url: str, access: Access, required: bool) -> bytes | None:
    """At most ``MAX_JSON_BYTES`` of ``url``; ``None`` when it is not there (or, remote, not
    reachable) and not ``required``. Remote with a shard cache: a copy is kept in the cache,
    and stands in when the store cannot be reached (see the module's docstring)."""
    if not is_remote(url):
        path = Path(url)
        if not path.is_file():
            if required:
                raise FileNotFoundError(f"no shard manifest at {path}")
            return None
        with open(path, "rb") as f:
            return _bounded(f, url)
    copy = cache_path(url, access.cache_dir) if access.cache_dir is not None else None
    warm = copy is not None and copy.is_file()
    try:
        with open_url(url, dataclasses.replace(access, cache_dir=None, retries=0 if warm else access.retries)) as stream:
            data = _bounded(stream, url)
    except ShardUnavailable as e:
        if warm and not e.permanent:
            _say_running_from_cache(url, e, access.cache_dir)
            with open(copy, "rb") as f:
                return _bounded(f, str(copy))
        if required:
            raise SourceError(f"cannot read {url}: {e}") from None
        log.info("no %s reachable: %s", url.rsplit("/", 1)[-1], e)
        return None
    if copy is not None and not (warm and copy.read_bytes() == data):
        atomic.write_bytes(copy, data)
    return data


def _say_running_from_cache(url: str, error: ShardUnavailable, cache_dir: str) -> None:
    if cache_dir in _CACHE_WARNED:
        log.info("%s unreachable; using its copy in the shard cache %s", url, cache_dir)
        return
    _CACHE_WARNED.add(cache_dir)
    log.warning("the shard store is unreachable (%s); running from the shard cache %s: its copies of the "
                "manifest, classes.json and the shards cached before (a shard not cached is skipped)",
                error.message, cache_dir)


def _bounded(stream: BinaryIO, url: str) -> bytes:
    data = stream.read(MAX_JSON_BYTES + 1)
    if len(data) > MAX_JSON_BYTES:
        raise SourceError(f"{url} is larger than {MAX_JSON_BYTES} bytes")
    return data
