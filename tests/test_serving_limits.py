"""lvvit-serve stays bounded: huge JPEGs decode at reduced DCT scale within a memory
ceiling, pixel limits are checked from the headers before decoding, and non-finite
tensors are refused; clients that stall mid-request are cut off after the read deadline.
The real server (subprocess), answered by the official tritonclient."""

from __future__ import annotations

import io
import json
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from PIL import Image
from tritonclient.utils import InferenceServerException

from lvvit.bench.serve import TINY_EXPORT_FLAGS, lvvit_export
from lvvit.bench.server_process import ServerProcess
from lvvit.data.decode import EvalTransform, jpeg_top_rows

pytestmark = pytest.mark.slow

IMG, BIG, MAX_BATCH, REQUEST_MPIX, READ_TIMEOUT = 64, 9000, 16, 700, 4
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32).reshape(3, 1, 1)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32).reshape(3, 1, 1)
GIB = 1024**3


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return lvvit_export(tmp_path_factory.mktemp("export") / "tiny", *TINY_EXPORT_FLAGS)


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    """Eight decode threads, so all eight images of the big request decode at once, and a
    per-request pixel budget of 700 MP (8 x 81 MP fit, 9 do not); per-image limit default;
    a 4 s read deadline, so that stalled clients are cut off within the test."""
    srv = ServerProcess(model_dir, tmp_path_factory.mktemp("serve") / "server.log",
                        "--max-batch-size", str(MAX_BATCH), "--threads", "1", "--decode-threads", "8",
                        "--max-request-mpix", str(REQUEST_MPIX), "--read-timeout-s", str(READ_TIMEOUT),
                        env={**os.environ, "OMP_NUM_THREADS": "1"})
    yield srv
    assert srv.stop() == 0, srv.output()


def jpeg(width: int, height: int, seed: int) -> bytes:
    """A photo-like JPEG (smooth colour fields plus a little noise): coarse random noise
    upsampled bilinearly, so a 9000 x 9000 one is about a megabyte, as a real photo is."""
    coarse = np.random.default_rng(seed).integers(0, 256, (height // 500 + 2, width // 500 + 2, 3), np.uint8)
    img = Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def claims_size(data: bytes, width: int, height: int) -> bytes:
    """The same small JPEG with a frame header that claims ``width x height``: a header
    check refuses it without decoding; anything that decoded first would fail differently."""
    data = jpeg_top_rows(data, height)  # patches the height field of the SOF
    sof = data.index(b"\xff\xc0")
    return data[: sof + 7] + width.to_bytes(2, "big") + data[sof + 9:]


def expected_rows(files: list[bytes]) -> np.ndarray:
    """The offline evaluation transform on the same files, normalised: the server must agree."""
    crops = np.stack([EvalTransform(IMG, 0.9)(f).transpose(2, 0, 1) for f in files]).astype(np.float32)
    return ((crops / 255.0 - MEAN) / STD).astype(np.float32)


def proc_status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def grpc_infer(srv: ServerProcess, name: str, array: np.ndarray, datatype: str):
    tensor = grpcclient.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return grpcclient.InferenceServerClient(f"127.0.0.1:{srv.grpc}").infer("lvvit", [tensor])


def post_json(srv: ServerProcess, body: bytes) -> tuple[int, str]:
    request = urllib.request.Request(srv.url("/v2/models/lvvit/infer"), data=body,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def good_request_succeeds(srv: ServerProcess, reference) -> None:
    x = np.random.default_rng(0).standard_normal((2, 3, IMG, IMG), dtype=np.float32)
    np.testing.assert_allclose(grpc_infer(srv, "images", x, "FP32").as_numpy("logits"), reference(x),
                               rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- huge JPEGs, bounded memory


def test_eight_9000px_jpegs_are_answered_within_1gb_of_idle(server, reference):
    files = [jpeg(BIG, BIG, seed) for seed in range(8)]
    assert all(len(f) < 4 * 1024**2 for f in files)
    good_request_succeeds(server, reference)  # warm: every lazy set-up done before measuring
    pid = server.proc.pid
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # reset VmHWM (peak RSS) to the current RSS
    idle_kib = proc_status_kib(pid, "VmRSS")

    batch = np.array(files, dtype=np.object_)
    via_grpc = grpc_infer(server, "image_bytes", batch, "BYTES").as_numpy("logits")
    peak_kib = proc_status_kib(pid, "VmHWM")
    after_kib = proc_status_kib(pid, "VmRSS")

    want = reference(expected_rows(files))
    np.testing.assert_allclose(via_grpc, want, rtol=1e-4, atol=1e-4)
    print(f"\nserver RSS idle {idle_kib / 1024:.0f} MiB, peak {peak_kib / 1024:.0f} MiB, "
          f"after {after_kib / 1024:.0f} MiB for 8 x {BIG}x{BIG} JPEGs ({sum(map(len, files)) / 1e6:.1f} MB)")
    assert (peak_kib - idle_kib) * 1024 < GIB, f"peak {peak_kib} KiB over idle {idle_kib} KiB"
    assert (after_kib - idle_kib) * 1024 < GIB / 4, f"{after_kib} KiB kept after the request (idle {idle_kib})"

    tensor = httpclient.InferInput("image_bytes", [len(files)], "BYTES")  # same over REST, binary
    tensor.set_data_from_numpy(batch)
    via_http = httpclient.InferenceServerClient(f"127.0.0.1:{server.http}").infer("lvvit", [tensor])
    np.testing.assert_allclose(via_http.as_numpy("logits"), want, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- pixel limits, from the header


def test_image_over_the_per_image_limit_is_refused_before_decoding(server, reference):
    small = jpeg(200, 150, seed=20)
    files = np.array([small, claims_size(small, 12000, 12000)], dtype=np.object_)
    with pytest.raises(InferenceServerException) as err:
        grpc_infer(server, "image_bytes", files, "BYTES")
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert ("input 'image_bytes' element 1: 12000x12000 image (144.0 MP) is over this server's "
            "per-image limit of 100.0 MP (--max-image-mpix)") in err.value.message()
    good_request_succeeds(server, reference)


def test_request_over_the_pixel_budget_is_refused_naming_the_element(server, reference):
    small = jpeg(200, 150, seed=21)
    files = [claims_size(small, BIG, BIG)] * 9  # 9 x 81 MP = 729 MP > 700
    tensor = httpclient.InferInput("image_bytes", [len(files)], "BYTES")
    tensor.set_data_from_numpy(np.array(files, dtype=np.object_))
    with pytest.raises(InferenceServerException) as err:
        httpclient.InferenceServerClient(f"127.0.0.1:{server.http}").infer("lvvit", [tensor])
    assert err.value.status() == "400"
    assert ("input 'image_bytes' element 8: the request's images reach 729.0 MP here, over this "
            f"server's per-request limit of {REQUEST_MPIX:.1f} MP (--max-request-mpix)") in err.value.message()
    good_request_succeeds(server, reference)


# ---------------------------------------------------------------- non-finite tensors


def test_nan_pixels_over_grpc_are_invalid_argument(server, reference):
    x = np.zeros((3, 3, IMG, IMG), np.float32)
    x[1, 2, 5, 7] = np.nan
    x[2, 0, 0, 0] = np.inf
    stop, good = threading.Event(), []

    def keep_asking() -> None:  # a neighbour's requests in flight meanwhile
        while not stop.is_set() or not good:
            good_request_succeeds(server, reference)
            good.append(True)

    worker = threading.Thread(target=keep_asking)
    worker.start()
    try:
        with pytest.raises(InferenceServerException) as err:
            grpc_infer(server, "images", x, "FP32")
    finally:
        stop.set()
        worker.join(timeout=120)
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "input 'images': row 1 holds NaN or infinite values (2 of 3 rows do)" in err.value.message()
    assert good


def test_inf_pixels_over_binary_http_are_400(server, reference):
    x = np.zeros((1, 3, IMG, IMG), np.float32)
    x[0, 1, 2, 3] = -np.inf
    tensor = httpclient.InferInput("images", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)  # binary tensor extension
    with pytest.raises(InferenceServerException) as err:
        httpclient.InferenceServerClient(f"127.0.0.1:{server.http}").infer("lvvit", [tensor])
    assert err.value.status() == "400"
    assert "input 'images': row 0 holds NaN or infinite values" in err.value.message()
    good_request_succeeds(server, reference)


def json_images_body(bad: str) -> bytes:
    values = ["0.5"] * (3 * IMG * IMG)
    values[100] = bad
    return (f'{{"inputs": [{{"name": "images", "datatype": "FP32", "shape": [1, 3, {IMG}, {IMG}], '
            f'"data": [{",".join(values)}]}}]}}').encode()


@pytest.mark.parametrize("bad", ['"nan"', '"NaN"', '"inf"', '"1.5"'])
def test_strings_in_json_tensors_are_400(server, reference, bad):
    """numpy would read "nan" (and "1.5") as floats: strings are refused as not numbers."""
    status, text = post_json(server, json_images_body(bad))
    assert status == 400, text
    assert json.loads(text)["error"] == (
        "input 'images': data holds strings, not numbers; FP32 data must be JSON numbers")
    good_request_succeeds(server, reference)


def test_nan_literal_in_json_is_refused_by_the_parser(server, reference):
    status, text = post_json(server, json_images_body("NaN"))  # not JSON: the parser says so
    assert status == 400 and "request body is not valid JSON" in json.loads(text)["error"], text
    good_request_succeeds(server, reference)


# ---------------------------------------------------------------- stalled clients


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def stalled_client(port: int, head: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(head)
    sock.settimeout(READ_TIMEOUT + 30)
    return sock


def test_clients_that_stall_mid_request_are_closed_after_the_read_deadline(server, reference):
    """50 clients that send headers with a Content-Length and half the body, one that sends
    half its headers and one that sends nothing: each is closed once the deadline passes, and
    the server's open file descriptors come back to where they were."""
    pid = server.proc.pid
    baseline = open_fds(pid)
    body = b'{"inputs": [' + b" " * 1000
    head = (b"POST /v2/models/lvvit/infer HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % (2 * len(body)))
    clients = [stalled_client(server.http, head + body) for _ in range(50)]
    clients += [stalled_client(server.http, head[:40]), stalled_client(server.http, b"")]
    start = time.monotonic()
    deadline = start + 10
    while open_fds(pid) < baseline + len(clients) and time.monotonic() < deadline:
        time.sleep(0.1)
    held = open_fds(pid)
    assert held >= baseline + len(clients)  # all held open, server side

    for sock in clients:
        try:
            assert sock.recv(1024) == b""  # closed by the server, no reply to half a request
        except ConnectionResetError:
            pass
        finally:
            sock.close()
    waited = time.monotonic() - start
    assert READ_TIMEOUT - 1 < waited < READ_TIMEOUT + 30, f"{waited:.1f} s"
    while open_fds(pid) > baseline + 2 and time.monotonic() < start + READ_TIMEOUT + 40:
        time.sleep(0.1)
    print(f"\nserver open fds {baseline} -> {held} with {len(clients)} stalled clients -> {open_fds(pid)} "
          f"after the {READ_TIMEOUT} s deadline (clients closed after {waited:.1f} s)")
    assert open_fds(pid) <= baseline + 2, f"{open_fds(pid)} open fds, {baseline} before"
    good_request_succeeds(server, reference)
