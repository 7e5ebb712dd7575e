"""ImageFolder trees to WebDataset shards, with the official TokenLabeling maps imported.

A sample is ``<key>.jpg`` (the original bytes unless re-encoded), ``<key>.cls`` and,
with ``label_root``, ``<key>.tlm`` (docs/format.md). The order is a seeded shuffle, so
every shard holds a mix of classes. Samples that cannot be used are reported and left
out; the run goes on. Each shard is written under a temporary name and renamed once
complete, and ``<prefix>-summary.json`` records, after every shard, how far the input
has been consumed, so an interrupted build resumes where it stopped and never leaves a
tar that looks complete but is not.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import tarfile
import threading
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from lvvit import atomic
from lvvit.data.labelmap import LabelMap, LabelMapError, centre_square_box, encode_tlm

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})
JPEG_QUALITY = 95
_TAR_BLOCK = 512


class ShardBuildError(RuntimeError):
    """A build that cannot start or go on (not a bad sample: those are reported)."""


@dataclass(frozen=True)
class SourceImage:
    key: str  # "<class dir>/<file stem>", dots replaced: WebDataset splits keys at the first dot
    path: str
    label: int
    label_path: str | None = None


@dataclass
class BuildConfig:
    root: str
    out: str
    prefix: str = "train"
    shard_size: int | None = 1000  # samples per shard
    shard_bytes: int | None = None  # an upper bound on tar bytes per shard instead, when given
    seed: int = 0
    max_size: int | None = None  # re-encode images whose longer side exceeds this
    label_root: str | None = None  # official TokenLabeling maps: <label_root>/<class>/<stem>.pt
    class_names: str | None = None  # "wnid name..." lines (ImageNet's LOC_synset_mapping.txt)
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


def sample_key(class_dir: str, stem: str) -> str:
    return f"{class_dir.replace('.', '_')}/{stem.replace('.', '_')}"


def scan_image_folder(root: str | Path, label_root: str | Path | None = None):
    """``root/<class>/<image>`` -> (sorted class dirs, images, duplicate-key reports)."""
    root = Path(root)
    if not root.is_dir():
        raise ShardBuildError(f"image folder {root} does not exist")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ShardBuildError(f"{root} has no class folders (expected root/<class>/<image>)")
    items, seen, duplicates = [], {}, []
    for label, class_dir in enumerate(classes):
        for path in sorted((root / class_dir).rglob("*")):
            if not path.is_file() or path.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            key = sample_key(class_dir, path.stem)
            if key in seen:
                duplicates.append({"key": key, "reason": f"duplicate key: {path} and {seen[key]}"})
                continue
            seen[key] = path
            label_path = str(Path(label_root) / class_dir / f"{path.stem}.pt") if label_root else None
            items.append(SourceImage(key, str(path), label, label_path))
    return classes, items, duplicates


def read_class_names(path: str | Path) -> dict[str, str]:
    """``wnid name, more names`` per line, as ImageNet's ``LOC_synset_mapping.txt``."""
    names = {}
    for line in Path(path).read_text().splitlines():
        wnid, _, name = line.strip().partition(" ")
        if wnid:
            names[wnid] = name.strip() or wnid
    return names


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


def _jpeg_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def _image_bytes(data: bytes, max_size: int | None) -> tuple[bytes, tuple[int, int], bool]:
    """Decode fully (so corrupt files are caught here, not in training) and re-encode
    when the file is not a plain RGB/grey JPEG or is larger than ``max_size``."""
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        size = image.size
        too_big = max_size is not None and max(size) > max_size
        if image.format == "JPEG" and image.mode in ("RGB", "L") and not too_big:
            return data, size, False
        if too_big:
            image.thumbnail((max_size, max_size), Image.Resampling.LANCZOS)
        return _jpeg_bytes(image), size, True


def prepare_sample(item: SourceImage, max_size: int | None = None) -> Prepared:
    """Read, check and encode one image (and its map); never raises for bad input."""
    try:
        data = Path(item.path).read_bytes()
        jpg, (width, height), reencoded = _image_bytes(data, max_size)
    except Exception as exc:  # PIL raises many types for damaged files
        return Prepared(item.key, reason=f"cannot decode image {item.path}: {exc}")
    members = {"jpg": jpg, "cls": str(item.label).encode()}
    if item.label_path is not None:
        if not os.path.isfile(item.label_path):
            return Prepared(item.key, reason=f"no label map at {item.label_path}")
        try:
            import torch

            tensor = torch.load(item.label_path, map_location="cpu", weights_only=True)
            if not isinstance(tensor, torch.Tensor):
                raise LabelMapError(f"{item.label_path}: holds {type(tensor).__name__}, not a tensor")
            label_map = import_official_map(tensor, width, height, item.label_path)
            members["tlm"] = encode_tlm(label_map, item.key)
        except Exception as exc:
            return Prepared(item.key, reason=f"bad label map {item.label_path}: {exc}")
    return Prepared(item.key, members, reencoded=reencoded)


class _ShardFile:
    """One tar being written under ``.tmp``; ``close`` renames it into place."""

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
        os.replace(self.tmp, self.path)

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


def _prepare_all(items: list[SourceImage], max_size: int | None, workers: int) -> Iterator[Prepared]:
    """Prepared samples in input order. With workers, at most ``64 * workers`` are in
    flight: ``Pool.imap`` alone would read ahead without bound when writing is slower
    than decoding (network storage), holding every finished sample in memory."""
    if workers <= 1:
        yield from (prepare_sample(item, max_size) for item in items)
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
            for prepared in pool.imap(partial(prepare_sample, max_size=max_size), feed(), chunksize=4):
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
        }

    def resume_from(self, previous: dict, out: Path) -> None:
        """Keep the shards of ``previous`` that are on disk, in order, up to the first gap."""
        for entry in previous.get("shards", []):
            if not (out / entry["name"]).is_file():
                break
            self.state["shards"].append(entry)
            self.state["skipped"].extend(entry.get("skipped", []))
            self.state["reencoded"] += entry.get("reencoded", 0)

    @property
    def consumed(self) -> int:
        return self.state["shards"][-1]["consumed"] if self.state["shards"] else 0

    def add_shard(self, name: str, samples: int, consumed: int, skipped: list, reencoded: int) -> None:
        self.state["shards"].append(
            {"name": name, "samples": samples, "consumed": consumed, "skipped": skipped, "reencoded": reencoded}
        )
        self.state["skipped"].extend(skipped)
        self.state["reencoded"] += reencoded
        self.save()

    def save(self) -> None:
        self.state["total"] = sum(s["samples"] for s in self.state["shards"])
        atomic.write_json(self.path, self.state)


def _check_out_dir(out: Path, prefix: str, summary_path: Path, fingerprint: str, overwrite: bool) -> dict:
    """Previous state to resume from, or {}; refuses to mix two different builds."""
    stale = sorted(out.glob(f"{prefix}-*.tar.tmp"))
    for path in stale:
        path.unlink()
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
    for name in (summary_path.name, "manifest.json"):
        (out / name).unlink(missing_ok=True)
    return {}


def _classes_json(classes: list[str], class_names: str | None) -> list[dict]:
    names = read_class_names(class_names) if class_names else {}
    return [{"index": i, "name": names.get(c, c), "wnid": c} for i, c in enumerate(classes)]


def build_shards(config: BuildConfig, progress: bool = True) -> dict:
    """Build (or resume) the shards of ``config``; returns the summary it writes."""
    if config.shard_bytes is not None:
        config = replace(config, shard_size=None)
    elif config.shard_size is None:
        raise ShardBuildError("give shard_size (samples) or shard_bytes")
    if (config.shard_size or 1) < 1 or (config.shard_bytes or tarfile.RECORDSIZE) < tarfile.RECORDSIZE:
        raise ShardBuildError(f"shard size too small (at least 1 sample or {tarfile.RECORDSIZE} bytes)")
    if config.label_root and not Path(config.label_root).is_dir():
        raise ShardBuildError(f"label root {config.label_root} does not exist")
    config = replace(
        config,
        root=str(Path(config.root).resolve()),
        label_root=str(Path(config.label_root).resolve()) if config.label_root else None,
    )
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    classes, items, duplicates = scan_image_folder(config.root, config.label_root)
    order = np.random.default_rng(config.seed).permutation(len(items))
    items = [items[i] for i in order]
    fingerprint = config.fingerprint(items)
    summary_path = out / f"{config.prefix}-summary.json"
    previous = _check_out_dir(out, config.prefix, summary_path, fingerprint, config.overwrite)

    state = _Progress(summary_path, fingerprint, config, len(items))
    state.state["skipped"].extend(duplicates)
    state.resume_from(previous, out)
    resumed_shards, start = len(state.state["shards"]), state.consumed
    if previous.get("complete") and start == len(items):
        state.state["complete"] = True
    else:
        _write_shards(config, items, state, start, progress)
    atomic.write_json(out / "classes.json", _classes_json(classes, config.class_names))
    manifest = {
        "shards": [{"name": s["name"], "samples": s["samples"]} for s in state.state["shards"]],
        "total": sum(s["samples"] for s in state.state["shards"]),
    }
    atomic.write_json(out / "manifest.json", manifest)
    state.state["complete"] = True
    state.state["resumed_shards"] = resumed_shards
    state.save()
    return state.state


def _write_shards(config: BuildConfig, items: list[SourceImage], state: _Progress, start: int, progress: bool) -> None:
    out = Path(config.out)
    index = len(state.state["shards"])
    shard, skipped, reencoded = None, [], 0
    bar = tqdm(total=len(items), initial=start, unit="img", desc=f"{config.prefix} shards", disable=not progress)

    def finish(consumed: int) -> None:
        nonlocal shard, skipped, reencoded, index
        shard.close()
        state.add_shard(shard.path.name, shard.samples, consumed, skipped, reencoded)
        shard, skipped, reencoded, index = None, [], 0, index + 1
        bar.set_postfix(shards=index, skipped=len(state.state["skipped"]))

    try:
        for position, prepared in enumerate(_prepare_all(items[start:], config.max_size, config.workers), start):
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


def iter_shard(path: str | Path) -> Iterator[dict]:
    """Samples of one shard as WebDataset-style dicts (``__key__`` plus one bytes value
    per extension), in file order."""
    from webdataset.tariterators import base_plus_ext

    sample: dict | None = None
    with tarfile.open(path, "r") as tar:
        for info in tar:
            if not info.isfile():
                continue
            key, ext = base_plus_ext(info.name)
            if sample is not None and sample["__key__"] != key:
                yield sample
                sample = None
            if sample is None:
                sample = {"__key__": key}
            sample[ext] = tar.extractfile(info).read()
    if sample is not None:
        yield sample


def iter_shards(paths: Iterable[str | Path]) -> Iterator[dict]:
    for path in paths:
        yield from iter_shard(path)


def shard_paths(location: str | Path) -> list[Path]:
    """Shard files of a folder (via its manifest when present), a manifest, or one tar."""
    location = Path(location)
    manifest = location / "manifest.json" if location.is_dir() else location
    if manifest.suffix == ".json":
        if not manifest.is_file():
            tars = sorted(location.glob("*.tar")) if location.is_dir() else []
            if tars:
                return tars
            raise FileNotFoundError(f"no manifest.json or .tar shards in {location}")
        entries = json.loads(manifest.read_text())["shards"]
        return [manifest.parent / e["name"] for e in entries]
    if not location.is_file():
        raise FileNotFoundError(f"shard {location} does not exist")
    return [location]
