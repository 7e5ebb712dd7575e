"""Every failure ends the process by itself: a loader worker's error, a shard that cannot be
read, SIGTERM during set-up. Real ``python train.py`` processes (tiny LV-ViT, tiny shards,
``--workers 2`` so that loader workers exist), a real HTTP server on 127.0.0.1.

Before, a rank whose loader failed printed the error and hung: its workers, started with
SIGTERM blocked, never ended on ``terminate()``, and multiprocessing's exit handler joined
them forever.
"""

from __future__ import annotations

import functools
import http.server
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import webdataset as wds
from test_shard_sources import Handler, Server
from test_train import COMMON, REPO, command, write_shards

pytestmark = pytest.mark.slow

# 32 samples, micro batch 8, one rank, one epoch of 4 steps, then the eval
ONE_EPOCH = [*COMMON, "--epochs", "1", "--cooldown-epochs", "0", "--save-every", "0", "--workers", "2",
             "--shard-retries", "0", "--no-mlflow", "--deepspeed_config", str(REPO / "ds_configs" / "cpu.json")]
ENDS_WITHIN = 90.0  # seconds from the start; the runs take under 15 s here, a hang never ends


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("exits")
    eval_dir = write_shards(root / "eval", 16, 8, tlm=False, seed=3)
    (eval_dir / "data-000001.tar").unlink()  # listed in the manifest, answered with 404
    undecodable = root / "undecodable"
    undecodable.mkdir()
    with wds.TarWriter(str(undecodable / "data-000000.tar")) as sink:
        for i in range(600):  # more than MAX_SKIPS_IN_A_ROW
            sink.write({"__key__": f"s{i:05d}", "jpg": b"not a jpeg", "cls": b"0"})
    (undecodable / "manifest.json").write_text('{"shards": [{"name": "data-000000.tar", "samples": 600}], '
                                               '"total": 600}')
    return {"train": write_shards(root / "train", 32, 16, tlm=False, seed=5), "eval": eval_dir,
            "undecodable": undecodable}


def run_to_end(args: list[str]) -> tuple[subprocess.CompletedProcess, float]:
    """``python train.py ARGS``, which must end by itself; its result and wall time."""
    cmd, env = command(args, None, ranks=0)
    started = time.monotonic()
    try:
        done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=ENDS_WITHIN)
    except subprocess.TimeoutExpired as hung:
        raise AssertionError(f"no exit after {ENDS_WITHIN} s:\n{hung.stdout}\n{hung.stderr}") from None
    return done, time.monotonic() - started


def test_an_eval_shard_that_answers_404_ends_the_run(shards, tmp_path):
    server = Server(shards["eval"])
    try:
        done, took = run_to_end(["--train-shards", str(shards["train"]), "--eval-shards", f"{server.url}/",
                                 "--output", str(tmp_path / "out"), *ONE_EPOCH])
    finally:
        server.stop()
    text = done.stdout + done.stderr
    assert done.returncode == 1, text[-3000:]
    assert f"eval shard {server.url}/data-000001.tar cannot be read" in done.stderr.strip().splitlines()[-1]
    assert "step 4 loss" in text  # it trained, then the final eval failed
    print(f"\n[figures] eval shard 404: exited {done.returncode} after {took:.1f} s")


def test_a_train_loader_worker_that_fails_ends_the_run(shards, tmp_path):
    done, took = run_to_end(["--train-shards", str(shards["undecodable"]), "--no-eval",
                             "--output", str(tmp_path / "out"), *ONE_EPOCH])
    text = done.stdout + done.stderr
    assert done.returncode == 1, text[-3000:]
    assert "samples in a row failed to decode" in done.stderr.strip().splitlines()[-1]
    print(f"\n[figures] train worker error: exited {done.returncode} after {took:.1f} s")


def test_an_eval_shard_gone_since_the_start_is_an_error_and_the_workers_end(shards, tmp_path):
    """A local eval shard deleted after the source was resolved: an error naming it (it was
    skipped before, changing the metric), raised from a worker started under the
    preemption shield (signals blocked); the process then ends by itself."""
    folder = tmp_path / "eval"
    write_shards(folder, 16, 8, tlm=False, seed=3)
    script = f"""
import os
import torch.distributed as dist
from lvvit.loader.pipeline import eval_loader
from lvvit.data.source import resolve
from lvvit.ports import free_port
from lvvit.train.preemption import DEFAULT_SIGNALS, Preemption, parse_signals
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{{free_port()}}", rank=0, world_size=1)
source = resolve({str(folder)!r})
os.unlink(source.urls[1])
shield = Preemption(parse_signals(DEFAULT_SIGNALS), 60.0)
for _ in shield.shielded(eval_loader(source, batch_size=4, img_size=32, num_workers=2, world_size=1, rank=0)):
    pass
"""
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                          timeout=ENDS_WITHIN, env=command([], None, ranks=0)[1])
    took = time.monotonic() - started
    assert done.returncode == 1, done.stderr[-3000:]
    assert f"eval shard {folder / 'data-000001.tar'} cannot be read: FileNotFoundError" in done.stderr
    print(f"\n[figures] local eval shard gone: exited after {took:.1f} s")


class HeldManifest(Handler):
    """Holds every ``manifest.json`` request until ``release`` is set; ``arrived`` says one came."""

    arrived: threading.Event
    release: threading.Event

    def do_GET(self) -> None:
        if not self.path.endswith("manifest.json"):
            return super().do_GET()
        self.arrived.set()
        self.release.wait(60)  # then closes without an answer: the client is gone by then
        return None


def test_sigterm_during_setup_exits_143_without_a_traceback(shards, tmp_path):
    """SIGTERM while the trainer, its process group already up, reads the train manifest (held
    by the server): status 143 as docs/training.md says, one line, no traceback, no output."""
    arrived, release = threading.Event(), threading.Event()
    handler = type("H", (HeldManifest,), {"requests": Counter(), "cut": set(), "arrived": arrived,
                                          "release": release})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(handler, directory=str(shards["train"])))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    out = tmp_path / "out"
    cmd, env = command(["--train-shards", f"http://127.0.0.1:{server.server_port}/", "--no-eval",
                        "--output", str(out), *ONE_EPOCH], None, ranks=0)
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert arrived.wait(ENDS_WITHIN), "the manifest was never asked for"
        proc.terminate()
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        release.set()
        proc.kill()
        server.shutdown()
        server.server_close()
    assert proc.returncode == 143, stderr[-3000:]
    assert "Traceback" not in stdout + stderr
    assert "SIGTERM during set-up; exiting with 143" in stderr
    assert not (out / "checkpoints").exists()


def test_img_size_0_is_refused_before_any_compute(shards, tmp_path):
    done, _ = run_to_end(["--train-shards", str(shards["train"]), "--no-eval", "--output", str(tmp_path / "out"),
                          *ONE_EPOCH, "--img-size", "0"])
    assert done.returncode != 0 and "--img-size" in done.stderr, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "step 1" not in done.stdout + done.stderr
