"""Shard sources: where a stage's shards come from, and how each one is opened.

A source spec is any of

* a local folder (its ``manifest.json`` lists the shards, else its ``*.tar`` files),
  a local ``manifest.json``, one local tar, or a local brace pattern naming a subset;
* ``http://`` / ``https://`` URLs, with brace patterns, or a folder URL (``.../train/``)
  whose ``manifest.json`` lists the shards;
* ``pipe:COMMAND`` (the command writes one shard to stdout; braces expand as in
  webdataset, e.g. ``pipe:aws s3 cp s3://bucket/train-{000000..000009}.tar -``);
* ``s3://`` and ``gs://`` URLs, read through the providers' command-line tools
  (``aws s3 cp URL -`` and ``gsutil cat URL``, the commands webdataset's own ``gs``
  handler and its documentation use).

The manifest (sample counts per shard: equal steps per rank, the exact eval split) and
``classes.json`` are looked up beside the shards by the same scheme, or taken from an
explicit manifest location; a pattern that names a subset gets the counts of exactly
those shards. Both files are untrusted data: read with a size bound, parsed as JSON and
checked field by field; nothing is unpickled.

Opening a remote shard retries transient failures with exponential backoff, every
network read and pipe read has a timeout, and a stream that ends early (short HTTP body,
command exiting non-zero) raises ``ShardUnavailable`` naming the URL, so a half-read
shard never passes for a complete one. We open URLs ourselves rather than through
webdataset's ``gopen``: its curl and pipe readers have no read timeout (a stalled
server or command blocks a rank for ever) and do not resume a broken transfer.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import logging
import os
import re
import select
import shlex
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path
from typing import BinaryIO, Protocol

from braceexpand import braceexpand

from lvvit import atomic

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
CLASSES = "classes.json"
MAX_JSON_BYTES = 32 << 20
"""Largest manifest or classes.json read: ImageNet's are ~60 KB and ~80 KB."""
DEFAULT_TIMEOUT = 60.0
"""Seconds one connect or read may take before it counts as a failure."""
DEFAULT_RETRIES = 4
"""Retries of a failed open or read (backoff 0.5, 1, 2, 4 s) before a shard is unavailable."""
MAX_BACKOFF = 8.0
CHUNK = 1 << 20
PERMANENT_HTTP = frozenset(range(400, 500)) - {408, 425, 429}
"""HTTP statuses that a retry will not change (404, 403, ...); the others are retried."""
_REMOTE = re.compile(r"^(https?|s3|gs)://", re.IGNORECASE)


class SourceError(ValueError):
    """A spec, manifest or classes.json that cannot be used; the message names it."""


class ShardUnavailable(OSError):
    """A shard (or manifest) that could not be read to its end after retries."""

    def __init__(self, message: str, url: str = "") -> None:
        super().__init__(message)
        self.url = url
        self.message = message  # as raised: webdataset appends to ``args`` on its way up


@dataclass(frozen=True)
class Access:
    """How remote shards are read: per-operation timeout, retries, optional node-local cache."""

    timeout: float = DEFAULT_TIMEOUT
    retries: int = DEFAULT_RETRIES
    cache_dir: str | None = None


@dataclass(frozen=True)
class ShardSource:
    """The shards a stage reads, in order, with their sample counts when a manifest gave them."""

    spec: str
    urls: tuple[str, ...]
    counts: tuple[int, ...] | None  # per shard; None when no manifest was reachable
    manifest: str | None  # where the counts came from
    classes_json: bytes | None  # classes.json as found beside the shards (checked JSON)
    access: Access = Access()

    @property
    def total(self) -> int | None:
        return None if self.counts is None else sum(self.counts)

    @property
    def classes(self) -> list[dict] | None:
        return None if self.classes_json is None else json.loads(self.classes_json)

    def open(self, url: str) -> BinaryIO:
        """One shard as a binary stream (see ``open_url``)."""
        return open_url(url, self.access)


def is_remote(spec: str) -> bool:
    return spec.startswith("pipe:") or bool(_REMOTE.match(spec))


def shard_name(url: str) -> str:
    """The shard's file name, as the manifest lists it: the last path part of the URL (of
    the word ending in ``.tar`` for a pipe command)."""
    if url.startswith("pipe:"):
        words = [w for w in shlex.split(url[5:]) if w.endswith(".tar")]
        if len(words) == 1:
            return words[0].rsplit("/", 1)[-1]
        return url
    return url.rstrip("/").rsplit("/", 1)[-1]


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


def resolve(spec: str | Path, manifest: str | Path | None = None, access: Access = Access()) -> ShardSource:
    """The shards ``spec`` names, with counts from ``manifest`` (else the one beside them).

    Raises ``FileNotFoundError`` for local files that do not exist and ``SourceError`` for a
    spec or manifest that cannot be used. A manifest beside a pattern that is absent (or,
    remote, unreachable) leaves the counts unknown: training then needs ``--steps-per-epoch``.
    """
    spec = str(spec)
    urls, beside, entries = _shards_of(spec, access)
    listing = beside
    if manifest is not None:
        listing, entries = str(manifest), _manifest_entries(str(manifest), access, required=True)
    elif entries is None and beside is not None:
        entries = _manifest_entries(beside, access, required=False)
    counts = None if entries is None else _subset_counts(urls, entries, listing, spec)
    if not is_remote(spec):
        missing = [url for url in urls if not Path(url).is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} shard(s) of {spec} are missing: {', '.join(missing)}")
    classes_at = sibling(listing if listing is not None else urls[0], CLASSES)
    classes = _read_classes(classes_at, access) if classes_at is not None else None
    return ShardSource(spec, tuple(urls), counts, listing if counts is not None else None, classes, access)


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


def _shards_of(spec: str, access: Access) -> tuple[list[str], str | None, dict[str, int] | None]:
    """Shard URLs of ``spec``, the manifest beside them (``None``: none to look for) and its
    entries when they were read already (a folder spec)."""
    folder = _folder_manifest(spec)
    if folder is not None and not is_remote(spec) and not Path(folder).is_file() and Path(spec).is_dir():
        return _local_folder_without_manifest(Path(spec)), None, None
    if folder is not None:
        entries = _manifest_entries(folder, access, required=True)
        if not entries:
            raise SourceError(f"{folder} lists no shards")
        return [sibling(folder, name) for name in entries], folder, entries
    urls = list(braceexpand(spec))
    folders = {sibling(url, MANIFEST) for url in urls}
    return urls, folders.pop() if len(folders) == 1 else None, None


def _local_folder_without_manifest(folder: Path) -> list[str]:
    tars = sorted(folder.glob("*.tar"))
    if not tars:
        raise FileNotFoundError(f"no {MANIFEST} or .tar shards in {folder}")
    return [str(path) for path in tars]


def _manifest_entries(url: str, access: Access, required: bool) -> dict[str, int] | None:
    data = _read_json_bytes(url, access, required)
    return None if data is None else _parse_manifest(data, url)


def _subset_counts(urls: list[str], entries: dict[str, int], listing: str, spec: str) -> tuple[int, ...]:
    """The listed counts of exactly the shards ``urls`` names (a pattern may name a subset)."""
    unlisted = [url for url in urls if shard_name(url) not in entries]
    if unlisted:
        raise SourceError(f"{listing} does not list {len(unlisted)} shard(s) of {spec}: {', '.join(unlisted[:5])}")
    return tuple(entries[shard_name(url)] for url in urls)


def _parse_manifest(data: bytes, where: str) -> dict[str, int]:
    """Shard name -> samples, in manifest order, every field checked."""
    try:
        manifest = json.loads(data)
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
        if name in entries:
            raise SourceError(f"{where}: shard {name} is listed twice")
        entries[name] = samples
    return entries


def _read_classes(url: str, access: Access) -> bytes | None:
    data = _read_json_bytes(url, access, required=False)
    if data is None:
        return None
    try:
        classes = json.loads(data)
    except ValueError as e:
        raise SourceError(f"{url}: not valid JSON ({e})") from None
    if not isinstance(classes, list) or not all(
        isinstance(c, dict) and isinstance(c.get("index"), int) and isinstance(c.get("name"), str) for c in classes
    ):
        raise SourceError(f"{url}: expected a list of {{'index': int, 'name': str, ...}}")
    return data


def _read_json_bytes(url: str, access: Access, required: bool) -> bytes | None:
    """At most ``MAX_JSON_BYTES`` of ``url``; ``None`` when it is not there (or, remote, not
    reachable) and not ``required``."""
    if not is_remote(url):
        path = Path(url)
        if not path.is_file():
            if required:
                raise FileNotFoundError(f"no shard manifest at {path}")
            return None
        with open(path, "rb") as f:
            return _bounded(f, url)
    try:
        with contextlib.closing(open_url(url, Access(access.timeout, access.retries))) as stream:
            return _bounded(stream, url)
    except ShardUnavailable as e:
        if required:
            raise SourceError(f"cannot read {url}: {e}") from None
        log.info("no %s reachable: %s", url.rsplit("/", 1)[-1], e)
        return None


def _bounded(stream: BinaryIO, url: str) -> bytes:
    data = stream.read(MAX_JSON_BYTES + 1)
    if len(data) > MAX_JSON_BYTES:
        raise SourceError(f"{url} is larger than {MAX_JSON_BYTES} bytes")
    return data


# ---------------------------------------------------------------- opening a shard


def open_url(url: str, access: Access = Access()) -> BinaryIO:
    """A local file as is; a remote one through the node-local cache when ``access`` has
    one, else streamed with retries and timeouts."""
    if not is_remote(url):
        return open(url, "rb")
    if access.cache_dir is not None:
        return open(_cached(url, access), "rb")
    return io.BufferedReader(_RetryingStream(url, _connector(url, access.timeout), access.retries), CHUNK)


def cache_path(url: str, cache_dir: str) -> Path:
    """Where ``url`` is cached: a hash of the whole URL (two buckets may share names), then its name."""
    digest = hashlib.sha256(url.encode()).hexdigest()[:16]
    name = re.sub(r"[^A-Za-z0-9._-]", "_", shard_name(url))[-80:]
    return Path(cache_dir) / f"{digest}-{name}"


def _cached(url: str, access: Access) -> Path:
    """The cached copy of ``url``, downloaded once per node: a lock beside it makes the other
    ranks and workers of the node wait for the one download, which is written to a
    temporary name and renamed only when complete."""
    path = cache_path(url, access.cache_dir)
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "wb") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.is_file():
            stream = _RetryingStream(url, _connector(url, access.timeout), access.retries)
            with contextlib.closing(stream), atomic.atomic_path(path) as tmp, open(tmp, "wb") as out:
                shutil.copyfileobj(stream, out, CHUNK)
            log.info("cached %s as %s", url, path)
    return path


class _Connection(Protocol):
    def readinto(self, buffer: memoryview) -> int: ...

    def close(self) -> None: ...


class _Permanent(Exception):
    """A failure a retry will not change (HTTP 404, ...)."""


Connector = Callable[[int], "_Connection"]


class _RetryingStream(io.RawIOBase):
    """Bytes of one remote shard. A failed connect or read is retried with backoff,
    reconnecting at the byte reached (an HTTP Range request; a pipe is re-run and the
    bytes already read are skipped); after ``retries`` failures in a row, or a permanent
    one, it raises ``ShardUnavailable`` naming the URL."""

    def __init__(self, url: str, connect: Connector, retries: int) -> None:
        super().__init__()
        self.url, self.connect, self.retries = url, connect, retries
        self.position = 0
        self.connection: _Connection | None = None
        self.failure: ShardUnavailable | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:
        if self.failure is not None:  # a reader that goes on after the error gets it again, not new retries
            raise self.failure
        try:
            return self._readinto(buffer)
        except ShardUnavailable as e:
            self.failure = e
            raise

    def _readinto(self, buffer: memoryview) -> int:
        failures = 0
        while True:
            try:
                if self.connection is None:
                    self.connection = self.connect(self.position)
                n = self.connection.readinto(buffer)
                self.position += n
                return n
            except _Permanent as e:
                raise ShardUnavailable(f"shard {self.url} is unavailable: {e}", self.url) from None
            except (OSError, HTTPException) as e:
                self._drop()
                failures += 1
                if failures > self.retries:
                    raise ShardUnavailable(
                        f"shard {self.url} is unavailable after {self.retries} retries: {type(e).__name__}: {e}",
                        self.url) from None
                delay = min(MAX_BACKOFF, 0.5 * 2 ** (failures - 1))
                log.warning("reading %s failed (%s); retry %d of %d in %.1f s", self.url, e, failures,
                            self.retries, delay)
                time.sleep(delay)

    def _drop(self) -> None:
        if self.connection is not None:
            with contextlib.suppress(Exception):
                self.connection.close()
            self.connection = None

    def close(self) -> None:
        self._drop()
        super().close()


def _connector(url: str, timeout: float) -> Connector:
    if url.startswith("pipe:"):
        return lambda offset: _PipeConnection(url[5:], timeout, offset)
    if url[:5].lower() == "s3://":
        return lambda offset: _PipeConnection(shlex.join(["aws", "s3", "cp", url, "-"]), timeout, offset)
    if url[:5].lower() == "gs://":
        return lambda offset: _PipeConnection(shlex.join(["gsutil", "cat", url]), timeout, offset)
    return lambda offset: _http_connection(url, timeout, offset)


class _HTTPBody:
    """A response body that raises when it ends short of its Content-Length: http.client's
    ``readinto`` then just returns 0, which would pass a cut transfer off as a whole shard."""

    def __init__(self, response) -> None:
        self.response = response
        length = response.getheader("Content-Length")
        self.remaining = int(length) if length is not None and length.isdigit() else None

    def readinto(self, buffer: memoryview) -> int:
        n = self.response.readinto(buffer)
        if self.remaining is not None:
            if n == 0 and len(buffer) and self.remaining > 0:
                raise ConnectionError(f"the body ended {self.remaining} bytes short of its Content-Length")
            self.remaining -= n
        return n

    def close(self) -> None:
        self.response.close()


def _http_connection(url: str, timeout: float, offset: int) -> _Connection:
    """A response positioned at ``offset``: a Range request, or (a server without ranges)
    the whole body with the first ``offset`` bytes skipped. ``timeout`` bounds the connect
    and every read; a body shorter than its Content-Length raises ``ConnectionError``."""
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code in PERMANENT_HTTP:
            raise _Permanent(f"HTTP {e.code} {e.reason}") from None
        raise
    body = _HTTPBody(response)
    if offset and response.status != 206:
        _skip(body, offset)
    return body


def _skip(connection: _Connection, count: int) -> None:
    buffer = memoryview(bytearray(min(CHUNK, max(count, 1))))
    while count > 0:
        n = connection.readinto(buffer[: min(count, len(buffer))])
        if n == 0:
            raise EOFError("the stream ended before the byte to resume from")
        count -= n


class _PipeConnection:
    """Stdout of a shell command, each read bounded by ``timeout`` (``select``); at the end
    of the output the command must exit 0, or the shard is incomplete."""

    def __init__(self, command: str, timeout: float, offset: int) -> None:
        self.command, self.timeout = command, timeout
        self.stderr = tempfile.TemporaryFile()  # noqa: SIM115 (closed in close())
        self.process = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, stderr=self.stderr,
                                        stdin=subprocess.DEVNULL)
        if offset:
            _skip(self, offset)

    def readinto(self, buffer: memoryview) -> int:
        fd = self.process.stdout.fileno()
        ready, _, _ = select.select([fd], [], [], self.timeout)
        if not ready:
            raise TimeoutError(f"no output from '{self.command}' for {self.timeout:g} s")
        n = os.readv(fd, [buffer])
        if n == 0:
            self._check_exit()
        return n

    def _check_exit(self) -> None:
        try:
            status = self.process.wait(self.timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"'{self.command}' did not exit {self.timeout:g} s after its output ended") from None
        if status != 0:
            self.stderr.seek(0)
            message = " ".join(self.stderr.read()[-300:].decode(errors="replace").split())
            raise OSError(f"'{self.command}' exited with status {status}: {message}")

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self.process.stdout.close()
        self.stderr.close()
