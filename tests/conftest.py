"""Fixtures shared by test modules that serve an export folder (each defines ``model_dir``)."""

import subprocess
import sys

import pytest

from lvvit import onnxrt


@pytest.fixture(scope="module")
def reference(model_dir):
    session = onnxrt.session(model_dir / "model.onnx", threads=1)
    return lambda x: session.run(["logits"], {"images": x})[0]


_SPAWN_AND_MEASURE = (
    "import os, subprocess, sys\n"
    "proc = subprocess.Popen(sys.argv[1:])\n"
    "_, status, usage = os.wait4(proc.pid, 0)\n"
    "print(f'\\npeak-rss-kib {usage.ru_maxrss}', flush=True)\n"
    "sys.exit(os.waitstatus_to_exitcode(status))\n"
)
"""A small launcher between the test and the measured command: the ``ru_maxrss`` of a child
also counts the process it was forked from, which would be the whole pytest process."""


def run_measured(cmd: list[str], env: dict | None = None, timeout: float = 120) -> tuple[int, str, int]:
    """Exit status, output (stdout and stderr) and peak RSS in bytes of the command ``cmd``."""
    result = subprocess.run([sys.executable, "-c", _SPAWN_AND_MEASURE, *cmd], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=env, timeout=timeout)
    output = result.stdout.decode(errors="replace")
    head, _, peak = output.rpartition("\npeak-rss-kib ")
    return result.returncode, head, int(peak) * 1024


@pytest.fixture(autouse=True)
def _no_process_wide_mlflow_uri(monkeypatch):
    """In-process ``lvvit-export`` calls set MLflow's process-wide tracking URI, which would
    outlive their test and win over a later test's ``MLFLOW_TRACKING_URI``; each test starts
    as a fresh process does, the environment deciding."""
    utils = sys.modules.get("mlflow.tracking._tracking_service.utils")
    if utils is not None:
        monkeypatch.setattr(utils, "_tracking_uri", None)
