"""ImageFolder trees to WebDataset shards, with the official TokenLabeling maps imported.

A sample is ``<key>.jpg`` (the original bytes unless re-encoded), ``<key>.cls`` and,
with ``label_root``, ``<key>.tlm`` (docs/format.md). The order is a seeded shuffle, so
every shard holds a mix of classes. Samples that cannot be used are reported and left
out; the run goes on, but a build that keeps no sample at all fails without writing a
manifest. Input files are untrusted: every image is decoded and checked
(``lvvit.data.images``), so training never meets a surprise. Each shard is written
under a temporary name and renamed once complete (``lvvit.atomic``), and ``<prefix>-summary.json``
records, after every shard, how far the input has been consumed, so an interrupted
build resumes where it stopped and never leaves a tar that looks complete but is not.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import tarfile
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

import numpy as np
from tqdm import tqdm

from lvvit import atomic
from lvvit.data.imagefolder import ShardBuildError, SourceImage, classes_json, scan_image_folder
from lvvit.data.images import UnsupportedImage, encode_image
from lvvit.data.labelmap import LabelMap, LabelMapError, centre_square_box, encode_tlm
from lvvit.data.members import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS

NO_MAP = "no label map at"
_TAR_BLOCK = 512


class EmptyBuildError(ShardBuildError):
    """Every input was left out: no manifest is written, so the folder never looks finished."""

    def __init__(self, message: str, summary: dict):
        super().__init__(message)
        self.summary = summary  # the build report, with every input's reason


@dataclass
class BuildConfig:
    root: str
    out: str
    prefix: str = "train"
    shard_size: int | None = 1000  # samples per shard
    shard_bytes: int | None = None  # an upper bound on tar bytes per shard instead, when given
    seed: int = 0
    max_size: int | None = None  # re-encode images whose longer side exceeds this
    max_pixels: int = DEFAULT_MAX_PIXELS  # downscale images with more pixels than this
    label_root: str | None = None  # official TokenLabeling maps: <label_root>/<class>/<name up to first dot>.pt
    class_names: str | None = None  # "wnid name..." lines (ImageNet's LOC_synset_mapping.txt)
    class_order: str = "sorted"  # class indices: "sorted" (torchvision) or "natural" (timm, official)
    workers: int = 1
    overwrite: bool = False

    def fingerprint(self, items: list[SourceImage]) -> str:
        """Changes whenever the shards this build would write change."""
        digest = hashlib.sha256()
        settings = {k: v for k, v in asdict(self).items() if k not in ("out", "workers", "overwrite")}
        digest.update(json.dumps(settings, sort_keys=True).encode())
        for item in items:
            digest.update(f"{item.key}\0{item.path}\0{item.label}\0".encode())
        return digest.hexdigest()


@dataclass
class Prepared:
    """One input image after preparation: its members, or why it was left out."""

    key: str
    members: dict[str, bytes] = field(default_factory=dict)
    reason: str | None = None
    reencoded: bool = False
    downscaled: bool = False


def import_official_map(tensor, width: int, height: int, source: str) -> LabelMap:
    """An official TokenLabeling map (``[2, k, H, W]``: logits, then class indices as
    fp16) as a ``LabelMap`` over the centre square the teacher saw of a
    ``width x height`` image."""
    array = tensor.numpy() if hasattr(tensor, "numpy") else np.asarray(tensor)
    if array.ndim != 4 or array.shape[0] != 2:
        raise LabelMapError(f"{source}: expected a [2, k, H, W] tensor, got shape {list(array.shape)}")
    values, indices = array[0].astype(np.float16), array[1].astype(np.float64)
    if not np.all(np.isfinite(indices)) or np.any(indices < 0) or np.any(indices > 0xFFFF):
        raise LabelMapError(f"{source}: class indices must be finite and in [0, 65535]")
    if np.any(indices != np.round(indices)):
        raise LabelMapError(f"{source}: class indices are not whole numbers")
    return LabelMap(values, indices.astype(np.uint16), centre_square_box(width, height))



def prepare_sample(item: SourceImage, max_size: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> Prepared:
    """Read, check and encode one image (and its map); never raises for bad input."""
    try:
        data = Path(item.path).read_bytes()
        encoded = encode_image(data, item.path, max_size, max_pixels)
    except UnsupportedImage as exc:
        return Prepared(item.key, reason=str(exc))
    except Exception as exc:  # PIL raises many types for damaged files
        return Prepared(item.key, reason=f"cannot decode image {item.path}: {exc}")
    width, height = encoded.size
    members = {"jpg": encoded.data, "cls": str(item.label).encode()}
    if item.label_path is not None:
        if not os.path.isfile(item.label_path):
            return Prepared(item.key, reason=f"{NO_MAP} {item.label_path}")
        try:
            import torch

            tensor = torch.load(item.label_path, map_location="cpu", weights_only=True)
            if not isinstance(tensor, torch.Tensor):
                raise LabelMapError(f"{item.label_path}: holds {type(tensor).__name__}, not a tensor")
            label_map = import_official_map(tensor, width, height, item.label_path)
            members["tlm"] = encode_tlm(label_map, item.key)
        except Exception as exc:
            return Prepared(item.key, reason=f"bad label map {item.label_path}: {exc}")
    return Prepared(item.key, members, reencoded=encoded.reencoded, downscaled=encoded.downscaled)


def missing_label_maps(skipped: list[dict]) -> list[dict]:
    """The skipped inputs that were left out because their label map does not exist."""
    return [entry for entry in skipped if entry["reason"].startswith(NO_MAP)]


class _ShardFile:
    """One tar being written under ``.tmp``; ``close`` renames it into place.

    Not webdataset's ``TarWriter``/``ShardWriter`` (1.0.2), because neither keeps what this
    writer promises (docs/format.md), and making them do so leaves little of them:

    * ``TarWriter.write`` adds a sample's members sorted by extension (``cls, jpg, tlm``), ours
      go ``jpg, cls, tlm``: every shard would differ from the same build by earlier versions,
      and a build resumed across the change would mix both orders in one folder. Its defaults
      are not reproducible either: ``mtime`` is ``time.time()`` per member and ``uname``/
      ``gname`` are ``"bigdata"`` (ours: 0 and empty), and ``format=`` is never passed on to
      ``tarfile.open``. With ``mtime=0, user="", group="", encoder=False`` and our members
      pre-sorted its bytes equal ours (checked), so only the order is in the way; but then it
      does nothing ``tarfile`` does not, and the size bound below reads its private ``tarstream``.
    * Given a name, it opens the final name itself (``gopen``): no temporary, no fsync, no
      rename, so a killed build leaves a truncated tar under the name a resume keeps.
    * ``ShardWriter`` bounds a shard by payload bytes (``maxsize``, headers and 512-byte
      padding not counted, checked before the next sample is added, so a shard ends past the
      bound), where ``--shard-bytes`` bounds the tar file; and it closes a full shard only when
      the next sample arrives, telling ``post`` just the file name, so the summary cannot record
      how many inputs (skipped ones included) that shard consumed at the moment it is renamed,
      which is what a resume continues from.
    """

    def __init__(self, path: Path):
        self.path, self.tmp = path, path.with_name(path.name + ".tmp")
        self.tar = tarfile.open(self.tmp, "w", format=tarfile.PAX_FORMAT)  # noqa: SIM115 (open across add() calls)
        self.samples = 0

    def add(self, prepared: Prepared) -> None:
        for ext, data in prepared.members.items():
            info = tarfile.TarInfo(f"{prepared.key}.{ext}")
            info.size, info.mode, info.mtime = len(data), 0o444, 0  # byte-identical re-runs
            self.tar.addfile(info, io.BytesIO(data))
        self.samples += 1

    @property
    def bytes(self) -> int:
        return self.tar.offset

    def close(self) -> None:
        self.tar.close()
        atomic.commit(self.tmp, self.path)

    def discard(self) -> None:
        self.tar.close()
        self.tmp.unlink(missing_ok=True)


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.tar"


def _tar_size(offset: int) -> int:
    """File size of a tar whose members end at ``offset``: two zero blocks, then padding
    to tarfile's 10 KiB record."""
    return -(-(offset + 2 * _TAR_BLOCK) // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


def _sample_bytes(prepared: Prepared) -> int:
    return sum(_TAR_BLOCK + -(-len(d) // _TAR_BLOCK) * _TAR_BLOCK for d in prepared.members.values())


def _prepare_all(items: list[SourceImage], max_size: int | None, max_pixels: int, workers: int) -> Iterator[Prepared]:
    """Prepared samples in input order. With workers, at most ``64 * workers`` are in
    flight: ``Pool.imap`` alone would read ahead without bound when writing is slower
    than decoding (network storage), holding every finished sample in memory."""
    if workers <= 1:
        yield from (prepare_sample(item, max_size, max_pixels) for item in items)
        return
    slots, stop = threading.Semaphore(64 * workers), threading.Event()

    def feed() -> Iterator[SourceImage]:
        for item in items:
            slots.acquire()
            if stop.is_set():
                return
            yield item

    with multiprocessing.get_context().Pool(workers) as pool:
        try:
            for prepared in pool.imap(partial(prepare_sample, max_size=max_size, max_pixels=max_pixels), feed(), chunksize=4):
                slots.release()
                yield prepared
        finally:
            stop.set()
            slots.release(64 * workers)  # let a feeder blocked on a slot see the stop


class _Progress:
    """The resumable build state: ``<prefix>-summary.json``, rewritten after each shard."""

    def __init__(self, path: Path, fingerprint: str, config: BuildConfig, total_inputs: int):
        self.path = path
        self.state = {
            "complete": False,
            "fingerprint": fingerprint,
            "settings": {k: v for k, v in asdict(config).items() if k != "overwrite"},
            "inputs": total_inputs,
            "shards": [],  # name, samples, consumed (inputs used up to and including this shard)
            "skipped": [],
            "reencoded": 0,
            "downscaled": 0,
        }

    def resume_from(self, previous: dict, out: Path) -> None:
        """Keep the shards of ``previous`` that are on disk, in order, up to the first gap."""
        for entry in previous.get("shards", []):
            if not (out / entry["name"]).is_file():
                break
            self.state["shards"].append(entry)
            self.state["skipped"].extend(entry.get("skipped", []))
            self.state["reencoded"] += entry.get("reencoded", 0)
            self.state["downscaled"] += entry.get("downscaled", 0)

    @property
    def consumed(self) -> int:
        return self.state["shards"][-1]["consumed"] if self.state["shards"] else 0

    def add_shard(self, name: str, samples: int, consumed: int, skipped: list, reencoded: int, downscaled: int) -> None:
        self.state["shards"].append(
            {"name": name, "samples": samples, "consumed": consumed, "skipped": skipped, "reencoded": reencoded,
             "downscaled": downscaled}
        )
        self.state["skipped"].extend(skipped)
        self.state["reencoded"] += reencoded
        self.state["downscaled"] += downscaled
        self.save()

    def save(self) -> None:
        self.state["total"] = sum(s["samples"] for s in self.state["shards"])
        self.state["missing_label_maps"] = len(missing_label_maps(self.state["skipped"]))
        atomic.write_json(self.path, self.state)


def _check_out_dir(out: Path, prefix: str, summary_path: Path, fingerprint: str, overwrite: bool) -> dict:
    """Previous state to resume from, or {}; refuses to mix two different builds. What a
    killed build was writing (a shard, the summary, the manifest) is removed first."""
    stale = [*out.glob(f"{prefix}-*.tar.tmp"),
             *(tmp for name in (summary_path.name, "manifest.json", "classes.json")
               for tmp in atomic.temporaries(out / name))]
    for path in stale:
        path.unlink(missing_ok=True)
    existing = sorted(out.glob(f"{prefix}-[0-9][0-9][0-9][0-9][0-9][0-9].tar"))
    previous = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    if previous.get("fingerprint") == fingerprint:
        return previous
    if not (existing or previous):
        return {}
    if not overwrite:
        raise ShardBuildError(
            f"{out} already holds '{prefix}' shards from a different build (other input files or "
            "settings); pass --overwrite to replace them or choose another --out"
        )
    for path in existing:
        path.unlink()
    for name in (summary_path.name, "manifest.json", "classes.json"):
        (out / name).unlink(missing_ok=True)
    return {}


def write_manifest(out: Path, shards: list[tuple[str, int]], class_order: str | None) -> None:
    """``out/manifest.json`` (docs/format.md): each shard's name and sample count in order,
    the total and, when known, the ``class_order`` the ``cls`` indices follow. Written
    last, by the build and by the labeler, so a folder with one is finished."""
    manifest: dict = {"shards": [{"name": name, "samples": samples} for name, samples in shards],
                      "total": sum(samples for _, samples in shards)}
    if class_order is not None:
        manifest["class_order"] = class_order
    atomic.write_json(out / "manifest.json", manifest)


def build_shards(config: BuildConfig, progress: bool = True) -> dict:
    """Build (or resume) the shards of ``config``; returns the summary it writes."""
    if config.shard_bytes is not None:
        config = replace(config, shard_size=None)
    elif config.shard_size is None:
        raise ShardBuildError("give shard_size (samples) or shard_bytes")
    if (config.shard_size or 1) < 1 or (config.shard_bytes or tarfile.RECORDSIZE) < tarfile.RECORDSIZE:
        raise ShardBuildError(f"shard size too small (at least 1 sample or {tarfile.RECORDSIZE} bytes)")
    if config.max_pixels < 1:
        raise ShardBuildError(f"max_pixels (--max-pixels) must be at least 1, got {config.max_pixels}")
    if config.label_root and not Path(config.label_root).is_dir():
        raise ShardBuildError(f"label root {config.label_root} does not exist")
    config = replace(
        config,
        root=str(Path(config.root).resolve()),
        label_root=str(Path(config.label_root).resolve()) if config.label_root else None,
    )
    scan = scan_image_folder(config.root, config.label_root, config.class_order)
    if not scan.items:
        raise ShardBuildError(f"no images under {config.root} (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})")
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    order = np.random.default_rng(config.seed).permutation(len(scan.items))
    items = [scan.items[i] for i in order]
    fingerprint = config.fingerprint(items)
    summary_path = out / f"{config.prefix}-summary.json"
    previous = _check_out_dir(out, config.prefix, summary_path, fingerprint, config.overwrite)

    state = _Progress(summary_path, fingerprint, config, len(items))
    state.state["skipped"].extend(scan.duplicates)
    state.state["empty_classes"] = scan.empty_classes
    state.resume_from(previous, out)
    resumed_shards, start = len(state.state["shards"]), state.consumed
    if previous.get("complete") and start == len(items):
        state.state["complete"] = True
    else:
        _write_shards(config, items, state, start, progress)
    state.save()
    if state.state["total"] == 0:
        raise EmptyBuildError(
            f"every one of the {len(items)} images under {config.root} was left out, so no manifest "
            f"was written; see {summary_path}",
            state.state,
        )
    atomic.write_json(out / "classes.json", classes_json(scan.classes, config.class_names))
    write_manifest(out, [(s["name"], s["samples"]) for s in state.state["shards"]], config.class_order)
    state.state["complete"] = True
    state.state["resumed_shards"] = resumed_shards
    state.save()
    return state.state


def _write_shards(config: BuildConfig, items: list[SourceImage], state: _Progress, start: int, progress: bool) -> None:
    out = Path(config.out)
    index = len(state.state["shards"])
    shard, skipped, reencoded, downscaled = None, [], 0, 0
    bar = tqdm(total=len(items), initial=start, unit="img", desc=f"{config.prefix} shards", disable=not progress)

    def finish(consumed: int) -> None:
        nonlocal shard, skipped, reencoded, downscaled, index
        shard.close()
        state.add_shard(shard.path.name, shard.samples, consumed, skipped, reencoded, downscaled)
        shard, skipped, reencoded, downscaled, index = None, [], 0, 0, index + 1
        bar.set_postfix(shards=index, skipped=len(state.state["skipped"]))

    try:
        for position, prepared in enumerate(_prepare_all(items[start:], config.max_size, config.max_pixels, config.workers), start):
            bar.update()
            if prepared.reason is not None:
                skipped.append({"key": prepared.key, "reason": prepared.reason})
                bar.set_postfix(skipped=len(state.state["skipped"]) + len(skipped), shards=index)
                continue
            if shard is not None and config.shard_bytes and _tar_size(shard.bytes + _sample_bytes(prepared)) > config.shard_bytes:
                finish(position)
            if shard is None:
                shard = _ShardFile(out / shard_name(config.prefix, index))
            shard.add(prepared)
            reencoded += prepared.reencoded
            downscaled += prepared.downscaled
            if config.shard_size and shard.samples == config.shard_size:
                finish(position + 1)
        if shard is not None:
            finish(len(items))
        elif skipped and state.state["shards"]:
            # Trailing skips after the last full shard belong to it for the report.
            last = state.state["shards"][-1]
            last["skipped"] += skipped
            last["consumed"] = len(items)
            state.state["skipped"].extend(skipped)
            state.save()
        elif skipped:
            state.state["skipped"].extend(skipped)
    except BaseException:
        if shard is not None:
            shard.discard()
        raise
    finally:
        bar.close()
