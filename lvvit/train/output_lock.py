"""One training per ``--output``: an exclusive lock on ``OUTPUT/.lock``.

Two runs given the same folder used to overwrite each other's checkpoint tags, ``latest``
and ``weights.pth`` without a word. Rank 0 takes an ``flock`` on ``OUTPUT/.lock`` before
the engine is built and writes its host and pid into it; a second run is refused naming
them. The kernel drops the lock when its holder dies, so a lock file left by a killed run
is taken over (and said so). A lock still held in the name of a dead process on this host
(a forked child of the dead run kept the open file) is stale too: the file is replaced.
The other ranks take no lock; they learn rank 0's answer in one broadcast, so every rank
stops with the same message, none waits on a collective the others never join.
"""

from __future__ import annotations

import atexit
import fcntl
import json
import logging
import os
import socket
from pathlib import Path

import torch.distributed as dist

from lvvit import jsonload
from lvvit.errors import ConfigError

log = logging.getLogger(__name__)
LOCK_FILE = ".lock"


class OutputLocked(RuntimeError):
    """Another live process holds the lock; the message names its host and pid."""


def _holder(fd: int) -> dict:
    """The host and pid written in the lock file (empty when there are none)."""
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 4096)
    try:
        holder = jsonload.loads(raw) if raw else {}
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def _dead_here(holder: dict) -> bool:
    """The holder is a process of this host that no longer runs."""
    if holder.get("host") != socket.gethostname() or type(holder.get("pid")) is not int:
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _describe(holder: dict) -> str:
    return f"host {holder.get('host', '?')} pid {holder.get('pid', '?')}"


class OutputLock:
    """The held lock; ``release`` (or the process ending) frees it."""

    def __init__(self, output: Path) -> None:
        self.path = Path(output) / LOCK_FILE
        self.fd = self._acquire(replace_stale=True)
        atexit.register(self.release)

    def _acquire(self, replace_stale: bool) -> int:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            if replace_stale and _dead_here(holder):
                log.warning("%s: taking over the lock of %s, which no longer runs", self.path, _describe(holder))
                self.path.unlink(missing_ok=True)
                return self._acquire(replace_stale=False)
            raise OutputLocked(f"--output {self.path.parent} is in use by another training ({_describe(holder)}, "
                               f"lock {self.path}); give another --output or stop that run") from None
        previous = _holder(fd)
        if previous:
            log.warning("%s: taking over a stale lock of %s, which no longer holds it", self.path, _describe(previous))
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid()}).encode(), 0)
        return fd

    def release(self) -> None:
        """Empty the file (the next run finds no stale holder) and unlock."""
        if self.fd < 0:
            return
        os.ftruncate(self.fd, 0)
        os.close(self.fd)
        self.fd = -1


def lock_output(output: Path, rank: int) -> OutputLock | None:
    """Rank 0 locks ``output``; every rank raises ``ConfigError`` with rank 0's refusal.
    Collective when a process group exists: every rank calls it once, at the same point."""
    lock, refusal = None, None
    if rank == 0:
        try:
            lock = OutputLock(output)
        except OutputLocked as err:
            refusal = str(err)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [refusal]
        dist.broadcast_object_list(box, src=0)
        refusal = box[0]
    if refusal is not None:
        raise ConfigError(refusal)
    return lock
