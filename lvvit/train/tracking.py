"""MLflow tracking from rank 0; every other rank gets a tracker that does nothing.

The store is MLflow's own choice: ``MLFLOW_TRACKING_URI`` when set (a server), else the
embedded SQLite store (``mlflow.db`` + ``mlruns/`` in the working directory). The run id
is written to ``OUTPUT/mlflow_run.json`` so ``--resume`` and ``lvvit-export`` find the run.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any

RUN_FILE = "mlflow_run.json"
MAX_PARAM_CHARS = 6000


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``: one MLflow param per leaf."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def read_run_file(output: Path) -> dict[str, str] | None:
    path = Path(output) / RUN_FILE
    return json.loads(path.read_text()) if path.exists() else None


def ensure_experiment(name: str) -> None:
    """Select ``name``, creating it if needed. With a SQLite store, a new experiment keeps its
    artifacts in ``mlruns/`` beside the database file rather than in the working directory
    of whichever run happened to create it."""
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = mlflow.get_tracking_uri()
    if uri.startswith("sqlite:///") and mlflow.get_experiment_by_name(name) is None:
        db = Path(uri[len("sqlite:///"):]).resolve()
        with contextlib.suppress(MlflowException):  # created meanwhile by another run
            mlflow.create_experiment(name, artifact_location=(db.parent / "mlruns").as_uri())
    mlflow.set_experiment(name)


class NullTracker:
    """What ranks other than 0 (and ``--no-mlflow`` runs) log to."""

    run_id: str | None = None

    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None: ...
    def log_dict(self, data: dict, name: str) -> None: ...
    def finish(self, status: str = "FINISHED") -> None: ...


class MlflowTracker(NullTracker):
    """One MLflow run; resuming passes the stored ``run_id`` and the run carries on."""

    def __init__(
        self, experiment: str, run_name: str, output: Path, tags: dict[str, str],
        run_id: str | None = None, system_metrics: bool = True, record: bool = True,
    ) -> None:
        import mlflow

        self.mlflow = mlflow
        ensure_experiment(experiment)
        if run_id is not None:
            run = mlflow.start_run(run_id=run_id, log_system_metrics=system_metrics)
        else:
            run = mlflow.start_run(run_name=run_name, tags=tags, log_system_metrics=system_metrics)
        self.run_id = run.info.run_id
        if record:
            self._record(output, run)

    def _record(self, output: Path, run) -> None:
        """``OUTPUT/mlflow_run.json``: the run ``--resume`` continues and ``lvvit-export`` logs to."""
        mlflow = self.mlflow
        output.mkdir(parents=True, exist_ok=True)
        record = {
            "run_id": self.run_id,
            "experiment_id": run.info.experiment_id,
            "tracking_uri": mlflow.get_tracking_uri(),
        }
        tmp = output / (RUN_FILE + ".tmp")
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        os.replace(tmp, output / RUN_FILE)

    def log_params(self, params: dict[str, Any]) -> None:
        existing = self.mlflow.get_run(self.run_id).data.params
        fresh = {k: str(v)[:MAX_PARAM_CHARS] for k, v in params.items() if k not in existing}
        if fresh:
            self.mlflow.log_params(fresh)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics(metrics, step=step)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def log_dict(self, data: dict, name: str) -> None:
        self.mlflow.log_dict(data, name)

    def finish(self, status: str = "FINISHED") -> None:
        self.mlflow.end_run(status=status)


def make_tracker(
    enabled: bool, rank: int, experiment: str, run_name: str, output: Path,
    tags: dict[str, str], run_id: str | None, system_metrics: bool, record: bool = True,
) -> NullTracker:
    """``record=False`` leaves ``OUTPUT/mlflow_run.json`` alone (an eval-only run must not
    take the place of the training run that ``--resume`` continues)."""
    if not enabled or rank != 0:
        return NullTracker()
    return MlflowTracker(experiment, run_name, output, tags, run_id, system_metrics, record)
