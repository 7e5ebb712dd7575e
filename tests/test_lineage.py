"""MLflow lineage (lvvit/train/lineage.py): shard sources as MLflow datasets, sent through the
tracker (and its spool when the server is away), read back with the client; the spool's
check of an ``inputs`` record. A SQLite store, no server, no training: the training runs
of tests/test_train.py and tests/test_tracking_outage.py check the same on real runs."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import pytest

from lvvit.data.source import resolve
from lvvit.digest import file_sha256
from lvvit.ports import free_port
from lvvit.train import lineage
from lvvit.train.spool import BadRecord, check_shape


def fake_shards(folder: Path, counts: list[int], classes: int | None = 3, manifest: bool = True) -> Path:
    """Tars that ``resolve`` accepts (it only sizes them) with manifest.json and classes.json."""
    folder.mkdir(parents=True)
    for i, n in enumerate(counts):
        (folder / f"shard-{i:06d}.tar").write_bytes(bytes(1024 * (n + 1)))
    if manifest:
        entries = [{"name": f"shard-{i:06d}.tar", "samples": n} for i, n in enumerate(counts)]
        (folder / "manifest.json").write_text(json.dumps({"shards": entries, "total": sum(counts)}))
    if classes:
        (folder / "classes.json").write_text(json.dumps([{"index": i, "name": f"c{i}"} for i in range(classes)]))
    return folder


def test_a_folder_with_a_manifest_is_named_by_the_manifests_digest(tmp_path):
    folder = fake_shards(tmp_path / "imagenet" / "train", [5, 7])
    d = lineage.dataset(resolve(folder), "training")
    assert d == {"name": "imagenet/train", "digest": file_sha256(folder / "manifest.json"), "digest_of": "manifest",
                 "source_type": "local", "uri": str(folder), "context": "training", "samples": 12, "shards": 2,
                 "classes": 3, "used_samples": None}
    check_shape({"kind": "inputs", "datasets": [d], "run": None}, tmp_path)
    # the manifest itself as the spec: the same dataset
    assert lineage.dataset(resolve(folder / "manifest.json"), "training")["digest"] == d["digest"]


def test_a_subset_or_no_manifest_is_named_by_its_shard_list(tmp_path):
    folder = fake_shards(tmp_path / "data" / "val", [4, 6, 8])
    subset = lineage.dataset(resolve(f"{folder}/shard-{{000000..000001}}.tar"), "eval")
    lines = "shard-000000.tar\t4\nshard-000001.tar\t6\n"
    assert subset["digest"] == hashlib.sha256(lines.encode()).hexdigest() and subset["digest_of"] == "shards"
    assert subset["name"] == "val/shard-{000000..000001}.tar" and subset["samples"] == 10

    bare = fake_shards(tmp_path / "bare", [3], classes=None, manifest=False)
    d = lineage.dataset(resolve(bare), "eval")
    assert d["digest"] == hashlib.sha256(b"shard-000000.tar\t\n").hexdigest()
    assert (d["samples"], d["classes"], d["shards"], d["digest_of"]) == (None, None, 1, "shards")
    check_shape({"kind": "inputs", "datasets": [subset, d]}, tmp_path)


@pytest.mark.parametrize(("spec", "kind", "uri", "name"), [
    ("s3://bucket/imagenet/train/", "s3", "s3://bucket/imagenet/train/", "imagenet/train"),
    ("gs://b/train/manifest.json", "gs", "gs://b/train/manifest.json", "b/train"),
    ("https://u:secret@host/d/train-{0..3}.tar", "http", "https://u:***@host/d/train-{0..3}.tar",
     "d/train-{0..3}.tar"),
    ("pipe:aws s3 cp s3://b/x/train-{0..3}.tar -", "pipe", "pipe:aws s3 cp s3://b/x/train-{0..3}.tar -",
     "x/train-{0..3}.tar"),
])
def test_remote_specs_keep_their_scheme_and_hide_a_password(spec, kind, uri, name):
    assert (lineage.source_type(spec), lineage.source_uri(spec), lineage.dataset_name(spec)) == (kind, uri, name)


def good_dataset() -> dict:
    return {"name": "imagenet/train", "digest": "a" * 64, "digest_of": "manifest", "source_type": "local",
            "uri": "/data/imagenet/train", "context": "training", "samples": 12, "shards": 2, "classes": 3,
            "used_samples": None}


@pytest.mark.parametrize(("change", "why"), [
    ({"digest": "a" * 63}, "hex SHA-256"),
    ({"digest": "A" * 64}, "hex SHA-256"),
    ({"digest": 5}, "hex SHA-256"),
    ({"name": ""}, "needs a name"),
    ({"name": "n" * 501}, "at most 500 characters"),
    ({"uri": "u" * 8001}, "at most 8000 characters"),
    ({"context": "testing"}, "'context' must be one of"),
    ({"source_type": "file"}, "'source_type' must be one of"),
    ({"digest_of": "guess"}, "'digest_of' must be one of"),
    ({"samples": -1}, "'samples' must be null or an integer"),
    ({"shards": True}, "'shards' must be null or an integer"),
    ({"classes": 1.5}, "'classes' must be null or an integer"),
    ({"used_samples": 2**63}, "'used_samples' must be null or an integer"),
    ({"schema": "{}"}, "exactly the fields"),
])
def test_the_spool_refuses_a_dataset_the_trainer_does_not_write(tmp_path, change, why):
    with pytest.raises(BadRecord, match=why):
        check_shape({"kind": "inputs", "datasets": [{**good_dataset(), **change}]}, tmp_path)


@pytest.mark.parametrize(("record", "why"), [
    ({"kind": "inputs", "datasets": []}, "list of 1 to 16"),
    ({"kind": "inputs", "datasets": [good_dataset()] * 17}, "list of 1 to 16"),
    ({"kind": "inputs", "datasets": {"a": 1}}, "list of 1 to 16"),
    ({"kind": "inputs", "datasets": ["x"]}, "exactly the fields"),
    ({"kind": "inputs"}, "needs 'datasets'"),
    ({"kind": "inputs", "datasets": [good_dataset()], "path": "/etc/passwd"}, "field 'path' is not part"),
])
def test_the_spool_refuses_a_malformed_inputs_record(tmp_path, record, why):
    with pytest.raises(BadRecord, match=why):
        check_shape(record, tmp_path)


def read_back(client, run_id: str) -> dict[str, dict]:
    """The run's datasets by context: name, digest, source type, source, profile, tags."""
    found = {}
    for di in client.get_run(run_id).inputs.dataset_inputs:
        tags = {t.key: t.value for t in di.tags}
        d = di.dataset
        found[tags["mlflow.data.context"]] = {"name": d.name, "digest": d.digest, "source_type": d.source_type,
                                              "source": json.loads(d.source), "profile": json.loads(d.profile),
                                              "tags": tags}
    return found


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A SQLite MLflow store in ``tmp_path``; calls bounded as the trainer bounds them."""
    from lvvit.train.tracking import HTTP_DEFAULTS

    for key, value in HTTP_DEFAULTS.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_a_runs_sources_are_mlflow_datasets_read_back_with_the_client(tmp_path, store, monkeypatch):
    from mlflow.tracking import MlflowClient

    from lvvit.train.tracking import make_tracker

    train = resolve(fake_shards(tmp_path / "imagenet" / "train", [5, 7]))
    val = resolve(fake_shards(tmp_path / "imagenet" / "val", [2], classes=None))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    MlflowClient(store).search_experiments()  # the store's schema made now: the tracker's bounded calls stay fast
    out = tmp_path / "out"
    tracker = make_tracker(True, 0, "lineage", "r", out, {}, None, system_metrics=False)
    lineage.log_sources(tracker, [(train, "training"), (val, "eval"), (None, "calibration")])
    lineage.log_sources(tracker, [(train, "training")])  # a resumed run logs them again: no duplicate
    tracker.finish("FINISHED")
    assert not (out / "mlflow-spool.jsonl").exists()

    client = MlflowClient(store)
    run = client.get_run(tracker.run_id)
    assert len(run.inputs.dataset_inputs) == 2
    got = read_back(client, tracker.run_id)
    manifest = file_sha256(tmp_path / "imagenet" / "train" / "manifest.json")
    assert got["training"] == {
        "name": "imagenet/train", "digest": manifest[:32], "source_type": "local",
        "source": {"uri": str(tmp_path / "imagenet" / "train")},
        "profile": {"samples": 12, "shards": 2, "classes": 3, "sha256": manifest, "digest_of": "manifest"},
        "tags": {"mlflow.data.context": "training"}}
    assert got["eval"]["name"] == "imagenet/val"
    assert got["eval"]["profile"] == {"samples": 2, "shards": 1, "sha256": file_sha256(
        tmp_path / "imagenet" / "val" / "manifest.json"), "digest_of": "manifest"}


def test_datasets_wait_in_the_spool_and_replay_sends_them(tmp_path, store, monkeypatch, caplog):
    """The server away from the start: the 'inputs' record is spooled like the others, passes
    the replay's check and reaches the run the replay makes."""
    from mlflow.tracking import MlflowClient

    from lvvit.train import tracking

    train = resolve(fake_shards(tmp_path / "train", [5, 7]))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="lvvit.train.tracking"):
        tracker = tracking.make_tracker(True, 0, "lineage", "r", out, {}, None, system_metrics=False)
        lineage.log_sources(tracker, [(train, "training")])
        tracker.finish("FINISHED", wait=30)
    spooled = [json.loads(line) for line in (out / "mlflow-spool.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in spooled] == ["create", "inputs", "end"]
    assert spooled[1]["datasets"] == [lineage.dataset(train, "training")]

    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    assert "3 records sent" in tracking.replay(out)
    run_id = json.loads((out / "mlflow_run.json").read_text())["run_id"]
    got = read_back(MlflowClient(store), run_id)
    assert got["training"]["digest"] == file_sha256(tmp_path / "train" / "manifest.json")[:32]
    assert MlflowClient(store).get_run(run_id).info.status == "FINISHED"


def test_calibration_records_the_samples_used_as_an_input_tag(tmp_path, store):
    from lvvit.export.tracking import source_datasets
    from mlflow.tracking import MlflowClient

    calib = fake_shards(tmp_path / "calib", [5, 7])
    datasets = source_datasets(str(calib), 8, None)
    assert [d["context"] for d in datasets] == ["calibration"] and datasets[0]["used_samples"] == 8
    assert source_datasets(str(calib), 100, None)[0]["used_samples"] == 12
    assert source_datasets(str(tmp_path / "missing"), 8, str(calib)) == [lineage.dataset(resolve(calib), "eval")]

    client = MlflowClient(store)
    run_id = client.create_run(client.create_experiment("calib")).info.run_id
    lineage.send_inputs(client, run_id, datasets)
    got = read_back(client, run_id)["calibration"]
    assert got["tags"] == {"mlflow.data.context": "calibration", "lvvit.used_samples": "8"}
    assert "used_samples" not in got["profile"]  # the dataset is shared; the use is the run's


def test_no_tracker_reads_nothing(tmp_path):
    from lvvit.train.tracking import NullTracker

    source = resolve(fake_shards(tmp_path / "t", [1]))
    os.remove(tmp_path / "t" / "manifest.json")  # would make dataset() fall back; never asked
    lineage.log_sources(NullTracker(), [(source, "training")])
