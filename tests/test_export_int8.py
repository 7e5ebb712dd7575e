"""lvvit-export --precision int8 end to end: a tiny LV-ViT trained here on a trivially
separable colour task, shards written here, the real CLI, the real lvvit-serve answered by
tritonclient, and ONNX Runtime in-process as the reference."""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import tritonclient.http as httpclient
from lvvit.export.triton import write_triton_repo
from lvvit.serving.process import ServerProcess
from PIL import Image

from lvvit.data.transforms import normalize
from lvvit.models import create_model

TINY = {"embed_dim": 48, "depth": 2, "num_heads": 2, "stem_width": 16}
TINY_FLAGS = ["--model", "lvvit_t", "--img-size", "64", "--embed-dim", "48", "--depth", "2",
              "--num-heads", "2", "--stem-width", "16", "--max-batch", "8"]
COLOURS = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200], [200, 200, 40]], np.float32)
"""Class k is an image of colour k under brightness changes and noise."""
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
CALIBRATION = 32


def colour_images(n: int, seed: int, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """``n`` uint8 HWC images and their classes."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(COLOURS), n)
    scale = rng.uniform(0.6, 1.2, (n, 1, 1, 1))
    noise = rng.normal(0, 30, (n, size, size, 3))
    images = COLOURS[labels][:, None, None, :] * scale + noise
    return np.clip(images, 0, 255).astype(np.uint8), labels


def write_shards(root: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    """One shard of JPEG + class samples and its manifest."""
    root.mkdir(parents=True)
    with tarfile.open(root / "s-000000.tar", "w") as tar:
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            jpeg = io.BytesIO()
            Image.fromarray(image).save(jpeg, format="JPEG", quality=95)
            for suffix, data in (("jpg", jpeg.getvalue()), ("cls", str(label).encode())):
                info = tarfile.TarInfo(f"k{i:04d}.{suffix}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    manifest = {"shards": [{"name": "s-000000.tar", "samples": len(labels)}], "total": len(labels)}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def train_tiny(path: Path) -> None:
    """A few seconds of AdamW on the colour task, saved as an official-format checkpoint.
    Eval mode throughout: plain logits, no MixToken, BatchNorm statistics left as built."""
    torch.manual_seed(0)
    model = create_model("lvvit_t", img_size=64, num_classes=len(COLOURS), **TINY)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    images, labels = colour_images(1024, seed=1)
    x = normalize(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous())
    y = torch.from_numpy(labels)
    model.eval()
    for step in range(48):
        batch = slice(32 * (step % 32), 32 * (step % 32 + 1))
        loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    torch.save({"state_dict": model.state_dict(), "args": argparse.Namespace(model="lvvit_t", img_size=64)}, path)


def export(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lvvit.export.cli", *args], env=ENV,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("int8")
    train_tiny(root / "model.pth.tar")
    images, labels = colour_images(CALIBRATION + 96, seed=2)
    return {
        "root": root,
        "checkpoint": root / "model.pth.tar",
        "outlier_checkpoint": with_hidden_outlier(root / "model.pth.tar", root / "outlier.pth.tar"),
        "shards": write_shards(root / "shards", images, labels),
    }


def with_hidden_outlier(path: Path, out: Path) -> Path:
    """The trained model with one stem channel pinned at 1e4 that the projection ignores
    (zero weights): fp32 logits are unchanged, but the projection's int8 input is one
    per-tensor scale, which the outlier stretches until every real channel rounds to 0.
    Activation outliers are how quantization breaks real networks; the gate must see it."""
    ckpt = torch.load(path, weights_only=False)
    state = ckpt["state_dict"]
    state["patch_embed.bn3.bias"][0] = 1e4
    state["patch_embed.proj.weight"][:, 0] = 0.0
    torch.save(ckpt, out)
    return out


@pytest.fixture(scope="module")
def int8_export(work) -> tuple[Path, subprocess.CompletedProcess]:
    """One export run serves several tests: split calibration, Triton repository and --trt."""
    out = work["root"] / "int8"
    done = export("--out", str(out), "--checkpoint", str(work["checkpoint"]), *TINY_FLAGS,
                  "--precision", "int8", "--calibration-shards", str(work["shards"]),
                  "--calibration-samples", str(CALIBRATION), "--triton-repo", "--no-mlflow", "--trt")
    return out, done


def test_int8_export_is_calibrated_from_shards_and_passes_the_accuracy_gate(int8_export):
    out, done = int8_export
    assert done.returncode in (0, 3), done.stderr[-3000:]
    info = json.loads((out / "model.json").read_text())
    assert info["precision"] == "int8" and info["format"] == "QDQ"
    assert info["tensorrt_source"] == "model.onnx"
    assert info["quantization"]["calibration_samples"] == CALIBRATION
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == [
        "labels.txt", "model.json", "model.onnx", "parity.json"]
    graph = onnx.load(out / "model.onnx").graph
    ops = {n.op_type for n in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "MatMul", "LayerNormalization", "Softmax"} <= ops
    assert any(t.data_type == onnx.TensorProto.INT8 for t in graph.initializer)
    # the attention products (MatMul of two activations) stay float: no DequantizeLinear feeds them
    produced_by = {out: n.op_type for n in graph.node for out in n.output}
    weights = {t.name for t in graph.initializer}
    float_matmuls = [n for n in graph.node if n.op_type == "MatMul"
                     and all(produced_by.get(i) != "DequantizeLinear" and i not in weights for i in n.input)]
    assert len(float_matmuls) == 2 * 2 and "attention" in info["quantization"]["kept_float"]  # 2 per block
    convs = [n for n in graph.node if n.op_type == "Conv"]
    assert produced_by.get(convs[0].input[0]) != "DequantizeLinear"  # the input convolution stays float
    assert all(produced_by.get(c.input[0]) == "DequantizeLinear" for c in convs[1:])  # the rest of the stem is int8
    gate = json.loads((out / "parity.json").read_text())["int8_accuracy"]
    assert gate["passed"] and gate["images"] == 96  # exactly the samples calibration did not see
    assert gate["fp32_top1"] >= 0.95, "the tiny model did not learn the colour task"
    assert gate["top1_agreement"] >= 0.99 and gate["top1_drop"] <= 0.005
    assert "int8 accuracy gate on 96 held-out images" in done.stdout
    check = export("--check", str(out))
    assert check.returncode == 0 and "int8" in check.stdout, check.stderr


def test_trt_on_int8_without_a_gpu_exits_with_one_line(int8_export):
    out, done = int8_export
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the INT8 engine is built instead")
    assert done.returncode == 3
    errors = [line for line in done.stderr.splitlines() if line.startswith("lvvit-export:")]
    assert len(errors) == 1 and "TensorRT engine not built" in errors[0], done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert not (out / "model.plan").exists() and (out / "model.onnx").is_file()


def test_triton_repository_serves_the_int8_graph(int8_export, tmp_path):
    out, _ = int8_export
    model = out / "triton" / "lvvit_onnx"
    assert (model / "1" / "model.onnx").read_bytes() == (out / "model.onnx").read_bytes()
    assert 'platform: "onnxruntime_onnx"' in (model / "config.pbtxt").read_text()
    # on GPU instances ONNX Runtime's TensorRT accelerator must build INT8 from the QDQ scales
    info = json.loads((out / "model.json").read_text())
    (gpu_model,) = write_triton_repo(tmp_path, out, info, gpu=True, trt_accelerator=True)
    assert 'parameters { key: "precision_mode" value: "INT8" }' in (gpu_model / "config.pbtxt").read_text()


def test_activation_outlier_fails_the_gate_and_writes_nothing(work):
    """Same fp32 accuracy, int8 broken by a hidden activation outlier: the gate must refuse,
    give the figures and leave no export behind."""
    out = work["root"] / "broken"
    done = export("--out", str(out), "--checkpoint", str(work["outlier_checkpoint"]), *TINY_FLAGS,
                  "--precision", "int8", "--calibration-shards", str(work["shards"]),
                  "--calibration-samples", str(CALIBRATION), "--no-mlflow")
    assert done.returncode == 1, done.stderr[-3000:]
    error = [line for line in done.stderr.splitlines() if line.startswith("lvvit-export: error:")]
    assert len(error) == 1 and "FAIL" in error[0] and "agreement with fp32" in error[0], done.stderr[-2000:]
    assert "drop" in error[0] and "nothing written" in error[0]
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".broken")]


def test_int8_without_calibration_shards_is_a_usage_error(work):
    done = export("--out", str(work["root"] / "none"), *TINY_FLAGS, "--precision", "int8")
    assert done.returncode == 2 and "--calibration-shards" in done.stderr


def test_served_int8_model_answers_tritonclient_like_onnx_runtime(int8_export, work):
    out, _ = int8_export
    images, _ = colour_images(8, seed=3)
    x = normalize(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()).numpy()
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(out / "model.onnx"), options, providers=["CPUExecutionProvider"])
    expected = session.run(["logits"], {"images": x})[0]
    server = ServerProcess(out, work["root"] / "serve.log", "--threads", "1", env=ENV)
    try:
        client = httpclient.InferenceServerClient(f"127.0.0.1:{server.http}")
        request = httpclient.InferInput("images", list(x.shape), "FP32")
        request.set_data_from_numpy(x)
        logits = client.infer("lvvit", [request]).as_numpy("logits")
    finally:
        server.stop()
    assert logits.shape == expected.shape
    np.testing.assert_array_equal(logits.argmax(1), expected.argmax(1))
