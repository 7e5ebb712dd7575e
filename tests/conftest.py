"""Fixtures shared by test modules that serve an export folder (each defines ``model_dir``)."""

import onnxruntime as ort
import pytest


@pytest.fixture(scope="module")
def reference(model_dir):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(model_dir / "model.onnx"), options, providers=["CPUExecutionProvider"])
    return lambda x: session.run(["logits"], {"images": x})[0]
