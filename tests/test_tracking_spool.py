"""The live tracker's spool: an outage that spooled more than ``--max-spool-mb`` is sent in
pieces by the next run segment (``replay`` still refuses it whole), and a spool line the
sender cannot read stops the sending, not the sender: the run's end still reaches the spool.
Real MLflow client and SQLite store; the outage is a port nothing listens on.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from lvvit.errors import DataError
from lvvit.ports import free_port
from lvvit.train import spool, tracking

STEPS = 300


@pytest.fixture
def outage(monkeypatch) -> None:
    """MLflow calls bounded as the trainer bounds them, against a port nothing listens on."""
    for key, value in tracking.HTTP_DEFAULTS.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")


def spooled_segment(out: Path) -> None:
    """One run segment with the server away throughout: all of it goes to the spool."""
    tracker = tracking.make_tracker(True, 0, "pieces", "r", out, {}, None, system_metrics=False)
    for step in range(STEPS):
        tracker.log_metrics({"train/loss": float(step)}, step)
    tracker.finish("FINISHED", wait=30)


def kinds(out: Path) -> list[str]:
    return [json.loads(line)["kind"] for line in (out / spool.SPOOL_FILE).read_text().splitlines()]


def test_a_spool_over_the_limit_is_sent_in_pieces_by_the_next_segment(tmp_path, outage, monkeypatch):
    out = tmp_path / "out"
    spooled_segment(out)
    assert kinds(out) == ["create", *["metrics"] * STEPS, "end"]
    size = (out / spool.SPOOL_FILE).stat().st_size
    limit_mb = size / 5 / 2**20
    with pytest.raises(DataError, match="over the limit"):
        tracking.replay(out, limit_mb)  # replay checks every line before sending: whole or not at all
    assert kinds(out) == ["create", *["metrics"] * STEPS, "end"]

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setattr(spool, "MAX_SPOOL_MB", limit_mb)
    tracker = tracking.make_tracker(True, 0, "pieces", "r2", out, {}, None, system_metrics=False)
    assert tracker.spool.max_bytes < size / 4  # the live sender read it in five pieces or more
    tracker.finish("FINISHED", wait=60)
    assert not (out / spool.SPOOL_FILE).exists()
    client = MlflowClient(store)
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("pieces").experiment_id])}
    first = runs["r"]
    assert first.info.status == "FINISHED"
    history = client.get_metric_history(first.info.run_id, "train/loss")
    assert sorted((m.step, m.value) for m in history) == [(s, float(s)) for s in range(STEPS)]
    assert runs["r2"].info.status == "FINISHED"


def test_a_spool_line_the_sender_cannot_read_stops_sending_not_the_sender(tmp_path, outage, caplog):
    out = tmp_path / "out"
    tracker = tracking.make_tracker(True, 0, "bad-line", "r", out, {}, None, system_metrics=False)
    tracker.log_metrics({"train/loss": 1.0}, 0)
    deadline = time.monotonic() + 30
    while kinds(out)[-1:] != ["metrics"] and time.monotonic() < deadline:
        time.sleep(0.05)
    with open(out / spool.SPOOL_FILE, "a") as f:
        f.write(json.dumps({"kind": "shell", "command": "touch PWNED"}) + "\n")
    start = time.monotonic()
    with caplog.at_level(logging.ERROR, logger="lvvit.train.tracking"):
        tracker.finish("FINISHED", wait=30)
    assert time.monotonic() - start < 25  # the sender lived to handle the end itself
    assert kinds(out) == ["create", "metrics", "shell", "end"]  # the run's end kept, after the bad line
    assert any("line 3" in r.getMessage() and "tracking records go on into the spool" in r.getMessage()
               for r in caplog.records)
    assert not (tmp_path / "PWNED").exists()
