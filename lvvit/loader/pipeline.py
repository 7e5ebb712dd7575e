"""Training and evaluation loaders over WebDataset shards.

Training: ``resampled=True`` shards split by node and worker, a shuffle buffer, the
per-sample :class:`~lvvit.loader.transforms.TrainTransform` in DataLoader workers, batches
built in the workers, and ``with_epoch`` so every rank runs exactly
``total // (batch_size * world_size)`` steps per epoch (ZeRO-3 hangs otherwise).
Exact epochs (``sampling="epoch"``) and their resume are in :mod:`lvvit.loader.epoch_loader`.

Evaluation: every sample exactly once across ranks, and every rank the same number of
batches. Rank ``r`` owns a contiguous block of ``ceil(N / world)`` sample slots; the last
batches are padded, and the ``valid`` key masks padding (and samples that failed to decode)
out of the metrics.

Shards come from a :class:`~lvvit.data.source.ShardSource` (a local folder or pattern,
``http(s)://``, ``pipe:``, object-store URLs); a pattern naming a subset gives the counts
of exactly that subset.

Corrupt samples (a JPEG that does not decode, a ``tlm`` that does not parse, a missing
field) are skipped, collected with their shard and key in :attr:`BatchLoader.skipped`, and
logged at the end of each epoch. In training, a shard that stays unreachable (404, refused,
timed out) is skipped the same way and reported by URL with key ``<shard>``; in evaluation,
where a silent skip would change the metric, it is an error naming the URL (a local
shard that cannot be opened too). A missing local shard is an error that names it when the
source is resolved. The workers end with their rank on every exit path
(:mod:`lvvit.loader.workers`).
"""

from __future__ import annotations

import logging
import math
import random
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.utils import pytorch_worker_info

from lvvit.data.decode import EvalTransform
from lvvit.data.labelmap import LabelMapError, decode_tlm
from lvvit.data.source import ShardSource, ShardUnavailable, as_source
from lvvit.data.tarsamples import SHARD_KEY, SkippedSample, read_tar_samples
from lvvit.loader.transforms import RandAugment, TrainTransform
from lvvit.loader.workers import worker_init

log = logging.getLogger(__name__)


class CorruptSampleError(Exception):
    """A sample whose fields are missing or unreadable (the image and tlm decoders raise
    their own errors, listed in ``CORRUPT_SAMPLE_ERRORS``)."""


CORRUPT_SAMPLE_ERRORS = (CorruptSampleError, LabelMapError, OSError, SyntaxError, EOFError, Image.DecompressionBombError)
"""What a bad sample raises: PIL decoding errors, ``decode_tlm``'s, ours. Anything else is a
bug and propagates."""

DEFAULT_RANDAUGMENT = RandAugment()
"""The official recipe's ``rand-m9-mstd0.5-inc1`` (LV-ViT-T/S/M)."""

SKIPPED = "_skipped"
"""Batch key carrying skip records from the workers; :class:`BatchLoader` pops it."""
POSITION = "_position"
"""Batch key (epoch sampling) carrying ``(worker, entries used, batches made)`` of the worker
that made the batch, as of that batch; :class:`BatchLoader` pops it."""
KEYS = "keys"
"""Batch key: the sample keys of the batch, in order (a list of str; not a tensor)."""
SAMPLINGS = ("epoch", "resampled")



def _field(sample: dict[str, Any], name: str) -> bytes:
    if name not in sample:
        raise CorruptSampleError(f"missing field {name!r}")
    return sample[name]


def _class_index(sample: dict[str, Any]) -> int:
    raw = _field(sample, "cls")
    try:
        return int(raw)
    except ValueError:
        raise CorruptSampleError(f"cls {raw[:20]!r} is not an integer") from None


def _reason(error: BaseException) -> str:
    if isinstance(error, CorruptSampleError):
        return str(error)
    if isinstance(error, Image.UnidentifiedImageError):
        return "not a decodable image"
    return f"{type(error).__name__}: {error}"


def has_label_maps(source: ShardSource) -> bool:
    """Whether the first sample of the first shard carries a ``tlm`` member."""
    with source.open(source.urls[0]) as stream:
        first = next(read_tar_samples(stream, source.urls[0]), None)
    return first is not None and "tlm" in first.as_dict()


def shard_samples(stream: BinaryIO, url: str) -> Iterator[dict[str, Any]]:
    """webdataset's sample dicts (with ``__url__``) of one open shard, through the bounded
    tar reader (:mod:`lvvit.data.tarsamples`): no member larger than its kind allows is read."""
    with stream:
        for sample in read_tar_samples(stream, url):
            yield {**sample.as_dict(), "__url__": url}


def _split_rank(world_size: int | None) -> tuple[int, int]:
    rank, world, _, _ = pytorch_worker_info()
    return rank, world if world_size is None else world_size


class BatchLoader:
    """Iterates one epoch of batches (contract dicts) and keeps the skip report.

    ``skipped`` holds this epoch's corrupt samples (unique by shard and key; with
    resampling one sample can come round more than once); ``total_skipped`` counts all
    skips since construction. A sample skipped after a worker's last batch of an epoch
    is reported with the next epoch."""

    def __init__(self, loader: Iterable[dict[str, Any]], steps: int, name: str) -> None:
        self.loader = loader
        self.steps = steps
        self.name = name
        self.skipped: list[SkippedSample] = []
        self.total_skipped = 0

    def __len__(self) -> int:
        return self.steps

    def position(self) -> dict[str, Any] | None:
        """Where the stream stands (epoch sampling; see
        :class:`~lvvit.loader.epoch_loader.EpochBatchLoader`); ``None``
        with resampling, which has no position to resume at."""
        return None

    def _epoch(self) -> Iterable[dict[str, Any]]:
        return self.loader

    def _took(self, batch: dict[str, Any]) -> None:
        """Called with each batch as it is handed to the consumer."""

    def _ended(self) -> None:
        """Called when an epoch's batches have all been handed out."""

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        seen: dict[tuple[str, str], SkippedSample] = {}
        self.skipped = []
        for batch in self._epoch():
            for record in batch.pop(SKIPPED):
                self.total_skipped += 1
                seen.setdefault(record[:2], SkippedSample(*record))
            self.skipped = list(seen.values())
            self._took(batch)
            yield batch
        self._ended()
        if self.skipped:
            listing = "; ".join(f"{s.shard}:{s.key} ({s.reason})" for s in self.skipped)
            log.warning("%s: skipped %d corrupt sample(s) this epoch: %s", self.name, len(self.skipped), listing)


# ---------------------------------------------------------------- training


MAX_SKIPS_IN_A_ROW = 500
"""Resampling never runs out of samples, so a dataset whose every sample fails (say, maps
expected but absent) would hang; this many failures in a row is an error instead."""
MAX_SHARDS_WITHOUT_SAMPLES = 16
"""Likewise for shards: this many shards in a row that give no sample (the server is gone,
every shard is empty) is an error."""


class _TrainStage:
    """Open, decode and collate for one worker; one object so that all see the same skip list."""

    def __init__(self, source: ShardSource, transform: TrainTransform, label_maps: bool, seed: int, rank: int,
                 keys: bool = False) -> None:
        self.source = source
        self.keys = keys
        self.transform = transform
        self.label_maps = label_maps
        self.seed = seed
        self.rank = rank
        self.rng: random.Random | None = None
        self.skipped: list[SkippedSample] = []
        self.in_a_row = 0
        self.shards_in_a_row = 0
        self.last_url = ""

    def samples(self, shards: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """The samples of each drawn shard, opened through the source (retries, timeouts,
        cache); a shard that cannot be opened or read to its end is skipped and reported by
        URL (the samples it gave before stay in)."""
        for shard in shards:
            url = shard["url"]
            self.shards_in_a_row += 1
            if self.shards_in_a_row > MAX_SHARDS_WITHOUT_SAMPLES:
                last = self.skipped[-1].reason if self.skipped and self.skipped[-1].key == SHARD_KEY else "no sample"
                raise RuntimeError(f"{MAX_SHARDS_WITHOUT_SAMPLES} shards in a row gave no sample; the last: "
                                   f"{self.last_url} ({last})")
            self.last_url = url
            try:
                for sample in shard_samples(self.source.open(url), url):
                    self.shards_in_a_row = 0
                    yield sample
            except (OSError, tarfile.TarError, EOFError) as error:  # ShardUnavailable is an OSError
                self.shard_failed(error, url)

    def shard_failed(self, error: BaseException, url: str) -> None:
        reason = getattr(error, "message", None) or f"{type(error).__name__}: {error.args[0] if error.args else error}"
        self.skipped.append(SkippedSample(url, SHARD_KEY, reason))
        log.warning("skipping shard %s: %s", url, reason)

    def _rng(self) -> random.Random:
        # Seeded lazily inside the worker: DataLoader draws a fresh worker seed from its
        # (rank-seeded) generator each epoch, so augmentations differ per epoch and rank.
        if self.rng is None:
            info = get_worker_info()
            worker_seed = info.seed if info is not None else 0
            self.rng = random.Random(f"{self.seed}-{self.rank}-{worker_seed}")
        return self.rng

    def decode(self, sample: dict[str, Any], rng: random.Random | None = None) -> dict[str, Any] | None:
        """The decoded, augmented sample (with ``rng``, else the worker's own generator), or
        ``None`` for a corrupt one (recorded)."""
        key = sample.get("__key__", "<unknown>")
        try:
            label = _class_index(sample)
            label_map = decode_tlm(_field(sample, "tlm"), key) if self.label_maps else None
            out = self.transform(_field(sample, "jpg"), label_map, rng or self._rng())
        except CORRUPT_SAMPLE_ERRORS as error:
            self.failed(SkippedSample(Path(sample.get("__url__", "?")).name, key, _reason(error)), error)
            return None
        self.in_a_row = 0
        return {"label": label, "sample": out, "key": key}

    def failed(self, skip: SkippedSample | None, error: BaseException | None = None) -> None:
        """One sample gave nothing (recorded when ``skip`` is given); too many in a row is an error."""
        if skip is not None:
            self.skipped.append(skip)
        self.in_a_row += 1
        if self.in_a_row >= MAX_SKIPS_IN_A_ROW:
            last = f"{skip.shard}:{skip.key} ({skip.reason})" if skip is not None else "in an unreadable shard"
            raise RuntimeError(f"{self.in_a_row} samples in a row failed to decode; the last: {last}") from error

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        outs = [s["sample"] for s in samples]
        batch = {
            "images": torch.from_numpy(np.stack([o.image for o in outs])).permute(0, 3, 1, 2).contiguous(),
            "labels": torch.tensor([s["label"] for s in samples], dtype=torch.int64),
            "crop_boxes": torch.tensor([o.crop_box for o in outs], dtype=torch.float32),
            "flips": torch.tensor([o.flip for o in outs], dtype=torch.bool),
        }
        if self.label_maps:
            maps = [o.label_map for o in outs]
            shapes = {m.values.shape for m in maps}
            if len(shapes) > 1:
                keys = ", ".join(f"{s['__key__']} {o.label_map.values.shape}" for s, o in zip(samples, outs, strict=True))
                raise ValueError(f"label maps of different shapes in one batch: {keys}")
            batch["tlm_values"] = torch.from_numpy(np.stack([m.values for m in maps]).astype(np.float32))
            batch["tlm_indices"] = torch.from_numpy(np.stack([m.indices for m in maps]).astype(np.int64))
            batch["map_boxes"] = torch.tensor([m.box for m in maps], dtype=torch.float32)
        else:
            batch["map_boxes"] = torch.tensor([(0.0, 0.0, 1.0, 1.0)] * len(outs), dtype=torch.float32)
        if self.keys:
            batch[KEYS] = [s["key"] for s in samples]
        batch[SKIPPED], self.skipped = self.skipped, []
        return batch


def train_loader(
    data: str | Path,
    batch_size: int,
    img_size: int = 224,
    *,
    num_workers: int = 4,
    shuffle_buffer: int = 2000,
    randaugment: RandAugment | None = DEFAULT_RANDAUGMENT,
    erase_prob: float = 0.25,
    hflip: float = 0.5,
    scale: tuple[float, float] = (0.08, 1.0),
    label_maps: bool | None = None,
    steps_per_epoch: int | None = None,
    seed: int = 0,
    world_size: int | None = None,
    pin_memory: bool = False,
    sampling: str = "resampled",
    epoch: int = 0,
    position: dict[str, Any] | list[dict[str, Any]] | None = None,
    rank: int | None = None,
    keys: bool = False,
) -> BatchLoader:
    """Training batches (docs/contracts.md, "Training batch") from the shards of ``data``
    (a :class:`ShardSource`, or a spec for one: a folder with ``manifest.json``, the
    manifest itself, a brace pattern, an ``http(s)://`` or ``pipe:`` pattern, ...).

    ``shuffle_buffer`` samples are mixed across shards (0 or 1: stream order).
    ``randaugment`` defaults to m9, mstd 0.5, 2 ops; pass ``RandAugment(num_ops=3)`` for
    LV-ViT-L, ``None`` for none. ``label_maps=None`` looks at the first
    sample of the first shard. Every rank gets ``steps_per_epoch`` batches, by default
    ``total // (batch_size * world_size)`` (a source without counts needs
    ``steps_per_epoch``). Shards are drawn at random (resampled, seeded by ``seed``, rank
    and worker) from the source's shards only. The rank and world size come from RANK and
    WORLD_SIZE or the initialised process group, as webdataset's ``split_by_node`` reads them.

    ``sampling="epoch"`` (needs the source's per-shard counts) gives exact epochs instead
    (:mod:`lvvit.loader.sampling`, docs/training.md "Sampling and exact resume"): every
    sample once per epoch (less the ``drop_last`` remainder), in an order fixed by (seed,
    epoch, rank, worker count), augmented from (seed, epoch, sample); the first iteration
    is ``epoch`` (or the position's), each later one the next epoch; ``rank`` may be
    given explicitly; batches carry ``"keys"``;
    :meth:`~lvvit.loader.epoch_loader.EpochBatchLoader.position` is a
    resume point, and ``position=`` (one rank's dict, or the list of every rank's) continues
    the stream: exactly with the same world size, worker count, batch size and buffer,
    else with the epoch's samples not yet seen. ``steps_per_epoch`` is then the batches of
    a whole epoch. ``keys=True`` adds ``"keys"`` to resampled batches too.
    """
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling {sampling!r} is not one of {', '.join(SAMPLINGS)}")
    source = as_source(data)
    if sampling == "epoch":
        from lvvit.loader.epoch_loader import _epoch_loader  # imports this module: not at the top

        return _epoch_loader(source, batch_size, img_size, num_workers=num_workers, shuffle_buffer=shuffle_buffer,
                             randaugment=randaugment, erase_prob=erase_prob, hflip=hflip, scale=scale,
                             label_maps=label_maps, steps_per_epoch=steps_per_epoch, seed=seed,
                             world_size=world_size, rank=rank, pin_memory=pin_memory, epoch=epoch, position=position)
    if position is not None or rank is not None:
        raise ValueError("position and rank are for sampling='epoch'; resampling has no position to resume at")
    rank, world = _split_rank(world_size)
    if steps_per_epoch is None and source.total is None:
        raise ValueError(f"no sample counts for {source.spec} (no manifest.json reachable); give steps_per_epoch")
    steps = steps_per_epoch or source.total // (batch_size * world)
    if steps < 1:
        raise ValueError(f"{source.total} samples give no full batch of {batch_size} on each of {world} rank(s)")
    if label_maps is None:
        label_maps = has_label_maps(source)
    transform = TrainTransform(
        img_size=img_size,
        scale=scale,
        hflip=hflip,
        randaugment=randaugment,
        erase_prob=erase_prob,
    )
    stage = _TrainStage(source, transform, label_maps, seed, rank, keys)
    dataset = wds.DataPipeline(
        wds.ResampledShards(list(source.urls), seed=seed, deterministic=True),
        wds.split_by_node,
        wds.split_by_worker,
        stage.samples,
    )
    if shuffle_buffer > 1:
        dataset.append(wds.shuffle(shuffle_buffer, initial=min(shuffle_buffer, 100), seed=seed * 7919 + rank))
    dataset.append(wds.map(stage.decode))
    dataset.append(wds.batched(batch_size, collation_fn=stage.collate, partial=False))
    generator = torch.Generator().manual_seed(seed * 100_003 + rank)
    loader = wds.WebLoader(
        dataset,
        batch_size=None,
        num_workers=num_workers,
        generator=generator,
        pin_memory=pin_memory,
        worker_init_fn=worker_init,
    ).with_epoch(steps)
    return BatchLoader(loader, steps, f"train rank {rank}")


# ---------------------------------------------------------------- evaluation


class _EvalDataset(IterableDataset):
    """Rank ``rank``'s padded block of sample slots, as whole batches; DataLoader workers
    take contiguous runs of those batches, so each reads only the shards it needs."""

    def __init__(self, source: ShardSource, transform: EvalTransform, batch_size: int, rank: int, world: int) -> None:
        super().__init__()
        self.source = source
        self.counts = source.counts
        self.transform = transform
        self.batch_size = batch_size
        per_rank = math.ceil(source.total / world)
        self.num_batches = math.ceil(per_rank / batch_size)
        self.first = rank * per_rank  # global index of this rank's first slot
        self.end = min(source.total, self.first + per_rank)  # first index past its real samples

    def _samples(self, lo: int, hi: int, skipped: list[SkippedSample]) -> Iterator[tuple[int, dict[str, Any]]]:
        """(global index, sample) for the samples ``lo <= index < hi``, in order."""
        offset = 0
        for url, count in zip(self.source.urls, self.counts, strict=True):
            if offset + count > lo and offset < hi:
                try:
                    for position, sample in enumerate(self._shard_samples(url)):
                        index = offset + position
                        if position >= count or index >= hi:
                            break
                        if index >= lo:
                            yield index, sample
                except ShardUnavailable as error:
                    raise ShardUnavailable(f"eval shard {url} cannot be read: {error.args[0]}", url) from None
                except (OSError, tarfile.TarError, ValueError) as error:
                    skipped.append(SkippedSample(Path(url).name, SHARD_KEY, _reason(error)))
            offset += count

    def _shard_samples(self, url: str) -> Iterator[dict[str, Any]]:
        try:
            stream = self.source.open(url)
        except ShardUnavailable:
            raise
        except OSError as error:  # a local shard gone (or unreadable) since the run started
            raise ShardUnavailable(f"{type(error).__name__}: {error.strerror or error}", url) from None
        yield from shard_samples(stream, url)

    def _decode(self, sample: dict[str, Any], skipped: list[SkippedSample]) -> tuple[np.ndarray, int] | None:
        try:
            return self.transform(_field(sample, "jpg")), _class_index(sample)
        except CORRUPT_SAMPLE_ERRORS as error:
            shard = Path(sample.get("__url__", "?")).name
            skipped.append(SkippedSample(shard, sample.get("__key__", "<unknown>"), _reason(error)))
            return None

    def _shard_of(self, index: int) -> str:
        offsets = np.cumsum(self.counts)
        return Path(self.source.urls[int(np.searchsorted(offsets, index, side="right"))]).name

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        b0, b1 = self.num_batches * worker // workers, self.num_batches * (worker + 1) // workers
        size, first = self.batch_size, self.first
        skipped: list[SkippedSample] = []
        stream = self._samples(first + b0 * size, min(self.end, first + b1 * size), skipped)
        pending = next(stream, None)
        for b in range(b0, b1):
            images = np.zeros((size, self.transform.img_size, self.transform.img_size, 3), np.uint8)
            labels = np.zeros(size, np.int64)
            valid = np.zeros(size, bool)
            for slot in range(size):
                index = first + b * size + slot
                if index >= self.end:
                    continue  # padding
                if pending is None or pending[0] != index:
                    skipped.append(SkippedSample(self._shard_of(index), f"#{index}", "not in shard (manifest count too high)"))
                    continue
                decoded = self._decode(pending[1], skipped)
                pending = next(stream, None)
                if decoded is not None:
                    images[slot], labels[slot] = decoded
                    valid[slot] = True
            yield {
                "images": torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
                "labels": torch.from_numpy(labels),
                "valid": torch.from_numpy(valid),
                SKIPPED: skipped,
            }
            skipped = []


def eval_loader(
    data: str | Path,
    batch_size: int,
    img_size: int = 224,
    crop_pct: float = 0.9,
    *,
    num_workers: int = 4,
    world_size: int | None = None,
    rank: int | None = None,
    pin_memory: bool = False,
) -> BatchLoader:
    """Eval batches ``{"images": uint8 [B,3,S,S], "labels": int64 [B], "valid": bool [B]}``.

    Every rank gets ``ceil(ceil(N / world) / batch_size)`` batches; sum metrics over
    ``valid`` samples only and all-reduce them, and each sample counts exactly once. ``data``
    is a :class:`ShardSource` or a spec for one; the split needs its manifest's counts. A
    shard that cannot be read raises ``ShardUnavailable`` naming its URL.
    """
    source = as_source(data)
    if source.counts is None:
        raise ValueError(f"evaluating {source.spec} needs its per-shard sample counts for the exact split, "
                         "and no manifest.json is reachable beside it; give one")
    found_rank, world = _split_rank(world_size)
    rank = found_rank if rank is None else rank
    dataset = _EvalDataset(source, EvalTransform(img_size, crop_pct), batch_size, rank, world)
    loader = DataLoader(dataset, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                        worker_init_fn=worker_init)
    return BatchLoader(loader, dataset.num_batches, f"eval rank {rank}")
