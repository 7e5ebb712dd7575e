"""``s3://`` shard sources against a real S3-compatible server on 127.0.0.1 (moto's
``ThreadedMotoServer``), reached the way users reach MinIO or Ceph: ``AWS_ENDPOINT_URL`` and
dummy credentials. ``lvvit-shards info``, ``lvvit-label``, the loaders with and without the
shard cache, the store going down under a warm cache, permanent errors failing fast and
named, transient ones retried; and, slow, two-rank ``train.py`` from ``s3://``.
"""

from __future__ import annotations

import ast
import contextlib
import http.server
import json
import logging
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_labeling import _label_args
from test_pipeline import write_shards
from test_shard_sources import COUNTS, eval_labels, first_index, indices_of
from test_shard_sources import teacher_file as teacher_file  # a fixture

from lvvit.data.cli import main as shards_main
from lvvit.data.source import Access, ShardUnavailable, SourceError, resolve
from lvvit.data.streams import open_url
from lvvit.data.tarsamples import iter_tar_samples
from lvvit.labeling.cli import main as label_main
from lvvit.loader.pipeline import train_loader

boto3 = pytest.importorskip("boto3")
moto_server = pytest.importorskip("moto.server")

BUCKET = "lvvit-test"
FAST = Access(timeout=5, retries=1)
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


class Store:
    """A moto S3 server on a free loopback port; ``stop`` closes its socket too, so a
    connection to it is refused (ThreadedMotoServer.stop alone leaves it listening)."""

    def __init__(self) -> None:
        self.server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        self.endpoint = "http://{}:{}".format(*self.server.get_host_and_port())

    def client(self):
        return boto3.client("s3", endpoint_url=self.endpoint, **{
            "aws_access_key_id": "testing", "aws_secret_access_key": "testing", "region_name": "us-east-1"})

    def upload(self, folder: Path, prefix: str) -> str:
        """Every file of ``folder`` under ``s3://BUCKET/prefix/``; returns that URL."""
        client = self.client()
        if BUCKET not in [b["Name"] for b in client.list_buckets()["Buckets"]]:
            client.create_bucket(Bucket=BUCKET)
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                client.upload_file(str(path), BUCKET, f"{prefix}/{path.relative_to(folder)}")
        return f"s3://{BUCKET}/{prefix}/"

    def stop(self) -> None:
        self.server.stop()
        self.server._server.server_close()


@pytest.fixture
def s3_env(monkeypatch) -> Iterator[None]:
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")  # the machine's own profiles play no part
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    yield


@pytest.fixture
def store(s3_env, monkeypatch) -> Iterator[Store]:
    s = Store()
    monkeypatch.setenv("AWS_ENDPOINT_URL", s.endpoint)
    yield s
    s.stop()


@pytest.fixture
def shards(tmp_path: Path) -> Path:
    root = write_shards(tmp_path / "shards", COUNTS, tlm=False)
    (root / "classes.json").write_text(json.dumps([{"index": i, "name": f"class{i}"} for i in range(sum(COUNTS))]))
    return root


def test_info_and_label_from_s3(store: Store, shards: Path, tmp_path: Path, capsys, teacher_file) -> None:
    url = store.upload(shards, "data/train")
    with pytest.raises(SystemExit) as exit_:
        shards_main(["info", f"{url}s-{{000000..000001}}.tar"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "shards: 2  samples: 7  classes: 17" in out and "first key: k0000" in out
    labeled = tmp_path / "labeled"
    assert label_main(_label_args(url, labeled, "smallcnn", teacher_file)) == 0
    assert [s["samples"] for s in json.loads((labeled / "manifest.json").read_text())["shards"]] == COUNTS
    assert (labeled / "classes.json").read_bytes() == (shards / "classes.json").read_bytes()
    sample = next(iter_tar_samples(labeled / "s-000003.tar"))
    assert sample.key == f"k{first_index(3):04d}" and "tlm" in sample.as_dict()


def test_loaders_with_and_without_the_cache_and_with_the_store_down(store: Store, shards: Path, tmp_path: Path,
                                                                     caplog) -> None:
    url = store.upload(shards, "data/train")
    local = resolve(str(shards), access=FAST)
    streamed = resolve(f"{url}s-{{000000..000002}}.tar", access=FAST)
    assert streamed.counts == (3, 4, 2) and streamed.classes == local.classes
    assert eval_labels(streamed) == indices_of(range(3))
    cache = tmp_path / "cache"
    cached = resolve(url, access=Access(5, 1, str(cache)))
    assert cached.counts == local.counts and eval_labels(cached) == eval_labels(local)
    loader = train_loader(cached, batch_size=2, img_size=32, num_workers=2, shuffle_buffer=0, seed=1)
    seen = {label for _ in range(2) for batch in loader for label in batch["labels"].tolist()}
    assert seen <= set(range(sum(COUNTS))) and not loader.skipped
    kept = sorted(p.name.split("-", 1)[1] for p in cache.iterdir() if not p.name.startswith("."))
    assert kept == sorted(["classes.json", "manifest.json", *(f"s-{i:06d}.tar" for i in range(5))])

    store.stop()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lvvit"):
        start = time.monotonic()
        down = resolve(url, access=Access(5, 4, str(cache)))
        assert eval_labels(down) == eval_labels(local)
        assert time.monotonic() - start < 10  # one try per JSON file, no backoff: the cache is warm
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "store is unreachable" in warnings[0] and str(cache) in warnings[0]
    loader = train_loader(down, batch_size=2, img_size=32, num_workers=0, shuffle_buffer=0, seed=1)
    assert len(list(loader)) == sum(COUNTS) // 2 and not loader.skipped
    with pytest.raises(SourceError, match=re.escape(f"{url}manifest.json")):  # no cache: the outage is an error
        resolve(url, access=Access(2, 0))


def test_permanent_errors_fail_fast_and_named(store: Store, shards: Path) -> None:
    url = store.upload(shards, "data/train")
    source = resolve(url, access=Access(timeout=5, retries=4))
    store.client().delete_object(Bucket=BUCKET, Key="data/train/s-000002.tar")
    for missing, code in ((source.urls[2], "NoSuchKey"), ("s3://no-such-bucket-here/train/s-000000.tar", "NoSuchBucket")):
        start = time.monotonic()
        with pytest.raises(ShardUnavailable, match=rf"{re.escape(missing)} is unavailable: HTTP 404 {code}") as error:
            source.open(missing).read()
        assert time.monotonic() - start < 2 and error.value.permanent
    with pytest.raises(SourceError, match=r"s3://lvvit-test/nowhere/manifest\.json.*NoSuchKey"):
        resolve("s3://lvvit-test/nowhere/", access=Access(timeout=5, retries=4))


def test_endpoint_url_s3_wins_and_transient_answers_are_retried(store: Store, shards: Path, monkeypatch) -> None:
    """``AWS_ENDPOINT_URL_S3`` beats ``AWS_ENDPOINT_URL``; 503 SlowDown is retried, a whole
    shard is bounded by its deadline even when headers trickle in."""
    url = store.upload(shards, "data/train")
    asked: list[str] = []

    class SlowDown(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:
            asked.append(self.path)
            body = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
            self.send_response(503)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    busy = http.server.ThreadingHTTPServer(("127.0.0.1", 0), SlowDown)
    threading.Thread(target=busy.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{busy.server_port}")
        with pytest.raises(SourceError, match="after 1 retries: StoreError: HTTP 503 SlowDown: Please reduce"):
            resolve(url, access=Access(timeout=5, retries=1))
        assert len(asked) == 2 and asked[0].startswith("/lvvit-test/data/train/manifest.json?")
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", store.endpoint)
        assert resolve(url, access=FAST).counts == tuple(COUNTS)
    finally:
        busy.shutdown()
        busy.server_close()

    with socket.socket() as listener:  # accepts, then sends a header byte a second: never a timeout
        listener.bind(("127.0.0.1", 0))
        listener.listen()

        def trickle() -> None:
            conn, _ = listener.accept()
            with conn, contextlib.suppress(OSError):
                for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n":
                    time.sleep(0.3)
                    conn.sendall(bytes([byte]))

        threading.Thread(target=trickle, daemon=True).start()
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{listener.getsockname()[1]}")
        start = time.monotonic()
        with pytest.raises(ShardUnavailable, match="1 s deadline"):
            open_url(f"{url}s-000000.tar", Access(timeout=5, retries=0, deadline=1.0)).read()
        assert time.monotonic() - start < 3


# ---------------------------------------------------------------- train.py, two ranks


@pytest.mark.slow
def test_two_rank_training_from_s3_streamed_cached_then_with_the_store_down(store: Store, tmp_path: Path) -> None:
    """Streamed from the store; then with ``--shard-cache``, which the run fills from the
    store; then with the store stopped, from the cache alone (said in the log): the same
    steps and eval each time."""
    from test_train import TINY, ds_config, launch
    from test_train import write_shards as write_colour_shards

    served = tmp_path / "served"
    write_colour_shards(served / "train", 64, 16, tlm=False, seed=0)
    write_colour_shards(served / "eval", 24, 12, tlm=False, seed=3)
    url = store.upload(served, "imagenet")
    cache = tmp_path / "cache"
    common = [*TINY, "--deepspeed_config", str(ds_config(tmp_path, 2)), "--micro-batch", "8", "--epochs", "1",
              "--cooldown-epochs", "0", "--warmup-epochs", "0", "--lr", "3e-3", "--workers", "0",
              "--no-mlflow", "--no-system-metrics", "--save-every", "0", "--seed", "7", "--log-every", "1",
              "--train-shards", f"{url}train/data-{{000000..000002}}.tar", "--eval-shards", f"{url}eval/",
              "--shard-timeout", "5"]
    env = {**CREDENTIALS, "AWS_ENDPOINT_URL": store.endpoint, "AWS_CONFIG_FILE": "/nonexistent",
           "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent"}
    runs = {}
    for name in ("streamed", "store up", "store down"):
        if name == "store down":
            store.stop()
        cached = [] if name == "streamed" else ["--shard-cache", str(cache)]
        proc = launch([*common, *cached, "--output", str(tmp_path / name.replace(" ", "_"))], None, env_extra=env)
        log = proc.stdout + proc.stderr
        evals = re.findall(r"epoch 0 eval (\{[^}]*\})", log)
        assert evals, log[-3000:]
        runs[name] = {"steps": re.findall(r"(\d+) steps/epoch", log)[-1], "eval": ast.literal_eval(evals[-1]),
                      "warned": "running from the shard cache" in log, "skipped": "skipping shard" in log}
    streamed, up, down = runs["streamed"], runs["store up"], runs["store down"]
    assert streamed["steps"] == up["steps"] == down["steps"] == "3"
    assert not any(run["skipped"] for run in runs.values())
    assert not streamed["warned"] and not up["warned"] and down["warned"]
    for run in (up, down):
        assert run["eval"]["eval/samples"] == streamed["eval"]["eval/samples"] == 24
        assert run["eval"]["eval/top1"] == streamed["eval"]["eval/top1"]
        assert run["eval"]["eval/loss"] == pytest.approx(streamed["eval"]["eval/loss"], rel=1e-6)
    assert not any(p.name.endswith("data-000003.tar") for p in cache.iterdir())  # outside the pattern
