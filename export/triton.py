"""A Triton model repository for an export folder: ``<prefix>_onnx`` (ONNX Runtime backend)
and, when the folder has an engine, ``<prefix>_trt`` (TensorRT backend).

Configs are written as text in Triton's ``ModelConfig`` protobuf format; the tests parse
them with the schema ``tritonclient`` ships.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from lvvit import atomic

from .errors import ExportError

TRITON_DTYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "uint8": "TYPE_UINT8"}
VERSION = "1"
LABELS_FILE = "labels.txt"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy name, e.g. "float32"
    dims: tuple[int, ...]  # without the batch axis


def preferred_batch_sizes(max_batch: int) -> list[int]:
    """Powers of two up to ``max_batch`` (and ``max_batch`` itself): shapes engines tune for."""
    sizes = [b for b in (2**i for i in range(1, 11)) if b < max_batch] + [max_batch]
    return sizes[-3:]


def config_text(
    name: str,
    platform: str,
    max_batch: int,
    inp: TensorSpec,
    out: TensorSpec,
    gpu: bool,
    trt_accelerator: str | None = None,
    max_queue_delay_us: int = 2000,
) -> str:
    """``config.pbtxt`` for one model. ``trt_accelerator`` ("FP32"/"FP16"/"INT8") adds ONNX Runtime's
    TensorRT execution accelerator (GPU instances only)."""
    if trt_accelerator and not gpu:
        raise ExportError("the TensorRT accelerator needs GPU instances (--triton-gpu)")
    lines = [
        f'name: "{name}"',
        f'platform: "{platform}"',
        f"max_batch_size: {max_batch}",
        "input [",
        "  {",
        f'    name: "{inp.name}"',
        f"    data_type: {TRITON_DTYPES[inp.dtype]}",
        f"    dims: [ {', '.join(map(str, inp.dims))} ]",
        "  }",
        "]",
        "output [",
        "  {",
        f'    name: "{out.name}"',
        f"    data_type: {TRITON_DTYPES[out.dtype]}",
        f"    dims: [ {', '.join(map(str, out.dims))} ]",
        f'    label_filename: "{LABELS_FILE}"',
        "  }",
        "]",
        "dynamic_batching {",
        f"  preferred_batch_size: [ {', '.join(map(str, preferred_batch_sizes(max_batch)))} ]",
        f"  max_queue_delay_microseconds: {max_queue_delay_us}",
        "}",
        "instance_group [",
        "  {",
        "    count: 1",
        f"    kind: {'KIND_GPU' if gpu else 'KIND_CPU'}",
        "  }",
        "]",
    ]
    if trt_accelerator:
        lines += [
            "optimization {",
            "  execution_accelerators {",
            "    gpu_execution_accelerator: [",
            "      {",
            '        name: "tensorrt"',
            f'        parameters {{ key: "precision_mode" value: "{trt_accelerator}" }}',
            '        parameters { key: "max_workspace_size_bytes" value: "4294967296" }',
            '        parameters { key: "trt_engine_cache_enable" value: "1" }',
            "      }",
            "    ]",
            "  }",
            "}",
        ]
    return "\n".join(lines) + "\n"


def write_model(repo: Path, name: str, config: str, files: dict[str, Path], labels: Path,
                overwrite: bool) -> Path:
    """``repo/name/{config.pbtxt, labels.txt, 1/<files>}``, staged and renamed into place."""
    target = repo / name
    if target.exists() and not overwrite:
        raise ExportError(f"{target} already exists; pass --overwrite to replace it")
    with atomic.staged_dir(target) as stage:
        (stage / "config.pbtxt").write_text(config)
        shutil.copyfile(labels, stage / LABELS_FILE)
        (stage / VERSION).mkdir()
        for dest, src in files.items():
            link_or_copy(src, stage / VERSION / dest)
    return target


def link_or_copy(src: Path, dest: Path) -> None:
    """Hard link when on the same filesystem (models are large), else copy."""
    try:
        os.link(src, dest)
    except OSError:
        shutil.copyfile(src, dest)


def tensor_specs(model_info: dict) -> tuple[TensorSpec, TensorSpec]:
    """The ONNX graph's input and output as Triton sees them (``model_info``: model.json)."""
    s = model_info["img_size"]
    return (TensorSpec(model_info["input_name"], model_info["input_dtype"], (3, s, s)),
            TensorSpec(model_info["output_name"], "float32", (model_info["num_classes"],)))


def onnx_config_text(name: str, model_info: dict, gpu: bool = False, trt_accelerator: bool = False,
                     max_batch: int | None = None, max_queue_delay_us: int = 2000) -> str:
    """``config.pbtxt`` of the ``onnxruntime_onnx`` model for an export (``model_info``: its
    model.json); ``lvvit-serve`` answers Triton's model-configuration extension with it too."""
    inp, out = tensor_specs(model_info)
    accel = None
    if trt_accelerator:
        # an int8 export is a QDQ graph: INT8 mode makes TensorRT use its scales
        accel = {"fp16": "FP16", "int8": "INT8"}.get(model_info["precision"], "FP32")
    return config_text(name, "onnxruntime_onnx", max_batch or model_info["max_batch"], inp, out,
                       gpu, accel, max_queue_delay_us)


def write_triton_repo(
    repo: Path,
    export_dir: Path,
    model_info: dict,
    prefix: str = "lvvit",
    gpu: bool = False,
    trt_accelerator: bool = False,
    overwrite: bool = False,
) -> list[Path]:
    """Model folders for the export in ``export_dir`` (``model_info`` is its ``model.json``)."""
    inp, out = tensor_specs(model_info)
    max_batch = model_info["max_batch"]
    labels = export_dir / LABELS_FILE
    onnx_files = {p.name: p for p in sorted(export_dir.glob("model.onnx*"))}
    written = [write_model(
        repo, f"{prefix}_onnx", onnx_config_text(f"{prefix}_onnx", model_info, gpu, trt_accelerator),
        onnx_files, labels, overwrite,
    )]
    plan = export_dir / "model.plan"
    if plan.is_file():
        written.append(write_model(
            repo, f"{prefix}_trt",
            config_text(f"{prefix}_trt", "tensorrt_plan", max_batch, inp, out, gpu=True),
            {"model.plan": plan}, labels, overwrite,
        ))
    return written
