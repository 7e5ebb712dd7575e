"""Exact-epoch training loader (``sampling="epoch"`` of
:func:`lvvit.loader.pipeline.train_loader`).

Each rank's share of an epoch follows its :class:`~lvvit.loader.sampling.EpochPlan`: the
DataLoader workers emit their precomputed orders (:class:`_EpochDataset`), and
:class:`EpochBatchLoader` hands out the rest of the current epoch per iteration and says
where the stream stands (:meth:`EpochBatchLoader.position`). :func:`_start_plan` turns a
saved position (one rank's, or every rank's) into the plan and per-worker start to resume
at: exactly on the same layout, else with the epoch's samples not yet seen. Decoding,
augmentation, collation and the skip report are the shared pieces of
:mod:`lvvit.loader.pipeline`.
"""

from __future__ import annotations

import contextlib
import logging
import random
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from lvvit.data.source import ShardSource
from lvvit.data.streams import shard_name
from lvvit.data.tarsamples import SkippedSample, scan_tar_samples
from lvvit.loader.pipeline import (
    MAX_SHARDS_WITHOUT_SAMPLES,
    POSITION,
    BatchLoader,
    _split_rank,
    _TrainStage,
    has_label_maps,
)
from lvvit.loader.sampling import EpochPlan, check_positions, plan_of
from lvvit.loader.transforms import RandAugment, TrainTransform
from lvvit.loader.workers import worker_init

log = logging.getLogger(__name__)


class _EpochDataset(IterableDataset):
    """One rank's share of an epoch (:mod:`lvvit.loader.sampling`): each DataLoader worker
    emits its precomputed order from its start entry, reading its shards in sequence
    order, passing by header over samples it does not need, holding read samples until
    their turn (fewer than the shuffle buffer), and augmenting each with a generator
    seeded by (seed, epoch, shard, key)."""

    def __init__(self, stage: _TrainStage, plan: EpochPlan, rank: int, batch_size: int,
                 entries: Sequence[int], made: Sequence[int]) -> None:
        super().__init__()
        self.stage, self.plan, self.rank, self.batch_size = stage, plan, rank, batch_size
        self.entries, self.made = list(entries), list(made)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        # DataLoader takes batches from its workers round robin from worker 0; after a
        # resume the next batch is due from plan worker (batches taken) % W: rotate.
        info = get_worker_info()
        workers = self.plan.num_workers
        worker = ((info.id if info is not None else 0) + sum(self.made)) % workers
        target, made = self.plan.batches()[worker], self.made[worker]
        if made >= target:
            return
        order = self.plan.worker_order(self.rank, worker)
        if not order:
            raise RuntimeError(f"rank {self.rank} worker {worker} has {target} batches to make and no samples")
        stage, seed, epoch = self.stage, self.plan.seed, self.plan.epoch
        keep: list[dict[str, Any]] = []
        with contextlib.closing(self._entries(order, self.entries[worker])) as entries:
            for entry, sample in entries:
                if sample is not None:
                    rng = random.Random(f"{seed}-{epoch}-{shard_name(sample['__url__'])}/{sample['__key__']}")
                    out = stage.decode(sample, rng)
                    if out is not None:
                        keep.append(out)
                if len(keep) == self.batch_size:
                    made += 1
                    batch = stage.collate(keep)
                    batch[POSITION] = (worker, entry + 1, made)
                    keep = []
                    yield batch
                    if made >= target:
                        return

    def _entries(self, order: list[int], start: int) -> Iterator[tuple[int, dict[str, Any] | None]]:
        """``(entry, sample or None)`` from entry ``start`` on; entry ``e`` is ``order[e % n]``
        (a worker short of samples starts its order again rather than end short)."""
        entry = start
        while True:
            with contextlib.closing(self._stream(order, entry % len(order))) as stream:
                for sample in stream:
                    yield entry, sample
                    entry += 1

    def _stream(self, order: list[int], start: int) -> Iterator[dict[str, Any] | None]:
        """The samples of ``order[start:]`` in that order (``None``: missing or unreadable).
        Only the shards holding them are opened; the others of the worker's shards
        are not, and within a shard samples not needed are passed over by header."""
        need = order[start:]
        pending: dict[int, dict[str, Any] | None] = {}
        emitted = 0
        for shard, slots in self._by_shard(sorted(need)):
            wanted = dict(slots)
            failed: list[BaseException] = []
            for index, sample in self._shard(shard, wanted, failed):
                pending[wanted.pop(index)] = sample
                while emitted < len(need) and need[emitted] in pending:
                    yield pending.pop(need[emitted])
                    emitted += 1
            name = Path(self.stage.source.urls[shard]).name
            for index, slot in wanted.items():  # not in the shard, or the shard failed (reported once)
                why = None if failed else SkippedSample(name, f"#{index}", "not in shard (manifest count too high)")
                self.stage.failed(why)
                pending[slot] = None
            while emitted < len(need) and need[emitted] in pending:
                yield pending.pop(need[emitted])
                emitted += 1

    def _by_shard(self, slots: list[int]) -> Iterator[tuple[int, list[tuple[int, int]]]]:
        """(shard, [(index in shard, slot), ...]) in sequence order."""
        group: list[tuple[int, int]] = []
        current = -1
        for slot in slots:
            shard, index = self.plan.locate(slot)
            if shard != current and group:
                yield current, group
                group = []
            current = shard
            group.append((index, slot))
        if group:
            yield current, group

    def _shard(self, shard: int, wanted: dict[int, int], failed: list[BaseException]
               ) -> Iterator[tuple[int, dict[str, Any]]]:
        """(index, sample dict) of the ``wanted`` samples of one shard; stops after the last.
        A shard that cannot be opened or read is recorded by URL (its unread samples then
        count as failed)."""
        stage = self.stage
        url = stage.source.urls[shard]
        last = max(wanted)
        stage.shards_in_a_row += 1
        if stage.shards_in_a_row > MAX_SHARDS_WITHOUT_SAMPLES:
            raise RuntimeError(f"{MAX_SHARDS_WITHOUT_SAMPLES} shards in a row gave no sample; the last: {stage.last_url}")
        stage.last_url = url
        try:
            with stage.source.open(url) as stream:
                for index, sample in scan_tar_samples(stream, url, wanted.__contains__):
                    if sample is not None:
                        stage.shards_in_a_row = 0
                        yield index, {**sample.as_dict(), "__url__": url}
                    if index >= last:
                        return
        except (OSError, tarfile.TarError, EOFError) as error:  # ShardUnavailable is an OSError
            stage.shard_failed(error, url)
            failed.append(error)


class EpochBatchLoader(BatchLoader):
    """Exact epochs (``sampling="epoch"``): each iteration is the rest of the current
    epoch, then the next iteration is the next epoch from its start. ``len()`` is the
    batches the next iteration gives. :meth:`position` says how far the consumer is."""

    def __init__(self, make: Any, plan: EpochPlan, rank: int, entries: list[int], made: list[int],
                 steps_per_epoch: int | None, name: str) -> None:
        super().__init__((), 0, name)
        self.make, self.plan, self.rank = make, plan, rank
        self.entries, self.made = entries, made
        self.steps_per_epoch = steps_per_epoch

    def __len__(self) -> int:
        return self.plan.steps - sum(self.made)

    def _epoch(self) -> Iterable[dict[str, Any]]:
        return self.make(self.plan, self.entries, self.made)

    def _took(self, batch: dict[str, Any]) -> None:
        worker, used, made = batch.pop(POSITION)
        self.entries[worker], self.made[worker] = used, made

    def _ended(self) -> None:
        self.plan = self._next_plan()
        self.entries, self.made = [0] * self.plan.num_workers, [0] * self.plan.num_workers

    def _next_plan(self) -> EpochPlan:
        p = self.plan
        return EpochPlan(p.counts, p.seed, p.epoch + 1, p.world, p.num_workers, p.batch_size, p.shuffle_buffer,
                         self.steps_per_epoch)

    @property
    def epoch(self) -> int:
        """The epoch the next batch belongs to."""
        return self.position()["epoch"]

    def position(self) -> dict[str, Any]:
        """This rank's position as of the last batch the consumer took (JSON-serialisable;
        format in docs/training.md). After an epoch's last batch it is the start of the next."""
        if sum(self.made) >= self.plan.steps:
            return self._next_plan().position(self.rank, [0] * self.plan.num_workers, [0] * self.plan.num_workers)
        return self.plan.position(self.rank, self.entries, self.made)


def _start_plan(
    counts: tuple[int, ...], seed: int, epoch: int, world: int, rank: int, workers: int, batch_size: int,
    shuffle_buffer: int, steps: int | None, position: dict[str, Any] | list[dict[str, Any]] | None,
) -> tuple[EpochPlan, list[int], list[int]]:
    """The plan and per-worker (entries, batches) to start at."""
    fresh = EpochPlan(counts, seed, epoch, world, workers, batch_size, shuffle_buffer, steps)
    if position is None:
        return fresh, [0] * workers, [0] * workers
    positions = position if isinstance(position, list) else [position]
    if not positions:
        raise ValueError("empty position list")
    for p in positions:
        if p.get("seed") != seed:
            raise ValueError(f"the saved position was taken with seed {p.get('seed')}, this loader has seed {seed}")
    mine = [p for p in positions if p.get("rank") == rank]
    p = mine[0] if mine else positions[0]
    same = (p.get("world"), p.get("num_workers"), p.get("batch_size"), p.get("shuffle_buffer")) == (
        world, workers, batch_size, shuffle_buffer)
    if same and mine:
        check_positions([p], counts, all_ranks=False)
        return plan_of(p, counts), list(p["entries"]), list(p["batches"])
    check_positions(positions, counts)
    if not any(sum(q["entries"]) for q in positions) and not any(q.get("resumed_from") for q in positions):
        fresh = EpochPlan(counts, seed, p["epoch"], world, workers, batch_size, shuffle_buffer, steps)
        return fresh, [0] * workers, [0] * workers  # an epoch not started: start it on the new layout
    plan = EpochPlan(counts, seed, p["epoch"], world, workers, batch_size, shuffle_buffer, None,
                     sorted(positions, key=lambda q: q["rank"]))
    log.info("continuing epoch %d on %d rank(s) x %d worker(s) (was %d x %d): %d samples left, %d batches per rank",
             p["epoch"], world, workers, p["world"], p["num_workers"], len(plan.sequence), plan.steps)
    return plan, [0] * workers, [0] * workers


def _epoch_loader(source: ShardSource, batch_size: int, img_size: int, *, num_workers: int, shuffle_buffer: int,
                  randaugment: RandAugment | None, erase_prob: float, hflip: float, scale: tuple[float, float],
                  label_maps: bool | None, steps_per_epoch: int | None, seed: int, world_size: int | None,
                  rank: int | None, pin_memory: bool, epoch: int,
                  position: dict[str, Any] | list[dict[str, Any]] | None) -> EpochBatchLoader:
    if source.counts is None:
        raise ValueError(f"sampling='epoch' needs the per-shard sample counts of {source.spec} (its manifest.json), "
                         "and none is reachable; give a manifest or use sampling='resampled'")
    found_rank, world = _split_rank(world_size)
    rank = found_rank if rank is None else rank
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside a world of {world}")
    workers = max(1, num_workers)
    plan, entries, made = _start_plan(source.counts, seed, epoch, world, rank, workers, batch_size,
                                      shuffle_buffer, steps_per_epoch, position)
    if plan.steps < 1:
        raise ValueError(f"{len(plan.sequence)} samples give no full batch of {batch_size} on each of {world} rank(s)")
    if label_maps is None:
        label_maps = has_label_maps(source)
    transform = TrainTransform(img_size=img_size, scale=scale, hflip=hflip, randaugment=randaugment,
                               erase_prob=erase_prob)
    stage = _TrainStage(source, transform, label_maps, seed, rank, keys=True)

    def make(plan: EpochPlan, entries: list[int], made: list[int]) -> DataLoader:
        dataset = _EpochDataset(stage, plan, rank, batch_size, entries, made)
        return DataLoader(dataset, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                          worker_init_fn=worker_init if num_workers else None)

    return EpochBatchLoader(make, plan, rank, entries, made, steps_per_epoch, f"train rank {rank}")
