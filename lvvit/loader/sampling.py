"""Exact epochs: which sample each rank and loader worker emits, and when, computed from
the per-shard counts alone (no data read), so that a position in that order is a resume point.

One epoch of ``sampling="epoch"`` (docs/training.md, "Sampling and exact resume"):

1. The shards are permuted, seeded by (seed, epoch); their samples laid end to end in
   that order make one sequence of ``total`` slots (slot -> (shard, index in shard)).
2. Rank ``r`` takes the contiguous block ``[r * per_rank, (r + 1) * per_rank)``,
   ``per_rank = total // world`` (a shard may be split between two ranks: each reads only
   its part). Each rank runs ``steps`` batches (default ``per_rank // batch_size``).
3. The rank's ``steps`` batches are dealt to its ``W`` loader workers as DataLoader takes
   them, round robin (worker ``w`` makes ``steps // W`` batches, one more when
   ``w < steps % W``), and the rank's block is split contiguously in proportion, so
   every worker holds at least the samples its batches need.
4. A worker's slots go through a shuffle buffer seeded by (seed, epoch, rank, worker):
   run on slot numbers, it gives the worker's whole emission order up front.

A worker emits its order from the front; a sample that turns out corrupt (or missing from
its shard, or in a shard that cannot be read) uses up its entry and the next one fills the
batch. The entries its batches do not need, at most the ``per_rank % batch_size`` spare
slots of a rank plus the ``total % world`` slots no rank takes, are left out this epoch
(``drop_last``: at ImageNet's 1,281,167 images and a global batch of 1024, 143 images,
0.011 %, whatever the world size; other ones each epoch). A worker with more corrupt
samples than spare entries starts its order again (a second pass) rather than end short:
every rank must take the same number of steps.

A position is, per worker, the entries its consumed batches used. With the same world
size and worker count the rest of the order is the same stream. With another, the old
plans are recomputed to find the slots already emitted, and the epoch's remaining slots,
in sequence order, are dealt to the new ranks and workers as in 2-4 (one level of
``resumed_from`` per change; the rest of that epoch only).
"""

from __future__ import annotations

import bisect
import itertools
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

POSITION_FIELDS = ("epoch", "seed", "samples", "world", "rank", "num_workers", "batch_size", "steps",
                   "shuffle_buffer", "entries", "batches")


def shard_order(num_shards: int, seed: int, epoch: int) -> list[int]:
    """The epoch's shard permutation."""
    order = list(range(num_shards))
    random.Random(f"{seed}-{epoch}-shards").shuffle(order)
    return order


def buffer_order(items: Sequence[int], buffer: int, rng: random.Random) -> list[int]:
    """The order a shuffle buffer of ``buffer`` entries emits ``items`` read in order: once
    it holds ``buffer``, each read is followed by emitting a random held one; at the end
    the rest leave in a random order. Item ``items[i]`` is always emitted at or after its
    read, and emission ``j`` happens by the read of item ``j + buffer - 1``: a reader that
    emits greedily in this order holds fewer than ``buffer`` read items."""
    if buffer <= 1:
        return list(items)
    held: list[int] = []
    out: list[int] = []
    for item in items:
        held.append(item)
        if len(held) >= buffer:
            k = rng.randrange(len(held))
            held[k], held[-1] = held[-1], held[k]
            out.append(held.pop())
    rng.shuffle(held)
    out.extend(held)
    return out


def worker_batches(steps: int, workers: int) -> list[int]:
    """Batches each worker makes so that DataLoader's round robin gives ``steps`` in all."""
    return [steps // workers + (w < steps % workers) for w in range(workers)]


def left_out(total: int, world: int, batch_size: int) -> int:
    """Samples an epoch leaves out with the default steps (``drop_last``)."""
    return total - (total // world) // batch_size * batch_size * world


@dataclass
class EpochPlan:
    """The emission orders of one epoch (or of the rest of one, after a change of world
    size or worker count) for every rank and worker; a pure function of its fields."""

    counts: tuple[int, ...]
    seed: int
    epoch: int
    world: int
    num_workers: int
    batch_size: int
    shuffle_buffer: int
    steps: int | None = None  # per rank; None: per_rank // batch_size
    resumed_from: list[dict[str, Any]] = field(default_factory=list)  # the old ranks' positions

    def __post_init__(self) -> None:
        self.shards = shard_order(len(self.counts), self.seed, self.epoch)
        self.starts = [0, *itertools.accumulate(self.counts[s] for s in self.shards)]
        self.total = self.starts[-1]
        if self.resumed_from:
            self.sequence: Sequence[int] = remaining_slots(self.resumed_from, self.counts)
        else:
            self.sequence = range(self.total)
        self.per_rank = len(self.sequence) // self.world
        if self.steps is None:
            self.steps = self.per_rank // self.batch_size

    @property
    def depth(self) -> int:
        return 1 + max((p.get("depth", 0) for p in self.resumed_from), default=-1) if self.resumed_from else 0

    def locate(self, slot: int) -> tuple[int, int]:
        """(shard index in the source, sample index in the shard) of a slot."""
        i = bisect.bisect_right(self.starts, slot) - 1
        return self.shards[i], slot - self.starts[i]

    def batches(self) -> list[int]:
        return worker_batches(self.steps, self.num_workers)

    def worker_slots(self, rank: int, worker: int) -> Sequence[int]:
        """The worker's slots in sequence (read) order."""
        cumulative = [0, *itertools.accumulate(self.batches())]
        steps = max(self.steps, 1)
        block = self.sequence[rank * self.per_rank : (rank + 1) * self.per_rank]
        lo, hi = self.per_rank * cumulative[worker] // steps, self.per_rank * cumulative[worker + 1] // steps
        return block[lo:hi]

    def worker_order(self, rank: int, worker: int) -> list[int]:
        """The worker's emission order (slots), shuffle buffer seeded by (seed, epoch, rank, worker)."""
        rng = random.Random(f"{self.seed}-{self.epoch}-{rank}-{worker}-{self.depth}")
        return buffer_order(self.worker_slots(rank, worker), self.shuffle_buffer, rng)

    def position(self, rank: int, entries: list[int], batches: list[int]) -> dict[str, Any]:
        """JSON-serialisable position of ``rank`` (format: docs/training.md)."""
        out = {"sampling": "epoch", "epoch": self.epoch, "seed": self.seed, "samples": self.total,
               "world": self.world, "rank": rank, "num_workers": self.num_workers, "batch_size": self.batch_size,
               "steps": self.steps, "shuffle_buffer": self.shuffle_buffer, "entries": list(entries),
               "batches": list(batches)}
        if self.resumed_from:
            out["resumed_from"] = self.resumed_from
            out["depth"] = self.depth
        return out


def plan_of(position: dict[str, Any], counts: tuple[int, ...]) -> EpochPlan:
    """The plan a saved position was taken in."""
    return EpochPlan(counts, position["seed"], position["epoch"], position["world"], position["num_workers"],
                     position["batch_size"], position["shuffle_buffer"], position["steps"],
                     position.get("resumed_from", []))


def check_positions(positions: list[dict[str, Any]], counts: tuple[int, ...], all_ranks: bool = True) -> None:
    """Raises ``ValueError`` unless ``positions`` are of one plan of this data (and, with
    ``all_ranks``, every rank of it)."""
    for p in positions:
        missing = [f for f in POSITION_FIELDS if f not in p]
        if missing or p.get("sampling", "epoch") != "epoch":
            raise ValueError(f"not an epoch-sampling position (missing {', '.join(missing) or 'sampling'}): {p!r:.200}")
    first = positions[0]
    same = ("epoch", "seed", "samples", "world", "num_workers", "batch_size", "steps", "shuffle_buffer")
    for p in positions:
        if any(p[f] != first[f] for f in same):
            raise ValueError("the saved positions are not of one epoch plan: "
                             + ", ".join(f"{f} {p[f]} vs {first[f]}" for f in same if p[f] != first[f]))
    if first["samples"] != sum(counts):
        raise ValueError(f"the saved position is for {first['samples']} samples, the source has {sum(counts)}: "
                         "the data changed, the stream cannot be continued")
    if all_ranks and sorted(p["rank"] for p in positions) != list(range(first["world"])):
        raise ValueError(f"continuing on another world size or worker count needs the positions of all "
                         f"{first['world']} old ranks; got ranks {sorted(p['rank'] for p in positions)}")


def emitted_slots(positions: list[dict[str, Any]], counts: tuple[int, ...]) -> set[int]:
    """The slots the ranks of ``positions`` (all of one plan) had emitted."""
    check_positions(positions, counts)
    plan = plan_of(positions[0], counts)
    seen: set[int] = set()
    for p in positions:
        for worker, used in enumerate(p["entries"]):
            order = plan.worker_order(p["rank"], worker)
            seen.update(order if used >= len(order) else order[:used])
    return seen


def remaining_slots(positions: list[dict[str, Any]], counts: tuple[int, ...]) -> list[int]:
    """The old plan's sequence less what its ranks had emitted, in sequence order."""
    plan = plan_of(positions[0], counts)
    seen = emitted_slots(positions, counts)
    return [slot for slot in plan.sequence if slot not in seen]


__all__ = ["EpochPlan", "buffer_order", "emitted_slots", "left_out", "plan_of", "remaining_slots", "shard_order",
           "worker_batches"]
