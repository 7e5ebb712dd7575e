"""The export output folder as the server sees it (docs/contracts.md, "Export output folder").

The server reads exactly ``model.onnx``, ``model.json`` and ``labels.txt`` (and
``model.plan`` when present); everything it needs to validate requests, preprocess
images and name classes comes from there, so a folder that loads here serves correctly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lvvit import jsonload
from lvvit.errors import LvvitError

INPUT_DTYPES = ("float32", "uint8")
REQUIRED_KEYS = ("img_size", "num_classes", "crop_pct", "mean", "std", "input_name",
                 "input_dtype", "output_name")


class ModelDirError(LvvitError, ValueError):
    """The folder is not a usable export: the message names the file and key at fault."""


@dataclass(frozen=True)
class ModelDir:
    path: Path
    model: str
    img_size: int
    num_classes: int
    crop_pct: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    input_name: str
    input_dtype: str
    output_name: str
    precision: str
    max_batch: int | None
    labels: tuple[str, ...]

    @property
    def onnx_path(self) -> Path:
        return self.path / "model.onnx"

    @property
    def plan_path(self) -> Path | None:
        plan = self.path / "model.plan"
        return plan if plan.is_file() else None


def load_model_dir(path: str | Path) -> ModelDir:
    """Read and check an export folder; fail early, naming the file and key, on anything off."""
    path = Path(path)
    if not path.is_dir():
        raise ModelDirError(f"{path}: not a folder (expected the output of lvvit-export --out)")
    for name in ("model.onnx", "model.json", "labels.txt"):
        if not (path / name).is_file():
            raise ModelDirError(f"{path / name}: missing (lvvit-export writes it)")
    meta_path = path / "model.json"
    try:
        meta = jsonload.loads(meta_path.read_bytes())
    except ValueError as err:
        raise ModelDirError(f"{meta_path}: not valid JSON ({err})") from err
    if not isinstance(meta, dict):
        raise ModelDirError(f"{meta_path}: expected a JSON object")
    missing = [key for key in REQUIRED_KEYS if key not in meta]
    if missing:
        raise ModelDirError(f"{meta_path}: missing key(s) {', '.join(missing)}")
    if meta["input_dtype"] not in INPUT_DTYPES:
        raise ModelDirError(
            f"{meta_path}: input_dtype {meta['input_dtype']!r} is not one of {INPUT_DTYPES}"
        )
    for key in ("mean", "std"):
        if not (isinstance(meta[key], list) and len(meta[key]) == 3):
            raise ModelDirError(f"{meta_path}: {key} must be a list of 3 numbers")
    labels = tuple(path.joinpath("labels.txt").read_text(encoding="utf-8").splitlines())
    num_classes = int(meta["num_classes"])
    if len(labels) != num_classes:
        raise ModelDirError(
            f"{path / 'labels.txt'}: {len(labels)} lines but model.json num_classes is {num_classes}"
        )
    return ModelDir(
        path=path,
        model=str(meta.get("model", "lvvit")),
        img_size=int(meta["img_size"]),
        num_classes=num_classes,
        crop_pct=float(meta["crop_pct"]),
        mean=tuple(float(v) for v in meta["mean"]),
        std=tuple(float(v) for v in meta["std"]),
        input_name=str(meta["input_name"]),
        input_dtype=str(meta["input_dtype"]),
        output_name=str(meta["output_name"]),
        precision=str(meta.get("precision", "fp32")),
        max_batch=int(meta["max_batch"]) if meta.get("max_batch") else None,
        labels=labels,
    )
