"""lvvit-export --precision int8 end to end: a tiny LV-ViT trained here on a trivially
separable colour task, shards written here, the real CLI, the real lvvit-serve answered by
tritonclient, and ONNX Runtime in-process as the reference."""

from __future__ import annotations

import argparse
import http.server
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import tritonclient.http as httpclient
from lvvit.export.triton import write_triton_repo
from PIL import Image

from lvvit import onnxrt
from lvvit.bench.server_process import ServerProcess
from lvvit.data.decode import normalize
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
    session = onnxrt.session(out / "model.onnx", threads=1)
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


def with_near_ties(path: Path, out: Path) -> Path:
    """The trained model with 6 classes: class 3 (yellow) switched off and two near-identical
    twins of its head rows as classes 4 and 5, which no label names. Yellow images are then
    wrong in both graphs, and which twin wins is a near-tie that int8 rounding flips: equal
    top-1, lower agreement, as on a trained model whose close classes swap."""
    ckpt = torch.load(path, weights_only=False)
    state = ckpt["state_dict"]
    gen = torch.Generator().manual_seed(0)
    for head in ("head", "aux_head"):
        w, b = state[f"{head}.weight"], state[f"{head}.bias"]
        twins = w[3].repeat(2, 1) + 1e-3 * w[3].abs().max() * torch.randn(2, w.shape[1], generator=gen)
        state[f"{head}.weight"] = torch.cat([w[:3], torch.zeros_like(w[3:]), twins])
        state[f"{head}.bias"] = torch.cat([b[:3], torch.tensor([-100.0]), b[3].repeat(2)])
    torch.save(ckpt, out)
    return out


def staging_left(out: Path) -> list[str]:
    return [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def int8_flags(work: dict, checkpoint: Path, *extra: str) -> list[str]:
    return ["--checkpoint", str(checkpoint), *TINY_FLAGS, "--precision", "int8", "--calibration-shards",
            str(work["shards"]), "--calibration-samples", str(CALIBRATION), "--no-mlflow", *extra]


def test_near_ties_pass_the_accuracy_gate_and_agreement_is_a_flag(work):
    ties = with_near_ties(work["checkpoint"], work["root"] / "ties.pth.tar")
    out = work["root"] / "ties"
    done = export("--out", str(out), *int8_flags(work, ties))
    assert done.returncode == 0, done.stderr[-3000:]
    gate = json.loads((out / "parity.json").read_text())["int8_accuracy"]
    assert gate["int8_top1"] == gate["fp32_top1"] and gate["top1_agreement"] < 0.99, gate
    assert gate["passed"] and (gate["max_top1_drop"], gate["min_agreement"]) == (0.005, 0.0)
    assert "(not gated)" in done.stdout
    strict = work["root"] / "ties-strict"
    refused = export("--out", str(strict), *int8_flags(work, ties, "--int8-min-agreement", "99"))
    assert refused.returncode == 1, refused.stderr[-3000:]
    error = [line for line in refused.stderr.splitlines() if line.startswith("lvvit-export: error:")]
    assert len(error) == 1 and "FAIL" in error[0] and "(need 99%)" in error[0], refused.stderr[-2000:]
    assert not strict.exists() and not staging_left(strict)


def test_eval_labels_outside_the_models_classes_are_refused(work):
    images, labels = colour_images(16, seed=4)
    shards = write_shards(work["root"] / "eval-7", images, labels + len(COLOURS))  # 4..7 for a 4-class model
    out = work["root"] / "labels"
    done = export("--out", str(out), *int8_flags(work, work["checkpoint"], "--eval-shards", str(shards)))
    assert done.returncode == 1, done.stderr[-3000:]
    error = [line for line in done.stderr.splitlines() if line.startswith("lvvit-export: error:")]
    assert len(error) == 1 and f"--eval-shards {shards}: label " in error[0], done.stderr[-2000:]
    assert "is outside the model's classes 0..3" in error[0]
    assert not out.exists() and not staging_left(out)


def drip_server(folder: Path) -> http.server.ThreadingHTTPServer:
    """Serves ``folder`` on 127.0.0.1: JSON at once, each ``.tar`` one byte per 0.1 s (a
    calibration read that does not end while the test looks at it)."""

    class Drip(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = folder / self.path.lstrip("/")
            if not path.is_file():
                self.send_error(404)
                return
            data = path.read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            try:
                if path.suffix != ".tar":
                    self.wfile.write(data)
                    return
                for i in range(len(data)):
                    self.wfile.write(data[i:i + 1])
                    self.wfile.flush()
                    time.sleep(0.1)
            except OSError:
                return  # the client went away

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Drip)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_sigterm_during_calibration_leaves_no_staging_folder(work):
    server = drip_server(work["shards"])
    out = work["root"] / "killed"
    url = f"http://127.0.0.1:{server.server_address[1]}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "lvvit.export.cli", "--out", str(out), *TINY_FLAGS, "--precision", "int8",
         "--calibration-shards", url, "--calibration-samples", str(CALIBRATION), "--no-mlflow"],
        env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not any((out.parent / name / "model.fp32.onnx").is_file() for name in staging_left(out)):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-2000:]
            time.sleep(0.05)
        time.sleep(1.0)  # the parity check passed, calibration is reading the dripping shard
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    finally:
        proc.kill()
        server.shutdown()
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert stderr.strip().splitlines()[-1] == "lvvit-export: terminated (SIGTERM); nothing written"
    assert not out.exists() and not staging_left(out)
