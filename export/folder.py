"""The export folder (layout in docs/contracts.md): staged in a hidden sibling and renamed
into place only once everything in it passed its checks, and verified when read back."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from lvvit import atomic, jsonload
from lvvit.data.source import class_index_problem
from lvvit.digest import file_sha256

from .errors import ExportError
from .onnx_export import io_spec, load_onnx, parity_session

MODEL_FILE = "model.onnx"
FP32_FILE = "model.fp32.onnx"
"""The float graph an int8 export quantizes; it lives only in the staging folder."""
INFO_FILE = "model.json"
LABELS_FILE = "labels.txt"
PARITY_FILE = "parity.json"
PLAN_FILE = "model.plan"


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def check_writable(out: Path, overwrite: bool) -> None:
    """Refuse early (before minutes of work) to replace an existing non-empty folder."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ExportError(f"{out} already exists and is not empty; pass --overwrite to replace it")


@contextmanager
def staged_output(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty staging folder; on success it becomes ``out``, on any error it is removed.

    A reader therefore sees either the previous complete export or the new complete one,
    never a half-written folder under the final name.
    """
    check_writable(out, overwrite)
    with atomic.staged_dir(out) as stage:
        yield stage


def placeholder_names(num_classes: int) -> list[str]:
    return [f"class_{i}" for i in range(num_classes)]


def read_class_names(path: Path) -> list[str]:
    """Names in index order from ``classes.json`` (``[{"index", "name", ...}]`` or a list of
    names) or a text file with one name per line."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ExportError(f"--classes {path}: {err.strerror or err}") from err
    if path.suffix == ".json":
        names = _names_from_json(path, text)
    else:
        names = [line.strip() for line in text.splitlines() if line.strip()]
    bad = [i for i, n in enumerate(names) if not n or "\n" in n]
    if bad:
        raise ExportError(f"--classes {path}: empty or multi-line name at index {bad[0]}")
    return names


def _names_from_json(path: Path, text: str) -> list[str]:
    try:
        data = jsonload.loads(text)
    except ValueError as err:
        raise ExportError(f"--classes {path}: not valid JSON: {err}") from err
    if isinstance(data, list) and all(isinstance(x, str) for x in data):
        return data
    if not isinstance(data, list) or not all(isinstance(x, dict) for x in data):
        raise ExportError(f"--classes {path}: expected a list of {{'index', 'name'}} objects")
    for pos, entry in enumerate(data):
        if type(entry.get("index", pos)) is not int or not isinstance(entry.get("name"), str):
            raise ExportError(f"--classes {path}: entry {pos} needs an integer 'index' and a string 'name'")
    indices = [entry.get("index", pos) for pos, entry in enumerate(data)]
    problem = class_index_problem(indices)
    if problem:
        raise ExportError(f"--classes {path}: {problem}")
    by_index = {index: entry["name"] for index, entry in zip(indices, data, strict=True)}
    return [by_index[i] for i in range(len(by_index))]


def verify_export_dir(path: Path, run: bool = True) -> dict:
    """Check a folder written by ``lvvit-export`` and return its ``model.json``.

    The ONNX file must load, pass the full checker, have the SHA-256 recorded in
    ``model.json`` (weights can be damaged without breaking the protobuf) and match
    ``model.json`` (names, dtype, size, classes); ``labels.txt`` must have one line per class; with ``run``, ONNX Runtime
    must produce finite logits of the right shape. Every failure names the file at fault.
    """
    path = Path(path)
    info_path = path / INFO_FILE
    try:
        info = jsonload.loads(info_path.read_bytes())
    except (OSError, ValueError) as err:
        raise ExportError(f"{info_path}: missing or not valid JSON ({err})") from err
    proto = load_onnx(path / MODEL_FILE)
    recorded = info.get("onnx_sha256")
    if recorded and file_sha256(path / MODEL_FILE) != recorded:
        raise ExportError(f"{path / MODEL_FILE}: SHA-256 differs from the one in {INFO_FILE}; "
                          "the file was corrupted or replaced after export")
    spec = io_spec(proto)
    s, classes = info["img_size"], info["num_classes"]
    expected = {"input": (info["input_name"], info["input_dtype"], [-1, 3, s, s]),
                "output": (info["output_name"], "float32", [-1, classes])}
    for key, want in expected.items():
        got = (spec[key]["name"], spec[key]["dtype"], spec[key]["dims"])
        if got != want:
            raise ExportError(f"{path / MODEL_FILE}: {key} is {got}, but {INFO_FILE} says {want}")
    labels = (path / LABELS_FILE).read_text(encoding="utf-8").splitlines() if (path / LABELS_FILE).is_file() else []
    if len(labels) != classes:
        raise ExportError(f"{path / LABELS_FILE}: {len(labels)} lines for {classes} classes")
    if run:
        session = parity_session(path / MODEL_FILE)
        x = np.zeros((1, 3, s, s), dtype=np.dtype(info["input_dtype"]))
        logits = session.run(None, {info["input_name"]: x})[0]
        if logits.shape != (1, classes) or not np.isfinite(logits).all():
            raise ExportError(f"{path / MODEL_FILE}: ONNX Runtime gave logits of shape "
                              f"{logits.shape} (finite: {bool(np.isfinite(logits).all())})")
    return info
