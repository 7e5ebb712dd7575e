"""lvvit-label: run a dense teacher over shards (or an ImageFolder) and add tlm records.

Input is any shard source (a local folder of WebDataset shards with classes.json and
manifest.json, a brace pattern, http(s):// patterns, pipe:COMMAND, s3:// or gs:// URLs)
or an ImageFolder tree (root/<class>/<image>). Output is the same shards (or new ones
for an ImageFolder), written to a local folder, with a tlm member added to every sample;
all other members are copied byte for byte. Images that cannot be decoded are reported
and left out; a shard that cannot be read to its end is a named error and not written.

Start it once, or on every rank of a launch (deepspeed --module lvvit.labeling.cli ...,
torchrun -m lvvit.labeling.cli ...): rank r of W takes shards r, r+W, ... and no rank
waits for another. Finished output shards are skipped on a rerun, so an interrupted
job resumes when the same command is run again.

The teacher is a built-in, a Python factory, or an ONNX file (--teacher onnx:PATH) run by
ONNX Runtime; an ONNX classifier ([B, C] logits from global average pooling and a linear
layer) is made dense automatically. `lvvit-label dense-teacher IN.onnx OUT.onnx` makes the
same decision (``lvvit.labeling.onnx_teacher.dense_graph``: dense maps as they are, patch
tokens laid on their grid, classifiers rewritten) and writes the dense graph
(docs/labeling.md); both refuse the same graphs with the same line.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from lvvit import atomic, jsonload
from lvvit.data.cli import access_from_args, add_access_args, add_class_order
from lvvit.data.decode import IMAGENET_MEAN, IMAGENET_STD
from lvvit.data.shards import write_manifest
from lvvit.data.source import (
    SourceError,
    is_remote,
    resolve,
)
from lvvit.data.tarsamples import ShardReadError, count_tar_samples
from lvvit.digest import file_sha256
from lvvit.errors import ConfigError, DataError, exits_on_error
from lvvit.labeling.dense_rewrite import LAYOUTS
from lvvit.labeling.labeler import CHANNEL_ORDERS, PRECISIONS, Labeler, ShardResult
from lvvit.labeling.onnx_file import (
    DEFAULT_TENSOR_MIB,
    MEMORY_FRACTION,
    Limits,
    default_memory_bytes,
)
from lvvit.labeling.onnx_teacher import OnnxTeacherError, fixed_size, load_onnx_teacher
from lvvit.labeling.sources import Plan, ShardJob, is_shard_folder, plan_image_folder, plan_shards
from lvvit.labeling.teacher import TEACHERS, TeacherOutputError, build_teacher
from lvvit.onnxrt import PROVIDERS

log = logging.getLogger("lvvit.label")

SETTINGS_FILE = "label-settings.json"
ONNX_PREFIX = "onnx:"
BUILTIN_IMG_SIZE = 576
DENSE_TEACHER = "dense-teacher"


@dataclass(frozen=True)
class RankInfo:
    rank: int
    world_size: int
    local_rank: int


def rank_info(local_rank_arg: int | None) -> RankInfo:
    """Rank from the launcher's environment (torchrun and deepspeed set RANK, WORLD_SIZE)."""
    local_rank = local_rank_arg if local_rank_arg is not None else int(os.environ.get("LOCAL_RANK", 0))
    rank = int(os.environ.get("RANK", local_rank))
    world = int(os.environ.get("WORLD_SIZE", 1))
    if not 0 <= rank < world:
        raise ConfigError(f"RANK {rank} is outside WORLD_SIZE {world}")
    return RankInfo(rank, world, local_rank)


def onnx_path(teacher: str) -> Path | None:
    """The file of an ``onnx:PATH`` teacher, None for any other teacher."""
    return Path(teacher[len(ONNX_PREFIX) :]) if teacher.startswith(ONNX_PREFIX) else None


def teacher_file(args: argparse.Namespace) -> Path:
    """The file that holds the teacher's weights: the ONNX graph or --teacher-checkpoint."""
    return onnx_path(args.teacher) or args.teacher_checkpoint


def labeling_settings(args: argparse.Namespace) -> dict:
    """Everything that decides the labels, to tell a resume from a different job."""
    return {
        "input": args.input if is_remote(args.input) else str(Path(args.input).resolve()),
        "teacher": args.teacher,
        "teacher_checkpoint_sha256": file_sha256(teacher_file(args)),
        "teacher_args": args.teacher_args,
        "mean": list(args.mean),
        "std": list(args.std),
        "channel_order": args.channel_order,
        "layout": args.layout,
        "num_classes": args.num_classes,
        "img_size": args.img_size,
        "crop_pct": args.crop_pct,
        "topk": args.topk,
        "precision": args.precision,
        "imagefolder": {k: getattr(args, k) for k in ("prefix", "shard_size", "seed", "max_size", "class_order")},
    }


def check_settings(out: Path, settings: dict) -> None:
    """Refuse to resume into a folder labeled another way: mixed maps would look fine."""
    path = out / SETTINGS_FILE
    if not path.is_file():
        return
    try:
        previous = jsonload.load_object(path)
    except ConfigError as err:
        raise ConfigError(f"{err}; choose another --out or empty it") from None
    changed = sorted(k for k in previous.keys() | settings.keys() if previous.get(k) != settings.get(k))
    if changed:
        raise ConfigError(
            f"{out} holds labels made with other settings ({', '.join(changed)} differ, see {path}); "
            "choose another --out or empty it"
        )


def record_settings(out: Path, settings: dict) -> None:
    """Written once a shard is finished, so a run that fails at start pins nothing."""
    if not (out / SETTINGS_FILE).is_file():
        atomic.write_json(out / SETTINGS_FILE, settings)


def write_output_manifest(out_dir: Path, plan: Plan) -> None:
    """Sample counts of the finished output (skipped images change them) and the input's
    class order, as in the contract."""
    shards = [(job.name, count_tar_samples(out_dir / job.name)) for job in plan.jobs]
    write_manifest(out_dir, shards, plan.class_order)


def json_object(text: str) -> dict:
    """argparse type for ``--teacher-args``: a JSON object, with a readable error."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e}): {text}") from e
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object like '{{\"depth\": 2}}', got {text}")
    return value


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows defaults that exist and are not already spelled out in the help text."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        shown = action.default is not None and action.default is not False and action.default != argparse.SUPPRESS
        if shown and "default" not in text:
            text += " (default: %(default)s)"
        return text


def add_limit_args(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """The two flags that raise or lower :class:`Limits`, for every command that runs a teacher
    (here and ``lvvit-label dense-teacher``); :func:`limits_from_args` reads them."""
    parser.add_argument("--max-teacher-tensor-mib", type=float, default=DEFAULT_TENSOR_MIB,
                        help="largest intermediate an onnx: teacher may infer, per image, in MiB")
    parser.add_argument("--max-teacher-memory-gib", type=float,
                        help=f"resident memory of this process while an onnx: teacher runs (default: "
                        f"{MEMORY_FRACTION * 100:.0f}%% of the machine's or container's memory)")


def limits_from_args(args: argparse.Namespace) -> Limits:
    """The :class:`Limits` of the flags :func:`add_limit_args` adds; a value that is not a
    positive number is a ``ConfigError`` naming the flag."""
    for flag, value in (("--max-teacher-tensor-mib", args.max_teacher_tensor_mib),
                        ("--max-teacher-memory-gib", args.max_teacher_memory_gib)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{flag} {value}: must be a positive number")
    memory = default_memory_bytes() if args.max_teacher_memory_gib is None else int(args.max_teacher_memory_gib * 2**30)
    return Limits(int(args.max_teacher_tensor_mib * 2**20), memory)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="lvvit-label", description=__doc__, formatter_class=_HelpFormatter)
    p.add_argument("--input", required=True,
                   help="shard source (folder, brace pattern, http(s)://, pipe:COMMAND, s3://, gs://) "
                   "or ImageFolder root")
    p.add_argument("--out", type=Path, required=True, help="output shard folder (local)")
    src = p.add_argument_group("shard source")
    src.add_argument("--manifest", help="manifest.json with the input shards' sample counts (default: beside them)")
    add_access_args(src, "is an error")
    t = p.add_argument_group("teacher")
    t.add_argument(
        "--teacher",
        required=True,
        help=f"{', '.join(sorted(TEACHERS))}, 'package.module:factory' returning a module "
        "with output [B, C, h, w] (called with checkpoint=, img_size=, **teacher-args), or onnx:PATH, an ONNX "
        "model with output [B, C, h, w], [B, N, C] tokens, or [B, C] logits of a classifier (made dense)",
    )
    t.add_argument("--teacher-checkpoint", type=Path,
                   help="local weights file (every teacher but onnx:PATH, whose file holds the weights)")
    t.add_argument(
        "--teacher-args",
        type=json_object,
        default={},
        help='JSON architecture overrides, e.g. \'{"embed_dim": 48, "depth": 2}\' or \'{"widths": [16, 32]}\'',
    )
    t.add_argument("--num-classes", type=int,
                   help="class count the teacher's output must have (default: the length of classes.json of --input); "
                   "also a torch teacher's head size (default: the checkpoint's)")
    t.add_argument("--topk", type=int, default=5, help="classes kept per map cell")
    t.add_argument("--onnx-provider", choices=list(PROVIDERS), default="cpu",
                   help="ONNX Runtime provider of an onnx: teacher (cuda, tensorrt: device LOCAL_RANK)")
    add_limit_args(t)
    pre = p.add_argument_group("preprocessing (bicubic resize of the shorter side, centre crop)")
    pre.add_argument("--img-size", type=int,
                     help=f"teacher input size (default: an ONNX graph's fixed size, else {BUILTIN_IMG_SIZE}, "
                     "the official maps')")
    pre.add_argument(
        "--crop-pct",
        type=float,
        default=1.0,
        help="shorter side resized to img-size / crop-pct before the crop (1.0: largest centre square)",
    )
    pre.add_argument("--mean", type=float, nargs=3, default=list(IMAGENET_MEAN), metavar="M",
                     help="per-channel mean on the 0-1 scale, in --channel-order")
    pre.add_argument("--std", type=float, nargs=3, default=list(IMAGENET_STD), metavar="S",
                     help="per-channel std on the 0-1 scale, in --channel-order")
    pre.add_argument("--channel-order", choices=list(CHANNEL_ORDERS), default="rgb",
                     help="channel order the teacher expects")
    pre.add_argument("--layout", choices=list(LAYOUTS), default="nchw",
                     help="input layout of an onnx: teacher (torch teachers take nchw)")
    folder = p.add_argument_group("ImageFolder input (shards are planned as lvvit-shards would)")
    folder.add_argument("--prefix", default="train", help="output shard name prefix")
    folder.add_argument("--shard-size", type=int, default=1000, help="input images per shard")
    folder.add_argument("--seed", type=int, default=0, help="shuffle seed of the sample order")
    folder.add_argument("--max-size", type=int, help="re-encode images whose longer side exceeds this")
    folder.add_argument("--class-names", type=Path, help="'wnid name' lines (LOC_synset_mapping.txt)")
    add_class_order(folder)
    run = p.add_argument_group("execution")
    run.add_argument("--device", default="cpu", help="cpu or cuda (each rank uses cuda:LOCAL_RANK)")
    run.add_argument("--batch-size", type=int, default=64, help="images per teacher forward")
    run.add_argument("--precision", choices=list(PRECISIONS), default="fp32", help="teacher autocast dtype")
    run.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="decode threads")
    run.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    run.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def check_teacher_args(args: argparse.Namespace) -> None:
    """Flags that only make sense for one kind of teacher, and the teacher's file, in one line each."""
    path = onnx_path(args.teacher)
    if path is None:
        if args.teacher_checkpoint is None:
            raise ConfigError(f"--teacher {args.teacher} needs --teacher-checkpoint (only onnx:PATH teachers do not)")
        if not args.teacher_checkpoint.is_file():
            raise ConfigError(f"teacher checkpoint {args.teacher_checkpoint} does not exist")
        if args.layout != "nchw":
            raise ConfigError(f"--layout {args.layout} is for onnx: teachers; torch teachers take nchw")
        return
    if not path.is_file():
        raise ConfigError(f"ONNX teacher {path} does not exist")
    ignored = [flag for flag, used in (
        ("--teacher-checkpoint", args.teacher_checkpoint is not None),
        ("--teacher-args", bool(args.teacher_args)),
        (f"--precision {args.precision}", args.precision != "fp32"),
        (f"--device {args.device}", args.device != "cpu"),
    ) if used]
    if ignored:
        raise ConfigError(
            f"{', '.join(ignored)}: not used with --teacher {args.teacher} (the graph fixes weights and "
            "precision; --onnx-provider picks the device)"
        )


def resolve_img_size(args: argparse.Namespace) -> int:
    """--img-size, else an ONNX graph's fixed input size, else the official 576."""
    path = onnx_path(args.teacher)
    fixed = fixed_size(path, args.layout) if path is not None else None
    if args.img_size is None:
        return fixed or BUILTIN_IMG_SIZE
    if fixed is not None and fixed != args.img_size:
        raise ConfigError(f"{path}: the graph's input is {fixed} px, --img-size is {args.img_size}")
    return args.img_size


def make_plan(args: argparse.Namespace) -> Plan:
    """An ImageFolder tree's plan, or the plan of the shard source ``--input`` names."""
    folder = Path(args.input)
    if not is_remote(args.input) and folder.is_dir() and not is_shard_folder(folder):
        return plan_image_folder(
            folder, args.prefix, args.shard_size, args.seed, args.max_size, args.class_names, args.workers,
            args.class_order,
        )
    try:
        return plan_shards(resolve(args.input, args.manifest, access_from_args(args)))
    except (SourceError, FileNotFoundError) as e:
        raise DataError(f"--input {args.input}: {e}") from None


def dataset_classes(args: argparse.Namespace, plan: Plan) -> int | None:
    """The class count the teacher's output must have: classes.json's, or --num-classes."""
    listed = None if plan.classes is None else len(json.loads(plan.classes))
    if listed is not None and args.num_classes is not None and listed != args.num_classes:
        raise ConfigError(f"--num-classes {args.num_classes}, but classes.json of {args.input} lists {listed} classes")
    if listed is None and args.num_classes is None:
        log.warning("no classes.json and no --num-classes: the teacher's class count is not checked")
    return listed if listed is not None else args.num_classes


def make_teacher(args: argparse.Namespace, ranks: RankInfo, num_classes: int | None, limits: Limits) -> torch.nn.Module:
    path = onnx_path(args.teacher)
    if path is not None:
        return load_onnx_teacher(
            path, args.img_size, args.layout, args.onnx_provider, ranks.local_rank, limits, num_classes
        )
    teacher_args = dict(args.teacher_args)
    if args.num_classes is not None:
        teacher_args["num_classes"] = args.num_classes
    return build_teacher(args.teacher, args.teacher_checkpoint, args.img_size, **teacher_args)


def make_labeler(args: argparse.Namespace, ranks: RankInfo, num_classes: int | None, limits: Limits) -> Labeler:
    """The teacher, checked and probed (an ONNX one), behind the preprocessing."""
    teacher = make_teacher(args, ranks, num_classes, limits)
    device = f"cuda:{ranks.local_rank}" if args.device == "cuda" else args.device
    return Labeler(
        teacher,
        img_size=args.img_size,
        crop_pct=args.crop_pct,
        topk=args.topk,
        batch_size=args.batch_size,
        device=device,
        precision=args.precision,
        workers=args.workers,
        mean=tuple(args.mean),
        std=tuple(args.std),
        channel_order=args.channel_order,
        num_classes=num_classes,
        where=str(teacher_file(args)),
    )


def label_jobs(
    args: argparse.Namespace, ranks: RankInfo, labeler: Labeler, todo: list[ShardJob], settings: dict
) -> tuple[list[ShardResult], list[str]]:
    """Label this rank's unfinished shards; a damaged input shard is reported and passed over,
    a teacher whose output cannot be labels ends the job (its shard is not written)."""
    expected = [job.expected for job in todo]
    results, failures = [], []
    bar = tqdm(
        total=None if None in expected else sum(expected), unit="img", desc=f"rank {ranks.rank}",
        position=ranks.local_rank, disable=args.no_progress, dynamic_ncols=True,
    )
    with bar, logging_redirect_tqdm():
        for job in todo:
            try:
                result = labeler.label_shard(job.samples(), args.out / job.name, job.expected, bar.update)
            except ShardReadError as e:
                log.error("%s not written: %s", job.name, e)
                failures.append(f"{job.name}: {e}")
                continue
            except (TeacherOutputError, OnnxTeacherError) as e:  # same type, the shard named
                raise type(e)(f"{e} (labeling {job.name}; not written)") from None
            results.append(result)
            record_settings(args.out, settings)
            log.info(
                "%s: %d images labeled, %d skipped, %.1f img/s",
                job.name, result.written, len(result.skipped), result.written / max(result.seconds, 1e-9),
            )
    return results, failures


def report(ranks: RankInfo, results: list[ShardResult], finished_before: int, skipped: list[dict]) -> None:
    written = sum(r.written for r in results)
    seconds = sum(r.seconds for r in results)
    skipped = [*skipped, *({"key": s.key, "reason": f"{s.reason} (in {s.shard})"} for r in results for s in r.skipped)]
    log.info(
        "rank %d done: %d images labeled in %d shards (%.1f img/s), %d shards already finished, %d images skipped",
        ranks.rank, written, len(results), written / seconds if seconds else 0.0, finished_before, len(skipped),
    )
    for s in skipped:
        log.info("  skipped %s: %s", s["key"], s["reason"])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [DENSE_TEACHER]:
        from lvvit.labeling.dense_teacher import main as dense_teacher_main

        return dense_teacher_main(argv[1:])
    args = parse_args(argv)
    with exits_on_error():
        return label(args)


def label(args: argparse.Namespace) -> int:
    """The labeling job of the parsed command line; our errors propagate (``main`` prints them)."""
    check_teacher_args(args)
    limits = limits_from_args(args)
    args.img_size = resolve_img_size(args)
    ranks = rank_info(args.local_rank)
    logging.basicConfig(level=logging.INFO, format=f"[lvvit-label rank {ranks.rank}] %(levelname)s %(message)s")
    if not is_remote(args.input) and args.out.resolve() == Path(args.input).resolve():
        raise ConfigError("--out must differ from --input: input shards are never overwritten")
    plan = make_plan(args)
    if not plan.jobs:
        raise DataError(f"nothing to label in {args.input}")
    if plan.classes is None:
        log.warning("%s has no classes.json; the output will have none either", args.input)
    num_classes = dataset_classes(args, plan)

    settings = labeling_settings(args)
    check_settings(args.out, settings)

    mine = plan.jobs[ranks.rank :: ranks.world_size]
    todo = [job for job in mine if not (args.out / job.name).exists()]
    log.info(
        "%d shards from %s; this rank (%d of %d) has %d, %d already finished",
        len(plan.jobs), args.input, ranks.rank, ranks.world_size, len(mine), len(mine) - len(todo),
    )
    results, failures = [], []
    if todo:
        labeler = make_labeler(args, ranks, num_classes, limits)
        args.out.mkdir(parents=True, exist_ok=True)
        try:
            results, failures = label_jobs(args, ranks, labeler, todo, settings)
        finally:
            labeler.close()
    report(ranks, results, len(mine) - len(todo), plan.skipped if ranks.rank == 0 else [])
    if failures:
        log.error("rank %d: %d shards failed and were not written:", ranks.rank, len(failures))
        for failure in failures:
            log.error("  %s", failure)
        return 1

    # classes.json last of this rank's files: a job that failed leaves none to look finished.
    if plan.classes is not None:
        atomic.write_bytes(args.out / "classes.json", plan.classes)
    # No collectives: the rank that finishes last sees every shard and writes the manifest.
    if all((args.out / job.name).exists() for job in plan.jobs):
        write_output_manifest(args.out, plan)
        log.info("all %d shards finished; wrote %s", len(plan.jobs), args.out / "manifest.json")
    return 0

if __name__ == "__main__":
    sys.exit(main())
