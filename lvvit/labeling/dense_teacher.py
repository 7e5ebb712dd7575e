"""``lvvit-label dense-teacher IN.onnx OUT.onnx``: an ONNX teacher written as a dense teacher.

OUT maps images to ``[B, classes, h, w]``. Which files are accepted, and why one is
refused, is decided by :func:`lvvit.labeling.onnx_teacher.dense_graph`, the decision
``lvvit-label --teacher onnx:IN.onnx`` makes in memory: a classifier's head (global average
pooling, then one linear layer, with Flatten/Reshape/Squeeze allowed between) becomes a
1x1 Conv on the pre-pool feature map, checked by running both graphs (the mean of the
dense map over locations must equal the classifier's logits); ``[B, N, C]`` tokens (a ViT's
patch tokens through its head) get a Transpose and a Reshape that lay them on the square
grid; a graph that is already dense is written as it is. The figure is printed. This
command is for looking at the result (Netron) or using it elsewhere.

The file is held to the same bounds as a labeling teacher (docs/security.md). A file
with external data keeps it: OUT refers to the same data file(s), copied beside OUT when
OUT is written to another folder.
"""

from __future__ import annotations

import argparse
import shutil
from dataclasses import dataclass
from pathlib import Path

import onnx

from lvvit import atomic
from lvvit.errors import ConfigError, exits_on_error
from lvvit.labeling.cli import add_limit_args, limits_from_args
from lvvit.labeling.dense_rewrite import LAYOUTS
from lvvit.labeling.onnx_file import Limits, graph_tensors
from lvvit.labeling.onnx_teacher import (
    OnnxTeacherError,
    dense_graph,
    input_spec,
    load_model,
)

DEFAULT_CHECK_SIZE = 224


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="lvvit-label dense-teacher", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", type=Path, help="ONNX teacher: [B, C] classifier logits, [B, N, C] tokens or [B, C, h, w] maps")
    p.add_argument("output", type=Path, help="where to write the dense graph")
    p.add_argument("--img-size", type=int,
                   help=f"input size of the check (default: the graph's fixed size, else {DEFAULT_CHECK_SIZE})")
    p.add_argument("--layout", choices=list(LAYOUTS), default="nchw", help="input layout of the graph (default: nchw)")
    add_limit_args(p)
    return p.parse_args(argv)


@dataclass(frozen=True)
class Rewrite:
    """One ``dense-teacher`` job: the teacher file, where the dense graph goes, and how to check it."""

    input: Path
    output: Path
    limits: Limits
    img_size: int | None = None
    """Size of the check; None: the graph's fixed size, else :data:`DEFAULT_CHECK_SIZE`."""
    layout: str = "nchw"


def rewrite(job: Rewrite) -> float:
    """Decide (as ``--teacher onnx:`` does), check and write OUT; returns the check's figure."""
    where = str(job.input)
    model = load_model(job.input)
    size = job.img_size or input_spec(model, job.layout, where).size or DEFAULT_CHECK_SIZE
    found = dense_graph(model, where, size, job.layout, job.input.parent, job.limits)
    copy_external_data(found.model, job.input.parent, job.output.parent)
    atomic.write_bytes(job.output, found.model.SerializeToString())
    print(f"{where} {found.describe()}")
    print(f"wrote {job.output}")
    return found.diff


def copy_external_data(model: onnx.ModelProto, source: Path, target: Path) -> None:
    """Copy the external data files ``model`` refers to from ``source`` to ``target`` (OUT's
    folder), streamed; a different file already there under that name is refused."""
    names = {e.value for t in graph_tensors(model.graph) for e in t.external_data if e.key == "location"}
    for name in sorted(names):
        src, dst = source / name, target / name
        if dst.exists() and dst.resolve() == src.resolve():
            continue
        if dst.exists():
            raise OnnxTeacherError(f"{dst} exists: OUT's external data would replace it; write OUT beside IN "
                                   "or in another folder")
        with atomic.atomic_path(dst) as tmp:
            shutil.copyfile(src, tmp)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    with exits_on_error():
        if args.output.resolve() == args.input.resolve():
            raise ConfigError("OUT must differ from IN: the classifier is kept")
        rewrite(Rewrite(args.input, args.output, limits_from_args(args), args.img_size, args.layout))
    return 0
