"""Training options checked before any compute: the ``--config`` YAML read as data, and every
numeric option within its range.

A value outside its meaning used to train, or to lose the run: ``--keep 0`` deleted each
checkpoint right after writing it, ``--ema-decay 2`` diverged the EMA, ``lr: .inf`` trained
on NaN. Each numeric option has a range here (a test keeps the table complete), floats must
be finite, and the YAML file may neither repeat a key (the last one silently won) nor nest
deeper than ``jsonload.MAX_DEPTH`` (the parser recursed into a ``RecursionError``).
Every refusal is one line naming the option or key and what it allows, exit status 2.
"""

from __future__ import annotations

import argparse
import difflib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import yaml

from lvvit.jsonload import MAX_DEPTH


@dataclass(frozen=True)
class Range:
    """Allowed values of one numeric option: ``low``/``high`` bounds (``None``: unbounded),
    each inclusive unless its ``open`` flag is set."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def admits(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


AT_LEAST_1, AT_LEAST_0, POSITIVE = Range(1), Range(0), Range(0, low_open=True)
PROBABILITY, FRACTION = Range(0, 1), Range(0, 1, high_open=True)
RANGES: dict[str, Range] = {
    "img_size": AT_LEAST_1, "num_classes": AT_LEAST_1, "drop_path": FRACTION,
    "shard_timeout": POSITIVE, "shard_retries": AT_LEAST_0, "shard_deadline": POSITIVE, "steps_per_epoch": AT_LEAST_1,
    "eval_batch": AT_LEAST_1, "workers": AT_LEAST_0,
    "randaug_magnitude": Range(0, 10), "randaug_mstd": AT_LEAST_0, "randaug_ops": AT_LEAST_0,
    "scale": Range(0, 1, low_open=True), "hflip": PROBABILITY, "reprob": PROBABILITY, "smoothing": FRACTION,
    "cls_weight": AT_LEAST_0, "dense_weight": AT_LEAST_0,
    "epochs": AT_LEAST_1, "cooldown_epochs": AT_LEAST_0, "warmup_epochs": AT_LEAST_0,
    "warmup_lr": AT_LEAST_0, "base_lr": POSITIVE, "lr": POSITIVE, "min_lr": AT_LEAST_0,
    "weight_decay": AT_LEAST_0, "clip_grad": AT_LEAST_0, "micro_batch": AT_LEAST_1, "grad_accum": AT_LEAST_1,
    "ema_decay": FRACTION, "seed": AT_LEAST_0, "max_steps": AT_LEAST_1,
    "save_every": AT_LEAST_0, "keep": AT_LEAST_1, "preempt_grace": POSITIVE, "log_every": AT_LEAST_1,
}
"""Every ``type=int``/``type=float`` option of ``train.py`` (``local_rank`` is the launcher's)."""


def refuse(parser: argparse.ArgumentParser, message: str) -> NoReturn:
    """One line on stderr, exit status 2 (argparse's, without the usage block)."""
    parser.exit(2, f"{parser.prog}: error: {message}\n")


def numeric_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.type in (int, float) and a.dest != "local_rank"}


def value_problem(action: argparse.Action, value: Any, allowed: Range) -> str | None:
    """What is wrong with ``value`` for ``action`` (``None``: nothing). A string is converted
    as the command line would be (YAML reads ``1e-3`` without a dot as a string)."""
    if value is None:
        return None if action.default is None else "must be set"
    values = value if action.nargs == 2 else [value]
    if action.nargs == 2 and (not isinstance(value, list | tuple) or len(value) != 2):
        return "must be two numbers"
    for item in values:
        try:
            number = action.type(item) if isinstance(item, str) else item
        except ValueError:
            return f"is not {'an integer' if action.type is int else 'a number'}"
        if isinstance(number, bool) or not isinstance(number, int | float) or (
                action.type is int and not isinstance(number, int)):
            return f"is not {'an integer' if action.type is int else 'a number'}"
        if not math.isfinite(number):
            return "must be a finite number"
        if not allowed.admits(number):
            return f"must be {allowed}"
    if action.nargs == 2 and float(values[0]) > float(values[1]):
        return "must be MIN <= MAX"
    return None


def check_ranges(parser: argparse.ArgumentParser, args: argparse.Namespace,
                 ranges: dict[str, Range] = RANGES) -> None:
    """Every numeric option of the final options (command line over the YAML file) that
    ``ranges`` lists; a ``KeyError`` for one it misses (a new option needs its range)."""
    for dest, action in numeric_actions(parser).items():
        value = getattr(args, dest)
        problem = value_problem(action, value, ranges[dest])
        if problem:
            shown = " ".join(map(str, value)) if isinstance(value, list | tuple) else value
            refuse(parser, f"{action.option_strings[0]} {shown}: {problem}")


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a mapping holding a key twice (YAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    problem=f"key {key!r} appears twice (line {key_node.start_mark.line + 1})")
            seen.add(key)
        return super().construct_mapping(node, deep)


def _check_yaml_depth(text: str) -> None:
    """Refuse nesting deeper than ``MAX_DEPTH`` from the event stream, which PyYAML produces
    without recursing (composing the document would recurse once per level)."""
    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_DEPTH:
                raise yaml.YAMLError(f"nested deeper than {MAX_DEPTH} levels (line {event.start_mark.line + 1})")
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1


def read_yaml(path: Path) -> Any:
    """The YAML file as data: depth bounded, duplicate keys refused; ``yaml.YAMLError`` or
    ``OSError`` otherwise."""
    text = path.read_text()
    _check_yaml_depth(text)
    return yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass: data only


def yaml_defaults(parser: argparse.ArgumentParser, path: Path) -> dict[str, Any]:
    """The ``--config`` file's options by destination, each known and, if numeric, in range."""
    try:
        data = read_yaml(path) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        refuse(parser, f"--config {path}: {' '.join(str(e).split())}")
    if not isinstance(data, dict):
        refuse(parser, f"--config {path}: expected a mapping of option: value")
    known = {a.dest for a in parser._actions} - {"config", "help", "local_rank"}
    numeric = numeric_actions(parser)
    out = {}
    for key, value in data.items():
        dest = str(key).replace("-", "_")
        if dest not in known:
            close = difflib.get_close_matches(dest, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            refuse(parser, f"--config {path}: unknown option {key!r}{hint}")
        problem = value_problem(numeric[dest], value, RANGES[dest]) if dest in numeric else None
        if problem:
            refuse(parser, f"--config {path}: {key}: {value!r} {problem}")
        out[dest] = value
    return out
