"""A deadline for each REST request to arrive whole, so that slow or stalled clients cannot
hold connections (and file descriptors) open for ever.

uvicorn, which runs MLServer's REST app, times out a connection only while it is idle
between two requests (``timeout_keep_alive``, armed when a response ends and cancelled by
any byte received). A client that connects and sends nothing, or half its headers, or a
``Content-Length`` and half the body, is never cut off. Here each connection gets
``read_timeout`` seconds, counted from its opening or from the end of the previous
response, to deliver the whole request (head and body); one that has not is closed. Once
a request is whole the clock stops: a slow inference is never cut.
"""

from __future__ import annotations

import asyncio
import functools

import h11
from uvicorn import Config
from uvicorn.protocols.http.h11_impl import H11Protocol


class ReadDeadlineProtocol(H11Protocol):
    """uvicorn's h11 protocol plus the whole-request deadline."""

    def __init__(self, *args, read_timeout: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.read_timeout = read_timeout
        self.read_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self.disarm()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state is h11.DONE and self.cycle is not None and not self.cycle.response_complete:
            self.disarm()  # the request is whole and the app is answering it

    def on_response_complete(self) -> None:
        self.arm()  # before the next cycle starts: a pipelined request already whole disarms it
        super().on_response_complete()

    def arm(self) -> None:
        self.disarm()
        self.read_deadline = self.loop.call_later(self.read_timeout, self.expire)

    def disarm(self) -> None:
        if self.read_deadline is not None:
            self.read_deadline.cancel()
            self.read_deadline = None

    def expire(self) -> None:
        """Close a connection whose request is still incomplete; the app, if it is reading
        the body, sees ``http.disconnect``."""
        self.read_deadline = None
        if not self.transport.is_closing():
            self.transport.close()


def bound_connections(config: Config, read_timeout: float) -> Config:
    """``config`` serving with :class:`ReadDeadlineProtocol` (h11, as uvicorn picks when
    httptools is absent)."""
    config.http = functools.partial(ReadDeadlineProtocol, read_timeout=read_timeout)
    return config
