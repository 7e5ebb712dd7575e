"""Logging an export to the MLflow run that trained it, and registering the model.

The run comes from ``--mlflow-run`` or from the ``mlflow_run.json`` that training writes
in its output folder (found by walking up from the checkpoint). Lineage: an int8 export's
calibration (and ``--eval-shards``) sources become datasets of the run
(lvvit/train/lineage.py); a ``--mlflow-run`` other than the checkpoint's own run, and the
registered model version, get the tag ``lvvit.checkpoint_run`` naming the run that trained it.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from lvvit import jsonload
from lvvit.errors import first_line
from lvvit.train.lineage import CHECKPOINT_RUN_TAG, dataset, send_inputs
from lvvit.train.tracking import bound_http_requests

from .errors import ExportError

RUN_FILE = "mlflow_run.json"
"""Written by ``lvvit.train.tracking`` in the run's output folder."""

_logger = logging.getLogger(__name__)


def find_run_record(checkpoint: Path, levels: int = 3) -> dict | None:
    """The ``mlflow_run.json`` beside ``checkpoint`` or up to ``levels`` folders above it
    (``OUTPUT/checkpoints/stepN`` -> ``OUTPUT``)."""
    start = checkpoint if checkpoint.is_dir() else checkpoint.parent
    for folder in [start.resolve(), *list(start.resolve().parents)[:levels]]:
        path = folder / RUN_FILE
        if path.is_file():
            try:
                record = jsonload.loads(path.read_bytes())
            except (OSError, ValueError) as err:
                raise ExportError(f"{path}: unreadable MLflow run record: {err}") from err
            if not isinstance(record, dict) or "run_id" not in record:
                raise ExportError(f"{path}: expected a JSON object with 'run_id'")
            return record
    return None


def log_export(
    export_dir: Path,
    run_id: str,
    register_name: str | None = "lvvit",
    tracking_uri: str | None = None,
    datasets: list[dict[str, Any]] | None = None,
    checkpoint_run: str | None = None,
) -> str:
    """Log ``model.onnx`` (signature + input example), model.json, labels and parity report to
    ``run_id``; register it under ``register_name``; ``datasets`` (:func:`source_datasets`)
    as the run's inputs; ``checkpoint_run`` (the run that trained the checkpoint) as a tag of
    the model version and, when it is another run, of ``run_id``. Returns the logged model's URI."""
    import mlflow
    import mlflow.onnx
    import onnx
    import onnxruntime
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    bound_http_requests()
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    info = json.loads((export_dir / "model.json").read_text())
    s, dtype = info["img_size"], np.dtype(info["input_dtype"])
    signature = ModelSignature(
        inputs=Schema([TensorSpec(dtype, (-1, 3, s, s), info["input_name"])]),
        outputs=Schema([TensorSpec(np.dtype("float32"), (-1, info["num_classes"]), info["output_name"])]),
    )
    example = np.zeros((1, 3, s, s), dtype=dtype)
    client = mlflow.tracking.MlflowClient()
    try:
        run = client.get_run(run_id)
    except Exception as err:  # MlflowException, connection errors
        raise ExportError(f"MLflow run {run_id!r} not found at {mlflow.get_tracking_uri()}: "
                          f"{str(err).splitlines()[0][:200]}") from err
    # the logged model belongs to the run's experiment; no start_run/end_run, so the run's
    # status and end time stay what training left
    mlflow.set_experiment(experiment_id=run.info.experiment_id)
    try:
        model_info = mlflow.onnx.log_model(
            onnx.load_model(export_dir / "model.onnx"),
            name="onnx_model",
            run_id=run_id,
            signature=signature,
            input_example={info["input_name"]: example},
            registered_model_name=register_name or None,
            save_as_external_data=False,
            onnx_execution_providers=loadable_providers(),
            # stated, not inferred: inference imports the model in a subprocess (slow, and
            # it would list everything this process happens to have loaded)
            pip_requirements=[f"onnx=={onnx.__version__}", f"onnxruntime=={onnxruntime.__version__}"],
            metadata={k: info[k] for k in ("model", "img_size", "num_classes", "precision",
                                             "input_dtype", "mean", "std", "crop_pct")},
            extra_files=[str(export_dir / "labels.txt"), str(export_dir / "model.json")],
        )
        for name in ("parity.json", "model.json", "labels.txt"):
            client.log_artifact(run_id, str(export_dir / name), artifact_path="export")
        if datasets:
            send_inputs(client, run_id, datasets)
        if checkpoint_run and checkpoint_run != run_id:
            client.set_tag(run_id, CHECKPOINT_RUN_TAG, checkpoint_run)
        if checkpoint_run and model_info.registered_model_version is not None:
            client.set_model_version_tag(register_name, str(model_info.registered_model_version),
                                         CHECKPOINT_RUN_TAG, checkpoint_run)
    except Exception as err:  # MlflowException, connection errors (bounded by bound_http_requests)
        raise ExportError(f"MLflow logging to run {run_id!r} failed: {str(err).splitlines()[0][:300]}") from err
    return model_info.model_uri


def source_datasets(calibration: str | None, calibration_samples: int,
                    eval_shards: str | None) -> list[dict[str, Any]]:
    """The int8 export's sources as dataset records: the calibration shards (with the
    samples asked for, at most the source's) and the held-out ``--eval-shards``. A source
    that cannot be read again now is left out with a warning: the export itself is done."""
    from lvvit.data.source import resolve

    found = []
    for spec, context in ((calibration, "calibration"), (eval_shards, "eval")):
        if not spec:
            continue
        try:
            source = resolve(spec)
            used = None
            if context == "calibration":
                used = calibration_samples if source.total is None else min(calibration_samples, source.total)
            found.append(dataset(source, context, used))
        except Exception as err:  # SourceError, an outage: lineage never costs the export
            _logger.warning("%s %s not logged as an MLflow dataset: %s", context, spec, first_line(err))
    return found


def loadable_providers() -> list[str]:
    """The providers the logged model asks for: those this ONNX Runtime has, CUDA first.

    MLflow's ONNX flavour filters the recorded list by what the loading machine has and
    warns about every missing entry; its default (CUDA, CPU) made every CPU-only load warn.
    """
    from lvvit.onnxrt import preferred_providers

    return preferred_providers()


def resolve_tracking_uri(cli_uri: str | None, record: dict | None) -> str | None:
    """``--mlflow-uri``, else ``MLFLOW_TRACKING_URI``, else the one training recorded."""
    return cli_uri or os.environ.get("MLFLOW_TRACKING_URI") or (record or {}).get("tracking_uri")
