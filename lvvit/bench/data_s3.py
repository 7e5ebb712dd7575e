"""``lvvit-bench data --source s3``: the training loader over ``s3://`` against local disk.

The same photographic JPEGs as ``--source http`` (``lvvit.bench.data``), in 8 shards with
their manifest, on local disk and in a bucket of an S3-compatible server that the benchmark
starts on 127.0.0.1 (``python -m moto.server``, from ``moto[server]`` in the ``dev`` extra),
reached as users reach MinIO or Ceph: ``AWS_ENDPOINT_URL`` and dummy credentials, set for
this process only. The server runs as a process of its own, as a store runs apart from the
training job; it still shares this machine's cores, so the CPU seconds it spends during the
s3 rounds are printed beside the figures (a remote store spends none of the job's). The
real training loader (resampled shards, shuffle buffer, full train transform, ``--workers``
loader processes) reads each source in turn, rounds alternating; the figure is wall-clock
images/s after the first batch (median of rounds) and the ratio s3 / local (target >=
0.9x); the time to the first batch is printed apart. Shards are streamed (no
``--shard-cache``), so every round reads every shard it draws from the server again.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import torch

from lvvit.environ import scoped_environ
from lvvit.errors import ConfigError
from lvvit.ports import free_port

BUCKET = "lvvit-bench"
DUMMY_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
SERVER_START_SECONDS = 60.0
"""How long the moto server may take to answer its first request."""


class S3Server:
    """A moto S3 server process on a free port of 127.0.0.1."""

    def __init__(self) -> None:
        try:
            import moto.server  # noqa: F401
        except ImportError:
            raise ConfigError("--source s3 starts a local S3-compatible server from moto: "
                              "pip install 'moto[server]' (or the dev extra: pip install -e '.[dev]')") from None
        port = free_port()
        self.endpoint = f"http://127.0.0.1:{port}"
        self.process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + SERVER_START_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ConfigError(f"the moto S3 server exited with status {self.process.returncode} at start")
            try:
                urllib.request.urlopen(self.endpoint + "/", timeout=1).close()
                return
            except urllib.error.HTTPError:
                return  # it answers: an S3 error document is an answer
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise ConfigError(f"the moto S3 server did not answer on {self.endpoint} within {SERVER_START_SECONDS:.0f} s")

    def cpu_seconds(self) -> float:
        """User + system CPU seconds the server process has used so far (``/proc``; NaN
        where there is none)."""
        try:
            fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return float("nan")
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@contextlib.contextmanager
def loopback_s3() -> Iterator[S3Server]:
    """An ``S3Server``, this process pointed at it (endpoint and dummy credentials; the user's
    profiles and endpoint are set aside until it stops)."""
    server = S3Server()
    values: dict[str, str | None] = {**DUMMY_CREDENTIALS, "AWS_ENDPOINT_URL": server.endpoint,
                                     "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
                                     "AWS_ENDPOINT_URL_S3": None, "AWS_PROFILE": None, "AWS_SESSION_TOKEN": None}
    try:
        with scoped_environ(values):
            yield server
    finally:
        server.stop()


def upload(folder: Path, prefix: str) -> str:
    """Every file of ``folder`` into ``s3://BUCKET/prefix/`` (the endpoint of the environment)."""
    import boto3

    client = boto3.client("s3")
    client.create_bucket(Bucket=BUCKET)
    for path in sorted(folder.iterdir()):
        client.upload_file(str(path), BUCKET, f"{prefix}/{path.name}")
    return f"s3://{BUCKET}/{prefix}/"


def run_s3(args: argparse.Namespace) -> None:
    """Local shards vs the same shards in a loopback S3 bucket, in one run, rounds alternating."""
    from lvvit.bench.data import (
        cpu_info,
        interleaved_rates,
        report_rates,
        sample_jpegs,
        write_bench_shards,
    )

    torch.set_num_threads(1)
    jpegs = sample_jpegs(args.images, args.seed)
    with tempfile.TemporaryDirectory(prefix="lvvit-bench-") as tmp, loopback_s3() as server:
        folder = Path(tmp)
        write_bench_shards(folder, jpegs, per_shard=max(1, len(jpegs) // 8))
        specs = {"local": str(folder), "s3": upload(folder, "photos")}
        steps = max(2, args.passes * len(jpegs) // 32)
        size = sum(p.stat().st_size for p in folder.glob("*.tar")) / 8 / 2**20
        print(f"machine: {cpu_info()[0]}, {os.cpu_count()} vCPUs; {len(jpegs)} JPEGs in 8 shards of {size:.1f} MiB, "
              f"{args.workers} loader workers, batch 32 at {args.img_size}, {steps} batches per round; "
              f"S3: moto server process at {server.endpoint}")
        cpu_before = server.cpu_seconds()
        rounds = interleaved_rates(specs, args, steps)
        server_cpu = server.cpu_seconds() - cpu_before
    report_rates(rounds, {"local": "local disk", "s3": "loopback S3"})
    core_seconds = sum(r.seconds for r in rounds["s3"]) * (os.cpu_count() or 1)
    print(f"the S3 server process used {server_cpu:.1f} CPU s, {100 * server_cpu / core_seconds:.0f}% of the "
          f"{core_seconds:.0f} core-seconds of the timed s3 rounds: cores the loader workers did not have, which a "
          f"remote store would leave them")
