"""Shard sources (lvvit.data.source) end to end: a real HTTP server on 127.0.0.1 (Python's
http.server in a thread, over folders made here), ``pipe:cat`` commands, and the stages that
read them: the training and eval loaders, ``train.py`` under the DeepSpeed launcher,
``lvvit-shards info`` and ``lvvit-label``.
"""

from __future__ import annotations

import ast
import functools
import http.server
import json
import re
import shutil
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_labeling import _label_args, _small_cnn_file
from test_pipeline import write_shards

from lvvit.data.cli import main as shards_main
from lvvit.data.source import Access, ShardUnavailable, resolve
from lvvit.data.tarsamples import SHARD_KEY, iter_tar_samples
from lvvit.labeling.cli import main as label_main
from lvvit.loader.pipeline import eval_loader, train_loader

FAST = Access(timeout=5, retries=1)
COUNTS = [3, 4, 2, 5, 3]  # 17 samples; sample i has key k000i and class i


class Handler(http.server.SimpleHTTPRequestHandler):
    """Serves the folder; counts requests per path; cuts the bodies of ``cut`` names short."""

    requests: Counter
    cut: set[str]

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        self.requests[self.path] += 1
        name = self.path.rsplit("/", 1)[-1]
        if name not in self.cut:
            return super().do_GET()
        data = (Path(self.directory) / name).read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[: len(data) // 2])  # then the connection closes: a short body


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory) -> Path:
    """A SmallCNN of these shards' 17 classes: lvvit-label refuses a teacher of another count."""
    return _small_cnn_file(tmp_path_factory.mktemp("teacher") / "smallcnn.pt", sum(COUNTS))


class Server:
    def __init__(self, root: Path, cut: set[str] = frozenset()) -> None:
        handler = type("H", (Handler,), {"requests": Counter(), "cut": set(cut)})
        self.requests = handler.requests
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(root)))
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def shards(tmp_path: Path) -> Path:
    root = write_shards(tmp_path / "shards", COUNTS, tlm=False)
    classes = [{"index": i, "name": f"class{i}"} for i in range(sum(COUNTS))]
    (root / "classes.json").write_text(json.dumps(classes))
    return root


@pytest.fixture
def server(shards: Path) -> Iterator[Server]:
    s = Server(shards)
    yield s
    s.stop()


def first_index(shard: int) -> int:
    return sum(COUNTS[:shard])


def indices_of(shards: range) -> list[int]:
    return [i for s in shards for i in range(first_index(s), first_index(s) + COUNTS[s])]


def eval_labels(source) -> list[int]:
    labels = []
    for batch in eval_loader(source, batch_size=4, img_size=32, num_workers=0, world_size=1, rank=0):
        labels += batch["labels"][batch["valid"]].tolist()
    return labels


def test_a_pattern_naming_3_of_5_shards_reads_exactly_those(shards: Path, server: Server) -> None:
    for spec in (f"{shards}/s-{{000001..000003}}.tar", f"{server.url}/s-{{000001..000003}}.tar"):
        source = resolve(spec, access=FAST)
        assert [u.rsplit("/", 1)[-1] for u in source.urls] == ["s-000001.tar", "s-000002.tar", "s-000003.tar"]
        assert source.counts == (4, 2, 5) and source.total == 11
        assert source.classes[0] == {"index": 0, "name": "class0"}
        keys = [s.key for url in source.urls for s in iter_tar_samples(url, source.open)]
        assert keys == [f"k{i:04d}" for i in indices_of(range(1, 4))]
        assert eval_labels(source) == indices_of(range(1, 4))
        loader = train_loader(source, batch_size=2, img_size=32, num_workers=0, shuffle_buffer=0, seed=3)
        assert len(loader) == 11 // 2
        seen = {label for _ in range(3) for batch in loader for label in batch["labels"].tolist()}
        assert seen <= set(indices_of(range(1, 4))) and len(seen) > 4
    assert server.requests["/manifest.json"] >= 1 and server.requests["/s-000000.tar"] == 0


def test_pipe_cat_sources_and_their_manifest(shards: Path, capsys) -> None:
    spec = f"pipe:cat {shards}/s-{{000000..000002}}.tar"
    source = resolve(spec, access=FAST)
    assert source.counts == (3, 4, 2) and source.manifest == f"pipe:cat {shards}/manifest.json"
    assert eval_labels(source) == indices_of(range(3))
    with pytest.raises(SystemExit) as exit_:
        shards_main(["info", spec])
    assert exit_.value.code == 0
    assert "shards: 3  samples: 9  classes: 17" in capsys.readouterr().out


def test_a_404_shard_is_skipped_in_training_and_an_error_in_eval(shards: Path, server: Server) -> None:
    (shards / "s-000002.tar").unlink()
    missing = f"{server.url}/s-000002.tar"
    source = resolve(f"{server.url}/", access=FAST)
    loader = train_loader(source, batch_size=2, img_size=32, num_workers=0, shuffle_buffer=0, seed=1)
    reported, labels = {}, set()
    for _ in range(4):
        for batch in loader:
            labels.update(batch["labels"].tolist())
            assert batch["images"].shape[0] == 2
        reported.update({(s.shard, s.key): s.reason for s in loader.skipped})
    assert set(reported) == {(missing, SHARD_KEY)}
    assert "HTTP 404" in reported[missing, SHARD_KEY]
    assert not labels & set(indices_of(range(2, 3)))
    assert server.requests["/s-000002.tar"] >= 1  # 404 is not retried: once per draw
    with pytest.raises(ShardUnavailable, match=re.escape(missing)):
        eval_labels(source)


def test_a_body_cut_short_is_never_a_complete_shard(shards: Path, tmp_path: Path, teacher_file) -> None:
    cutter = Server(shards, cut={"s-000001.tar"})
    try:
        cut = f"{cutter.url}/s-000001.tar"
        source = resolve(f"{cutter.url}/s-{{000000..000001}}.tar", access=FAST)
        loader = train_loader(source, batch_size=2, img_size=32, num_workers=0, shuffle_buffer=0, seed=2)
        reported = {}
        for _ in range(3):
            list(loader)
            reported.update({(s.shard, s.key): s.reason for s in loader.skipped})
        assert (cut, SHARD_KEY) in reported and "short of its Content-Length" in reported[cut, SHARD_KEY]
        with pytest.raises(ShardUnavailable, match=re.escape(cut)):
            eval_labels(source)
        out = tmp_path / "labeled"
        code = label_main([*_label_args(f"{cutter.url}/s-{{000000..000001}}.tar", out, "smallcnn", teacher_file),
                           "--shard-timeout", "5", "--shard-retries", "1"])
        assert code == 1
        assert (out / "s-000000.tar").is_file() and not (out / "s-000001.tar").exists()
        assert not list(out.glob("*.partial")) and not (out / "manifest.json").exists()
        assert cutter.requests["/s-000001.tar"] >= 2  # retried, then given up
    finally:
        cutter.stop()


def test_server_stopped_mid_epoch_ends_training_named_and_bounded(shards: Path) -> None:
    server = Server(shards)
    source = resolve(f"{server.url}/", access=Access(timeout=2, retries=0))
    loader = train_loader(source, batch_size=2, img_size=32, num_workers=0, shuffle_buffer=0, seed=4)
    batches = iter(loader)
    next(batches)
    server.stop()
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=rf"shards in a row gave no sample; the last: {re.escape(server.url)}/s-\d+\.tar \(.*refused"):
        for _ in batches:
            pass
    assert time.monotonic() - start < 120  # bounded: refused connections are not waited on for ever
    with pytest.raises(ShardUnavailable, match=re.escape(server.url)):
        eval_labels(source)


def test_info_and_label_on_an_http_source(shards: Path, server: Server, tmp_path: Path, capsys,
                                          teacher_file) -> None:
    with pytest.raises(SystemExit) as exit_:
        shards_main(["info", f"{server.url}/s-{{000000..000001}}.tar"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "shards: 2  samples: 7  classes: 17" in out and "first key: k0000" in out
    labeled = tmp_path / "labeled"
    assert label_main(_label_args(f"{server.url}/", labeled, "smallcnn", teacher_file)) == 0
    manifest = json.loads((labeled / "manifest.json").read_text())
    assert [s["samples"] for s in manifest["shards"]] == COUNTS
    assert (labeled / "classes.json").read_bytes() == (shards / "classes.json").read_bytes()
    sample = next(iter_tar_samples(labeled / "s-000003.tar"))
    assert sample.key == f"k{first_index(3):04d}" and "tlm" in sample.as_dict()


def test_the_shard_cache_downloads_each_shard_once(shards: Path, server: Server, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    source = resolve(f"{server.url}/s-{{000000..000001}}.tar", access=Access(5, 1, str(cache)))
    for _ in range(2):
        assert eval_labels(source) == indices_of(range(2))
    loader = train_loader(source, batch_size=2, img_size=32, num_workers=2, shuffle_buffer=0)
    for _ in range(2):
        assert len(list(loader)) == 3
    assert server.requests["/s-000000.tar"] == server.requests["/s-000001.tar"] == 1
    cached = sorted(p.name.split("-", 1)[1] for p in cache.iterdir() if not p.name.startswith("."))
    assert cached == ["classes.json", "manifest.json", "s-000000.tar", "s-000001.tar"]  # kept for outages


def test_no_reachable_manifest_trains_with_steps_per_epoch(shards: Path, server: Server) -> None:
    from lvvit.errors import ConfigError, DataError
    from lvvit.train.cli import parse_config
    from lvvit.train.config import prepare

    (shards / "manifest.json").unlink()
    spec = f"{server.url}/s-{{000000..000002}}.tar"
    source = resolve(spec, access=FAST)
    assert source.counts is None and source.manifest is None
    loader = train_loader(source, batch_size=2, img_size=32, num_workers=0, steps_per_epoch=3)
    assert len(list(loader)) == 3
    with pytest.raises(ValueError, match="give steps_per_epoch"):
        train_loader(source, batch_size=2, img_size=32)
    with pytest.raises(ValueError, match=r"no manifest\.json is reachable"):
        eval_loader(source, batch_size=2)
    base = ["--train-shards", spec, "--deepspeed_config", str(Path(__file__).parents[1] / "ds_configs" / "cpu.json"),
            "--shard-retries", "0", "--micro-batch", "2"]
    assert prepare(parse_config([*base, "--steps-per-epoch", "3"]), 1).steps_per_epoch == 3
    with pytest.raises(ConfigError, match="pass --steps-per-epoch"):
        prepare(parse_config(base), 1)
    shutil.copy(shards / "classes.json", shards / "m.json")  # not a manifest: refused by field
    with pytest.raises(DataError, match=r"m\.json: expected an object with a 'shards' list"):
        prepare(parse_config([*base, "--train-manifest", f"{server.url}/m.json"]), 1)


# ---------------------------------------------------------------- train.py, two ranks


@pytest.mark.slow
def test_two_rank_training_from_http_matches_local(tmp_path: Path) -> None:
    """Same seed, ``--workers 0``: the http:// pattern gives the local run's steps and eval."""
    from test_train import TINY, ds_config, launch
    from test_train import write_shards as write_colour_shards

    train = write_colour_shards(tmp_path / "train", 64, 16, tlm=False, seed=0)
    evaluation = write_colour_shards(tmp_path / "eval", 24, 12, tlm=False, seed=3)
    (tmp_path / "served").mkdir()
    shutil.copytree(train, tmp_path / "served" / "train")
    shutil.copytree(evaluation, tmp_path / "served" / "eval")
    server = Server(tmp_path / "served")
    common = [*TINY, "--deepspeed_config", str(ds_config(tmp_path, 2)), "--micro-batch", "8", "--epochs", "1",
              "--cooldown-epochs", "0", "--warmup-epochs", "0", "--lr", "3e-3", "--workers", "0",
              "--no-mlflow", "--no-system-metrics", "--save-every", "0", "--seed", "7", "--log-every", "1"]
    runs = {}
    try:
        for name, base in (("local", str(tmp_path)), ("http", server.url)):
            out = tmp_path / f"out_{name}"
            proc = launch([*common, "--train-shards", f"{base}/train/data-{{000000..000002}}.tar",
                           "--eval-shards", f"{base}/eval", "--output", str(out)], None)
            log = proc.stdout + proc.stderr
            evals = re.findall(r"epoch 0 eval (\{[^}]*\})", log)
            assert evals, log[-3000:]
            runs[name] = {"steps_per_epoch": re.findall(r"(\d+) steps/epoch", log),
                          "tags": sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir()),
                          "eval": ast.literal_eval(evals[-1])}  # our own log line: a dict of floats
    finally:
        server.stop()
    assert runs["local"]["steps_per_epoch"][-1] == runs["http"]["steps_per_epoch"][-1] == "3"  # 48 / (8 x 2)
    assert runs["local"]["tags"] == runs["http"]["tags"] == ["step00000003"]
    local, remote = runs["local"]["eval"], runs["http"]["eval"]
    assert local["eval/samples"] == remote["eval/samples"] == 24
    assert local["eval/top1"] == remote["eval/top1"]
    assert local["eval/loss"] == pytest.approx(remote["eval/loss"], rel=1e-6)
    assert server.requests["/train/data-000003.tar"] == 0  # outside the pattern
