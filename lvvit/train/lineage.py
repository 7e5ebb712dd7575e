"""Lineage: the shard sources a run read, logged as MLflow datasets.

MLflow's ``log_input`` made by hand: one dataset per source, with the context it served in
(``training``, ``eval``, ``calibration``: the input tag ``mlflow.data.context``). The run
page's Datasets panel lists them, and a model registered from the run is traced to them.

* name: the last two parts of the spec (``imagenet/train``, ``bucket/val``, a pattern's
  folder and pattern);
* digest: the first :data:`DIGEST_CHARS` hex digits (MLflow keeps at most 36) of the
  SHA-256 of the source's ``manifest.json`` when the spec names exactly the shards it lists,
  else of the shard list (a line ``name<TAB>samples`` per shard, in order, samples empty
  when unknown); the whole SHA-256 and which of the two it is are in the profile;
* source: the spec as a URI (a local one made absolute, a password in an http URL hidden,
  at most ``spool.MAX_URI_CHARS`` characters),
  typed ``local``, ``http``, ``s3``, ``gs`` or ``pipe``;
* profile: samples, shards and classes (left out when unknown), the SHA-256 and what it is of;
* input tags: the context, and for calibration ``lvvit.used_samples`` (the samples read):
  a profile belongs to the dataset, which every run of the experiment that reads it shares.

Training (``log_setup``) sends them through the tracker as one ``inputs`` record, so they
wait in the spool like any other record (lvvit/train/spool.py checks its fields);
``lvvit-export`` sends its calibration source straight to the run it logs to.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shlex
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from lvvit import jsonload
from lvvit.data.source import MANIFEST, MAX_JSON_BYTES, ShardSource
from lvvit.data.streams import is_remote, open_url, shard_name
from lvvit.errors import first_line
from lvvit.train.spool import CONTEXTS, MAX_URI_CHARS

log = logging.getLogger("lvvit.train.tracking")

DIGEST_CHARS = 32
"""MLflow stores a dataset digest of at most 36 characters; 32 hex digits are 128 bits."""
CONTEXT_TAG = "mlflow.data.context"
USED_TAG = "lvvit.used_samples"
CHECKPOINT_RUN_TAG = "lvvit.checkpoint_run"
"""Set by ``lvvit-export`` on a ``--mlflow-run`` that is not the checkpoint's own run."""


def source_type(spec: str) -> str:
    if spec.startswith("pipe:"):
        return "pipe"
    if not is_remote(spec):
        return "local"
    scheme = spec.split("://", 1)[0].lower()
    return "http" if scheme in ("http", "https") else scheme


def source_uri(spec: str) -> str:
    """``spec`` as it names the data: a local path made absolute (as ``resolve`` reads it),
    the password of an http URL replaced by ``***``."""
    if not is_remote(spec):
        return os.path.abspath(spec)
    if source_type(spec) == "http":
        parts = urlsplit(spec)
        if parts.password is not None:
            host = parts.netloc.rsplit("@", 1)[1]
            return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))
    return spec


def dataset_name(spec: str) -> str:
    """The last two parts of the spec's path: ``/data/imagenet/train`` -> ``imagenet/train``."""
    where = spec
    if spec.startswith("pipe:"):
        words = [w for w in shlex.split(spec[5:]) if w.endswith((".tar", MANIFEST)) or "://" in w]
        where = words[-1] if words else spec[5:]
    elif not is_remote(spec):
        where = os.path.abspath(spec)
    else:
        where = spec.split("://", 1)[1]
    parts = [p for p in where.split("/") if p]
    if parts and parts[-1] == MANIFEST:
        parts.pop()
    return "/".join(parts[-2:])[-500:] or "shards"


def manifest_sha256(source: ShardSource) -> str | None:
    """SHA-256 of the manifest when it lists exactly the source's shards, in order; ``None``
    when there is none, it lists others too, or (remote) it cannot be read again at once."""
    if source.manifest is None:
        return None
    try:
        if is_remote(source.manifest):
            access = dataclasses.replace(source.access, cache_dir=None, retries=0)
            with open_url(source.manifest, access) as stream:
                data = stream.read(MAX_JSON_BYTES + 1)
        else:
            with open(source.manifest, "rb") as f:
                data = f.read(MAX_JSON_BYTES + 1)
        listed = [entry["name"] for entry in jsonload.loads(data)["shards"]]
    except Exception as err:  # an outage, a file replaced meanwhile: the shard list still names the data
        log.info("lineage: %s not read again (%s); the digest is of the shard list", source.manifest,
                 first_line(err))
        return None
    if len(data) > MAX_JSON_BYTES or listed != [shard_name(url) for url in source.urls]:
        return None
    return hashlib.sha256(data).hexdigest()


def shard_list_sha256(source: ShardSource) -> str:
    counts = source.counts or [None] * len(source.urls)
    lines = "".join(f"{shard_name(url)}\t{'' if n is None else n}\n" for url, n in zip(source.urls, counts, strict=True))
    return hashlib.sha256(lines.encode()).hexdigest()


def dataset(source: ShardSource, context: str, used_samples: int | None = None) -> dict[str, Any]:
    """One dataset of an ``inputs`` record (the fields ``spool.DATASET_FIELDS`` checks)."""
    if context not in CONTEXTS:
        raise ValueError(f"context {context!r} is not one of {', '.join(CONTEXTS)}")
    digest = manifest_sha256(source)
    classes = source.classes
    return {"name": dataset_name(source.spec), "digest": digest or shard_list_sha256(source),
            "digest_of": "shards" if digest is None else "manifest", "source_type": source_type(source.spec),
            "uri": source_uri(source.spec)[:MAX_URI_CHARS], "context": context, "samples": source.total,
            "shards": len(source.urls), "classes": None if classes is None else len(classes),
            "used_samples": used_samples}


def dataset_input(d: dict[str, Any]):
    """The MLflow ``DatasetInput`` of a dataset record."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    key = "url" if d["source_type"] == "http" else "uri"
    profile = {k: d[k] for k in ("samples", "shards", "classes") if d[k] is not None}
    profile.update(sha256=d["digest"], digest_of=d["digest_of"])
    tags = [InputTag(CONTEXT_TAG, d["context"])]
    if d["used_samples"] is not None:
        tags.append(InputTag(USED_TAG, str(d["used_samples"])))
    return DatasetInput(
        Dataset(d["name"], d["digest"][:DIGEST_CHARS], d["source_type"], json.dumps({key: d["uri"]}),
                profile=json.dumps(profile)), tags=tags)


def send_inputs(client, run_id: str, datasets: list[dict[str, Any]]) -> None:
    """Log ``datasets`` to ``run_id`` (``MlflowClient.log_inputs``). MLflow keeps one input
    per name and digest, so a source read in two contexts (eval shards that are also the
    calibration shards) is listed once, with its first context."""
    client.log_inputs(run_id, datasets=[dataset_input(d) for d in datasets])


def log_sources(tracker, sources: list[tuple[ShardSource | None, str]]) -> None:
    """The sources a run reads, as one ``inputs`` record on ``tracker`` (nothing on a
    ``NullTracker``: other ranks and ``--no-mlflow`` read no manifest again); a source that
    cannot be described is a warning."""
    if not hasattr(tracker, "put"):
        return
    datasets = []
    for source, context in sources:
        try:
            if source is not None:
                datasets.append(dataset(source, context))
        except Exception as err:  # lineage never costs a run
            log.warning("the %s source %s is not logged as an MLflow dataset: %s", context, source.spec,
                        first_line(err))
    if datasets:
        tracker.put({"kind": "inputs", "datasets": datasets})


__all__ = ["CHECKPOINT_RUN_TAG", "dataset", "dataset_input", "log_sources", "send_inputs"]
