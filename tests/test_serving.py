"""lvvit-serve end to end: the real server (subprocess) on loopback ports, answered by the
official tritonclient over gRPC and HTTP, checked against ONNX Runtime on the same file."""

from __future__ import annotations

import io
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import version
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from google.protobuf import json_format, text_format
from lvvit.export.triton import write_triton_repo
from PIL import Image
from tritonclient.grpc import model_config_pb2
from tritonclient.utils import InferenceServerException

from lvvit.bench.serve import TINY_EXPORT_FLAGS, lvvit_export
from lvvit.bench.server_process import ServerProcess, console_script, scrape
from lvvit.ports import free_port

pytestmark = pytest.mark.slow

IMG, CLASSES, MAX_BATCH = 64, 10, 8
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32).reshape(3, 1, 1)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32).reshape(3, 1, 1)
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
LVVIT_SERVE = console_script("lvvit-serve")


class Server(ServerProcess):
    """lvvit-serve with the tests' limits, plus tritonclient handles."""

    def __init__(self, model_dir: Path, log_path: Path, *flags: str) -> None:
        super().__init__(model_dir, log_path, "--max-batch-size", str(MAX_BATCH), "--threads", "1",
                         *flags, env=ENV)

    def grpc_client(self) -> grpcclient.InferenceServerClient:
        return grpcclient.InferenceServerClient(f"127.0.0.1:{self.grpc}")

    def http_client(self) -> httpclient.InferenceServerClient:
        return httpclient.InferenceServerClient(f"127.0.0.1:{self.http}")

    def successes(self) -> float:
        """MLServer's success counter for the model, all version labels together."""
        text = self.metrics_text()
        return sum(float(v) for v in re.findall(
            r'^model_infer_request_success_total\{model="lvvit",[^}]*\} (\S+)$', text, re.M))

    def batch_metrics(self) -> tuple[float, float]:
        """(engine calls, engine calls of exactly one row) so far."""
        text = self.metrics_text()
        return (scrape(text, "lvvit_batch_size_count", 'model="lvvit"'),
                scrape(text, "lvvit_batch_size_bucket", 'le="1.0",model="lvvit"'))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return lvvit_export(tmp_path_factory.mktemp("export") / "tiny", *TINY_EXPORT_FLAGS,
                        "--max-batch", str(MAX_BATCH))


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    srv = Server(model_dir, tmp_path_factory.mktemp("serve") / "server.log",
                 "--max-batch-delay-ms", "20", "--max-request-mb", "2")
    yield srv
    code = srv.stop()
    assert code == 0, srv.output()


def images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, IMG, IMG), dtype=np.float32)


def encoded(width: int, height: int, fmt: str, seed: int, mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    pixels = (pixels // 2 + np.linspace(0, 120, width, dtype=np.uint8)[None, :, None])  # some structure
    buf = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buf, fmt)
    return buf.getvalue()


def eval_crop(data: bytes) -> np.ndarray:
    """The evaluation transform written out independently: shorter side to
    floor(64 / 0.9) = 71 bicubic, centre 64 crop; uint8 CHW."""
    img = Image.open(io.BytesIO(data)).convert("RGB")
    short = math.floor(IMG / 0.9)
    w, h = img.size
    size = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
    img = img.resize(size, Image.Resampling.BICUBIC)
    left, top = round((size[0] - IMG) / 2), round((size[1] - IMG) / 2)
    return np.asarray(img.crop((left, top, left + IMG, top + IMG)), dtype=np.uint8).transpose(2, 0, 1)


def eval_preprocess(data: bytes) -> np.ndarray:
    """``eval_crop`` then ImageNet mean/std."""
    return ((eval_crop(data).astype(np.float32) / 255.0 - MEAN) / STD).astype(np.float32)


def expected_topk(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return top, np.take_along_axis(probs, top, axis=1)


def label_indices(labels: np.ndarray) -> np.ndarray:
    as_text = np.vectorize(lambda v: v.decode() if isinstance(v, bytes) else v)(labels)
    return np.vectorize(lambda s: int(s.split("_")[1]))(as_text)


def grpc_infer(client, name: str, array: np.ndarray, datatype: str, **kwargs):
    tensor = grpcclient.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return client.infer("lvvit", [tensor], **kwargs)


def http_infer(client, name: str, array: np.ndarray, datatype: str, binary: bool = True, **kwargs):
    tensor = httpclient.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array, binary_data=binary)
    outputs = [httpclient.InferRequestedOutput(o, binary_data=binary) for o in ("logits", "labels", "scores")]
    return client.infer("lvvit", [tensor], outputs=outputs, **kwargs)


# ---------------------------------------------------------------- health and metadata


def test_health_and_metadata(server):
    g, h = server.grpc_client(), server.http_client()
    assert g.is_server_live() and g.is_server_ready() and g.is_model_ready("lvvit")
    assert h.is_server_live() and h.is_server_ready() and h.is_model_ready("lvvit")
    meta = h.get_model_metadata("lvvit")
    assert {t["name"]: (t["datatype"], t["shape"]) for t in meta["inputs"]} == {
        "images": ("FP32", [-1, 3, IMG, IMG]), "image_bytes": ("BYTES", [-1])}
    assert {t["name"]: (t["datatype"], t["shape"]) for t in meta["outputs"]} == {
        "logits": ("FP32", [-1, CLASSES]), "labels": ("BYTES", [-1, -1]), "scores": ("FP32", [-1, -1])}
    gmeta = g.get_model_metadata("lvvit")
    assert [(t.name, t.datatype, list(t.shape)) for t in gmeta.inputs] == [
        ("images", "FP32", [-1, 3, IMG, IMG]), ("image_bytes", "BYTES", [-1])]
    assert not h.is_model_ready("no_such_model")


def test_startup_log_says_what_is_served(server):
    log = server.output()
    assert f"gRPC 127.0.0.1:{server.grpc}" in log
    assert f"http://127.0.0.1:{server.http}/v2/models/lvvit/infer" in log
    assert "lvvit_t 64px, 10 classes" in log and "CPUExecutionProvider" in log


# ---------------------------------------------------------------- Triton conventions

DOCS = Path(__file__).resolve().parents[1] / "docs" / "serving.md"
MINIMAL_REQUEST = b'{"inputs": [{"name": "images", "datatype": "FP32", "shape": [1], "data": [0]}]}'


def http_status(server, path: str, body: bytes | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(server.url(path), data=body,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, json.loads(reply.read() or b"{}")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_version_1_routes_and_model_config_match_the_triton_repository(server, model_dir, reference, tmp_path):
    """Version "1" as in the Triton repository lvvit-export writes; get_model_config over
    both protocols gives that repository's ModelConfig (with the server's name and limits)."""
    g, h = server.grpc_client(), server.http_client()
    assert h.get_model_metadata("lvvit")["versions"] == ["1"]
    assert list(g.get_model_metadata("lvvit", "1").versions) == ["1"]
    assert h.is_model_ready("lvvit", "1") and g.is_model_ready("lvvit", "1")
    x = images(2, seed=12)
    for result in (grpc_infer(g, "images", x, "FP32", model_version="1"),
                   http_infer(h, "images", x, "FP32", model_version="1")):
        np.testing.assert_allclose(result.as_numpy("logits"), reference(x), rtol=1e-5, atol=1e-5)
    assert http_status(server, "/v2/models/lvvit/versions/2") == (
        404, {"error": "Model lvvit with version 2 not found"})
    assert http_status(server, "/v2/models/lvvit/versions/2/infer", MINIMAL_REQUEST)[0] == 404
    with pytest.raises(InferenceServerException) as err:
        grpc_infer(g, "images", x, "FP32", model_version="2")
    assert err.value.status() == "StatusCode.NOT_FOUND"

    repo = write_triton_repo(tmp_path, model_dir, json.loads((model_dir / "model.json").read_text()))
    want = text_format.Parse((repo[0] / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    want.name, want.max_batch_size = "lvvit", MAX_BATCH  # lvvit-serve's --model-name, --max-batch-size
    want.dynamic_batching.max_queue_delay_microseconds = 20_000  # --max-batch-delay-ms 20
    del want.dynamic_batching.preferred_batch_size[:]
    want.dynamic_batching.preferred_batch_size.extend([2, 4, 8])
    assert g.get_model_config("lvvit", "1").config == want
    assert g.get_model_config("lvvit").config == want
    got = h.get_model_config("lvvit", "1")
    assert got == h.get_model_config("lvvit")
    assert json_format.ParseDict(got, model_config_pb2.ModelConfig()) == want
    assert got["input"][0]["dims"] == [3, IMG, IMG] and got["output"][0]["label_filename"] == "labels.txt"
    for fail in (lambda: h.get_model_config("lvvit", "2"), lambda: g.get_model_config("nope")):
        with pytest.raises(InferenceServerException) as err:
            fail()
        assert "not found" in err.value.message()


def test_class_count_gives_triton_classification_strings(server, reference):
    """Triton's classification extension: "<value>:<index>:<label>", highest first, over
    HTTP and gRPC; more than the class count gives them all; only logits is classified."""
    x = images(3, seed=13)
    want = reference(x)
    order = np.argsort(-want, axis=1, kind="stable")
    h_out = httpclient.InferRequestedOutput("logits", class_count=3)
    via_http = server.http_client().infer("lvvit", [_http_tensor(x)], outputs=[h_out])
    tensor = grpcclient.InferInput("images", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    g_out = grpcclient.InferRequestedOutput("logits", class_count=CLASSES + 5)
    via_grpc = server.grpc_client().infer("lvvit", [tensor], model_version="1", outputs=[g_out])
    for result, count in ((via_http, 3), (via_grpc, CLASSES)):
        got = result.as_numpy("logits")
        assert got.shape == (3, count)
        for row, strings in enumerate(got):
            parts = [(s.decode() if isinstance(s, bytes) else s).split(":") for s in strings]
            assert [int(i) for _, i, _ in parts] == order[row, :count].tolist()
            assert [label for _, _, label in parts] == [f"class_{i}" for i in order[row, :count]]
            np.testing.assert_allclose([float(v) for v, _, _ in parts], want[row, order[row, :count]],
                                       atol=2e-5)
            assert all(len(v.split(".")[1]) == 6 for v, _, _ in parts)  # C's %f, as Triton writes it
    scores = httpclient.InferRequestedOutput("scores", class_count=2)
    with pytest.raises(InferenceServerException) as err:
        server.http_client().infer("lvvit", [_http_tensor(x)], outputs=[scores])
    assert err.value.status() == "400" and "only 'logits' can be classified" in err.value.message()


def _http_tensor(x: np.ndarray) -> httpclient.InferInput:
    tensor = httpclient.InferInput("images", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return tensor


@pytest.mark.parametrize(("path", "body", "status", "fragment"), [
    ("/v2/models/lvvit/infer", b"{not json", 400, "request body is not valid JSON"),
    ("/v2/models/lvvit/infer", b'{"inputs": [{"name": "images", "data": [NaN]}]}', 400,
     "request body is not valid JSON"),
    ("/v2/models/lvvit/infer", b'{"inputs": [{"name": "images"}]}', 400, "inputs.0.shape: Field required"),
    ("/v2/models/lvvit/infer", b"[1, 2]", 400, "invalid inference request"),
    ("/v2/models/nope/infer", MINIMAL_REQUEST, 404, "Model nope not found"),
    ("/v2/models/lvvit/versions/2/ready", None, 404, "Model lvvit with version 2 not found"),
    ("/v2/no/such/route", None, 404, "Not Found"),
], ids=["malformed-json", "nan-literal", "missing-fields", "not-an-object", "unknown-model",
        "unknown-version", "unknown-route"])
def test_client_errors_have_the_v2_error_shape(server, path, body, status, fragment):
    got_status, got = http_status(server, path, body)
    assert got_status == status and list(got) == ["error"] and fragment in got["error"], got


def test_docs_client_script_runs_against_lvvit_serve(server, reference, tmp_path):
    """The Triton client in docs/serving.md, unchanged: version 1, the model configuration
    and class_count; its top classes are the model's on the evaluation preprocessing."""
    text = DOCS.read_text()
    block = text[text.index("<!-- triton-client-script"):]
    script = tmp_path / "classify.py"
    start = block.index("```python\n") + len("```python\n")
    script.write_text(block[start: block.index("\n```", start)] + "\n")
    files = []
    for i, (w, h, fmt, mode) in enumerate(FILES[:2]):
        files.append(tmp_path / f"image{i}.{fmt.lower()}")
        files[-1].write_bytes(encoded(w, h, fmt, seed=20 + i, mode=mode))
    run = subprocess.run([sys.executable, str(script), *map(str, files), "--url", f"127.0.0.1:{server.http}",
                          "--top", "3"], capture_output=True, text=True, env=ENV, timeout=120)
    assert run.returncode == 0, run.stderr
    want = reference(np.stack([eval_preprocess(f.read_bytes()) for f in files]))
    lines = run.stdout.splitlines()
    for i, path in enumerate(files):
        at = lines.index(str(path))
        top = np.argsort(-want[i], kind="stable")[:3]
        assert lines[at + 1: at + 4] == [f"  class_{c}  class {c}  logit {want[i, c]:.4f}" for c in top]


# ---------------------------------------------------------------- answers match ONNX Runtime


def test_grpc_images_match_onnxruntime(server, reference):
    x = images(3, seed=1)
    result = grpc_infer(server.grpc_client(), "images", x, "FP32", parameters={"top_k": 3})
    want = reference(x)
    np.testing.assert_allclose(result.as_numpy("logits"), want, rtol=1e-5, atol=1e-5)
    top, scores = expected_topk(want, 3)
    assert result.as_numpy("labels").shape == (3, 3)
    np.testing.assert_array_equal(label_indices(result.as_numpy("labels")), top)
    np.testing.assert_allclose(result.as_numpy("scores"), scores, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("binary", "compression"), [(True, None), (False, None), (True, "gzip"), (False, "deflate")],
                         ids=["binary-tensors", "json-tensors", "binary-gzip", "json-deflate"])
def test_http_images_match_onnxruntime(server, reference, binary, compression):
    x = images(2, seed=2)
    result = http_infer(server.http_client(), "images", x, "FP32", binary=binary,
                        request_compression_algorithm=compression)
    want = reference(x)
    np.testing.assert_allclose(result.as_numpy("logits"), want, rtol=1e-5, atol=1e-5)
    top, scores = expected_topk(want, 5)
    np.testing.assert_array_equal(label_indices(result.as_numpy("labels")), top)
    np.testing.assert_allclose(result.as_numpy("scores"), scores, rtol=1e-5, atol=1e-6)


def test_only_requested_outputs_come_back(server, reference):
    x = images(1, seed=3)
    tensor = grpcclient.InferInput("images", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    result = server.grpc_client().infer("lvvit", [tensor], outputs=[grpcclient.InferRequestedOutput("scores")])
    assert [o.name for o in result.get_response().outputs] == ["scores"]
    np.testing.assert_allclose(result.as_numpy("scores"), expected_topk(reference(x), 5)[1], rtol=1e-5)


FILES = [  # (width, height, format, mode): portrait, landscape, square; JPEG and PNG; grey and RGBA
    (80, 120, "JPEG", "RGB"), (150, 90, "PNG", "RGB"), (64, 64, "PNG", "RGBA"), (97, 71, "JPEG", "L"),
]


def test_image_bytes_match_eval_preprocessing(server, reference):
    files = [encoded(w, h, fmt, seed=i, mode=mode) for i, (w, h, fmt, mode) in enumerate(FILES)]
    want = reference(np.stack([eval_preprocess(f) for f in files]))
    batch = np.array(files, dtype=np.object_)
    via_grpc = grpc_infer(server.grpc_client(), "image_bytes", batch, "BYTES")
    via_http = http_infer(server.http_client(), "image_bytes", batch.reshape(-1, 1), "BYTES")
    for result in (via_grpc, via_http):
        np.testing.assert_allclose(result.as_numpy("logits"), want, rtol=1e-4, atol=1e-4)
        np.testing.assert_array_equal(label_indices(result.as_numpy("labels")), expected_topk(want, 5)[0])


# ---------------------------------------------------------------- concurrency and batching


def test_64_concurrent_requests_are_batched_and_right(server, reference):
    x = images(64, seed=4)
    want = reference(x)
    calls_before, ones_before = server.batch_metrics()
    successes_before = server.successes()
    local = threading.local()

    def one(i: int) -> np.ndarray:
        if i % 2:  # tritonclient.http clients are not thread-safe: one per thread
            local.http = getattr(local, "http", None) or server.http_client()
            return http_infer(local.http, "images", x[i:i + 1], "FP32").as_numpy("logits")
        local.grpc = getattr(local, "grpc", None) or server.grpc_client()
        return grpc_infer(local.grpc, "images", x[i:i + 1], "FP32").as_numpy("logits")

    with ThreadPoolExecutor(64) as pool:
        got = np.concatenate(list(pool.map(one, range(64))))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    calls_after, ones_after = server.batch_metrics()
    calls, single = calls_after - calls_before, ones_after - ones_before
    assert calls < 64 and single < calls, f"{calls} engine calls, {single} of one row: no batching"
    assert server.successes() - successes_before == 64


# ---------------------------------------------------------------- bad input


def _jpeg_truncated() -> bytes:
    data = encoded(120, 100, "JPEG", seed=9)
    return data[: len(data) // 2]


BAD_REQUESTS = {
    # name: (input name, array, datatype, extra infer kwargs, message fragment)
    "wrong-shape": ("images", np.zeros((1, 3, 32, 32), np.float32), "FP32", {}, "shape [1, 3, 32, 32]"),
    "transposed-same-size": ("images", np.zeros((1, IMG, 3, IMG), np.float32), "FP32", {},
                             f"shape [1, {IMG}, 3, {IMG}]"),
    "wrong-dtype": ("images", np.zeros((1, 3, IMG, IMG), np.float64), "FP64", {}, "datatype FP64"),
    "undecodable-image": ("image_bytes", np.array([b"not an image"], np.object_), "BYTES", {},
                          "element 0: cannot decode image"),
    "truncated-jpeg": ("image_bytes", np.array([_jpeg_truncated()], np.object_), "BYTES", {},
                       "element 0: cannot decode image"),
    "batch-above-limit": ("images", np.zeros((MAX_BATCH + 1, 3, IMG, IMG), np.float32), "FP32", {},
                          f"batch of {MAX_BATCH + 1} is above this server's limit of {MAX_BATCH}"),
    "unknown-input": ("pixels", np.zeros((1, 3, IMG, IMG), np.float32), "FP32", {}, "unknown input 'pixels'"),
    "bad-top-k": ("images", np.zeros((1, 3, IMG, IMG), np.float32), "FP32",
                  {"parameters": {"top_k": CLASSES + 1}}, "parameter 'top_k'"),
}


@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_input_is_rejected_and_neighbours_succeed(server, reference, case, protocol):
    name, array, datatype, kwargs, fragment = BAD_REQUESTS[case]
    good = images(1, seed=5)
    want = reference(good)
    stop = threading.Event()
    good_results: list[np.ndarray] = []

    def keep_asking() -> None:  # good requests in flight the whole time
        client = server.grpc_client()
        while not stop.is_set() or not good_results:
            good_results.append(grpc_infer(client, "images", good, "FP32").as_numpy("logits"))

    worker = threading.Thread(target=keep_asking)
    worker.start()
    try:
        with pytest.raises(InferenceServerException) as err:
            if protocol == "grpc":
                grpc_infer(server.grpc_client(), name, array, datatype, **kwargs)
            else:
                http_infer(server.http_client(), name, array, datatype, **kwargs)
    finally:
        stop.set()
        worker.join(timeout=60)
    assert fragment in err.value.message()
    assert err.value.status() == ("StatusCode.INVALID_ARGUMENT" if protocol == "grpc" else "400")
    assert good_results
    for got in good_results:
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert server.proc.poll() is None


def test_unknown_output_is_rejected(server):
    x = images(1, seed=6)
    tensor = grpcclient.InferInput("images", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    with pytest.raises(InferenceServerException, match="unknown output 'probs'"):
        server.grpc_client().infer("lvvit", [tensor], outputs=[grpcclient.InferRequestedOutput("probs")])


def test_oversized_requests_are_refused(server):
    body = b"{" + b" " * (3 * 1024 * 1024) + b"}"  # 3 MB > --max-request-mb 2
    request = urllib.request.Request(f"http://127.0.0.1:{server.http}/v2/models/lvvit/infer",
                                     data=body, headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=30)
    assert err.value.code == 413 and b"--max-request-mb" in err.value.read()
    big = np.zeros((MAX_BATCH, 3, IMG * 3, IMG * 3), np.float32)  # 3.5 MB gRPC message
    with pytest.raises(InferenceServerException) as gerr:
        grpc_infer(server.grpc_client(), "images", big, "FP32")
    assert gerr.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
    assert server.grpc_client().is_server_ready()


def test_malformed_binary_request_is_a_400(server):
    header = b'{"inputs": [{"name": "images", "datatype": "FP32", "shape": [1, 3, 64, 64], ' \
             b'"parameters": {"binary_data_size": 49152}}]}'
    body = header + b"\0" * 100  # far fewer tensor bytes than announced
    request = urllib.request.Request(
        f"http://127.0.0.1:{server.http}/v2/models/lvvit/infer", data=body,
        headers={"Content-Type": "application/octet-stream",
                 "Inference-Header-Content-Length": str(len(header))})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=30)
    assert err.value.code == 400
    assert b"input 'images': binary_data_size 49152 runs past the request body" in err.value.read()


# ---------------------------------------------------------------- lifecycle


def test_uint8_model_then_sigterm_finishes_in_flight_request(tmp_path):
    """A ``--uint8-input`` export (raw pixels in, normalised in the graph): image_bytes get
    the eval crop without normalisation; then SIGTERM lands mid-request, which is answered,
    and the server exits 0."""
    model_dir = lvvit_export(tmp_path / "u8", *TINY_EXPORT_FLAGS, "--uint8-input")
    session = ort.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    srv = Server(model_dir, tmp_path / "server.log")
    try:
        files = [encoded(w, h, fmt, seed=10 + i, mode=mode) for i, (w, h, fmt, mode) in enumerate(FILES[:2])]
        pixels = np.stack([eval_crop(f) for f in files])
        result = grpc_infer(srv.grpc_client(), "image_bytes", np.array(files, np.object_), "BYTES")
        np.testing.assert_allclose(result.as_numpy("logits"), session.run(["logits"], {"images": pixels})[0],
                                   rtol=1e-4, atol=1e-4)

        x = np.random.default_rng(7).integers(0, 256, (1, 3, IMG, IMG), dtype=np.uint8)
        tensor = httpclient.InferInput("images", list(x.shape), "UINT8")
        tensor.set_data_from_numpy(x, binary_data=False)
        body, _ = httpclient.InferenceServerClient.generate_request_body([tensor])
        # Headers and half the body first, so the request is in flight when SIGTERM lands.
        sock = socket.create_connection(("127.0.0.1", srv.http), timeout=60)
        sock.sendall(f"POST /v2/models/lvvit/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                     f"\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body[: len(body) // 2])
        time.sleep(0.5)
        srv.proc.send_signal(signal.SIGTERM)
        time.sleep(1.0)
        sock.sendall(body[len(body) // 2:])
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
        sock.close()
        head, _, payload = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), reply[:300]
        logits = httpclient.InferenceServerClient.parse_response_body(payload).as_numpy("logits")
        np.testing.assert_allclose(logits, session.run(["logits"], {"images": x})[0], rtol=1e-5, atol=1e-5)
        assert srv.proc.wait(timeout=30) == 0
        assert "SIGTERM: finishing in-flight requests" in srv.output()
        assert "stopped cleanly" in srv.output()
    finally:
        srv.stop()


def test_bad_model_dir_and_provider_fail_with_clear_errors(model_dir, tmp_path):
    def serve(folder: Path, *flags: str) -> subprocess.CompletedProcess:
        return subprocess.run([LVVIT_SERVE, "--model-dir", str(folder), *flags, "--http-port",
                               str(free_port()), "--grpc-port", str(free_port()), "--metrics-port",
                               str(free_port())], capture_output=True, text=True, env=ENV, timeout=180)

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "model.onnx").write_bytes(b"")
    run = serve(empty)
    assert run.returncode != 0 and f"{empty / 'model.json'}: missing" in run.stderr
    run = serve(model_dir, "--provider", "tensorrt")
    assert run.returncode != 0 and "--provider tensorrt needs TensorrtExecutionProvider" in run.stderr
    corrupt = tmp_path / "corrupt"
    shutil.copytree(model_dir, corrupt)
    (corrupt / "model.onnx").write_bytes((model_dir / "model.onnx").read_bytes()[:1000])
    run = serve(corrupt)  # passes the folder checks, fails in ONNX Runtime at model load
    assert run.returncode == 1 and "stopped without a stop signal" in run.stdout + run.stderr


def test_workers_serve_or_refuse_clearly(model_dir, tmp_path):
    """``--workers N`` runs the model in MLServer worker processes, which MLServer 1.7.1 cannot
    start with uvloop >= 0.22; then lvvit-serve must refuse with the reason, else serve."""
    uvloop = tuple(int(p) for p in re.findall(r"\d+", version("uvloop"))[:2])
    if uvloop >= (0, 22):
        run = subprocess.run([LVVIT_SERVE, "--model-dir", str(model_dir), "--workers", "1"],
                             capture_output=True, text=True, env=ENV, timeout=120)
        assert run.returncode != 0 and "needs uvloop < 0.22" in run.stderr
        return
    srv = Server(model_dir, tmp_path / "server.log", "--workers", "2")
    try:
        x = images(2, seed=11)
        got = grpc_infer(srv.grpc_client(), "images", x, "FP32").as_numpy("logits")
        assert got.shape == (2, CLASSES)
        assert srv.batch_metrics()[0] >= 1
    finally:
        assert srv.stop() == 0


def test_batcher_packs_rows_up_to_the_limit_and_routes_answers():
    """Rows, not requests, are counted: a request that would overflow the batch starts the
    next one, every batch stays within the limit, and each caller gets its own rows back."""
    import asyncio

    from lvvit.serving.batcher import DynamicBatcher

    seen: list[int] = []

    def run(batch: np.ndarray) -> np.ndarray:
        seen.append(len(batch))
        time.sleep(0.02)  # the engine is busy while more requests queue
        return batch * 2

    async def main() -> list[np.ndarray]:
        batcher = DynamicBatcher(run, max_batch=4, max_delay_s=0.05)
        sizes = [1, 3, 2, 2, 3, 1, 4]
        requests = [np.full((n, 1), i, dtype=np.float32) for i, n in enumerate(sizes)]
        try:
            return await asyncio.gather(*(batcher.submit(r) for r in requests))
        finally:
            batcher.close()

    answers = asyncio.run(main())
    for i, (answer, n) in enumerate(zip(answers, [1, 3, 2, 2, 3, 1, 4], strict=True)):
        np.testing.assert_array_equal(answer, np.full((n, 1), 2 * i, dtype=np.float32))
    assert sum(seen) == 16 and max(seen) <= 4 and seen == [4, 4, 4, 4]
