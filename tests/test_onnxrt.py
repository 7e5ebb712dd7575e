"""The one ONNX Runtime session factory: providers refused in one line, options applied,
external data read from the model's folder, unloadable models named."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from lvvit import onnxrt

WEIGHT = np.arange(16, dtype=np.float32).reshape(4, 4)


def tiny_model() -> onnx.ModelProto:
    """y = x @ W with W an initializer (so it can live in external data)."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [numpy_helper.from_array(WEIGHT, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("onnxrt") / "tiny.onnx"
    onnx.save(tiny_model(), path)
    return path


@pytest.mark.parametrize("name", ["cuda", "tensorrt"])
def test_missing_provider_is_one_line_naming_flag_and_what_exists(name):
    wanted = onnxrt.PROVIDERS[name][0]
    if wanted in ort.get_available_providers():
        pytest.skip(f"{wanted} is in this build")
    with pytest.raises(onnxrt.ProviderUnavailable) as err:
        onnxrt.provider_chain(name, "--provider")
    message = str(err.value)
    assert "\n" not in message
    assert f"--provider {name} needs {wanted}" in message and "CPUExecutionProvider" in message


def test_unknown_provider_names_the_flag():
    with pytest.raises(ValueError, match="--onnx-provider: unknown provider 'tpu'"):
        onnxrt.provider_chain("tpu", "--onnx-provider")


def test_cpu_chain_takes_no_device_options():
    assert onnxrt.provider_chain("cpu", "--provider", device_id=3, trt_options={"x": 1}) == ["CPUExecutionProvider"]


def test_options_are_applied(model_path):
    session = onnxrt.session(model_path, threads=1, inter_threads=1, opt_level="basic", log_level=3)
    options = session.get_session_options()
    assert (options.intra_op_num_threads, options.inter_op_num_threads, options.log_severity_level) == (1, 1, 3)
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    assert session.get_providers() == ["CPUExecutionProvider"]
    x = np.ones((1, 4), np.float32)
    np.testing.assert_allclose(session.run(None, {"x": x})[0], x @ WEIGHT)


def test_serialized_model_reads_external_data_from_its_folder(tmp_path):
    model = tiny_model()
    onnx.save(model, tmp_path / "big.onnx", save_as_external_data=True, location="big.data", size_threshold=0)
    data = onnx.load(tmp_path / "big.onnx", load_external_data=False).SerializeToString()
    session = onnxrt.session(data, external_data=tmp_path)
    assert session.get_session_options().get_session_config_entry(onnxrt.EXTERNAL_DATA_FOLDER) == str(tmp_path)
    x = np.ones((1, 4), np.float32)
    np.testing.assert_allclose(session.run(None, {"x": x})[0], x @ WEIGHT)
    with pytest.raises(onnxrt.SessionError, match=r"^teacher\.onnx: ONNX Runtime cannot load it \("):
        onnxrt.session(data, where="teacher.onnx", external_data=tmp_path / "elsewhere")


def test_unloadable_file_is_one_line_naming_it(tmp_path):
    path = tmp_path / "damaged.onnx"
    path.write_bytes(b"\x08\x07garbage" * 10)
    with pytest.raises(onnxrt.SessionError) as err:
        onnxrt.session(path)
    assert str(err.value).startswith(f"{path}: ONNX Runtime cannot load it (") and "\n" not in str(err.value)
    assert err.value.reason
