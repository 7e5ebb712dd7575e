"""lvvit-shards: pack an ImageFolder tree into WebDataset shards (optionally with the
official TokenLabeling maps), look inside shards, and preview their token labels."""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from lvvit.data.imagefolder import CLASS_ORDERS
from lvvit.data.members import DEFAULT_MAX_PIXELS
from lvvit.data.source import DEFAULT_RETRIES, DEFAULT_TIMEOUT, Access
from lvvit.data.streams import DEADLINE_PER_TIMEOUT
from lvvit.errors import ConfigError, exits_on_error

_SUFFIXES = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def _byte_size(text: str) -> int:
    """``500M``, ``1G``, ``1048576``."""
    text = text.strip().lower().removesuffix("b").removesuffix("i")
    scale = _SUFFIXES.get(text[-1:], 1)
    try:
        return int(float(text[:-1] if scale > 1 else text) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 500M, 1G)") from None


def add_access_args(group, on_failure: str) -> None:
    """``--shard-timeout``, ``--shard-retries`` and ``--shard-deadline``: how every stage that
    reads shards reads remote ones (``access_from_args``); ``on_failure`` says what a shard
    that stays unreadable becomes in that stage."""
    group.add_argument("--shard-timeout", type=float, default=DEFAULT_TIMEOUT,
                       help="seconds one connect or read of a remote shard may take (default: %(default)s)")
    group.add_argument("--shard-retries", type=int, default=DEFAULT_RETRIES,
                       help=f"retries (with backoff) of a failed remote read before the shard {on_failure} "
                       "(default: %(default)s)")
    group.add_argument("--shard-deadline", type=float, default=None,
                       help="seconds reading one whole remote shard or manifest may take, retries included; "
                       f"None: {DEADLINE_PER_TIMEOUT} x --shard-timeout (default: %(default)s)")


def access_from_args(args: argparse.Namespace, cache_dir: str | None = None) -> Access:
    """The ``Access`` of the options ``add_access_args`` adds, each checked: one line naming the
    option (``ConfigError``) for a value outside its range."""
    for flag, value, low in (("--shard-timeout", args.shard_timeout, 0.0), ("--shard-deadline", args.shard_deadline, 0.0)):
        if value is not None and not (math.isfinite(value) and value > low):
            raise ConfigError(f"{flag} {value}: must be a finite number > 0")
    if args.shard_retries < 0:
        raise ConfigError(f"--shard-retries {args.shard_retries}: must be >= 0")
    return Access(args.shard_timeout, args.shard_retries, cache_dir, deadline=args.shard_deadline)


def _add_build(sub) -> None:
    p = sub.add_parser(
        "build",
        help="ImageFolder tree -> prefix-%%06d.tar shards + classes.json + manifest.json",
        description="Pack ROOT/<class>/<image> into WebDataset shards in a seeded shuffled order. "
        "Images that do not decode, have an unsupported pixel mode or have no label map are reported "
        "and left out; a build that keeps none writes no manifest and fails. "
        "Re-running the same command resumes: finished shards are kept.",
    )
    p.add_argument("root", metavar="ROOT", help="ImageFolder root: ROOT/<class>/<image>")
    p.add_argument("--out", required=True, help="output folder (one folder per split)")
    p.add_argument("--prefix", default="train", help="shard name prefix (default: train)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--shard-size", type=int, default=None, help="samples per shard (default: 1000)")
    size.add_argument("--shard-bytes", type=_byte_size, default=None,
                      help="largest tar size instead, e.g. 500M or 1G")
    p.add_argument("--seed", type=int, default=0, help="shuffle seed (default: 0)")
    p.add_argument("--max-size", type=int, default=None,
                   help="re-encode images whose longer side exceeds this (JPEG q95); default: keep originals")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help="downscale (aspect kept, JPEG q95) images with more pixels than this "
                   f"(default: {DEFAULT_MAX_PIXELS:,})")
    p.add_argument("--label-root", default=None,
                   help="official TokenLabeling maps: LABEL_ROOT/<class>/<image name up to its first dot>.pt, "
                   "[2,k,H,W] fp16")
    p.add_argument("--class-names", default=None,
                   help="'wnid name' lines (ImageNet's LOC_synset_mapping.txt) for classes.json names")
    add_class_order(p)
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="decode/encode processes (default: min(8, CPUs))")
    p.add_argument("--overwrite", action="store_true",
                   help="replace shards of this prefix left by a build with other inputs or settings")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def add_class_order(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--class-order``, shared with lvvit-label so both index class folders alike."""
    parser.add_argument("--class-order", choices=CLASS_ORDERS, default="sorted",
                        help="class indices from folder names: sorted (default; torchvision's ImageFolder: "
                        "1, 10, 2) or natural (timm's and the official TokenLabeling loader's: 1, 2, 10); "
                        "ImageNet wnids get the same order from both")


def _add_preview(sub) -> None:
    p = sub.add_parser(
        "preview",
        help="PNG grid of samples with their token-label maps drawn over them",
        description="Top-1 class per cell as a colour, its softmax score as opacity, over the box "
        "the map covers; --crop adds a random training crop and the token targets it gets.",
    )
    add_source(p)
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--n", type=int, default=16, help="samples to show (default: 16)")
    p.add_argument("--crop", action="store_true", help="also show a random crop and its token targets")
    p.add_argument("--tile", type=int, default=192, help="tile side in pixels (default: 192)")
    p.add_argument("--tokens", type=int, default=14, help="token grid of the crop targets (default: 14)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random crops (default: 0)")


def _add_info(sub) -> None:
    p = sub.add_parser(
        "info",
        help="samples, shards, classes and label-map shape of a shard folder",
        description="Walks every tar to its end-of-archive block and counts its samples; a missing, "
        "truncated or damaged tar, or one whose count differs from manifest.json, is named and the "
        "exit status is 1.",
    )
    add_source(p)


def add_source(parser: argparse.ArgumentParser) -> None:
    """The shard source positional and how to reach it (lvvit.data.source)."""
    parser.add_argument("shards", metavar="SHARDS",
                        help="shard source: a folder (with manifest.json), a manifest, one .tar, a brace pattern, "
                        "http(s):// URLs or patterns, pipe:COMMAND, s3:// or gs:// URLs")
    parser.add_argument("--manifest", default=None,
                        help="manifest.json with the shards' sample counts (default: the one beside them)")
    add_access_args(parser, "is an error")


def _open_source(args):
    """The source of ``args.shards``; errors name it."""
    from lvvit.data.source import resolve

    return resolve(args.shards, args.manifest, access_from_args(args))


def _build(args) -> int:
    from lvvit.data.shards import BuildConfig, EmptyBuildError, ShardBuildError, build_shards

    config = BuildConfig(
        root=args.root,
        out=args.out,
        prefix=args.prefix,
        shard_size=args.shard_size or 1000,
        shard_bytes=args.shard_bytes,
        seed=args.seed,
        max_size=args.max_size,
        max_pixels=args.max_pixels,
        label_root=args.label_root,
        class_names=args.class_names,
        class_order=args.class_order,
        workers=args.workers,
        overwrite=args.overwrite,
    )
    try:
        summary = build_shards(config, progress=not args.quiet)
    except EmptyBuildError as exc:
        _print_build_report({**exc.summary, "resumed_shards": 0}, args)
        print(f"lvvit-shards: error: {exc}", file=sys.stderr)
        return 2
    except ShardBuildError as exc:
        print(f"lvvit-shards: error: {exc}", file=sys.stderr)
        return 2
    _print_build_report(summary, args)
    return 0


def _print_build_report(summary: dict, args) -> None:
    from lvvit.data.shards import missing_label_maps

    for name in summary["empty_classes"]:
        print(f"lvvit-shards: warning: class folder {Path(args.root) / name} has no images; its class gets no samples",
              file=sys.stderr)
    skipped = summary["skipped"]
    print(
        f"{summary['total']} samples in {len(summary['shards'])} shards under {args.out} "
        f"({summary['resumed_shards']} kept from an earlier run), {len(skipped)} left out, "
        f"{summary['reencoded']} re-encoded, {summary['downscaled']} downscaled "
        f"(above --max-pixels {args.max_pixels:,} or --max-size)"
    )
    missing = missing_label_maps(skipped)
    if missing:
        print(f"{len(missing)} images have no label map under {args.label_root}, e.g. "
              + ", ".join(entry["key"] for entry in missing[:5]))
    for entry in skipped[:20]:
        print(f"  left out {entry['key']}: {entry['reason']}")
    if len(skipped) > 20:
        print(f"  ... and {len(skipped) - 20} more")
    print(f"summary: {Path(args.out) / (args.prefix + '-summary.json')}")


def _preview(args) -> int:
    from lvvit.data.labelmap import LabelMapError
    from lvvit.data.tarsamples import ShardReadError
    from lvvit.loader.preview import render_preview

    try:
        width, height = render_preview(_open_source(args), args.out, n=args.n, crop=args.crop, tile=args.tile,
                                       tokens=args.tokens, seed=args.seed)
    except (ShardReadError, LabelMapError, FileNotFoundError, ValueError) as exc:
        print(f"lvvit-shards: error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {args.out} ({width}x{height})")
    return 0


def _info(args) -> int:
    from lvvit.data.labelmap import LabelMapError
    from lvvit.data.tarsamples import ShardReadError

    try:
        source = _open_source(args)
    except (FileNotFoundError, ValueError) as exc:  # SourceError is a ValueError
        print(f"lvvit-shards: error: {exc}", file=sys.stderr)
        return 1
    counts, damaged = _verify_all(source)
    classes = source.classes
    print(f"shards: {len(source.urls)}  samples: {sum(counts)}  classes: {len(classes) if classes else '?'}")
    for reason in damaged:
        print(f"damaged: {reason}")
    if damaged:
        print(f"lvvit-shards: error: {len(damaged)} of {len(source.urls)} shards are damaged", file=sys.stderr)
        return 1
    try:
        _describe_first_sample(source)
    except (ShardReadError, LabelMapError) as exc:
        print(f"lvvit-shards: error: {exc}", file=sys.stderr)
        return 1
    return 0


def _verify_all(source) -> tuple[list[int], list[str]]:
    """Sample counts of the readable shards (each read to its end-of-archive block), and why
    each other one is damaged: missing, truncated, unreachable, or not the manifest's count."""
    from lvvit.data.source import is_remote
    from lvvit.data.tarsamples import ShardReadError, verify_shard

    counts, damaged = [], []
    for url, expected in zip(source.urls, source.counts or [None] * len(source.urls), strict=True):
        try:
            counts.append(verify_shard(url, expected, source.open if is_remote(url) else None,
                                       source.manifest or "manifest.json"))
        except ShardReadError as exc:
            damaged.append(str(exc))
    return counts, damaged


def _describe_first_sample(source) -> None:
    from lvvit.data.labelmap import decode_tlm
    from lvvit.loader.preview import first_samples

    first = next(iter(first_samples(source, 1)), None)
    if first is None:
        return
    print(f"members: {', '.join(sorted(k for k in first if k != '__key__'))}  first key: {first['__key__']}")
    if "tlm" in first:
        m = decode_tlm(first["tlm"], first["__key__"])
        print(f"label map: k={m.shape[0]} H={m.shape[1]} W={m.shape[2]} box={m.box} record={len(first['tlm'])} bytes")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="lvvit-shards", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_build(sub)
    _add_preview(sub)
    _add_info(sub)
    args = parser.parse_args(argv)
    with exits_on_error():
        code = {"build": _build, "preview": _preview, "info": _info}[args.command](args)
    sys.exit(code)
