"""How an exception reads in a one-line message: its type and the first line of its text.

Library errors carry paragraphs (torch, DeepSpeed, protobuf, MLflow's HTTP client); the
messages we print are one line each (docs/security.md), so every place that quotes a
foreign exception quotes it the same way, here.
"""

from __future__ import annotations


def first_line(err: BaseException, limit: int | None = 300) -> str:
    """``"TypeName: first line of the message"`` (at most ``limit`` characters of it; all of
    it with ``None``), or the type name alone when the message is empty."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:limit]}" if text else type(err).__name__


__all__ = ["first_line"]
