"""lvvit-export end to end on a tiny LV-ViT: the real CLI, ONNX Runtime on the written file,
Triton's own config schema, and a real MLflow server."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from lvvit.export.errors import ExportError
from lvvit.export.folder import verify_export_dir
from lvvit.export.onnx_export import io_spec, load_onnx, metadata_props
from lvvit.export.parity import parity_pixels
from lvvit.export.triton import TensorSpec, config_text

from lvvit.data.decode import normalize
from lvvit.models import create_model
from lvvit.ports import free_port

TINY = {"embed_dim": 48, "depth": 2, "num_heads": 2, "stem_width": 16}
TINY_FLAGS = ["--model", "lvvit_t", "--img-size", "64", "--embed-dim", "48", "--depth", "2",
              "--num-heads", "2", "--stem-width", "16"]
NUM_CLASSES = 10
CLASS_NAMES = [f"kind {i} / ü" for i in range(NUM_CLASSES)]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}


def tiny_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = create_model("lvvit_t", img_size=64, num_classes=NUM_CLASSES, **TINY).eval()
    # non-trivial BatchNorm statistics, so folding them into the stem convs is exercised
    for bn in (model.patch_embed.bn1, model.patch_embed.bn2, model.patch_embed.bn3):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    return model


def export(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lvvit.export.cli", *args], env=ENV,
                          capture_output=True, text=True, timeout=300)


def run_onnx(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"images": x})[0]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("export")


@pytest.fixture(scope="module")
def checkpoint(workdir) -> dict:
    """An official-format (timm-style) checkpoint: `module.` prefixes, EMA, argparse args."""
    weights, ema = tiny_model(1), tiny_model(2)
    path = workdir / "ckpt" / "model_best.pth.tar"
    path.parent.mkdir()
    torch.save({
        "state_dict": {f"module.{k}": v for k, v in weights.state_dict().items()},
        "state_dict_ema": ema.state_dict(),
        "args": argparse.Namespace(model="lvvit_t", img_size=64),
        "epoch": 3,
    }, path)
    classes = workdir / "classes.json"
    classes.write_text(json.dumps(
        [{"index": i, "name": n, "wnid": f"n{i:08d}"} for i, n in reversed(list(enumerate(CLASS_NAMES)))]
    ))
    return {"path": path, "weights": weights, "ema": ema, "classes": classes}


@pytest.fixture(scope="module")
def fp32_export(workdir, checkpoint) -> dict:
    """One CLI run: EMA weights, class names, Triton repository, and --trt on this CPU box."""
    out = workdir / "fp32"
    proc = export(*TINY_FLAGS, "--checkpoint", str(checkpoint["path"]), "--ema", "--classes",
                  str(checkpoint["classes"]), "--out", str(out), "--max-batch", "8", "--trt",
                  "--triton-repo")
    return {"out": out, "proc": proc}


def test_export_from_checkpoint_passes_parity_with_the_ema_weights(fp32_export, checkpoint):
    out = fp32_export["out"]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["labels.txt", "model.json", "model.onnx", "parity.json", "triton"] + (["model.plan"] if TRT_HERE else [])
    )
    parity = json.loads((out / "parity.json").read_text())["onnxruntime"]
    assert parity["passed"] and [b["batch"] for b in parity["batches"]] == [1, 8]
    for b in parity["batches"]:
        assert b["max_abs_diff"] <= 1e-4 and b["top1_agreement"] == 1.0
    info = json.loads((out / "model.json").read_text())
    assert info["model"] == "lvvit_t" and info["img_size"] == 64 and info["num_classes"] == NUM_CLASSES
    assert info["input_dtype"] == "float32" and info["precision"] == "fp32" and info["max_batch"] == 8
    assert info["opset"] >= 18 and info["ema"] and info["source_checkpoint"].endswith("model_best.pth.tar")
    assert info["crop_pct"] == 0.9 and info["mean"] == [0.485, 0.456, 0.406]

    # ONNX Runtime on fresh inputs reproduces the EMA model, not the raw weights
    pixels = parity_pixels(5, 64, seed=123)
    x = normalize(pixels)
    got = run_onnx(out / "model.onnx", x.numpy())
    with torch.inference_mode():
        want, raw = checkpoint["ema"](x).numpy(), checkpoint["weights"](x).numpy()
    assert np.abs(got - want).max() < 1e-4
    assert np.abs(got - raw).max() > 1e-2

    proto = load_onnx(out / "model.onnx")
    assert proto.opset_import[0].version >= 18
    assert io_spec(proto)["input"]["dims"] == [-1, 3, 64, 64]
    assert not list(out.glob("*.data"))  # one self-contained file


def test_class_names_travel_in_labels_and_metadata(fp32_export):
    out = fp32_export["out"]
    assert (out / "labels.txt").read_text(encoding="utf-8").splitlines() == CLASS_NAMES
    meta = metadata_props(onnx.load(out / "model.onnx"))
    assert json.loads(meta["class_names"]) == CLASS_NAMES
    assert meta["model"] == "lvvit_t" and json.loads(meta["num_classes"]) == NUM_CLASSES
    # the same metadata as ONNX Runtime clients see it
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert json.loads(session.get_modelmeta().custom_metadata_map["class_names"]) == CLASS_NAMES


TRT_HERE = importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available()


@pytest.mark.skipif(not TRT_HERE, reason="needs tensorrt and a CUDA GPU")
def test_trt_engine_is_built_checked_and_served_from_the_repository(fp32_export):
    out = fp32_export["out"]
    assert fp32_export["proc"].returncode == 0, fp32_export["proc"].stderr
    assert (out / "model.plan").stat().st_size > 0
    assert json.loads((out / "parity.json").read_text())["tensorrt"]["passed"]
    cfg = parse_config((out / "triton" / "lvvit_trt" / "config.pbtxt").read_text())
    assert cfg.platform == "tensorrt_plan"
    assert_config_matches_onnx(cfg, out / "model.onnx", max_batch=8)


@pytest.mark.skipif(TRT_HERE, reason="TensorRT can run here")
def test_trt_without_tensorrt_exits_with_one_clear_line_and_keeps_the_onnx(fp32_export):
    proc = fp32_export["proc"]
    assert proc.returncode == 3, proc.stderr
    line = [ln for ln in proc.stderr.splitlines() if ln.startswith("lvvit-export:")]
    assert len(line) == 1
    assert "tensorrt package is not installed" in line[0]
    assert "no CUDA GPU is visible" in line[0]
    assert "pip install 'lvvit[trt]'" in line[0] and "pypi.nvidia.com" in line[0]
    assert (fp32_export["out"] / "model.onnx").is_file()
    assert not (fp32_export["out"] / "model.plan").exists()
    verify_export_dir(fp32_export["out"])


def parse_config(text: str):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(text, model_config_pb2.ModelConfig())


def assert_config_matches_onnx(cfg, onnx_path: Path, max_batch: int) -> None:
    from tritonclient.grpc import model_config_pb2 as pb

    spec = io_spec(onnx.load(onnx_path))
    triton_type = {"float32": pb.TYPE_FP32, "uint8": pb.TYPE_UINT8}
    assert cfg.max_batch_size == max_batch
    assert [i.name for i in cfg.input] == [spec["input"]["name"]]
    assert [o.name for o in cfg.output] == [spec["output"]["name"]]
    assert cfg.input[0].data_type == triton_type[spec["input"]["dtype"]]
    assert cfg.output[0].data_type == triton_type[spec["output"]["dtype"]]
    # Triton dims leave out the batch axis, which must be the ONNX model's dynamic one
    assert spec["input"]["dims"][0] == -1 and spec["output"]["dims"][0] == -1
    assert list(cfg.input[0].dims) == spec["input"]["dims"][1:]
    assert list(cfg.output[0].dims) == spec["output"]["dims"][1:]
    assert cfg.output[0].label_filename == "labels.txt"
    assert cfg.HasField("dynamic_batching")
    assert all(1 <= b <= max_batch for b in cfg.dynamic_batching.preferred_batch_size)


def test_triton_repository_configs_follow_triton_schema_and_the_onnx_model(fp32_export):
    from tritonclient.grpc import model_config_pb2 as pb

    repo = fp32_export["out"] / "triton"
    assert sorted(p.name for p in repo.iterdir()) == ["lvvit_onnx"] + (["lvvit_trt"] if TRT_HERE else [])
    model_dir = repo / "lvvit_onnx"
    cfg = parse_config((model_dir / "config.pbtxt").read_text())
    assert cfg.name == "lvvit_onnx" and cfg.platform == "onnxruntime_onnx"
    assert_config_matches_onnx(cfg, model_dir / "1" / "model.onnx", max_batch=8)
    assert [g.kind for g in cfg.instance_group] == [pb.ModelInstanceGroup.KIND_CPU]
    assert (model_dir / "labels.txt").read_text(encoding="utf-8").splitlines() == CLASS_NAMES
    assert (model_dir / "1" / "model.onnx").read_bytes() == (fp32_export["out"] / "model.onnx").read_bytes()

    # the GPU variants the CLI writes with --triton-trt-accelerator and with an engine
    info = json.loads((fp32_export["out"] / "model.json").read_text())
    inp = TensorSpec("images", info["input_dtype"], (3, 64, 64))
    out = TensorSpec("logits", "float32", (NUM_CLASSES,))
    accel = parse_config(config_text("m", "onnxruntime_onnx", 8, inp, out, gpu=True, trt_accelerator="FP16"))
    assert [g.kind for g in accel.instance_group] == [pb.ModelInstanceGroup.KIND_GPU]
    (trt_accel,) = accel.optimization.execution_accelerators.gpu_execution_accelerator
    assert trt_accel.name == "tensorrt" and trt_accel.parameters["precision_mode"] == "FP16"
    plan_cfg = parse_config(config_text("m_trt", "tensorrt_plan", 8, inp, out, gpu=True))
    assert plan_cfg.platform == "tensorrt_plan"
    assert_config_matches_onnx(plan_cfg, model_dir / "1" / "model.onnx", max_batch=8)
    with pytest.raises(ExportError, match="needs GPU instances"):
        config_text("m", "onnxruntime_onnx", 8, inp, out, gpu=False, trt_accelerator="FP32")


def test_uint8_input_graph_equals_the_float_graph_on_the_same_pixels(workdir, checkpoint, fp32_export):
    out = workdir / "uint8"
    proc = export(*TINY_FLAGS, "--checkpoint", str(checkpoint["path"]), "--ema", "--out", str(out),
                  "--max-batch", "4", "--uint8-input", "--triton-repo", str(workdir / "repo_u8"))
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "model.json").read_text())["input_dtype"] == "uint8"
    pixels = parity_pixels(3, 64, seed=7)
    from_uint8 = run_onnx(out / "model.onnx", pixels.numpy())
    from_float = run_onnx(fp32_export["out"] / "model.onnx", normalize(pixels).numpy())
    assert np.abs(from_uint8 - from_float).max() < 1e-4
    assert (from_uint8.argmax(1) == from_float.argmax(1)).all()
    cfg = parse_config((workdir / "repo_u8" / "lvvit_onnx" / "config.pbtxt").read_text())
    assert_config_matches_onnx(cfg, out / "model.onnx", max_batch=4)


def test_fp16_export_passes_parity_and_a_failed_parity_writes_nothing(workdir, checkpoint):
    out = workdir / "fp16"
    proc = export(*TINY_FLAGS, "--checkpoint", str(checkpoint["path"]), "--out", str(out),
                  "--max-batch", "4", "--precision", "fp16")
    assert proc.returncode == 0, proc.stderr
    proto = onnx.load(out / "model.onnx")
    spec = io_spec(proto)
    assert spec["input"]["dtype"] == "float32" and spec["output"]["dtype"] == "float32"
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in proto.graph.initializer)
    report = json.loads((out / "parity.json").read_text())["onnxruntime"]
    assert report["passed"] and report["precision"] == "fp16"
    assert all(0 < b["max_abs_diff"] <= b["allowed_abs_diff"] for b in report["batches"])

    failed = workdir / "fp16_strict"
    proc = export(*TINY_FLAGS, "--checkpoint", str(checkpoint["path"]), "--out", str(failed),
                  "--max-batch", "4", "--precision", "fp16", "--parity-atol", "1e-9")
    assert proc.returncode == 1
    assert "fails parity" in proc.stderr and "FAIL" in proc.stdout
    assert not failed.exists()
    assert not [p for p in workdir.iterdir() if p.name.startswith(".fp16_strict")]  # no staging left


def test_opset_23_writes_standard_attention_that_matches_the_default_graph(workdir, checkpoint, fp32_export):
    """--opset 23 (the documented ONNX Runtime CPU option): ONNX's own Attention op instead of
    the decomposed softmax(QK^T)V, no runtime-specific ops, same parity and the same logits."""
    out = workdir / "opset23"
    proc = export(*TINY_FLAGS, "--checkpoint", str(checkpoint["path"]), "--ema", "--out", str(out),
                  "--max-batch", "4", "--opset", "23")
    assert proc.returncode == 0, proc.stderr
    proto = load_onnx(out / "model.onnx")  # full checker and the serving interface
    assert proto.opset_import[0].version == 23 and json.loads((out / "model.json").read_text())["opset"] == 23
    ops = [(n.domain, n.op_type) for n in proto.graph.node]
    assert ops.count(("", "Attention")) == TINY["depth"] and ("", "Softmax") not in ops
    assert {domain for domain, _ in ops} == {""}
    report = json.loads((out / "parity.json").read_text())["onnxruntime"]
    assert report["passed"] and all(b["max_abs_diff"] <= 1e-4 for b in report["batches"])
    x = normalize(parity_pixels(3, 64, seed=11)).numpy()
    assert np.abs(run_onnx(out / "model.onnx", x) - run_onnx(fp32_export["out"] / "model.onnx", x)).max() < 1e-4


def test_bf16_is_refused_where_onnx_runtime_cannot_check_it(workdir, checkpoint):
    """ORT's CPU provider has no bf16 Conv kernel: an unchecked model must not be written."""
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu checks bf16 on the GPU")
    out = workdir / "bf16"
    proc = export(*TINY_FLAGS, "--checkpoint", str(checkpoint["path"]), "--out", str(out),
                  "--max-batch", "1", "--precision", "bf16")
    assert proc.returncode == 1
    assert "has no kernel" in proc.stderr and "--precision fp16" in proc.stderr
    assert not out.exists()


def test_corrupted_model_file_gets_a_clear_error(workdir, fp32_export):
    for damage in ("truncate", "garble"):
        copy = workdir / f"damaged_{damage}"
        shutil.copytree(fp32_export["out"], copy, ignore=shutil.ignore_patterns("triton"))
        model = copy / "model.onnx"
        data = model.read_bytes()
        if damage == "truncate":
            model.write_bytes(data[: len(data) // 2])
        else:
            mid = len(data) // 3
            model.write_bytes(data[:mid] + bytes(range(256)) * 8 + data[mid + 2048:])
        with pytest.raises(ExportError) as err:
            verify_export_dir(copy)
        assert str(model) in str(err.value)
        message = "truncated or corrupted" if damage == "truncate" else "SHA-256 differs"
        assert message in str(err.value)
    with pytest.raises(ExportError, match="truncated or corrupted"):
        load_onnx(workdir / "damaged_truncate" / "model.onnx")
    proc = export("--check", str(workdir / "damaged_truncate"))
    assert proc.returncode == 1
    assert proc.stderr.startswith("lvvit-export: error:") and "model.onnx" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert export("--check", str(fp32_export["out"])).returncode == 0


def test_bad_inputs_fail_fast_and_name_the_culprit(workdir, checkpoint):
    wrong = workdir / "three.txt"
    wrong.write_text("a\nb\nc\n")
    proc = export(*TINY_FLAGS, "--checkpoint", str(checkpoint["path"]), "--classes", str(wrong),
                  "--out", str(workdir / "never"))
    assert proc.returncode == 1 and "3 names for a 10-class model" in proc.stderr
    proc = export(*TINY_FLAGS, "--checkpoint", str(checkpoint["path"]), "--num-classes", "7",
                  "--out", str(workdir / "never"))
    assert proc.returncode == 1 and "has 10 classes" in proc.stderr and "--num-classes 10" in proc.stderr
    proc = export(*TINY_FLAGS, "--checkpoint", str(workdir / "missing.pth"), "--out", str(workdir / "never"))
    assert proc.returncode == 1 and "missing.pth" in proc.stderr
    taken = workdir / "taken_repo"
    (taken / "lvvit_onnx").mkdir(parents=True)
    proc = export(*TINY_FLAGS, "--out", str(workdir / "never"), "--triton-repo", str(taken))
    assert proc.returncode == 1 and "lvvit_onnx already exists; pass --overwrite" in proc.stderr
    assert not (workdir / "never").exists()


DEEPSPEED_SAVE = """
import os, sys
os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                  MASTER_PORT=sys.argv[2], DS_ACCELERATOR="cpu")
import torch, deepspeed
from lvvit.models import create_model
args = {"name": "lvvit_t", "img_size": 64, "num_classes": 10, "embed_dim": 48, "depth": 2,
        "num_heads": 2, "stem_width": 16}
torch.manual_seed(3)
model = create_model(**args)
cfg = {"train_batch_size": 1, "zero_optimization": {"stage": 2},
       "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}
engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
engine.save_checkpoint(sys.argv[1], tag="step00000001", client_state={"lvvit": {"model_args": args}})
torch.save(model.state_dict(), sys.argv[1] + "/../reference.pt")
"""


@pytest.mark.slow
def test_deepspeed_checkpoint_folder_is_consolidated_with_its_recorded_architecture(tmp_path):
    ckpt = tmp_path / "run" / "checkpoints"
    ckpt.mkdir(parents=True)
    subprocess.run([sys.executable, "-c", DEEPSPEED_SAVE, str(ckpt), str(free_port())],
                   env=ENV, check=True, capture_output=True, timeout=300)
    out = tmp_path / "out"
    # no architecture flags: name, size, classes and overrides come from the checkpoint's record
    proc = export("--checkpoint", str(ckpt / "step00000001"), "--out", str(out), "--max-batch", "2")
    assert proc.returncode == 0, proc.stderr
    info = json.loads((out / "model.json").read_text())
    assert (info["model"], info["img_size"], info["num_classes"]) == ("lvvit_t", 64, 10)
    assert info["model_args"] == TINY
    model = create_model("lvvit_t", img_size=64, num_classes=NUM_CLASSES, **TINY).eval()
    model.load_state_dict(torch.load(tmp_path / "run" / "reference.pt"))
    x = normalize(parity_pixels(2, 64, seed=9))
    with torch.inference_mode():
        want = model(x).numpy()
    assert np.abs(run_onnx(out / "model.onnx", x.numpy()) - want).max() < 1e-4


def export_lineage_names_the_checkpoints_run(client, uri: str, out: Path, trained_by: str, tmp: Path) -> None:
    """An export logged to another run (``--mlflow-run``) with its calibration source: the run
    and the new model version name the training run; the source is a dataset of the run."""
    from lvvit.export.tracking import log_export
    from test_lineage import fake_shards

    from lvvit.data.source import resolve
    from lvvit.digest import file_sha256
    from lvvit.train.lineage import dataset

    calib = fake_shards(tmp / "calib", [5, 7])
    other = client.create_run(client.get_experiment_by_name("Default").experiment_id).info.run_id
    log_export(out, other, "lvvit-test", uri, [dataset(resolve(calib), "calibration", 8)], trained_by)
    assert client.get_run(other).data.tags["lvvit.checkpoint_run"] == trained_by
    versions = sorted(client.search_model_versions("name='lvvit-test'"), key=lambda v: int(v.version))
    assert [(v.run_id, v.tags["lvvit.checkpoint_run"]) for v in versions] == [(trained_by, trained_by),
                                                                              (other, trained_by)]
    (used,) = client.get_run(other).inputs.dataset_inputs
    assert used.dataset.digest == file_sha256(calib / "manifest.json")[:32]
    assert {t.key: t.value for t in used.tags} == {"mlflow.data.context": "calibration", "lvvit.used_samples": "8"}


@pytest.mark.slow
def test_mlflow_logs_and_registers_the_export_in_the_training_run(tmp_path, fp32_export, checkpoint, caplog):
    import mlflow
    from lvvit.export.tracking import find_run_record, log_export
    from mlflow.tracking import MlflowClient

    port = free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
         "--default-artifact-root", str(tmp_path / "artifacts"), "--workers", "1"],
        env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        mlflow.set_tracking_uri(uri)
        deadline = time.time() + 120
        while True:
            try:
                run_id = MlflowClient(uri).create_run(
                    MlflowClient(uri).get_experiment_by_name("Default").experiment_id).info.run_id
                break
            except Exception:
                if time.time() > deadline or server.poll() is not None:
                    raise
                time.sleep(1)
        # training leaves mlflow_run.json in its output folder, above the checkpoints
        run_folder = checkpoint["path"].parent
        (run_folder / "mlflow_run.json").write_text(json.dumps({"run_id": run_id, "tracking_uri": uri}))
        record = find_run_record(run_folder / "checkpoints" / "step00000010")
        assert record == {"run_id": run_id, "tracking_uri": uri}

        model_uri = log_export(fp32_export["out"], record["run_id"], "lvvit-test", record["tracking_uri"],
                               checkpoint_run=run_id)
        client = MlflowClient(uri)
        assert client.get_run(run_id).info.status == "RUNNING"  # a live training run stays live
        (version,) = client.search_model_versions("name='lvvit-test'")
        assert version.run_id == run_id and version.tags["lvvit.checkpoint_run"] == run_id
        assert "lvvit.checkpoint_run" not in client.get_run(run_id).data.tags  # the run is its own
        export_lineage_names_the_checkpoints_run(client, uri, fp32_export["out"], run_id, tmp_path)
        artifacts = {a.path for a in client.list_artifacts(run_id, "export")}
        assert artifacts == {"export/parity.json", "export/model.json", "export/labels.txt"}

        with caplog.at_level("WARNING", logger="mlflow"):
            loaded = mlflow.pyfunc.load_model(model_uri)
        # the model asks only for providers this onnxruntime has, so loading it here is quiet
        available = ort.get_available_providers()
        assert loaded.metadata.flavors["onnx"]["providers"] == [
            p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        assert not [r for r in caplog.records if "unavailable" in r.getMessage()]
        inputs = loaded.metadata.get_input_schema().inputs
        assert inputs[0].name == "images" and inputs[0].shape == (-1, 3, 64, 64)
        x = normalize(parity_pixels(2, 64, seed=5)).numpy()
        got = loaded.predict({"images": x})["logits"]
        np.testing.assert_allclose(got, run_onnx(fp32_export["out"] / "model.onnx", x), atol=1e-5)
    finally:
        (checkpoint["path"].parent / "mlflow_run.json").unlink(missing_ok=True)
        server.terminate()
        server.wait(timeout=30)
