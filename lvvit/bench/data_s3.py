"""``lvvit-bench data --source s3``: the training loader over ``s3://`` against local disk.

The same photographic JPEGs as ``--source http`` (``lvvit.bench.data``), in 8 shards with
their manifest, on local disk and in a bucket of an S3-compatible server that the benchmark
starts itself on 127.0.0.1 (moto's ``ThreadedMotoServer``, from ``moto[server]`` in the
``dev`` extra), reached as users reach MinIO or Ceph: ``AWS_ENDPOINT_URL`` and dummy
credentials, set for this process only. The real training loader (resampled shards,
shuffle buffer, full train transform, ``--workers`` loader processes) reads each source
in turn, rounds alternating; the figure is wall-clock images/s (median of rounds) and the
ratio s3 / local (target >= 0.9x). Shards are streamed (no ``--shard-cache``), so every
round reads every shard it draws from the server again.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import statistics
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from lvvit.errors import ConfigError

BUCKET = "lvvit-bench"
DUMMY_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}


@contextlib.contextmanager
def loopback_s3() -> Iterator[str]:
    """A moto S3 server on a free port of 127.0.0.1, this process pointed at it (endpoint and
    dummy credentials; the user's profiles and endpoint are set aside until it stops)."""
    try:
        from moto.server import ThreadedMotoServer
    except ImportError:
        raise ConfigError("--source s3 starts a local S3-compatible server from moto: "
                          "pip install 'moto[server]' (or the dev extra: pip install -e '.[dev]')") from None
    requests_log = logging.getLogger("werkzeug")  # one line per request on stderr otherwise
    level = requests_log.level
    requests_log.setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    endpoint = "http://{}:{}".format(*server.get_host_and_port())
    names = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE",
             "AWS_SHARED_CREDENTIALS_FILE", *DUMMY_CREDENTIALS)
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update({**DUMMY_CREDENTIALS, "AWS_ENDPOINT_URL": endpoint, "AWS_CONFIG_FILE": os.devnull,
                       "AWS_SHARED_CREDENTIALS_FILE": os.devnull})
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        os.environ.pop(name, None)
    try:
        yield endpoint
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        server.stop()
        if server._server is not None:  # stop() leaves the socket listening
            server._server.server_close()
        requests_log.setLevel(level)


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
    from lvvit.bench.data import cpu_info, interleaved_rates, sample_jpegs, write_bench_shards

    torch.set_num_threads(1)
    jpegs = sample_jpegs(args.images, args.seed)
    with tempfile.TemporaryDirectory(prefix="lvvit-bench-") as tmp, loopback_s3() as endpoint:
        folder = Path(tmp)
        write_bench_shards(folder, jpegs, per_shard=max(1, len(jpegs) // 8))
        specs = {"local": str(folder), "s3": upload(folder, "photos")}
        steps = max(1, args.passes * len(jpegs) // 32)
        size = sum(p.stat().st_size for p in folder.glob("*.tar")) / 8 / 2**20
        print(f"machine: {cpu_info()[0]}, {os.cpu_count()} vCPUs; {len(jpegs)} JPEGs in 8 shards of {size:.1f} MiB, "
              f"{args.workers} loader workers, batch 32 at {args.img_size}, {steps} batches per round; "
              f"S3: moto server at {endpoint} (in this process)")
        rates = interleaved_rates(specs, args, steps)
    local, remote = statistics.median(rates["local"]), statistics.median(rates["s3"])
    print(f"\ntraining loader, images/s (median of rounds): local disk {local:.1f}, loopback S3 {remote:.1f}")
    print(f"speed ratio (s3 / local; target >= 0.9x): {remote / local:.2f}x")
