"""The GPU check (docs/benchmarks.md) rehearsed on the CPU: ``--dry-run`` runs every row with
a tiny model (DeepSpeed ZeRO-2 training eager and compiled, checkpointed training, eval,
label generation) and writes the one markdown table, so the script is ready the day a GPU
is lent."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow

ROWS = [
    "lvvit_t @64 training, eager",
    "lvvit_t @64 training, --compile",
    "lvvit_t @64 peak memory, grad checkpointing",
    "lvvit_t @96 peak memory, grad checkpointing",
    "lvvit_t @64 eval",
    "label generation, lvvit_t teacher @64",
]


def table_rows(text: str) -> dict[str, list[str]]:
    rows = [line.strip("|").split("|") for line in text.splitlines() if line.startswith("| ")]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows[2:]}  # past header, rule


def test_dry_run_writes_every_row(tmp_path):
    out = tmp_path / "check.md"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "lvvit.bench.gpu_check", "--dry-run", "--out", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    text = out.read_text()
    assert text.startswith("GPU check on CPU (dry run, tiny model)")
    rows = table_rows(text)
    assert list(rows) == ROWS
    for name, (_setting, result, seconds) in rows.items():
        assert "failed" not in result, f"{name}: {result}"
        assert re.search(r"\d+(\.\d+)? img/s", result), f"{name}: {result}"
        assert float(seconds) >= 0
    assert rows[ROWS[0]][0] == "ZeRO-2, batch 4"
    assert rows[ROWS[2]][1].startswith("n/a on CPU")


def test_a_failing_row_is_recorded_and_the_rest_run(tmp_path):
    """A row that cannot run writes ``failed: <reason>`` in one line; the script goes on."""
    from lvvit.bench.gpu_check import Check, attempt, render

    def broken() -> str:
        raise RuntimeError("CUDA out of memory.\nTried to allocate 2 GiB")

    checks = [Check("a", "x", attempt(broken)), Check("b", "y", attempt(lambda: "12 img/s"))]
    rows = table_rows(render(checks, "cpu", dry_run=True))
    assert rows["a"][1] == "failed: RuntimeError: CUDA out of memory."
    assert rows["b"][1] == "12 img/s"


def test_without_cuda_it_refuses_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lvvit.bench.gpu_check", "--out", str(tmp_path / "x.md")],
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].endswith("use --dry-run for the CPU rehearsal")
    assert not (tmp_path / "x.md").exists()
