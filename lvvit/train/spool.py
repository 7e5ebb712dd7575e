"""The tracking spool, ``OUTPUT/mlflow-spool.jsonl``: records a run could not send yet, one
JSON object a line, and the check every line passes before any of them is sent.

A spool is a file in a folder, so it is data: whoever can write the folder can write it.
Sending it (live, or with ``python -m lvvit.train.tracking replay``) must then do no more
than the trainer itself does, to the run that folder records: log metrics, params and tags,
upload files of that folder, name the datasets it read, set that run's status. So each line is checked for its shape
(known kind, known fields, types, bounded sizes, finite steps and times), each run id must
be one recorded in the folder (``mlflow_run.json``, ``mlflow_eval_run.json``) and each
artifact a file inside the folder; the first line that is not is refused by number, before
anything is sent.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from pathlib import Path
from typing import Any

from lvvit import atomic, jsonload
from lvvit.errors import DataError

log = logging.getLogger("lvvit.train.tracking")

SPOOL_FILE = "mlflow-spool.jsonl"
RUN_FILE = "mlflow_run.json"
"""The training run of an output folder: what ``--resume`` continues and export logs to."""
EVAL_RUN_FILE = "mlflow_eval_run.json"
"""The latest ``--eval-only`` run made in the folder (it must not take the training run's place)."""
MAX_SPOOL_MB = 512
"""About two million spooled training steps."""
MAX_LINE_BYTES = 4 * 1024 * 1024
MAX_RUN_FILE_BYTES = 64 * 1024
MAX_PARAM_CHARS = 6000
MAX_TAG_CHARS = 8000
MAX_KEY_CHARS = 250
MAX_ITEMS = 1000
MAX_TEXT_CHARS = 1024 * 1024
MAX_INT = 2**63 - 1
STATUSES = ("FINISHED", "FAILED", "KILLED")
RUN_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,99}")
FIELDS: dict[str, set[str]] = {
    "create": {"experiment", "run_name", "tags", "time", "record", "record_in"},
    "resume": set(),
    "params": {"params"},
    "metrics": {"metrics", "step", "time"},
    "artifact": {"path", "artifact_path"},
    "dict": {"data", "name"},
    "text": {"text", "name"},
    "end": {"status", "time"},
    "inputs": {"datasets"},
}
"""Each kind's fields besides ``kind`` and ``run``; ``record_in`` is the older spelling of
``record`` (a path, now only read as "record the run here")."""
OPTIONAL = {"run", "record", "record_in", "artifact_path"}
DATASET_FIELDS = {"name", "digest", "digest_of", "source_type", "uri", "context", "samples", "shards", "classes",
                  "used_samples"}
"""One dataset of an ``inputs`` record (lvvit/train/lineage.py); each is required, counts may be null."""
CONTEXTS = ("training", "eval", "calibration")
SOURCE_TYPES = ("local", "http", "s3", "gs", "pipe")
DIGESTS_OF = ("manifest", "shards")
MAX_DATASETS = 16
MAX_URI_CHARS = 8000
SHA256 = re.compile(r"[0-9a-f]{64}")


class BadRecord(ValueError):
    """A spool line that is not a record the trainer writes."""


# ----------------------------------------------------------------- the folder's runs

def read_run_file(output: Path, name: str = RUN_FILE) -> dict[str, str] | None:
    """``OUTPUT/mlflow_run.json`` (or ``name``), checked: a small JSON object with a run id."""
    path = Path(output) / name
    if not path.is_file():
        return None
    try:
        if path.stat().st_size > MAX_RUN_FILE_BYTES:
            raise BadRecord(f"over {MAX_RUN_FILE_BYTES} bytes")
        data = jsonload.loads(path.read_bytes())
        if not isinstance(data, dict) or not _is_run_id(data.get("run_id")):
            raise BadRecord("not a JSON object with a 'run_id'")
        if not all(isinstance(v, str) for v in data.values()):
            raise BadRecord("values must be strings")
    except (BadRecord, ValueError) as err:
        raise DataError(f"{path}: {err}") from None
    return data


def recorded_runs(output: Path) -> set[str]:
    """The run ids the output folder records: the only runs its spool may write to."""
    return {found["run_id"] for name in (RUN_FILE, EVAL_RUN_FILE) if (found := read_run_file(output, name))}


def inside(output: Path, name: str) -> Path:
    """``name`` (relative to ``output``, or absolute) as a path that, links followed, lies in
    ``output``; else :class:`BadRecord`."""
    root = Path(output).resolve()
    path = (root / name).resolve()
    if not path.is_relative_to(root) or path == root:
        raise BadRecord(f"artifact {name!r} is not a file inside {root}")
    return path


# ----------------------------------------------------------------- one line

def _is_run_id(value: Any) -> bool:
    return isinstance(value, str) and RUN_ID.fullmatch(value) is not None


def _int(record: dict, key: str) -> None:
    value = record[key]
    if type(value) is not int or not 0 <= value <= MAX_INT:
        raise BadRecord(f"{key!r} must be an integer in [0, 2^63)")


def _text(value: Any, what: str, limit: int) -> None:
    if not isinstance(value, str) or len(value) > limit:
        raise BadRecord(f"{what} must be a string of at most {limit} characters")


def _strings(value: Any, what: str, limit: int) -> None:
    if not isinstance(value, dict) or len(value) > MAX_ITEMS:
        raise BadRecord(f"{what!r} must be an object of at most {MAX_ITEMS} entries")
    for k, v in value.items():
        _text(k, f"a {what} name", MAX_KEY_CHARS)
        _text(v, f"{what} {k!r}", limit)


def _file_name(value: Any, what: str) -> None:
    if not isinstance(value, str) or FILE_NAME.fullmatch(value) is None:
        raise BadRecord(f"{what} {value!r} is not a plain file name")


def check_shape(record: Any, output: Path) -> None:
    """One record as the trainer writes it, or :class:`BadRecord` saying what is not."""
    if not isinstance(record, dict) or record.get("kind") not in FIELDS:
        raise BadRecord(f"not a record of a known kind ({', '.join(FIELDS)})")
    kind = record["kind"]
    allowed = FIELDS[kind] | {"kind", "run"}
    if unknown := sorted(set(record) - allowed):
        raise BadRecord(f"field {unknown[0]!r} is not part of a {kind!r} record")
    if missing := sorted(FIELDS[kind] - OPTIONAL - set(record)):
        raise BadRecord(f"a {kind!r} record needs {missing[0]!r}")
    run = record.get("run")
    if run is not None and not _is_run_id(run):
        raise BadRecord("'run' is not a run id")
    CHECKS[kind](record, output)


def _create(record: dict, output: Path) -> None:
    if record.get("run") is not None:
        raise BadRecord("a 'create' record names no run")
    _text(record["experiment"], "'experiment'", 500)
    _text(record["run_name"], "'run_name'", MAX_KEY_CHARS)
    _strings(record["tags"], "tag", MAX_TAG_CHARS)
    _int(record, "time")
    if not isinstance(record.get("record", False), bool) or not isinstance(record.get("record_in"), str | None):
        raise BadRecord("'record' must be true or false")


def _params(record: dict, output: Path) -> None:
    _strings(record["params"], "param", MAX_PARAM_CHARS)


def _metrics(record: dict, output: Path) -> None:
    """Values may be NaN or infinite (MLflow records them; an fp16 overflow's grad norm is)."""
    metrics = record["metrics"]
    if not isinstance(metrics, dict) or len(metrics) > MAX_ITEMS:
        raise BadRecord(f"'metrics' must be an object of at most {MAX_ITEMS} entries")
    for k, v in metrics.items():
        _text(k, "a metric name", MAX_KEY_CHARS)
        if type(v) not in (int, float) or (type(v) is int and abs(v) > MAX_INT):
            raise BadRecord(f"metric {k!r} is not a number")
    _int(record, "step")
    _int(record, "time")


def _artifact(record: dict, output: Path) -> None:
    _text(record["path"], "'path'", 4096)
    inside(output, record["path"])
    where = record.get("artifact_path")
    if where is not None:
        _text(where, "'artifact_path'", 1000)
        for part in where.split("/"):
            _file_name(part, "'artifact_path' part")


def _dict(record: dict, output: Path) -> None:
    _file_name(record["name"], "'name'")
    if not record["name"].endswith((".json", ".yaml", ".yml")) or not isinstance(record["data"], dict):
        raise BadRecord("a 'dict' record is an object named *.json, *.yaml or *.yml")


def _text_record(record: dict, output: Path) -> None:
    _file_name(record["name"], "'name'")
    _text(record["text"], "'text'", MAX_TEXT_CHARS)


def _end(record: dict, output: Path) -> None:
    if record["status"] not in STATUSES:
        raise BadRecord(f"'status' must be one of {', '.join(STATUSES)}")
    _int(record, "time")


def _inputs(record: dict, output: Path) -> None:
    """Datasets as :func:`lvvit.train.lineage.dataset` writes them: fixed fields, known
    kinds, bounded text, a SHA-256, counts that are integers or null."""
    datasets = record["datasets"]
    if not isinstance(datasets, list) or not 1 <= len(datasets) <= MAX_DATASETS:
        raise BadRecord(f"'datasets' must be a list of 1 to {MAX_DATASETS} datasets")
    for d in datasets:
        if not isinstance(d, dict) or set(d) != DATASET_FIELDS:
            raise BadRecord(f"a dataset is an object with exactly the fields {', '.join(sorted(DATASET_FIELDS))}")
        _text(d["name"], "a dataset 'name'", 500)
        _text(d["uri"], "a dataset 'uri'", MAX_URI_CHARS)
        if not d["name"] or not isinstance(d["digest"], str) or SHA256.fullmatch(d["digest"]) is None:
            raise BadRecord("a dataset needs a name and a hex SHA-256 'digest'")
        for key, allowed in (("context", CONTEXTS), ("source_type", SOURCE_TYPES), ("digest_of", DIGESTS_OF)):
            if d[key] not in allowed:
                raise BadRecord(f"a dataset {key!r} must be one of {', '.join(allowed)}")
        for key in ("samples", "shards", "classes", "used_samples"):
            if d[key] is not None and (type(d[key]) is not int or not 0 <= d[key] <= MAX_INT):
                raise BadRecord(f"a dataset {key!r} must be null or an integer in [0, 2^63)")


CHECKS = {"create": _create, "resume": lambda r, o: None, "params": _params, "metrics": _metrics,
          "artifact": _artifact, "dict": _dict, "text": _text_record, "end": _end, "inputs": _inputs}


# ----------------------------------------------------------------- the whole spool

def parse_spool(path: Path, data: bytes, output: Path, runs: set[str], created: bool = False
                ) -> list[dict[str, Any]]:
    """The spool's records, each checked (:func:`check_shape`) and each bound to a run of
    ``runs`` or to a ``create`` record before it (``created``: one before ``data``, sent in
    an earlier piece); else exit naming the line. A torn last line (the process died
    mid-write) is dropped."""
    records: list[dict[str, Any]] = []
    lines = data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    for number, line in enumerate(lines, 1):
        try:
            record = _load(line)
        except BadRecord as err:
            if number == len(lines) and not data.endswith(b"\n"):
                log.warning("%s: dropping a torn last line", path)
                break
            raise DataError(f"{path}: line {number}: {err}; nothing was sent") from None
        try:
            check_shape(record, output)
            created = created or record["kind"] == "create"
            _check_run(record, runs, created, output)
        except BadRecord as err:
            raise DataError(f"{path}: line {number}: {err}; nothing was sent") from None
        records.append(record)
    return records


def _load(line: bytes) -> Any:
    if len(line) > MAX_LINE_BYTES:
        raise BadRecord(f"over {MAX_LINE_BYTES} bytes")
    try:
        return jsonload.loads(line)
    except ValueError as err:  # also too deep, a key twice, or not UTF-8
        raise BadRecord(f"not JSON ({str(err)[:100]})") from None


def _check_run(record: dict, runs: set[str], created: bool, output: Path) -> None:
    run = record.get("run")
    if record["kind"] == "create":
        return
    if run is None and not created:
        raise BadRecord(f"a {record['kind']!r} record names no run and no 'create' record comes before it")
    if run is not None and run not in runs:
        raise BadRecord(f"run {run} is not a run recorded in {output} ({RUN_FILE}, {EVAL_RUN_FILE})")


class Spool:
    """Records not yet sent, appended as they come. Writers from two threads (the sender, and
    the training thread when the queue is full) share a lock."""

    def __init__(self, output: Path, max_mb: float | None = None) -> None:
        self.output = Path(output)
        self.path = self.output / SPOOL_FILE
        self.max_bytes = int((MAX_SPOOL_MB if max_mb is None else max_mb) * 1024 * 1024)
        self.lock = threading.Lock()

    def append(self, records: list[dict[str, Any]]) -> None:
        if not records:
            return
        with self.lock, open(self.path, "a") as f:
            f.write("".join(json.dumps(r) + "\n" for r in records))
            f.flush()

    def pending(self) -> bool:
        return self.path.exists() and self.path.stat().st_size > 0

    def take(self, runs: set[str] = frozenset(), whole: bool = True, created: bool = False
             ) -> tuple[list[dict[str, Any]], int]:
        """The records now in the spool, all checked, and the byte offset they end at.
        ``runs``: run ids besides those recorded in the folder (the live run's own).
        ``whole=False`` (the live sender): the whole lines of the first ``max_mb`` only, so
        that an outage longer than the limit is sent in pieces rather than refused;
        ``created``: a run made by an earlier piece's ``create`` takes records naming none."""
        with self.lock:
            if not self.path.exists():
                return [], 0
            size = self.path.stat().st_size
            if size > self.max_bytes and whole:
                raise DataError(f"{self.path}: {size} bytes, over the limit of {self.max_bytes} "
                                 f"(replay --max-spool-mb); nothing was sent")
            with open(self.path, "rb") as f:
                data = f.read(self.max_bytes + 1)
        if size > self.max_bytes:
            data = data[: data.rfind(b"\n") + 1]
            if not data:
                raise DataError(f"{self.path}: line 1 is longer than the limit of {self.max_bytes} bytes")
        return parse_spool(self.path, data, self.output, recorded_runs(self.output) | runs, created), len(data)

    def settle(self, unsent: list[dict[str, Any]], offset: int) -> None:
        """Keep ``unsent`` and whatever was appended after ``offset``; remove an empty spool."""
        with self.lock:
            tail = self.path.read_bytes()[offset:] if self.path.exists() else b""
            text = "".join(json.dumps(r) + "\n" for r in unsent) + tail.decode()
            if text:
                atomic.write_text(self.path, text)
            else:
                self.path.unlink(missing_ok=True)

    def count(self) -> int:
        """Lines in the spool (for messages: nothing is parsed)."""
        with self.lock, open(self.path, "rb") as f:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
