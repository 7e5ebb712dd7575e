"""ONNX Runtime sessions, opened in one place: the provider table, threads, optimisation
level and the few options a caller needs (labeling, export checks, int8, serving, benchmarks).

Each caller keeps its own policy (how many threads, which providers, what a failure becomes)
and passes it here as arguments; how those become ``SessionOptions`` is written once. A
provider this ONNX Runtime build lacks is one line naming what it does have, never a silent
fall-back to the CPU; a model ONNX Runtime cannot load is one line naming the file.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import onnxruntime as ort

from lvvit.errors import ConfigError, LvvitError, first_line

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"

PROVIDERS = {"cpu": (CPU,), "cuda": (CUDA, CPU), "tensorrt": (TENSORRT, CUDA, CPU)}
"""The names our command lines take (``--provider``, ``--onnx-provider``) -> ONNX Runtime's
providers, asked-for one first, then what runs the nodes it cannot (ORT assigns in order)."""

_HINTS = {"cuda": "install onnxruntime-gpu on a machine with CUDA",
          "tensorrt": "install onnxruntime-gpu with TensorRT libraries on a GPU machine"}

OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
"""Graph optimisation levels by name; ``all`` is ONNX Runtime's own default."""

EXTERNAL_DATA_FOLDER = "session.model_external_initializers_file_folder_path"


class ProviderUnavailable(ConfigError, RuntimeError):
    """The requested execution provider is not in this ONNX Runtime build."""


class SessionError(LvvitError, ValueError):
    """ONNX Runtime refused to load a model; the message names the model and the cause."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason
        """ORT's own first line, for callers that explain a known cause (``NOT_IMPLEMENTED``:
        no kernel for part of the graph, e.g. bf16 on the CPU provider)."""


def provider_chain(name: str, flag: str, *, device_id: int | None = None,
                   trt_options: dict | None = None) -> list:
    """ORT's provider list for our provider ``name`` (a key of :data:`PROVIDERS`, chosen
    with ``flag``); GPU providers get ``device_id`` when given, TensorRT ``trt_options``.

    Raises :class:`ProviderUnavailable` when the first provider is not in this build.
    """
    if name not in PROVIDERS:
        raise ValueError(f"{flag}: unknown provider {name!r}; choose one of {', '.join(PROVIDERS)}")
    chain = PROVIDERS[name]
    available = ort.get_available_providers()
    if chain[0] not in available:
        raise ProviderUnavailable(
            f"{flag} {name}: ONNX Runtime here has {', '.join(available)} (onnxruntime {ort.__version__}); "
            f"{flag} {name} needs {chain[0]}: {_HINTS.get(name, 'use another provider')}"
        )
    return [_with_options(p, device_id, trt_options) for p in chain]


def _with_options(provider: str, device_id: int | None, trt_options: dict | None) -> str | tuple[str, dict]:
    options = {} if provider == CPU or device_id is None else {"device_id": device_id}
    if provider == TENSORRT:
        options.update(trt_options or {})
    return (provider, options) if options else provider


def preferred_providers() -> list[str]:
    """CUDA first when this onnxruntime has it (onnxruntime-gpu), then the CPU."""
    available = ort.get_available_providers()
    return [p for p in (CUDA, CPU) if p in available]


def session(
    model: Path | str | bytes,
    *,
    providers: Sequence = (CPU,),
    threads: int = 0,
    inter_threads: int = 0,
    opt_level: str = "all",
    log_level: int = -1,
    external_data: Path | None = None,
    where: str | None = None,
) -> ort.InferenceSession:
    """An ONNX Runtime session on ``model`` (a file or serialized bytes).

    ``threads`` and ``inter_threads`` are ORT's intra- and inter-op pools (0: ORT's choice);
    ``log_level`` is its severity (-1: its default; callers that turn ORT errors into our one
    line pass 3 or 4). ``external_data`` is the folder a serialized model's external data
    is read from: ORT maps it there, and the NCHWc layout pass is turned off, since it
    would copy every convolution's weights. ``where`` names the model in errors.
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = OPT_LEVELS[opt_level]
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = inter_threads
    options.log_severity_level = log_level
    disabled = []
    if external_data is not None:
        options.add_session_config_entry(EXTERNAL_DATA_FOLDER, str(external_data))
        disabled = ["NchwcTransformer"]
    source = model if isinstance(model, bytes) else str(model)
    try:
        return ort.InferenceSession(source, options, providers=list(providers), disabled_optimizers=disabled)
    except Exception as err:  # ORT's own pybind exception types: a bad file, an op it cannot run
        label = where or ("the model" if isinstance(model, bytes) else str(model))
        raise SessionError(f"{label}: ONNX Runtime cannot load it ({first_line(err)})",
                           str(err).strip().split("\n")[0]) from None


__all__ = ["OPT_LEVELS", "PROVIDERS", "ProviderUnavailable", "SessionError", "preferred_providers",
           "provider_chain", "session"]
