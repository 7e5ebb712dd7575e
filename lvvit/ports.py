"""A free TCP port on the loopback interface, for the servers and process groups that tests,
benchmarks and single-process runs start on this machine."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A port that nothing listens on now. The socket is closed before the caller binds, so
    another process could take the port in between; callers start their server right away."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
