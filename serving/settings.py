"""MLServer's ``settings.json`` and ``model-settings.json`` for one export folder.

``lvvit-serve`` writes both into a settings folder and starts MLServer from it the way
``mlserver start FOLDER`` does, so the files are the whole server configuration: keep
them (``--settings-dir``) to see, diff or replay exactly what ran. (Plain ``mlserver
start`` lacks lvvit-serve's REST middleware: no request size limit on REST and no binary
tensors over HTTP; gRPC is the same.)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lvvit.export.triton import VERSION
from lvvit.serving.model_dir import ModelDir
from lvvit.serving.protocol import InputSpec, metadata_tensors

from lvvit.atomic import write_json

RUNTIME = "lvvit.serving.runtime.LVViTRuntime"
MODEL_VERSION = VERSION
"""The served model's version: "1", the version folder of the Triton repository that
lvvit-export writes, so /v2/models/NAME/versions/1/... means the same model on both servers."""
EXTENSIONS = ["binary_tensor_data", "classification", "model_configuration"]
"""Triton protocol extensions lvvit-serve answers (server metadata ``extensions``)."""


@dataclass(frozen=True)
class ServeOptions:
    """Everything ``lvvit-serve`` is told on its command line, minus the model folder."""

    model_name: str = "lvvit"
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    max_batch_size: int = 32
    max_batch_delay_ms: float = 5.0
    workers: int = 0
    provider: str = "cpu"
    threads: int = 0
    max_request_mb: float = 64.0
    max_image_mpix: float = 100.0
    max_request_mpix: float = 1000.0
    decode_threads: int = 0  # 0: one per CPU core this process may use
    read_timeout_s: float = 60.0  # for a REST request to arrive whole (serving/connections.py)
    debug: bool = False

    @property
    def max_request_bytes(self) -> int:
        return int(self.max_request_mb * 1024 * 1024)

    @property
    def max_image_pixels(self) -> int:
        return int(self.max_image_mpix * 1_000_000)

    @property
    def max_request_pixels(self) -> int:
        return int(self.max_request_mpix * 1_000_000)


def server_settings(opts: ServeOptions, metrics_dir: Path) -> dict:
    return {
        "server_name": "lvvit-serve",
        "debug": opts.debug,  # MLServer's debug means access logs + DEBUG level
        "host": opts.host,
        "http_port": opts.http_port,
        "grpc_port": opts.grpc_port,
        "metrics_port": opts.metrics_port,
        "parallel_workers": opts.workers,
        "metrics_dir": str(metrics_dir),
        "grpc_max_message_length": opts.max_request_bytes,
        "load_models_at_startup": True,
        "extensions": EXTENSIONS,
    }


def model_settings(model_dir: ModelDir, opts: ServeOptions) -> dict:
    spec = InputSpec(img_size=model_dir.img_size, dtype=model_dir.input_dtype,
                     num_classes=model_dir.num_classes, max_batch=opts.max_batch_size)
    inputs, outputs = metadata_tensors(spec)
    return {
        "name": opts.model_name,
        "implementation": RUNTIME,
        "platform": "onnxruntime",
        "versions": [MODEL_VERSION],
        "inputs": [t.model_dump(exclude_none=True) for t in inputs],
        "outputs": [t.model_dump(exclude_none=True) for t in outputs],
        # MLServer's adaptive batching stays off: the runtime batches validated rows itself.
        "max_batch_size": 0,
        "max_batch_time": 0.0,
        "parameters": {
            "uri": str(model_dir.path.resolve()),
            "version": MODEL_VERSION,
            "extra": {
                "provider": opts.provider,
                "threads": opts.threads,
                "max_batch_size": opts.max_batch_size,
                "max_batch_delay_ms": opts.max_batch_delay_ms,
                "max_image_pixels": opts.max_image_pixels,
                "max_request_pixels": opts.max_request_pixels,
                "decode_threads": opts.decode_threads,
            },
        },
    }


def write_settings(folder: str | Path, model_dir: ModelDir, opts: ServeOptions) -> Path:
    """``folder/settings.json`` + ``folder/<model>/model-settings.json``; returns ``folder``."""
    folder = Path(folder)
    (folder / opts.model_name).mkdir(parents=True, exist_ok=True)
    write_json(folder / "settings.json", server_settings(opts, folder / ".metrics"))
    write_json(folder / opts.model_name / "model-settings.json", model_settings(model_dir, opts))
    return folder
