"""MLflow outages never stop or stall training: a real `mlflow server` on 127.0.0.1 killed
mid-run or never there, launcher-less single-process runs of a tiny LV-ViT, the spool
replayed with `python -m lvvit.train.tracking replay`, crashed and SIGTERMed runs marked
FAILED / KILLED, and `lvvit-export` logging that leaves the training run's end time alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from test_train import COMMON, REPO, TINY_ARGS, VENV_BIN, command, write_shards

from lvvit.digest import file_sha256
from lvvit.models import create_model
from lvvit.ports import free_port

pytestmark = pytest.mark.slow

# 64 samples, micro batch 8, one rank: 8 steps an epoch, 2 epochs
ARGS = [*COMMON, "--epochs", "2", "--cooldown-epochs", "0", "--deepspeed_config",
        str(REPO / "ds_configs" / "cpu.json"), "--experiment", "outage"]
STEPS = 16
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}


class Server:
    """``mlflow server`` on a SQLite file; ``kill()`` takes its whole process group down."""

    def __init__(self, root: Path) -> None:
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [str(VENV_BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
             "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port",
             str(self.port), "--workers", "1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV, start_new_session=True)
        deadline = time.time() + 120
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                if time.time() > deadline or self.proc.poll() is not None:
                    self.kill()
                    raise
                time.sleep(0.5)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("shards")
    return {"tlm": write_shards(root / "tlm", 64, 32, tlm=True, seed=0),
            "nan": write_shards(root / "nan", 64, 32, tlm=True, seed=2, nan_every=12),
            "eval": write_shards(root / "eval", 16, 16, tlm=False, seed=3)}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("mlflow"))
    yield srv
    srv.kill()


def train(args: list[str], uri: str, until: str | None = None, then=None) -> tuple[int, str, float]:
    """``python train.py ARGS`` tracked at ``uri``; ``then(proc)`` runs once a log line holds
    ``until``. Returns exit status, output and wall time."""
    cmd, env = command(args, uri, ranks=0)
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if until is not None and until in line:
            then(proc)
            until = None
    proc.wait(timeout=300)
    return proc.returncode, "".join(lines), time.monotonic() - start


def replay(out: Path, uri: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lvvit.train.tracking", "replay", str(out)], cwd=REPO,
                          env={**ENV, "MLFLOW_TRACKING_URI": uri}, capture_output=True, text=True, timeout=300)


def spooled(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "mlflow-spool.jsonl").read_text().splitlines()]


def logged_steps(client: MlflowClient, run_id: str, key: str = "train/loss") -> set[int]:
    return {m.step for m in client.get_metric_history(run_id, key)}


def train_args(shards: Path, out: Path, *extra: str) -> list[str]:
    return ["--train-shards", str(shards), "--output", str(out), *ARGS, *extra]


def kill_once_logged(server: Server, out: Path, step: int) -> None:
    """Kill the server as soon as it holds ``train/loss`` at ``step`` (training goes on meanwhile)."""
    client, deadline = MlflowClient(server.uri), time.time() + 60
    while time.time() < deadline:
        run = json.loads((out / "mlflow_run.json").read_text())["run_id"]
        if step in logged_steps(client, run):
            break
        time.sleep(0.2)
    server.kill()


def test_server_killed_mid_run_training_completes_and_the_spool_replays(data, tmp_path):
    root = tmp_path / "mlflow"
    root.mkdir()
    first = Server(root)
    out = tmp_path / "run"
    try:
        rc, text, wall = train(train_args(data["tlm"], out, "--eval-shards", str(data["eval"])), first.uri,
                               until="step 3 loss", then=lambda _: kill_once_logged(first, out, 3))
    finally:
        first.kill()
    assert rc == 0, text[-4000:]
    assert wall < 180, f"{wall:.0f} s"
    assert (out / "weights.pth").is_file()
    latest = (out / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step{STEPS:08d}" and (out / "checkpoints" / latest / "mp_rank_00_model_states.pt").is_file()
    assert "does not answer" in text and "python -m lvvit.train.tracking replay" in text
    run_id = json.loads((out / "mlflow_run.json").read_text())["run_id"]

    records = spooled(out)
    assert records[-1]["kind"] == "end" and records[-1]["status"] == "FINISHED"
    assert all(r["run"] == run_id for r in records)
    in_spool = {r["step"] for r in records if r["kind"] == "metrics" and "train/loss" in r["metrics"]}
    assert STEPS in in_spool

    second = Server(root)  # the same store, back again
    try:
        client = MlflowClient(second.uri)
        before = logged_steps(client, run_id)
        assert {1, 2, 3} <= before and max(before) < STEPS
        assert before | in_spool == set(range(1, STEPS + 1))
        assert client.get_run(run_id).info.status == "RUNNING"

        proc = replay(out, second.uri)
        assert proc.returncode == 0, proc.stderr
        assert run_id in proc.stdout
        assert not (out / "mlflow-spool.jsonl").exists()
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        assert logged_steps(client, run_id) == set(range(1, STEPS + 1))
        assert logged_steps(client, run_id, "eval/top1") == {8, 16}
        assert "weights.pth" in {a.path for a in client.list_artifacts(run_id)}
    finally:
        second.kill()


def test_dead_server_from_the_start_is_a_warning_unless_strict(data, server, tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"
    out = tmp_path / "dead"
    rc, text, wall = train(train_args(data["tlm"], out, "--no-eval"), dead)
    assert rc == 0, text[-4000:]
    assert wall < 180, f"{wall:.0f} s"
    assert f"MLflow at {dead} does not answer" in text
    assert (out / "weights.pth").is_file() and not (out / "mlflow_run.json").exists()
    records = spooled(out)
    assert records[0]["kind"] == "create" and records[-1]["kind"] == "end"
    assert {r["step"] for r in records if r["kind"] == "metrics"} == set(range(1, STEPS + 1))

    # the spool makes the run on a server that answers, and records it for --resume / export
    proc = replay(out, server.uri)
    assert proc.returncode == 0, proc.stderr
    run_id = json.loads((out / "mlflow_run.json").read_text())["run_id"]
    client = MlflowClient(server.uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "lvvit_t-64"
    assert run.data.params["resolved.steps_per_epoch"] == "8"
    assert logged_steps(client, run_id) == set(range(1, STEPS + 1))
    (spooled_input,) = run.inputs.dataset_inputs  # the training shards, sent by the replay
    assert spooled_input.dataset.digest == file_sha256(data["tlm"] / "manifest.json")[:32]
    assert {t.key: t.value for t in spooled_input.tags} == {"mlflow.data.context": "training"}

    strict = tmp_path / "strict"
    rc, text, _ = train(train_args(data["tlm"], strict, "--strict-tracking"), dead)
    assert rc != 0
    assert f"--strict-tracking: MLflow at {dead} is unreachable" in text
    assert "Traceback" not in text
    assert "step 1 loss" not in text and not (strict / "checkpoints").exists()


def test_crashed_and_terminated_runs_are_failed_and_killed(data, server, tmp_path):
    client = MlflowClient(server.uri)
    out = tmp_path / "nan"
    rc, text, _ = train(train_args(data["nan"], out, "--no-eval"), server.uri)
    assert rc != 0 and "non-finite loss" in text
    run_id = json.loads((out / "mlflow_run.json").read_text())["run_id"]
    run = client.get_run(run_id)
    assert run.info.status == "FAILED" and run.info.end_time is not None
    assert not (out / "mlflow-spool.jsonl").exists()

    out = tmp_path / "term"  # without preemption handling (tests/test_preemption.py has it)
    rc, text, _ = train(train_args(data["tlm"], out, "--no-eval", "--preempt-signals", "none"), server.uri,
                        until="step 2 loss", then=lambda proc: proc.send_signal(signal.SIGTERM))
    assert rc == 128 + signal.SIGTERM, text[-4000:]
    run_id = json.loads((out / "mlflow_run.json").read_text())["run_id"]
    assert client.get_run(run_id).info.status == "KILLED"
    assert 1 in logged_steps(client, run_id)


def test_export_logging_leaves_the_training_runs_end_time(server, tmp_path):
    client = MlflowClient(server.uri)
    experiment = client.create_experiment("outage-export")
    run_id = client.create_run(experiment, run_name="trained").info.run_id
    client.set_terminated(run_id, status="FINISHED")
    ended = client.get_run(run_id).info
    folder = tmp_path / "train"
    folder.mkdir()
    model = create_model("lvvit_t", img_size=64, num_classes=4, **TINY_ARGS)
    model_args = {"name": "lvvit_t", "img_size": 64, "num_classes": 4, **TINY_ARGS}
    torch.save({"state_dict": model.state_dict(), "model_args": model_args}, folder / "weights.pth")
    (folder / "mlflow_run.json").write_text(json.dumps({"run_id": run_id, "tracking_uri": server.uri}))
    time.sleep(0.01)  # the export's clock is past the run's end

    proc = subprocess.run([sys.executable, "-m", "lvvit.export.cli", "--checkpoint", str(folder / "weights.pth"),
                           "--out", str(tmp_path / "export"), "--max-batch", "2", "--register-name", "outage"],
                          env={k: v for k, v in ENV.items() if k != "MLFLOW_TRACKING_URI"}, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    after = client.get_run(run_id).info
    assert (after.status, after.end_time) == ("FINISHED", ended.end_time)
    (version,) = client.search_model_versions("name='outage'")
    assert version.run_id == run_id
    assert {a.path for a in client.list_artifacts(run_id, "export")} == {
        "export/parity.json", "export/model.json", "export/labels.txt"}


def test_a_hung_server_does_not_stall_startup(tmp_path):
    """A port that accepts connections and never answers: each call gives up within the bounds."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        uri = f"http://127.0.0.1:{listener.getsockname()[1]}"
        env = {**ENV, "MLFLOW_TRACKING_URI": uri, "MLFLOW_HTTP_REQUEST_TIMEOUT": "2"}
        code = ("import pathlib, sys; from lvvit.train.tracking import make_tracker;"
                "t = make_tracker(True, 0, 'e', 'r', pathlib.Path(sys.argv[1]), {}, None, False);"
                "t.log_metrics({'a': 1.0}, 1); t.finish('FINISHED')")
        start = time.monotonic()
        proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=env, capture_output=True,
                              text=True, timeout=300)
        wall = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr
    assert "does not answer" in proc.stderr
    assert [r["kind"] for r in spooled(tmp_path)] == ["create", "metrics", "end"]
    assert wall < 90, f"{wall:.0f} s"  # MLflow's own defaults: 8 tries of 120 s per call


# ----------------------------------------------------------------- replay of a crafted spool

def hostile_lines(victim: str, ours: str, out: Path) -> list[tuple[dict | str, str]]:
    """Spool lines the trainer never writes, each with (part of) the refusal it must get."""
    (out / "passwd").symlink_to("/etc/passwd")
    step = {"kind": "metrics", "metrics": {"x": 1.0}, "step": 1, "time": 1}
    dataset = {"name": "d/train", "digest": "0" * 64, "digest_of": "manifest", "source_type": "local",
               "uri": "/d/train", "context": "training", "samples": 1, "shards": 1, "classes": None,
               "used_samples": None}
    return [
        ({"kind": "end", "status": "FAILED", "time": 1, "run": victim}, f"run {victim} is not a run recorded"),
        ({"kind": "params", "params": {"p": "v"}, "run": victim}, "is not a run recorded"),
        ({**step, "run": victim}, "is not a run recorded"),
        ({"kind": "artifact", "path": "/etc/passwd", "artifact_path": None, "run": ours}, "is not a file inside"),
        ({"kind": "artifact", "path": "passwd", "artifact_path": None, "run": ours}, "is not a file inside"),
        ({"kind": "artifact", "path": "weights.pth", "artifact_path": "../..", "run": ours}, "not a plain file name"),
        ({"kind": "dict", "data": {}, "name": "../x.json", "run": ours}, "not a plain file name"),
        ({**step, "run": ours, "command": "touch x"}, "field 'command' is not part of a 'metrics' record"),
        ({**step, "step": True, "run": ours}, "'step' must be an integer"),
        ('{"kind": "metrics", "metrics": {"x": 1.0}, "step": Infinity, "time": 1}', "'step' must be an integer"),
        ({"kind": "end", "status": "DELETED", "time": 1, "run": ours}, "'status' must be one of"),
        ({"kind": "params", "params": {"p": "v" * 7000}, "run": ours}, "at most 6000 characters"),
        ({"kind": "params", "params": {"p": "v" * (5 << 20)}, "run": ours}, "over 4194304 bytes"),
        ({**step, "run": None}, "no 'create' record comes before it"),
        ("[" * 100_000 + "]" * 100_000, "not JSON"),
        (f'{{"kind": "end", "status": "FINISHED", "time": 1, "run": "{ours}", "run": "{victim}"}}', "appears twice"),
        ({"kind": "inputs", "datasets": [dataset], "run": victim}, "is not a run recorded"),
        ({"kind": "inputs", "datasets": [{**dataset, "source_type": "file"}], "run": ours}, "'source_type' must be"),
        ({"kind": "inputs", "datasets": [{**dataset, "digest": "x" * 64}], "run": ours}, "hex SHA-256"),
        ({"kind": "inputs", "datasets": [{**dataset, "path": "passwd"}], "run": ours}, "exactly the fields"),
    ]


def test_replay_refuses_any_line_the_trainer_does_not_write(server, tmp_path, monkeypatch, capsys):
    """Each hostile line, after a good one: refused by line number before anything is sent."""
    from lvvit.train import tracking

    for key, value in tracking.HTTP_DEFAULTS.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    client = MlflowClient(server.uri)
    experiment = client.create_experiment("replay-trust")
    victim = client.create_run(experiment, run_name="victim").info.run_id
    client.set_terminated(victim, status="FINISHED")
    ours = client.create_run(experiment, run_name="ours").info.run_id
    out = tmp_path / "run"
    out.mkdir()
    (out / "mlflow_run.json").write_text(json.dumps({"run_id": ours, "tracking_uri": server.uri}))
    good = json.dumps({"kind": "metrics", "metrics": {"x": 1.0}, "step": 1, "time": 1, "run": ours})
    for line, why in hostile_lines(victim, ours, out):
        text = f"{good}\n{line if isinstance(line, str) else json.dumps(line)}\n"
        (out / "mlflow-spool.jsonl").write_text(text)
        with pytest.raises(SystemExit) as refused:
            tracking.main(["replay", str(out)])
        message = capsys.readouterr().err.strip()
        assert refused.value.code == 1
        assert message.startswith(f"{out / 'mlflow-spool.jsonl'}: line 2: ") and why in message, message
        assert message.endswith("nothing was sent") and "\n" not in message
        assert (out / "mlflow-spool.jsonl").read_text() == text
    assert client.get_metric_history(ours, "x") == []
    run = client.get_run(victim)
    assert (run.info.status, run.data.params, run.data.metrics) == ("FINISHED", {}, {})
    assert client.list_artifacts(victim) == [] and client.list_artifacts(ours) == []


def test_replay_writes_and_reads_only_inside_the_output_folder(server, tmp_path, monkeypatch, capsys):
    """A 'create' record that names another folder (the older spool format) records the run in
    the folder replayed; a run file naming a local store is refused, not opened."""
    from lvvit.train import tracking

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    create = {"kind": "create", "experiment": "replay-trust-2", "run_name": "r", "tags": {"t": "v"}, "time": 1,
              "record_in": str(elsewhere)}
    lines = [create, {"kind": "metrics", "metrics": {"x": 2.0}, "step": 3, "time": 2, "run": None},
             {"kind": "end", "status": "FINISHED", "time": 3, "run": None}]
    (out / "mlflow-spool.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (out / "mlflow_run.json").write_text(json.dumps({"run_id": "0" * 32, "tracking_uri": f"sqlite:///{elsewhere}/x.db"}))
    with pytest.raises(SystemExit):
        tracking.main(["replay", str(out)])
    assert re.search(r"tracking_uri 'sqlite:///.*' is not an http", capsys.readouterr().err)
    assert list(elsewhere.iterdir()) == []

    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    tracking.main(["replay", str(out)])
    assert list(elsewhere.iterdir()) == []
    run_id = json.loads((out / "mlflow_run.json").read_text())["run_id"]
    run = MlflowClient(server.uri).get_run(run_id)
    assert (run.info.status, run.data.metrics, run.data.tags["t"]) == ("FINISHED", {"x": 2.0}, "v")
    assert not (out / "mlflow-spool.jsonl").exists()
