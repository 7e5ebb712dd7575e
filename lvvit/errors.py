"""Our errors, and how any error reads in a one-line message.

Library code raises a :class:`LvvitError` subclass naming the file, key or option at fault;
only entry points (``main`` functions) turn one into an exit, through :func:`exits_on_error`,
so a library call never ends the caller's process and tests can catch the type.

Library errors of others carry paragraphs (torch, DeepSpeed, protobuf, MLflow's HTTP
client); the messages we print are one line each (docs/security.md), so every place that
quotes a foreign exception quotes it the same way: :func:`first_line`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class LvvitError(Exception):
    """Bad input or a failed stage, said in one message that names what is at fault.
    An entry point prints the message and exits with :attr:`exit_code`."""

    exit_code = 1


class ConfigError(LvvitError):
    """An option, a config file (YAML, DeepSpeed JSON, label settings) or a combination of
    them that cannot run; raised before any compute starts."""


class DataError(LvvitError):
    """Shards, manifests, class lists or label maps that cannot be read or do not agree."""


def first_line(err: BaseException, limit: int | None = 300) -> str:
    """``"TypeName: first line of the message"`` (at most ``limit`` characters of it; all of
    it with ``None``), or the type name alone when the message is empty."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:limit]}" if text else type(err).__name__


def describe(err: BaseException) -> str:
    """The one formatter of errors for users: our own errors by their message (it names the
    file, key or option already), anything else as :func:`first_line`."""
    return str(err) if isinstance(err, LvvitError) else first_line(err)


@contextlib.contextmanager
def exits_on_error() -> Iterator[None]:
    """Around an entry point's body: a :class:`LvvitError` becomes ``SystemExit`` with its
    message on stderr and its exit code; anything else propagates with its traceback (a bug)."""
    try:
        yield
    except LvvitError as err:
        import sys

        print(describe(err), file=sys.stderr, flush=True)
        raise SystemExit(err.exit_code) from None


__all__ = ["ConfigError", "DataError", "LvvitError", "describe", "exits_on_error", "first_line"]
