"""Run a dense teacher over samples and write shards with a ``tlm`` record added.

Decoding and resizing run in a thread pool (PIL releases the GIL) one batch ahead of
the teacher, so a GPU teacher is not starved by a single decoding thread.
"""

from __future__ import annotations

import logging
import tarfile
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from PIL import UnidentifiedImageError
from torch import nn

from lvvit import atomic
from lvvit.data.decode import IMAGENET_MEAN, IMAGENET_STD, EvalTransform, normalize, open_image
from lvvit.data.labelmap import LabelMap, encode_tlm
from lvvit.data.tarsamples import ShardReadError, SkippedSample, TarSample, add_member, new_member
from lvvit.labeling.teacher import check_logits, dense_topk

log = logging.getLogger(__name__)

Box = tuple[float, float, float, float]

PARTIAL_SUFFIX = ".partial"
"""Suffix of a shard being written; only a complete shard gets its final name."""

PRECISIONS = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
CHANNEL_ORDERS = ("rgb", "bgr")


def eval_box(width: int, height: int, img_size: int, crop_pct: float) -> Box:
    """The part of a ``width x height`` image that ``EvalTransform(img_size, crop_pct)``
    keeps, in normalised coordinates: the box the teacher's map covers."""
    return EvalTransform(img_size=img_size, crop_pct=crop_pct).box(width, height)


@dataclass
class ShardResult:
    name: str
    written: int = 0
    skipped: list[SkippedSample] = field(default_factory=list)
    seconds: float = 0.0


def _batched(items: Iterable[TarSample], n: int) -> Iterator[list[TarSample]]:
    it = iter(items)
    while batch := list(islice(it, n)):
        yield batch


class Labeler:
    """Teacher plus preprocessing: turns batches of samples into ``LabelMap`` records."""

    def __init__(
        self,
        teacher: nn.Module,
        img_size: int,
        crop_pct: float = 1.0,
        topk: int = 5,
        batch_size: int = 64,
        device: str | torch.device = "cpu",
        precision: str = "fp32",
        workers: int = 4,
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
        channel_order: str = "rgb",
        num_classes: int | None = None,
        where: str = "teacher",
    ) -> None:
        """``mean``/``std`` and ``channel_order`` are the teacher's input convention: the
        crops are RGB, reordered to ``channel_order`` first, then normalised with ``mean``
        and ``std`` given in that order (a BGR Caffe-style model lists its means as B, G, R).
        Every batch's logits must be finite floats with ``num_classes`` classes (when
        known); ``where`` (the teacher's file) names the teacher in that error."""
        self.device = torch.device(device)
        self.teacher = teacher.to(self.device).eval()
        if not 0.0 < crop_pct <= 1.0:
            raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
        self.transform = EvalTransform(img_size, crop_pct)
        self.topk, self.batch_size = topk, batch_size
        self.dtype = PRECISIONS[precision]
        if channel_order not in CHANNEL_ORDERS:
            raise ValueError(f"channel_order must be one of {CHANNEL_ORDERS}, got {channel_order!r}")
        self.mean, self.std, self.bgr = tuple(mean), tuple(std), channel_order == "bgr"
        self.num_classes, self.where = num_classes, where
        self.pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="label-decode")

    def close(self) -> None:
        self.pool.shutdown()

    def view(self, sample: TarSample) -> tuple[np.ndarray, Box]:
        """The teacher's eval crop (uint8 ``[S, S, 3]``) and the box it covers."""
        data = sample.image()
        width, height = open_image(data).size
        box = self.transform.box(width, height)
        return self.transform(data), box

    @torch.inference_mode()
    def label(self, crops: list[np.ndarray], boxes: list[Box]) -> list[LabelMap]:
        """Teacher top-k for a batch of eval crops (uint8 ``[S, S, 3]``)."""
        images = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2)
        if self.device.type == "cuda":
            images = images.pin_memory()
        images = images.to(self.device, non_blocking=True)
        if self.bgr:
            images = images.flip(1)
        autocast = (
            torch.autocast(self.device.type, dtype=self.dtype) if self.dtype is not None else nullcontext()
        )
        with autocast:
            logits = self.teacher(normalize(images, self.mean, self.std))
        check_logits(logits, self.num_classes, self.where)
        values, indices = dense_topk(logits, self.topk)
        values = values.cpu().numpy()
        indices = indices.cpu().numpy().astype(np.uint16)
        return [LabelMap(v, i, box) for v, i, box in zip(values, indices, boxes, strict=True)]

    def label_shard(
        self,
        samples: Iterable[TarSample],
        out_path: Path,
        expected: int | None = None,
        on_batch: Callable[[int], None] | None = None,
    ) -> ShardResult:
        """Label every sample and write them with ``tlm`` to ``out_path``, atomically.

        The tar is written under a temporary name and renamed only when complete (and,
        given ``expected``, only when that many input samples were seen: a tar cut at a
        member boundary reads as a shorter valid tar), so a file with the final name is
        always a finished shard, which is what resume trusts. Samples whose image cannot
        be read are left out and listed in the result.
        """
        result = ShardResult(out_path.name)
        start = time.perf_counter()
        with atomic.atomic_path(out_path, out_path.with_name(out_path.name + PARTIAL_SUFFIX)) as partial:
            seen = self._write_shard(samples, partial, result, on_batch)
            if expected is not None and seen != expected:
                raise ShardReadError(f"the input has {seen} samples, expected {expected}")
        result.seconds = time.perf_counter() - start
        return result

    def _write_shard(
        self,
        samples: Iterable[TarSample],
        path: Path,
        result: ShardResult,
        on_batch: Callable[[int], None] | None,
    ) -> int:
        """Decode one batch ahead while the teacher runs on the current one; returns samples seen."""
        seen = 0
        with tarfile.open(path, "w") as tar:
            pending: tuple[list[TarSample], list[Future]] | None = None
            for batch in _batched(samples, self.batch_size):
                views = [self.pool.submit(self.view, sample) for sample in batch]
                if pending is not None:
                    self._write_batch(tar, *pending, result, on_batch)
                pending = batch, views
                seen += len(batch)
            if pending is not None:
                self._write_batch(tar, *pending, result, on_batch)
        return seen

    def _write_batch(
        self,
        tar: tarfile.TarFile,
        batch: list[TarSample],
        views: list[Future],
        result: ShardResult,
        on_batch: Callable[[int], None] | None,
    ) -> None:
        crops, boxes, kept = [], [], []
        for sample, view in zip(batch, views, strict=True):
            try:
                crop, box = view.result()
            except UnidentifiedImageError:
                self._skip(result, sample.key, "UnidentifiedImageError: not an image format PIL can read")
                continue
            except Exception as e:  # an unreadable image costs one sample, not the run
                self._skip(result, sample.key, f"{type(e).__name__}: {e}")
                continue
            crops.append(crop)
            boxes.append(box)
            kept.append(sample)
        maps = self.label(crops, boxes) if crops else []
        for sample, label_map in zip(kept, maps, strict=True):
            write_labeled_sample(tar, sample, encode_tlm(label_map, sample.key))
        result.written += len(kept)
        if on_batch is not None:
            on_batch(len(batch))

    @staticmethod
    def _skip(result: ShardResult, key: str, reason: str) -> None:
        log.warning("%s: skipped sample %r: %s", result.name, key, reason)
        result.skipped.append(SkippedSample(result.name, key, reason))


def write_labeled_sample(tar: tarfile.TarFile, sample: TarSample, tlm: bytes) -> None:
    """The sample's members as they were, then ``tlm`` (replacing any earlier one)."""
    members = [(info, data) for info, data in sample.members if not info.name.endswith(".tlm")]
    for info, data in members:
        add_member(tar, info, data)
    add_member(tar, new_member(f"{sample.key}.tlm", tlm, like=members[0][0]), tlm)
