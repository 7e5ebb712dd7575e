"""MLflow tracking from rank 0 that never stops or stalls training.

The store is MLflow's own choice: ``MLFLOW_TRACKING_URI`` when set (a server), else the
embedded SQLite store (``mlflow.db`` + ``mlruns/`` in the working directory). The run id
is written to ``OUTPUT/mlflow_run.json`` so ``--resume`` and ``lvvit-export`` find the run.

Every call to MLflow is bounded (:func:`bound_http_requests`) and made by one background
thread: the training step only puts a record on a bounded queue. While the server does not
answer, records go to ``OUTPUT/mlflow-spool.jsonl`` and are sent when it answers again;
what is still there when the run ends can be sent later with
``python -m lvvit.train.tracking replay OUTPUT``. Every line of a spool is checked before
any is sent (lvvit/train/spool.py): it can only do what the trainer does, to the runs its
folder records.

Why not MLflow's own asynchronous logging (``log_metrics(..., synchronous=False)`` or
``MLFLOW_ENABLE_ASYNC_LOGGING``)? In mlflow 3.17.2 (``utils/async_logging/
async_logging_queue.py``, tried against a closed port) it hides latency, not an outage:
batches wait in an unbounded in-memory ``queue.Queue`` for 10 workers calling the ordinary
``log_batch``; with the server down a batch goes through the HTTP retries (7, backoff 2,
120 s per request) and is then dropped (logged; ``RunOperations.wait()`` raises). Nothing
reaches the disk: an ``atexit`` hook drains the queue at a normal exit, and a kill or a
preemption loses it; ``start_run`` and ending a run stay synchronous. So we keep our
bounded queue (``QUEUE_SIZE``; full, the record goes to the spool) and the spool file, which
survives the process and the job and is sent in order when the server answers (by this run,
the next ``--resume`` or ``replay``); a kill loses only what queued behind the one call in
flight, whose time :data:`HTTP_DEFAULTS` bounds.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import queue
import re
import sys
import threading
import time
from pathlib import Path
from typing import Any

from lvvit import atomic
from lvvit.errors import ConfigError, DataError, exits_on_error, first_line
from lvvit.train.lineage import send_inputs
from lvvit.train.spool import (
    EVAL_RUN_FILE,
    FILE_NAME,
    MAX_PARAM_CHARS,
    MAX_SPOOL_MB,
    MAX_TEXT_CHARS,
    RUN_FILE,
    Spool,
    inside,
    read_run_file,
)

log = logging.getLogger("lvvit.train.tracking")

HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5",
}
"""MLflow's own defaults (120 s timeout, 7 retries, backoff 2) let one call take minutes."""
QUEUE_SIZE = 1000
RETRY_SECONDS = 15.0
"""How long the sender waits, after a failed call, before trying the spool again."""
FINISH_SECONDS = 60.0
"""The longest the end of a run waits for the sender before leaving the rest in the spool."""


def bound_http_requests() -> None:
    """Short timeouts and few retries for every MLflow HTTP call of this process, unless the
    user set the variables. MLflow reads them at each request."""
    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)


def experiment_id(client, name: str) -> str:
    """The id of ``name``, created if needed. With a SQLite store, a new experiment keeps its
    artifacts in ``mlruns/`` beside the database file rather than in the working directory
    of whichever run happened to create it."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    uri = client.tracking_uri
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri[len("sqlite:///"):]).resolve().parent / "mlruns").as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:  # created meanwhile by another run
        return client.get_experiment_by_name(name).experiment_id


# ----------------------------------------------------------------- records
# One record per tracking call, as JSON: what the sender sends and the spool keeps.
# "run" is the run id, or None for "the run made by the latest preceding 'create' record";
# file paths are relative to the output folder (lvvit/train/spool.py checks each field).

def write_run_file(output: Path, name: str, run, uri: str) -> None:
    """``OUTPUT/mlflow_run.json``: the run ``--resume`` continues and ``lvvit-export`` logs to
    (``mlflow_eval_run.json`` for an eval-only run)."""
    atomic.write_json(output / name, {"run_id": run.info.run_id, "experiment_id": run.info.experiment_id,
                                      "tracking_uri": uri})


def apply(client, record: dict[str, Any], run_id: str | None, output: Path) -> str | None:
    """Send one record to ``run_id`` (a ``create`` record makes the run and records it in
    ``output``); returns the run id."""
    kind = record["kind"]
    if kind == "create":
        exp = experiment_id(client, record["experiment"])
        run = client.create_run(exp, run_name=record["run_name"], tags=record["tags"],
                                start_time=record["time"])
        recorded = record.get("record", record.get("record_in") is not None)
        write_run_file(output, RUN_FILE if recorded else EVAL_RUN_FILE, run, client.tracking_uri)
        return run.info.run_id
    if run_id is None:
        raise ValueError(f"a {kind!r} record has no run (no 'create' record before it)")
    from mlflow.entities import Metric, Param

    if kind == "resume":
        client.update_run(run_id, status="RUNNING")
    elif kind == "params":
        existing = client.get_run(run_id).data.params
        fresh = {k: v for k, v in record["params"].items() if k not in existing}
        if fresh:
            client.log_batch(run_id, params=[Param(k, v) for k, v in fresh.items()])
    elif kind == "metrics":
        client.log_batch(run_id, metrics=[Metric(k, float(v), record["time"], record["step"])
                                          for k, v in record["metrics"].items()])
    elif kind == "artifact":
        client.log_artifact(run_id, str(inside(output, record["path"])),
                            artifact_path=record.get("artifact_path"))
    elif kind == "dict":
        client.log_dict(run_id, record["data"], record["name"])
    elif kind == "text":
        client.log_text(run_id, record["text"], record["name"])
    elif kind == "inputs":  # the datasets the run reads (lvvit/train/lineage.py)
        send_inputs(client, run_id, record["datasets"])
    elif kind == "end":
        client.set_terminated(run_id, status=record["status"], end_time=record["time"])
    else:
        raise ValueError(f"unknown record kind {kind!r}")
    return run_id


def now_ms() -> int:
    return int(time.time() * 1000)


def is_outage(err: BaseException) -> bool:
    """The server did not answer (connection, timeout, 5xx): keep the record for later.
    Anything else (a record the server refuses, a local file gone) would fail forever."""
    import requests
    from mlflow.exceptions import MlflowException

    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, requests.exceptions.RequestException | ConnectionError | TimeoutError):
            return True
        seen = seen.__cause__ or seen.__context__
    return isinstance(err, MlflowException) and err.get_http_status_code() >= 500 and err.__cause__ is None


def send_all(client, records: list[dict[str, Any]], run_id: str | None, output: Path,
             on_run=None) -> tuple[list[dict[str, Any]], str | None, BaseException | None]:
    """Send ``records`` in order until the server stops answering; a record it refuses is
    dropped with a warning. Returns the unsent records (each naming its run, so the spool
    stays right once their ``create`` record is gone), the current run id and the error."""
    for i, record in enumerate(records):
        try:
            new = apply(client, record, record.get("run") or run_id, output)
        except Exception as err:  # connection errors, MlflowException
            if is_outage(err):
                return stamp(records[i:], run_id), run_id, err
            log.warning("MLflow refused a %r record, dropped: %s", record["kind"], first_line(err))
            continue
        if record["kind"] == "create":
            run_id = new
            if on_run is not None:
                on_run(new)
    return [], run_id, None


def stamp(records: list[dict[str, Any]], run_id: str | None) -> list[dict[str, Any]]:
    """Fill in ``run_id`` for the records that belong to it: those before the next 'create'."""
    for i, record in enumerate(records):
        if record["kind"] == "create":
            return [{**r, "run": r.get("run") or run_id} for r in records[:i]] + records[i:]
    return [{**r, "run": r.get("run") or run_id} for r in records]


# ----------------------------------------------------------------- trackers

class NullTracker:
    """What ranks other than 0 (and ``--no-mlflow`` runs) log to."""

    run_id: str | None = None

    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None: ...
    def log_dict(self, data: dict, name: str) -> None: ...
    def finish(self, status: str = "FINISHED", wait: float = FINISH_SECONDS) -> None: ...


class MlflowTracker(NullTracker):
    """One MLflow run fed by a background sender; resuming passes the stored ``run_id``.

    The run is created (or resumed) here, synchronously, so ``--strict-tracking`` can refuse
    to start; when the server does not answer, that record waits in the spool like any other.
    """

    def __init__(
        self, experiment: str, run_name: str, output: Path, tags: dict[str, str],
        run_id: str | None = None, system_metrics: bool = True, record: bool = True,
        strict: bool = False,
    ) -> None:
        bound_http_requests()
        from mlflow.tracking import MlflowClient

        output.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient()
        self.output = output
        self.system_metrics = system_metrics
        self.monitor = None
        self.spool = Spool(output)
        self.queue: queue.Queue = queue.Queue(maxsize=QUEUE_SIZE)
        self.run_id = run_id
        self.finished = False
        self.next_try = 0.0
        self.offline_warned = False
        if run_id is None:
            start = {"kind": "create", "experiment": experiment, "run_name": run_name, "tags": tags,
                     "time": now_ms(), "record": record}
        else:
            start = {"kind": "resume", "run": run_id}
        self.start(start, strict)
        self.sender = threading.Thread(target=self.send_loop, name="mlflow-sender", daemon=True)
        self.sender.start()

    def start(self, record: dict[str, Any], strict: bool) -> None:
        """Create or resume the run now; an unreachable server is fatal only when ``strict``."""
        if strict:
            try:
                self.client.search_experiments(max_results=1)
            except Exception as err:
                raise ConfigError(f"--strict-tracking: MLflow at {self.client.tracking_uri} is unreachable: "
                                 f"{first_line(err)}") from None
        if self.spool.pending():  # an earlier segment of this run could not send everything
            log.info("%s holds records of an earlier run segment; they are sent first", self.spool.path)
            self.spool.append([record])
            if self.flush_spool():
                self.start_monitor(resume=record["kind"] == "resume")
            return
        try:
            self.run_id = apply(self.client, record, self.run_id, self.output)
        except Exception as err:
            self.go_offline(err)
            self.spool.append([record])
            return
        self.start_monitor(resume=record["kind"] == "resume")

    def start_monitor(self, resume: bool) -> None:
        """MLflow's system metrics (CPU, memory, GPU) for the run; best effort, never spooled."""
        if not self.system_metrics or self.monitor is not None:
            return
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        try:
            self.monitor = SystemMetricsMonitor(self.run_id, resume_logging=resume,
                                                tracking_uri=self.client.tracking_uri)
            self.monitor.start()
        except Exception as err:
            log.warning("MLflow system metrics are off: %s", first_line(err))
            self.monitor = None

    def go_offline(self, err: BaseException) -> None:
        """Note the failure once per outage; the sender tries again after ``RETRY_SECONDS``."""
        self.next_try = time.monotonic() + RETRY_SECONDS
        if not self.offline_warned:
            self.offline_warned = True
            log.warning("MLflow at %s does not answer (%s): training goes on, tracking records wait in "
                        "%s and are sent when it answers", self.client.tracking_uri, first_line(err),
                        self.spool.path)

    def flush_spool(self) -> bool:
        """Send the spool in order, a piece of at most ``MAX_SPOOL_MB`` at a time (an outage
        may have spooled more than memory should hold); ``True`` when it is empty afterwards."""
        sent = 0
        while self.spool.pending():
            records, offset = self.spool.take({self.run_id} - {None}, whole=False, created=self.run_id is not None)
            unsent, self.run_id, err = send_all(self.client, records, self.run_id, self.output, on_run=self.created)
            self.spool.settle(unsent, offset)
            sent += len(records) - len(unsent)
            if err is not None:
                self.go_offline(err)
                return False
            if not records:
                break
        if self.offline_warned:
            log.info("MLflow at %s answers again: %d spooled records sent", self.client.tracking_uri, sent)
            self.offline_warned = False
        return not self.spool.pending()

    def created(self, run_id: str) -> None:
        self.run_id = run_id
        self.start_monitor(resume=False)

    # the sender thread
    def send_loop(self) -> None:
        while True:
            try:
                record = self.queue.get(timeout=1.0)
            except queue.Empty:
                record = None
            if self.spool.pending() and time.monotonic() >= self.next_try:
                self.try_flush()
            if record is None:
                continue
            if record["kind"] == "end":
                self.end(record)
                return
            self.send(record)

    def send(self, record: dict[str, Any]) -> None:
        """Straight to MLflow unless earlier records wait (order is kept); else to the spool."""
        if not self.spool.pending() and self.run_id is not None:
            try:
                apply(self.client, record, record.get("run") or self.run_id, self.output)
                return
            except Exception as err:
                if not is_outage(err):
                    log.warning("MLflow refused a %r record, dropped: %s", record["kind"], first_line(err))
                    return
                self.go_offline(err)
        self.spool.append([{**record, "run": record.get("run") or self.run_id}])

    def end(self, record: dict[str, Any]) -> None:
        """One last try at the spool, stop the system metrics, then close the run."""
        if self.monitor is not None:
            self.monitor.finish()
        if self.spool.pending() and self.next_try < math.inf:
            self.try_flush()
        self.send(record)

    def try_flush(self) -> None:
        """``flush_spool`` for the sender: a spool line it cannot send stops the sending (said
        once), never the thread; records keep going to the spool, for ``replay`` to judge."""
        try:
            self.flush_spool()
        except DataError as err:
            log.error("%s; training goes on and tracking records go on into the spool", err)
            self.next_try = math.inf

    # the training thread
    def put(self, record: dict[str, Any]) -> None:
        """Never waits: a full queue (the sender is stuck on the network) goes to the spool."""
        record = {**record, "run": self.run_id}
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            self.spool.append([record])

    def log_params(self, params: dict[str, Any]) -> None:
        self.put({"kind": "params", "params": {k: str(v)[:MAX_PARAM_CHARS] for k, v in params.items()}})

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.put({"kind": "metrics", "metrics": {k: float(v) for k, v in metrics.items()}, "step": int(step),
                  "time": now_ms()})

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """A file of the output folder by its relative path; any other (the ``--config``
        file) by its text, so that the spool never names a file outside the folder."""
        path, root = Path(path).resolve(), self.output.resolve()
        if path.is_relative_to(root):
            self.put({"kind": "artifact", "path": path.relative_to(root).as_posix(), "artifact_path": artifact_path})
            return
        with open(path, "rb") as f:
            text = f.read(MAX_TEXT_CHARS + 1).decode(errors="replace")
        if len(text) > MAX_TEXT_CHARS:
            log.warning("%s is over %d characters: not logged to MLflow", path, MAX_TEXT_CHARS)
            return
        name = re.sub(r"[^A-Za-z0-9._-]", "_", path.name).lstrip(".-") or "file"
        self.put({"kind": "text", "text": text, "name": name if FILE_NAME.fullmatch(name) else "file"})

    def log_dict(self, data: dict, name: str) -> None:
        self.put({"kind": "dict", "data": data, "name": name})

    def finish(self, status: str = "FINISHED", wait: float = FINISH_SECONDS) -> None:
        """Close the run as ``status`` (once); waits at most ``wait`` seconds for the sender
        (less than ``FINISH_SECONDS`` inside a preemption's grace period)."""
        if self.finished:
            return
        self.finished = True
        end = {"kind": "end", "status": status, "time": now_ms(), "run": self.run_id}
        wait = max(wait, 0.0)
        deadline = time.monotonic() + wait
        try:
            self.queue.put(end, timeout=wait)
            queued = True
        except queue.Full:
            queued = False
        self.sender.join(max(deadline - time.monotonic(), 0.0))
        if self.sender.is_alive():  # stuck on a call that does not return: the rest waits in the spool
            left = []
            while not self.queue.empty():
                left.append(self.queue.get_nowait())
            self.spool.append(left if queued and left else [*left, end])
            log.warning("MLflow at %s did not answer within %.0f s at the end of the run",
                        self.client.tracking_uri, wait)
        if self.spool.pending():
            log.warning("%d tracking records were not sent to MLflow at %s; they are in %s. Send them with "
                        "`MLFLOW_TRACKING_URI=%s python -m lvvit.train.tracking replay %s`",
                        self.spool.count(), self.client.tracking_uri, self.spool.path,
                        self.client.tracking_uri, self.output)


def make_tracker(enabled: bool, rank: int, experiment: str, run_name: str, output: Path, tags: dict[str, str],
                 run_id: str | None, system_metrics: bool, record: bool = True, strict: bool = False) -> NullTracker:
    """``record=False`` leaves ``OUTPUT/mlflow_run.json`` alone (an eval-only run must not
    take the place of the training run that ``--resume`` continues)."""
    if not enabled or rank != 0:
        return NullTracker()
    return MlflowTracker(experiment, run_name, output, tags, run_id, system_metrics, record, strict)


# ----------------------------------------------------------------- replay

def replay(output: Path, max_spool_mb: float = MAX_SPOOL_MB) -> str:
    """Send ``OUTPUT/mlflow-spool.jsonl`` to MLflow (``MLFLOW_TRACKING_URI``, else the http(s)
    URI in ``OUTPUT/mlflow_run.json``); returns a one-line summary. Every line is checked
    before any is sent (lvvit/train/spool.py); what fails to send stays in the spool."""
    bound_http_requests()
    from mlflow.tracking import MlflowClient

    spool = Spool(output, max_spool_mb)
    if not spool.pending():
        raise DataError(f"{spool.path}: no spooled records")
    client = MlflowClient(tracking_uri(output))
    records, offset = spool.take()
    runs: list[str] = []
    unsent, _, err = send_all(client, records, None, output, on_run=runs.append)
    spool.settle(unsent, offset)
    if err is not None:
        raise DataError(f"{spool.path}: {len(records) - len(unsent)} of {len(records)} records sent to "
                         f"{client.tracking_uri}, then {first_line(err)}; the rest stay in the spool")
    targets = sorted({r["run"] for r in records if r.get("run")} | set(runs))
    return f"{len(records)} records sent to {client.tracking_uri}, run {', '.join(targets)}"


def tracking_uri(output: Path) -> str | None:
    """``MLFLOW_TRACKING_URI``, else the server the folder's run file names. A file names only
    an http(s) server: a local store there (``sqlite:///``, a path) would be written outside
    the folder, wherever the file says."""
    if uri := os.environ.get("MLFLOW_TRACKING_URI"):
        return uri
    recorded = (read_run_file(output) or {}).get("tracking_uri")
    if recorded is None or recorded.startswith(("http://", "https://")):
        return recorded
    raise DataError(f"{output / RUN_FILE}: tracking_uri {recorded[:200]!r} is not an http(s) server; "
                     "set MLFLOW_TRACKING_URI to replay into a local store")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m lvvit.train.tracking",
        description="Send the MLflow records a training run could not send (OUTPUT/mlflow-spool.jsonl).")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("replay", help="send OUTPUT/mlflow-spool.jsonl to MLFLOW_TRACKING_URI "
                       "(else the URI in OUTPUT/mlflow_run.json); sent records leave the spool")
    p.add_argument("output", type=Path, help="the training run's --output folder")
    p.add_argument("--max-spool-mb", type=float, default=MAX_SPOOL_MB, metavar="MB",
                   help="largest spool read (default %(default)s)")
    args = parser.parse_args(argv)
    if not (0 < args.max_spool_mb < float("inf")):
        parser.error("--max-spool-mb must be positive and finite")
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    with exits_on_error():
        print(replay(args.output, args.max_spool_mb))


if __name__ == "__main__":
    main()
