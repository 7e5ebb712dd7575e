"""``lvvit.export``: LV-ViT weights -> checked ONNX graph, TensorRT engine, Triton model
repository and MLflow model version (``lvvit-export``; see docs/export.md)."""

from .errors import ExportError, ParityError, TensorRTUnavailable
from .folder import verify_export_dir
from .onnx_export import export_onnx, load_onnx
from .parity import ParityReport, check_parity
from .tensorrt import build_engine
from .tracking import log_export
from .triton import write_triton_repo

__all__ = [
    "ExportError",
    "ParityError",
    "ParityReport",
    "TensorRTUnavailable",
    "build_engine",
    "check_parity",
    "export_onnx",
    "load_onnx",
    "log_export",
    "verify_export_dir",
    "write_triton_repo",
]
