"""lvvit-serve under 16 concurrent single-image clients vs ONNX Runtime offline at the max
batch size, same model, same run.

Starts the real ``lvvit-serve`` on free loopback ports and drives it with
``tritonclient.grpc`` (one client object per thread); the baseline runs the same ONNX file
in-process at the server's max batch size. The two alternate for ``--rounds`` rounds so
a shared machine's drifting load hits both alike. Prints throughput of both, p50/p99
request latency, the mean batch the server formed (its ``lvvit_batch_size`` metric) and,
last, the ratio (target >= 0.7x). Without ``--model-dir`` it exports its own LV-ViT
(random weights) into a temporary folder with ``lvvit-export``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

from lvvit import onnxrt
from lvvit.bench.server_process import ServerProcess, console_script, scrape

TINY_EXPORT_FLAGS = ("--model", "lvvit_t", "--img-size", "64", "--num-classes", "10",
                     "--embed-dim", "48", "--depth", "2", "--num-heads", "2", "--stem-width", "16")
"""The tests' tiny LV-ViT, as ``lvvit-export`` flags."""


def lvvit_export(out: Path, *flags: str) -> Path:
    """Run the real ``lvvit-export --out OUT FLAGS`` (random weights unless a checkpoint is given)."""
    cmd = [console_script("lvvit-export"), "--out", str(out), *flags]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="export folder to serve (default: lvvit-export of lvvit_t at --img-size, "
                             "random weights, into a temporary folder)")
    parser.add_argument("--model", default="lvvit_t", help="variant of the built-in model")
    parser.add_argument("--img-size", type=int, default=224, help="input size of the built-in model")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients (default 16)")
    parser.add_argument("--requests", type=int, default=4,
                        help="timed requests per client per round (default 4)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="offline and served phases alternate this many times, so drifting "
                             "load on a shared machine hits both alike (default 3)")
    parser.add_argument("--input", choices=("images", "image_bytes"), default="images",
                        help="what clients send: the preprocessed tensor, or a 320x240 JPEG the "
                             "server decodes and preprocesses (default images)")
    parser.add_argument("--max-batch-size", type=int, default=16,
                        help="server --max-batch-size and the offline batch (default 16)")
    parser.add_argument("--max-batch-delay-ms", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=0,
                        help="ONNX Runtime intra-op threads, server and offline alike (0: ORT's choice)")


class Offline:
    """ORT in this process on one max-size batch: the baseline."""

    def __init__(self, onnx_path: Path, x: np.ndarray, threads: int) -> None:
        self.session = onnxrt.session(onnx_path, threads=threads)
        self.x = x
        self.session.run(["logits"], {"images": x})  # warm-up

    def timed(self, total: int) -> tuple[int, float]:
        """(images, seconds) for at least ``total`` images in max-size batches."""
        runs = -(-total // len(self.x))
        start = time.perf_counter()
        for _ in range(runs):
            self.session.run(["logits"], {"images": self.x})
        return runs * len(self.x), time.perf_counter() - start


def sample_jpeg(seed: int) -> bytes:
    """A 320x240 JPEG with some structure (smooth gradients plus noise)."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 200, 320, dtype=np.float32)[None, :, None]
    pixels = (ramp + rng.integers(0, 55, (240, 320, 3))).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def request_tensor(kind: str, rows: np.ndarray, i: int):
    import tritonclient.grpc as grpcclient

    if kind == "image_bytes":
        tensor = grpcclient.InferInput("image_bytes", [1], "BYTES")
        tensor.set_data_from_numpy(np.array([sample_jpeg(i)], dtype=np.object_))
    else:
        tensor = grpcclient.InferInput("images", [1, *rows.shape[1:]], "FP32")
        tensor.set_data_from_numpy(rows[i % len(rows)][None])
    return tensor


def drive(server: ServerProcess, rows: np.ndarray, clients: int, requests: int,
          kind: str = "images") -> tuple[int, float, list[float]]:
    """``clients`` threads (one tritonclient.grpc client each) sending single images back
    to back; returns (images, seconds, request latencies in s)."""
    import tritonclient.grpc as grpcclient

    latencies: list[float] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients + 1)

    def client(i: int) -> None:
        conn = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc}")
        tensor = request_tensor(kind, rows, i)
        outputs = [grpcclient.InferRequestedOutput("labels")]
        conn.infer("lvvit", [tensor], outputs=outputs)  # warm-up, untimed
        mine = []
        barrier.wait()
        for _ in range(requests):
            t0 = time.perf_counter()
            conn.infer("lvvit", [tensor], outputs=outputs)
            mine.append(time.perf_counter() - t0)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    return clients * requests, time.perf_counter() - start, latencies


def batch_stats(server: ServerProcess) -> tuple[float, float]:
    text = server.metrics_text()
    labels = 'model="lvvit"'
    return scrape(text, "lvvit_batch_size_sum", labels), scrape(text, "lvvit_batch_size_count", labels)


def run(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="lvvit-bench-serve-") as tmp:
        model_dir = args.model_dir
        if model_dir is None:
            print(f"exporting {args.model} @ {args.img_size} (random weights) with lvvit-export ...")
            model_dir = lvvit_export(Path(tmp) / "model", "--model", args.model, "--img-size",
                                     str(args.img_size), "--max-batch", str(args.max_batch_size))
        size = json.loads((model_dir / "model.json").read_text())["img_size"]
        rows = np.random.default_rng(0).standard_normal((args.max_batch_size, 3, size, size),
                                                        dtype=np.float32)
        total = args.clients * args.requests
        offline = Offline(model_dir / "model.onnx", rows, args.threads)
        server = ServerProcess(model_dir, Path(tmp) / "server.log", "--max-batch-size",
                               str(args.max_batch_size), "--max-batch-delay-ms",
                               str(args.max_batch_delay_ms), "--threads", str(args.threads))
        offline_n = offline_s = served_n = served_s = 0.0
        latencies: list[float] = []
        try:
            sum0, count0 = batch_stats(server)
            for _ in range(args.rounds):
                n, seconds = offline.timed(total)
                offline_n, offline_s = offline_n + n, offline_s + seconds
                n, seconds, lat = drive(server, rows, args.clients, args.requests, args.input)
                served_n, served_s = served_n + n, served_s + seconds
                latencies += lat
            sum1, count1 = batch_stats(server)
        finally:
            code = server.stop()
        if code != 0:
            raise RuntimeError(f"lvvit-serve exited {code}:\n{server.output()}")
    offline_rate, served_rate = offline_n / offline_s, served_n / served_s
    p50, p99 = np.percentile(np.asarray(latencies) * 1000, [50, 99])
    print(f"machine: {platform.machine()} {platform.system()}, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}; onnxruntime {ort.__version__}, intra-op threads "
          f"{args.threads or 'ORT default'}")
    print(f"model: {model_dir.name if args.model_dir else args.model} @ {size}px, "
          f"{args.clients} clients x {args.requests} single-image gRPC requests ({args.input}) "
          f"x {args.rounds} rounds, "
          f"max batch {args.max_batch_size}, delay {args.max_batch_delay_ms} ms")
    print(f"offline ONNX Runtime, batch {args.max_batch_size}: {offline_rate:8.1f} images/s")
    print(f"lvvit-serve:                     {served_rate:8.1f} images/s  "
          f"p50 {p50:.1f} ms  p99 {p99:.1f} ms  mean batch {(sum1 - sum0) / (count1 - count0):.1f}")
    print(f"ratio serve / offline: {served_rate / offline_rate:.2f}x (target >= 0.7x)")
