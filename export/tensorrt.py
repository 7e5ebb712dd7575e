"""A TensorRT engine (``model.plan``) built from the exported ONNX file.

Precision comes from the ONNX graph: TensorRT >= 10.12 builds a strongly typed network
(the only kind in TensorRT 11, where the precision builder flags are gone); older
versions get the matching ``BuilderFlag`` instead. An int8 export is a QDQ graph, which
TensorRT builds as an explicitly quantized INT8 engine with the graph's own scales. The engine has one optimization
profile for batch 1..max-batch and reuses a timing cache across builds.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from lvvit import atomic

from .errors import ExportError, TensorRTUnavailable

_logger = logging.getLogger(__name__)

INSTALL_HINT = (
    "pip install 'lvvit[trt]' (TensorRT wheels come from NVIDIA's index: add "
    "--extra-index-url https://pypi.nvidia.com if pip cannot find them; a CUDA build of "
    "torch is needed to run the engine)"
)
STRONGLY_TYPED_SINCE = (10, 12)


def default_timing_cache() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "lvvit" / "tensorrt-timing.cache"


def require_tensorrt():
    """The ``tensorrt`` module, or ``TensorRTUnavailable`` saying what is missing and how to get it."""
    missing = []
    try:
        import tensorrt as trt
    except ImportError:
        trt = None
        missing.append("the tensorrt package is not installed")
    import torch

    if not torch.cuda.is_available():
        missing.append("no CUDA GPU is visible to PyTorch"
                       + ("" if torch.version.cuda else " (this torch is a CPU-only build)"))
    if missing:
        raise TensorRTUnavailable(
            f"TensorRT engine not built: {' and '.join(missing)}; it needs an NVIDIA GPU and "
            f"{INSTALL_HINT}. The ONNX export is complete."
        )
    return trt


def trt_version(trt) -> tuple[int, int]:
    major, minor = trt.__version__.split(".")[:2]
    return int(major), int(minor)


def build_engine(
    onnx_path: Path,
    img_size: int,
    max_batch: int,
    precision: str,
    timing_cache: Path | None = None,
    opt_batch: int | None = None,
    workspace_gib: float = 4.0,
) -> bytes:
    """Serialized engine for ``onnx_path`` with a batch profile of 1..``max_batch``."""
    trt = require_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    strongly_typed = trt_version(trt) >= STRONGLY_TYPED_SINCE
    flags = 0
    if strongly_typed and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    elif not strongly_typed and trt_version(trt) < (10, 0):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"{onnx_path}: TensorRT's ONNX parser refused it: {errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * 2**30))
    if not strongly_typed and precision in ("fp16", "bf16"):
        config.set_flag(trt.BuilderFlag.FP16 if precision == "fp16" else trt.BuilderFlag.BF16)
    if not strongly_typed and precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)  # explicit quantization: scales come from the QDQ nodes

    name = network.get_input(0).name
    shape = (3, img_size, img_size)
    opt = opt_batch or max(1, max_batch // 2)
    profile = builder.create_optimization_profile()
    profile.set_shape(name, (1, *shape), (opt, *shape), (max_batch, *shape))
    config.add_optimization_profile(profile)

    cache_bytes = timing_cache.read_bytes() if timing_cache and timing_cache.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)

    _logger.info("building TensorRT %s engine (%s, batch 1..%d); this takes minutes",
                 trt.__version__, "strongly typed" if strongly_typed else precision, max_batch)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise ExportError(f"{onnx_path}: TensorRT failed to build an engine (see its log above)")
    if timing_cache is not None:
        atomic.write_bytes(timing_cache, bytes(memoryview(config.get_timing_cache().serialize())))
    return bytes(memoryview(engine))


class EngineRunner:
    """Runs a serialized engine on the GPU with torch tensors as device buffers."""

    def __init__(self, plan: bytes) -> None:
        trt = require_tensorrt()
        import torch

        self.torch = torch
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise ExportError("TensorRT could not deserialize the engine it just built")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = [self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names]
        self.input_name = names[is_input.index(True)]
        self.output_name = names[is_input.index(False)]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        torch = self.torch
        device_in = torch.from_numpy(np.ascontiguousarray(x)).cuda()
        self.context.set_input_shape(self.input_name, tuple(device_in.shape))
        out_shape = tuple(self.context.get_tensor_shape(self.output_name))
        device_out = torch.empty(out_shape, dtype=torch.float32, device="cuda")
        self.context.set_tensor_address(self.input_name, device_in.data_ptr())
        self.context.set_tensor_address(self.output_name, device_out.data_ptr())
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise ExportError("TensorRT engine execution failed")
        stream.synchronize()
        return device_out.cpu().numpy()
