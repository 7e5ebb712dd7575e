"""What to label: output shards planned from a shard source or an ImageFolder tree.

Every rank computes the same plan (sorted, seeded), so ranks split the work by shard
index alone, with no communication.
"""

from __future__ import annotations

import json
import logging
import tarfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from lvvit.data.imagefolder import SourceImage, classes_json, scan_image_folder
from lvvit.data.shards import Prepared, prepare_sample, shard_name
from lvvit.data.source import ShardSource, SourceError
from lvvit.data.source import shard_name as url_shard_name
from lvvit.data.tarsamples import TarSample, iter_tar_samples

log = logging.getLogger(__name__)

READ_AHEAD = 64
"""Image files read (and checked) ahead of the labeler when the input is an ImageFolder."""


@dataclass
class ShardJob:
    """One output shard: its name, where its samples come from, how many to expect."""

    name: str
    samples: Callable[[], Iterable[TarSample]]
    expected: int | None


@dataclass
class Plan:
    jobs: list[ShardJob]
    classes: bytes | None  # classes.json as written (copied from a shard folder); None if absent
    skipped: list[dict]  # inputs left out before labeling (duplicate keys), key + reason
    class_order: str | None  # how the cls indices were assigned (manifest.json), when known


def is_shard_folder(folder: Path) -> bool:
    return (folder / "manifest.json").is_file() or any(folder.glob("*.tar"))


def plan_shards(source: ShardSource) -> Plan:
    """The source's shards in order (a folder's manifest order, else sorted; a pattern's
    order), relabeled under the same names into one local folder."""
    names = [url_shard_name(url) for url in source.urls]
    twice = [name for name, n in Counter(names).items() if n > 1]
    if twice:
        raise SourceError(f"{source.spec} names several shards called {twice[0]}; they would be written to one file")
    counts = source.counts or (None,) * len(names)
    jobs = [
        ShardJob(name, partial(iter_tar_samples, url, source.open), count)
        for name, url, count in zip(names, source.urls, counts, strict=True)
    ]
    return Plan(jobs, source.classes_json, [], source.class_order)


def plan_image_folder(
    root: Path,
    prefix: str,
    shard_size: int,
    seed: int,
    max_size: int | None,
    class_names: Path | None,
    workers: int = 1,
    class_order: str = "sorted",
) -> Plan:
    """Shards of ``shard_size`` inputs in the seeded order and class indices ``lvvit-shards``
    uses; images that cannot be read are skipped inside their shard, so shard boundaries
    stay fixed."""
    scan = scan_image_folder(root, class_order=class_order)
    for name in scan.empty_classes:
        log.warning("class folder %s has no images; its class gets no samples", root / name)
    items = [scan.items[i] for i in np.random.default_rng(seed).permutation(len(scan.items))]
    jobs = [
        ShardJob(
            shard_name(prefix, i),
            lambda chunk=items[start : start + shard_size]: folder_samples(chunk, max_size, workers),
            len(items[start : start + shard_size]),
        )
        for i, start in enumerate(range(0, len(items), shard_size))
    ]
    classes = classes_json(scan.classes, class_names)
    return Plan(jobs, (json.dumps(classes, indent=1) + "\n").encode(), scan.duplicates, class_order)


def folder_samples(items: list[SourceImage], max_size: int | None, workers: int = 1) -> Iterator[TarSample]:
    """Image files as shard samples (``jpg`` + ``cls``), checked and re-encoded by the
    shard builder's own rules, ``workers`` at a time; unreadable files come through
    with their error."""
    prepare = partial(prepare_sample, max_size=max_size)
    with ThreadPoolExecutor(max(1, workers), thread_name_prefix="label-read") as pool:
        for start in range(0, len(items), READ_AHEAD):
            yield from map(_as_tar_sample, pool.map(prepare, items[start : start + READ_AHEAD]))


def _as_tar_sample(prepared: Prepared) -> TarSample:
    members = []
    for ext, data in prepared.members.items():
        info = tarfile.TarInfo(f"{prepared.key}.{ext}")
        info.size, info.mode, info.mtime = len(data), 0o444, 0  # as lvvit-shards writes them
        members.append((info, data))
    return TarSample(prepared.key, members, error=prepared.reason)
