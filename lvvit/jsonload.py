"""JSON read as data: nesting depth bounded before the parser recurses, duplicate keys refused.

``json.loads`` recurses once per nesting level, so a few kilobytes of ``[[[[...`` end in a
``RecursionError`` traceback, and it keeps the last of two equal keys without a word. Every
JSON file we read (configs, manifests, ``classes.json``) goes through ``loads`` here, which
raises ``ValueError`` with one line saying what is wrong; callers prefix the file name.
A file that must hold one JSON object (label settings, DeepSpeed configs) is read with
``load_object``, which does the prefixing and raises ``ConfigError``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from lvvit.errors import ConfigError

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


def load_object(path: Path | str) -> dict[str, Any]:
    """The JSON object in the file ``path``, read with :func:`loads`; anything else (a file
    that is missing or unreadable, not JSON, nested too deep, holding a key twice, or whose
    top level is not an object) is a :class:`ConfigError` reading ``"{path}: {problem}"``."""
    try:
        value = loads(Path(path).read_bytes())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot be read ({err.strerror or err})") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON ({err})") from None
    except ValueError as err:  # nested too deep, a key twice, bytes that are no text
        raise ConfigError(f"{path}: {err}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {_json_type(value)}")
    return value


def _json_type(value: Any) -> str:
    """How JSON names the type of a parsed value."""
    if isinstance(value, bool):
        return "a boolean"
    if value is None:
        return "null"
    return {list: "an array", str: "a string", int: "a number", float: "a number"}.get(type(value), type(value).__name__)
