"""The ONNX Runtime session behind the server, on the execution provider the user asked for.

``tensorrt`` runs ``model.onnx`` through ORT's TensorRT execution provider (engines cached
in ``~/.cache/lvvit/ort-tensorrt``); ``model.plan`` is the engine for Triton's
``tensorrt_plan`` backend and is not loaded here. An int8 export's ``model.onnx`` is a QDQ
graph: the CPU provider runs its integer kernels as is, and the TensorRT provider is told
to build INT8 from the graph's own scales. A provider this ONNX Runtime build lacks
is a start-up error naming the providers it does have, never a silent fall-back to CPU.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


class ProviderUnavailable(RuntimeError):
    """The requested execution provider is not in this ONNX Runtime build."""


TRT_CACHE = Path.home() / ".cache" / "lvvit" / "ort-tensorrt"


def provider_chain(provider: str, cache_dir: Path = TRT_CACHE, int8: bool = False) -> list:
    """ORT provider list for ``provider``; raises when its first provider is missing here."""
    if provider not in PROVIDERS:
        raise ValueError(f"unknown provider {provider!r}; choose one of {', '.join(PROVIDERS)}")
    chain = PROVIDERS[provider]
    available = ort.get_available_providers()
    if chain[0] not in available:
        hint = {
            "cuda": "install onnxruntime-gpu on a machine with CUDA",
            "tensorrt": "install onnxruntime-gpu with TensorRT libraries on a GPU machine",
        }.get(provider, "")
        raise ProviderUnavailable(
            f"--provider {provider} needs {chain[0]}, which this onnxruntime "
            f"{ort.__version__} does not have (available: {', '.join(available)}); {hint}"
        )
    if provider == "tensorrt":
        trt_options = {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache_dir),
                       **({"trt_int8_enable": True} if int8 else {})}
        return [("TensorrtExecutionProvider", trt_options), *chain[1:]]
    return list(chain)


class OnnxEngine:
    """One ORT session; ``run`` is thread-safe, so the batcher can call it off the event loop."""

    def __init__(self, onnx_path: Path, input_name: str, output_name: str, provider: str = "cpu",
                 threads: int = 0, int8: bool = False) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(
            str(onnx_path), options, providers=provider_chain(provider, int8=int8)
        )
        self.input_name = input_name
        self.output_name = output_name
        names = [i.name for i in self.session.get_inputs()]
        if input_name not in names:
            raise ValueError(f"{onnx_path}: no input {input_name!r} (graph inputs: {names})")

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def run(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {self.input_name: batch})[0]
