"""JSON read as data: nesting depth bounded before the parser recurses, duplicate keys refused.

``json.loads`` recurses once per nesting level, so a few kilobytes of ``[[[[...`` end in a
``RecursionError`` traceback, and it keeps the last of two equal keys without a word. Every
JSON file we read (configs, manifests, ``classes.json``) goes through ``loads`` here, which
raises ``ValueError`` with one line saying what is wrong; callers prefix the file name.
"""

from __future__ import annotations

import json
import re
from typing import Any

MAX_DEPTH = 32
"""Deepest nesting of arrays and objects accepted; our files need 4."""
_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]', re.DOTALL)
"""A string (skipped whole, brackets inside it do not count) or one bracket."""


def check_depth(text: str, limit: int = MAX_DEPTH) -> None:
    """Refuse ``text`` when its arrays/objects nest deeper than ``limit``, without recursing."""
    depth = 0
    for match in _TOKEN.finditer(text):
        token = match.group()
        if token in "[{":
            depth += 1
            if depth > limit:
                raise ValueError(f"nested deeper than {limit} levels (at character {match.start()})")
        elif token in "]}":
            depth -= 1


def no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` that refuses an object holding a key twice."""
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"key {key!r} appears twice")
        seen[key] = value
    return seen


def loads(data: str | bytes) -> Any:
    """``json.loads`` with the depth checked first and duplicate keys refused."""
    text = data.decode(json.detect_encoding(data), "surrogatepass") if isinstance(data, bytes) else data
    check_depth(text)
    return json.loads(text, object_pairs_hook=no_duplicate_keys)
