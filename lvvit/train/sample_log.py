"""``--sample-log DIR``: which samples each optimizer step trained on, one JSON line per step.

Each rank appends ``{"step": S, "keys": [...]}`` to ``DIR/rank{R}.jsonl``, the sample keys in
the order they entered the step (all its micro batches). A resumed run appends again from
its checkpoint's step, so a step can appear twice; :func:`read_sample_log` keeps the last line
of each step, which is what the weights saw. Written with a line-buffered file, no device sync.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import IO

from lvvit import jsonload


class SampleLog:
    """One rank's sample log: ``add`` a micro batch's keys, ``write`` when the step is taken."""

    def __init__(self, directory: Path, rank: int) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / f"rank{rank}.jsonl"
        self.file: IO[str] = open(self.path, "a", buffering=1)  # noqa: SIM115 (closed by close())
        self.keys: list[str] = []

    def add(self, keys: list[str]) -> None:
        self.keys.extend(keys)

    def write(self, step: int) -> None:
        self.file.write(json.dumps({"step": step, "keys": self.keys}) + "\n")
        self.keys = []

    def close(self) -> None:
        self.file.close()


def read_sample_log(path: Path) -> dict[int, list[str]]:
    """Step -> keys of one rank's log; for a step logged twice (before and after a resume),
    the later line."""
    steps: dict[int, list[str]] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            record = jsonload.loads(line)
            steps[int(record["step"])] = [str(k) for k in record["keys"]]
    return steps


__all__ = ["SampleLog", "read_sample_log"]
