"""ImageFolder trees: class folders in index order, image files as keyed, labelled inputs.

``root/<class>/<image>`` is read the way torchvision's ImageFolder (``sorted``) or timm and
the official TokenLabeling loader (``natural``) index classes, with sample keys that
WebDataset can group and official TokenLabeling map names beside each image. Used by
``lvvit-shards build`` and by ``lvvit-label`` on an ImageFolder, so both index alike.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from lvvit.data.members import IMAGE_EXTENSIONS
from lvvit.errors import DataError

CLASS_ORDERS = ("sorted", "natural")


class ShardBuildError(DataError, RuntimeError):
    """A build that cannot start or go on (not a bad sample: those are reported), e.g. an
    image folder that does not exist or has no class folders."""


@dataclass(frozen=True)
class SourceImage:
    key: str  # "<class dir>/<file stem>", dots replaced: WebDataset splits keys at the first dot
    path: str
    label: int
    label_path: str | None = None


@dataclass
class FolderScan:
    """What an ImageFolder tree holds: class folders in index order, images, problems."""

    classes: list[str]
    items: list[SourceImage]
    duplicates: list[dict]  # key + reason, for the build report
    empty_classes: list[str]  # class folders with no image: their index gets no samples


def sample_key(class_dir: str, stem: str) -> str:
    return f"{class_dir.replace('.', '_')}/{stem.replace('.', '_')}"


def natural_key(name: str) -> list:
    """timm's ``natural_key``: digit runs compare as numbers, letters case-insensitively."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name.lower())]


def order_classes(names: Iterable[str], order: str = "sorted") -> list[str]:
    """Class folder names in index order. ``sorted`` is torchvision's ImageFolder order
    (``1, 10, 2``); ``natural`` is timm's and the official TokenLabeling loader's
    (``1, 2, 10``). ImageNet's wnids (``n01440764``) get the same order from both."""
    if order == "sorted":
        return sorted(names)
    if order == "natural":
        return sorted(names, key=lambda name: (natural_key(name), name))
    raise ShardBuildError(f"class order {order!r} is not one of {', '.join(CLASS_ORDERS)}")


def official_map_name(image: Path) -> str:
    """The official TokenLabeling map of ``a_red_000.v2.jpg`` is ``a_red_000.pt``: its
    loader names maps by the part of the file name before the first dot."""
    return f"{image.name.split('.')[0]}.pt"


def scan_image_folder(root: str | Path, label_root: str | Path | None = None, class_order: str = "sorted") -> FolderScan:
    """``root/<class>/<image>``, classes indexed in ``class_order`` (see ``order_classes``)."""
    root = Path(root)
    if not root.is_dir():
        raise ShardBuildError(f"image folder {root} does not exist")
    classes = order_classes((p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")), class_order)
    if not classes:
        raise ShardBuildError(f"{root} has no class folders (expected root/<class>/<image>)")
    scan = FolderScan(classes, [], [], [])
    seen = {}
    for label, class_dir in enumerate(classes):
        images = [p for p in sorted((root / class_dir).rglob("*")) if p.is_file() and p.suffix.lower()[1:] in IMAGE_EXTENSIONS]
        if not images:
            scan.empty_classes.append(class_dir)
        for path in images:
            key = sample_key(class_dir, path.stem)
            if key in seen:
                scan.duplicates.append({"key": key, "reason": f"duplicate key: {path} and {seen[key]}"})
                continue
            seen[key] = path
            label_path = str(Path(label_root) / class_dir / official_map_name(path)) if label_root else None
            scan.items.append(SourceImage(key, str(path), label, label_path))
    return scan


def read_class_names(path: str | Path) -> dict[str, str]:
    """``wnid name, more names`` per line, as ImageNet's ``LOC_synset_mapping.txt``."""
    names = {}
    for line in Path(path).read_text().splitlines():
        wnid, _, name = line.strip().partition(" ")
        if wnid:
            names[wnid] = name.strip() or wnid
    return names


def classes_json(classes: list[str], class_names: str | Path | None) -> list[dict]:
    """``classes.json``: index, readable name (from ``class_names`` when given) and folder name."""
    names = read_class_names(class_names) if class_names else {}
    return [{"index": i, "name": names.get(c, c), "wnid": c} for i, c in enumerate(classes)]
