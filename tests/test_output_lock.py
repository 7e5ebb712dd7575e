"""One training per --output: a second run is refused naming the holder; a dead holder's
lock is taken over, and said so. The holder is a real second process."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lvvit.errors import ConfigError
from lvvit.train.output_lock import LOCK_FILE, OutputLock, lock_output

REPO = Path(__file__).resolve().parents[1]
HOLD = ("import sys, time\nfrom lvvit.train.output_lock import OutputLock\n"
        "OutputLock(sys.argv[1])\nprint('held', flush=True)\ntime.sleep(120)\n")


def test_a_second_run_is_refused_and_a_dead_holders_lock_taken_over(tmp_path, caplog):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError) as refused:
            lock_output(tmp_path, rank=0)
        assert f"host {socket.gethostname()} pid {holder.pid}" in str(refused.value)
        assert f"--output {tmp_path} is in use" in str(refused.value)
        assert lock_output(tmp_path, rank=1) is None  # other ranks take no lock (one process here)
    finally:
        holder.kill()
        holder.wait()
    # SIGKILLed: its host and pid are still in the file, the kernel dropped its flock
    with caplog.at_level(logging.WARNING, logger="lvvit.train.output_lock"):
        lock = lock_output(tmp_path, rank=0)
    assert f"taking over a stale lock of host {socket.gethostname()} pid {holder.pid}" in caplog.text
    assert f'"pid": {os.getpid()}' in (tmp_path / LOCK_FILE).read_text()
    lock.release()
    assert (tmp_path / LOCK_FILE).read_text() == ""  # a clean exit leaves no holder to report


def test_a_lock_held_in_a_dead_processs_name_is_replaced(tmp_path, caplog):
    """A forked child of a killed run can keep the locked file open: the holder named in it
    is dead, so the file is replaced rather than the new run refused."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / LOCK_FILE).write_text(f'{{"host": "{socket.gethostname()}", "pid": {dead.pid}}}')
    keeper = subprocess.Popen(  # holds the flock on the file, like an orphaned loader worker
        [sys.executable, "-c", "import fcntl, sys, time\nf = open(sys.argv[1])\nfcntl.flock(f, fcntl.LOCK_EX)\n"
         "print('held', flush=True)\ntime.sleep(120)\n", str(tmp_path / LOCK_FILE)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert keeper.stdout.readline().strip() == "held"
        with caplog.at_level(logging.WARNING, logger="lvvit.train.output_lock"):
            lock = OutputLock(tmp_path)
        assert f"taking over the lock of host {socket.gethostname()} pid {dead.pid}, which no longer runs" in caplog.text
        lock.release()
    finally:
        keeper.kill()
        keeper.wait()


def test_train_py_on_a_held_output_stops_before_the_engine(tmp_path):
    shards, out = tmp_path / "shards", tmp_path / "out"
    shards.mkdir()
    (shards / "manifest.json").write_text('{"shards": [{"name": "a.tar", "samples": 4}], "total": 4}')
    (shards / "a.tar").write_bytes(bytes(4096))  # never read: the run stops before any data
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        start = time.monotonic()
        proc = subprocess.run(
            [sys.executable, str(REPO / "train.py"), "--train-shards", str(shards), "--output", str(out),
             "--no-mlflow", "--deepspeed_config", str(REPO / "ds_configs" / "cpu.json"), "--micro-batch", "1",
             "--model", "lvvit_t"],
            env={**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
            timeout=300)
        elapsed = time.monotonic() - start
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(
        f"--output {out} is in use by another training (host {socket.gethostname()} pid {holder.pid}")
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # no checkpoint, no weights, no run record
    assert elapsed < 120  # generous: one process start and a DeepSpeed import
