"""The demo's last stage: held-out images classified by the trained weights in PyTorch and
by ``lvvit-serve`` through the official ``tritonclient``; the two must agree."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import tritonclient.grpc as grpcclient

from lvvit.bench.server_process import ServerProcess
from lvvit.data.decode import EvalTransform, normalize
from lvvit.models import create_model
from lvvit.serving.model_dir import load_model_dir


def held_out(val_root: Path) -> tuple[list[bytes], np.ndarray, list[str]]:
    """JPEG bytes and labels of ``val_root/<class>/*.jpg`` in class-folder order."""
    classes = sorted(p.name for p in val_root.iterdir() if p.is_dir())
    files, labels = [], []
    for index, name in enumerate(classes):
        for path in sorted((val_root / name).glob("*.jpg")):
            files.append(path.read_bytes())
            labels.append(index)
    return files, np.array(labels), classes


@torch.no_grad()
def torch_predictions(model_dir: Path, weights: Path, files: list[bytes]) -> np.ndarray:
    """Argmax of the PyTorch model on the server's own preprocessing (from model.json)."""
    meta = json.loads((model_dir / "model.json").read_text())
    model = create_model(meta["model"], img_size=meta["img_size"], num_classes=meta["num_classes"],
                         checkpoint=weights, **meta.get("model_args", {})).eval()
    transform = EvalTransform(img_size=meta["img_size"], crop_pct=meta["crop_pct"])
    pixels = torch.from_numpy(np.stack([transform(f) for f in files])).permute(0, 3, 1, 2)
    return torch.cat([model(normalize(chunk)).argmax(1) for chunk in pixels.split(64)]).numpy()


def server_predictions(server: ServerProcess, files: list[bytes], batch: int = 16) -> np.ndarray:
    """Top-1 class index from the server's ``logits`` for ``image_bytes`` requests over gRPC."""
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc}")
    predictions = []
    for start in range(0, len(files), batch):
        chunk = np.array(files[start : start + batch], dtype=np.object_)
        request = grpcclient.InferInput("image_bytes", [len(chunk)], "BYTES")
        request.set_data_from_numpy(chunk)
        result = client.infer("lvvit", [request], outputs=[grpcclient.InferRequestedOutput("logits")])
        predictions.append(result.as_numpy("logits").argmax(1))
    client.close()
    return np.concatenate(predictions)


def classify_through_server(model_dir: Path, val_root: Path, weights: Path, log: Path) -> dict:
    files, labels, classes = held_out(val_root)
    served = load_model_dir(model_dir)
    if list(served.labels) != classes:
        raise RuntimeError(f"{model_dir}/labels.txt {list(served.labels)} != class folders {classes}")
    expected = torch_predictions(model_dir, weights, files)
    print(f"    starting lvvit-serve on {model_dir} (log: {log})", flush=True)
    server = ServerProcess(model_dir, log)
    try:
        got = server_predictions(server, files)
    finally:
        code = server.stop()
    print(f"    server stopped (exit code {code})", flush=True)
    return {
        "images": len(files),
        "torch_top1": float((expected == labels).mean()),
        "server_top1": float((got == labels).mean()),
        "agreement": float((got == expected).mean()),
        "server_exit_code": code,
    }
