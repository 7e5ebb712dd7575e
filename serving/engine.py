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

from lvvit import onnxrt

TRT_CACHE = Path.home() / ".cache" / "lvvit" / "ort-tensorrt"


def serving_providers(provider: str, cache_dir: Path = TRT_CACHE, int8: bool = False) -> list:
    """ORT provider list for ``--provider``: TensorRT caches its engines in ``cache_dir`` and
    builds INT8 from an int8 export's own scales; raises when the provider is missing here."""
    trt_options = {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache_dir),
                   **({"trt_int8_enable": True} if int8 else {})}
    return onnxrt.provider_chain(provider, "--provider", trt_options=trt_options)


class OnnxEngine:
    """One ORT session; ``run`` is thread-safe, so the batcher can call it off the event loop."""

    def __init__(self, onnx_path: Path, input_name: str, output_name: str, provider: str = "cpu",
                 threads: int = 0, int8: bool = False) -> None:
        self.session = onnxrt.session(onnx_path, providers=serving_providers(provider, int8=int8), threads=threads)
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
