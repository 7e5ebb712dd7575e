"""Opening one shard (or manifest) location as a bounded byte stream.

A location is local or remote by the string the user typed, decided once
(``lvvit.data.source.resolve`` carries local shards as absolute paths, so no name found in
a folder or manifest can ever read as ``pipe:`` or a URL here).

Every remote read is bounded in time twice: each connect or read by ``Access.timeout``
(a stalled server or command), and the whole shard by ``Access.shard_deadline`` (a server
that sends one byte a second never trips a per-read timeout). Transient failures are
retried with backoff, resuming at the byte reached, within the deadline; a stream that
ends early raises ``ShardUnavailable`` naming the URL, so a half-read shard never passes
for a complete one. A ``pipe:`` command runs in its own process group, and the whole group
is ended when its stream closes, so a timed-out command leaves no children behind.
We open URLs ourselves rather than through webdataset's ``gopen``: its curl and pipe
readers have no read timeout and do not resume a broken transfer. ``s3://`` and ``gs://``
are requests signed by the provider's library (``lvvit.data.objectstore``) and read by the
same HTTP reader, with the same bounds.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import http.client
import io
import logging
import os
import re
import select
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from http.client import HTTPException
from pathlib import Path
from typing import BinaryIO, Protocol

from lvvit import atomic

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 60.0
"""Seconds one connect or read may take before it counts as a failure."""
DEFAULT_RETRIES = 4
"""Retries of a failed open or read (backoff 0.5, 1, 2, 4 s) before a shard is unavailable."""
DEADLINE_PER_TIMEOUT = 60
"""Unless given, the whole-shard deadline is this many per-read timeouts (60 s -> 1 hour:
a 1 GB shard must arrive faster than ~0.3 MB/s)."""
MAX_BACKOFF = 8.0
CHUNK = 1 << 20
PERMANENT_HTTP = frozenset(range(400, 500)) - {408, 425, 429}
"""HTTP statuses that a retry will not change (404, 403, ...); the others are retried."""
_REMOTE = re.compile(r"^(https?|s3|gs)://", re.IGNORECASE)


class ShardUnavailable(OSError):
    """A shard (or manifest) that could not be read to its end after retries."""

    def __init__(self, message: str, url: str = "", permanent: bool = False) -> None:
        super().__init__(message)
        self.url = url
        self.message = message  # as raised: webdataset appends to ``args`` on its way up
        self.permanent = permanent  # the server answered no (404, 403, ...): a cached copy must not stand in


@dataclass(frozen=True)
class Access:
    """How remote shards are read: per-operation timeout, retries, optional node-local cache,
    and the wall-clock limit for one whole shard or manifest (``None``: derived from the
    timeout, see ``DEADLINE_PER_TIMEOUT``)."""

    timeout: float = DEFAULT_TIMEOUT
    retries: int = DEFAULT_RETRIES
    cache_dir: str | None = None
    deadline: float | None = None

    @property
    def shard_deadline(self) -> float:
        return self.deadline if self.deadline is not None else DEADLINE_PER_TIMEOUT * self.timeout


DEFAULT_ACCESS = Access()


def is_remote(spec: str) -> bool:
    """Whether a location the user typed names a command or URL (never asked of a name
    found in a folder or manifest: those are joined to an absolute path first)."""
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


def open_url(url: str, access: Access = DEFAULT_ACCESS) -> BinaryIO:
    """A local file as is; a remote one through the node-local cache when ``access`` has
    one, else streamed with retries, timeouts and the shard deadline."""
    if not is_remote(url):
        return open(url, "rb")
    if access.cache_dir is not None:
        return open(_cached(url, access), "rb")
    return io.BufferedReader(_RetryingStream(url, _connector(url, access.timeout), access), CHUNK)


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
            stream = _RetryingStream(url, _connector(url, access.timeout), access)
            with contextlib.closing(stream), atomic.atomic_path(path) as tmp, open(tmp, "wb") as out:
                shutil.copyfileobj(stream, out, CHUNK)
            log.info("cached %s as %s", url, path)
    return path


class _Connection(Protocol):
    def readinto(self, buffer: memoryview) -> int: ...

    def close(self) -> None: ...


class PermanentError(Exception):
    """A failure a retry will not change (HTTP 404, S3 NoSuchKey, ...)."""


Connector = Callable[[int, float], "_Connection"]
"""(byte offset to resume at, monotonic deadline) -> an open connection."""


class _RetryingStream(io.RawIOBase):
    """Bytes of one remote shard. A failed connect or read is retried with backoff,
    reconnecting at the byte reached (an HTTP Range request; a pipe is re-run and the
    bytes already read are skipped); after ``retries`` failures in a row, a permanent
    one, or past the shard's deadline, it raises ``ShardUnavailable`` naming the URL."""

    def __init__(self, url: str, connect: Connector, access: Access) -> None:
        super().__init__()
        self.url, self.connect, self.retries = url, connect, access.retries
        self.seconds = access.shard_deadline
        self.deadline = time.monotonic() + self.seconds
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
            self._check_deadline()
            try:
                if self.connection is None:
                    self.connection = self.connect(self.position, self.deadline)
                n = self.connection.readinto(buffer)
                self.position += n
                return n
            except PermanentError as e:
                raise ShardUnavailable(f"shard {self.url} is unavailable: {e}", self.url, permanent=True) from None
            except (OSError, HTTPException) as e:
                self._drop()
                self._check_deadline()
                failures += 1
                if failures > self.retries:
                    raise ShardUnavailable(
                        f"shard {self.url} is unavailable after {self.retries} retries: {type(e).__name__}: {e}",
                        self.url) from None
                delay = min(MAX_BACKOFF, 0.5 * 2 ** (failures - 1), self.deadline - time.monotonic())
                log.warning("reading %s failed (%s); retry %d of %d in %.1f s", self.url, e, failures,
                            self.retries, delay)
                time.sleep(max(0.0, delay))

    def _check_deadline(self) -> None:
        if time.monotonic() >= self.deadline:
            raise ShardUnavailable(
                f"shard {self.url} was not read to its end within its {self.seconds:g} s deadline "
                f"(--shard-deadline; default {DEADLINE_PER_TIMEOUT} x --shard-timeout)", self.url)

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
        return lambda offset, deadline: _PipeConnection(url[5:], timeout, deadline, offset)
    if url[:5].lower() in ("s3://", "gs://"):
        from lvvit.data import objectstore

        return objectstore.connector(url, timeout)
    return lambda offset, deadline: http_connection(url, timeout, deadline, offset)


class _Watchdog:
    """Shuts a connection's socket down at the shard's deadline. A read blocked in the
    socket (http.client fills its whole buffer, one trickled byte at a time, each within
    the per-read timeout) cannot look at the clock itself; the shut socket makes it fail."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.timers: list[threading.Timer] = []

    def arm(self, sock: socket.socket) -> None:
        timer = threading.Timer(max(0.0, self.deadline - time.monotonic()), _shut, (sock,))
        timer.daemon = True
        timer.start()
        self.timers.append(timer)

    def cancel(self) -> None:
        for timer in self.timers:
            timer.cancel()


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


class _Watched:
    """An ``http.client`` connection whose socket the watchdog shuts at the deadline."""

    def __init__(self, host: str, watchdog: _Watchdog, **kwargs) -> None:
        super().__init__(host, **kwargs)
        self.watchdog = watchdog

    def connect(self) -> None:
        super().connect()
        self.watchdog.arm(self.sock)


class _WatchedHTTP(_Watched, http.client.HTTPConnection):
    pass


class _WatchedHTTPS(_Watched, http.client.HTTPSConnection):
    pass


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, watchdog: _Watchdog) -> None:
        super().__init__()
        self.watchdog = watchdog

    def http_open(self, req):
        return self.do_open(partial(_WatchedHTTP, watchdog=self.watchdog), req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, watchdog: _Watchdog) -> None:
        super().__init__()
        self.watchdog = watchdog

    def https_open(self, req):
        return self.do_open(partial(_WatchedHTTPS, watchdog=self.watchdog), req, context=self._context)


class _HTTPBody:
    """A response body that raises when it ends short of its Content-Length: http.client's
    ``readinto`` then just returns 0, which would pass a cut transfer off as a whole shard."""

    def __init__(self, response, watchdog: _Watchdog) -> None:
        self.response, self.watchdog = response, watchdog
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
        self.watchdog.cancel()
        self.response.close()


def http_connection(url: str, timeout: float, deadline: float, offset: int, headers: dict[str, str] | None = None,
                    explain: Callable[[urllib.error.HTTPError], Exception] | None = None) -> _Connection:
    """A response positioned at ``offset``: a Range request, or (a server without ranges)
    the whole body with the first ``offset`` bytes skipped. ``timeout`` bounds the connect
    and every read, ``deadline`` the whole exchange (headers included); a body shorter than
    its Content-Length raises ``ConnectionError``. An error status raises ``PermanentError``
    (4xx but 408/425/429) or the ``HTTPError`` (retried), or what ``explain`` makes of it
    (an object store names its own error codes)."""
    headers = {**(headers or {}), **({"Range": f"bytes={offset}-"} if offset else {})}
    watchdog = _Watchdog(deadline)
    opener = urllib.request.build_opener(_HTTPHandler(watchdog), _HTTPSHandler(watchdog))
    try:
        response = opener.open(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        try:
            if explain is not None:
                raise explain(e) from None
            if e.code in PERMANENT_HTTP:
                raise PermanentError(f"HTTP {e.code} {e.reason}") from None
            raise
        finally:
            watchdog.cancel()
            e.close()
    except BaseException:
        watchdog.cancel()
        raise
    body = _HTTPBody(response, watchdog)
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
    """Stdout of a shell command, each read bounded by ``timeout`` and all of them by
    ``deadline`` (``select``); at the end of the output the command must exit 0, or the
    shard is incomplete. The command leads its own process group (a new session), and
    ``close`` ends the whole group: killing the shell alone would leave what it started
    (``aws``, ``curl``, a ``sleep``) running."""

    def __init__(self, command: str, timeout: float, deadline: float, offset: int) -> None:
        self.command, self.timeout, self.deadline = command, timeout, deadline
        self.stderr = tempfile.TemporaryFile()  # noqa: SIM115 (closed in close())
        self.process = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, stderr=self.stderr,
                                        stdin=subprocess.DEVNULL, start_new_session=True)
        if offset:
            _skip(self, offset)

    def _wait_limit(self) -> float:
        return max(0.0, min(self.timeout, self.deadline - time.monotonic()))

    def readinto(self, buffer: memoryview) -> int:
        fd = self.process.stdout.fileno()
        limit = self._wait_limit()
        ready, _, _ = select.select([fd], [], [], limit)
        if not ready:
            raise TimeoutError(f"no output from '{self.command}' for {limit:g} s")
        n = os.readv(fd, [buffer])
        if n == 0:
            self._check_exit()
        return n

    def _check_exit(self) -> None:
        limit = self._wait_limit()
        try:
            status = self.process.wait(limit)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"'{self.command}' did not exit {limit:g} s after its output ended") from None
        if status != 0:
            self.stderr.seek(0)
            message = " ".join(self.stderr.read()[-300:].decode(errors="replace").split())
            raise OSError(f"'{self.command}' exited with status {status}: {message}")

    def close(self) -> None:
        if self.process.returncode is None:  # not reaped yet, so the group id is still this command's
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        self.process.stdout.close()
        self.stderr.close()
