"""The SHA-256 of a file, as recorded in run settings and ``model.json`` and checked against
them: one reader for every stage (hashlib's own chunked ``file_digest``, no whole-file read)."""

from __future__ import annotations

import hashlib
from pathlib import Path


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of the file at ``path``."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


__all__ = ["file_sha256"]
