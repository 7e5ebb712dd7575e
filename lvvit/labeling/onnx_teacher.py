"""ONNX teachers: any ONNX image model as a dense teacher, and classifiers made dense.

Most strong classifiers (timm, torchvision, Keras, the ONNX model zoo) export to ONNX,
and token labeling needs a score map, not one score per image. A classifier whose head
is global average pooling followed by one linear layer is made dense by applying that
linear layer at every location of the pre-pool feature map (a 1x1 Conv): because both
are linear, the mean of the map over locations is exactly the classifier's logits, which
:func:`verify_dense` checks on the rewritten graph before it is used.

The ONNX file is data (docs/security.md): read, bounded and run by
:mod:`lvvit.labeling.onnx_file`; what it returns must be finite float logits with the
dataset's class count (:func:`lvvit.labeling.teacher.check_logits`).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import helper, numpy_helper
from torch import nn

from lvvit.labeling.dense_rewrite import (
    DENSE_TOLERANCE,
    FLOAT_OUTPUTS,
    DenseRewriteError,
    Head,
    InputSpec,
    input_spec,
    make_dense,
    unique_name,
)
from lvvit.labeling.onnx_file import (
    Limits,
    OnnxTeacherError,
    _first_line,
    bounded_run,
    check_graph,
    load_model,
    make_session,
    shapes_only,
)
from lvvit.labeling.teacher import check_logits

__all__ = ["OnnxTeacherError", "load_model", "make_session"]  # re-exported: the file's reading lives in onnx_file

log = logging.getLogger(__name__)

def _example(spec: InputSpec, size: int, batch: int, seed: int = 0) -> np.ndarray:
    shape = (batch, 3, size, size) if spec.layout == "nchw" else (batch, size, size, 3)
    return np.random.default_rng(seed).standard_normal(shape).astype(spec.dtype)


def _run(session: ort.InferenceSession, spec: InputSpec, x: np.ndarray, where: str, limits: Limits) -> np.ndarray:
    """The first output for ``x``, within ``limits``; any failure is one named line."""
    try:
        return bounded_run(session, {spec.name: x}, limits, where, [session.get_outputs()[0].name])[0]
    except OnnxTeacherError:
        raise
    except Exception as e:  # ORT's own exception types; any of them means the graph cannot run here
        size = x.shape[2]  # H of NCHW, W of NHWC: inputs are square
        raise OnnxTeacherError(f"{where}: ONNX Runtime cannot run it at {size} px ({_first_line(e)})") from None


def verify_dense(original: onnx.ModelProto, dense: onnx.ModelProto, spec: InputSpec, size: int, where: str,
                 folder: Path | None = None, limits: Limits | None = None) -> float:
    """Max |mean over locations of the dense map - the classifier's logits|, relative to
    max(1, |logits|); refused above :data:`DENSE_TOLERANCE` (the head was not pool + linear)."""
    return _verify_dense(original, dense, spec, size, where, folder, limits)[0]


def _verify_dense(original: onnx.ModelProto, dense: onnx.ModelProto, spec: InputSpec, size: int, where: str,
                  folder: Path | None = None, limits: Limits | None = None) -> tuple[float, tuple[int, int]]:
    """:func:`verify_dense`'s figure and the map's ``(h, w)``. One session at a time: a
    teacher's weights are held once, not twice."""
    limits = limits or Limits()
    x = _example(spec, size, spec.batch or 2)
    logits = _run(make_session(original, where, folder=folder), spec, x, where, limits)
    maps = _run(make_session(dense, where, folder=folder), spec, x, where, limits)
    return dense_difference(logits, maps, spec, where)


def dense_difference(logits: np.ndarray, maps: np.ndarray, spec: InputSpec, where: str) -> tuple[float, tuple[int, int]]:
    """How far the dense maps' means are from the logits (and the maps' ``(h, w)``); refused
    above :data:`DENSE_TOLERANCE`."""
    logits, maps = logits.astype(np.float64), maps.astype(np.float64)
    if maps.ndim != 4 or logits.ndim != 2:
        raise DenseRewriteError(f"{where}: the rewrite gave {list(maps.shape)} for logits {list(logits.shape)}")
    diff = float(np.abs(maps.mean(axis=(2, 3)) - logits).max() / max(1.0, float(np.abs(logits).max())))
    if not diff <= DENSE_TOLERANCE[spec.dtype]:
        raise DenseRewriteError(
            f"{where}: the dense map's mean differs from the classifier's logits by {diff:.2e} "
            f"(allowed {DENSE_TOLERANCE[spec.dtype]:.0e}); the head is not pooling followed by a linear layer"
        )
    return diff, maps.shape[2:]


def to_dense_map(output: np.ndarray, where: str) -> np.ndarray:
    """``[B, C, h, w]`` as is; ``[B, N, C]`` tokens on a square grid as ``[B, C, s, s]``."""
    if output.ndim == 4:
        return output
    if output.ndim == 3:
        side = round(output.shape[1] ** 0.5)
        if side * side == output.shape[1]:
            return output.transpose(0, 2, 1).reshape(output.shape[0], output.shape[2], side, side)
    raise OnnxTeacherError(
        f"{where}: output shape {list(output.shape)} is neither dense logits [B, C, h, w], tokens [B, N, C] "
        "with N a square, nor classifier logits [B, C]"
    )


class OnnxTeacher(nn.Module):
    """An ONNX Runtime session behind the dense-teacher interface (``[B, 3, H, W]`` float
    in, ``[B, C, h, w]`` float32 out), so the :class:`~lvvit.labeling.labeler.Labeler` runs
    it like any torch teacher. No parameters: the graph holds the weights."""

    def __init__(self, session: ort.InferenceSession, spec: InputSpec, where: str, limits: Limits | None = None) -> None:
        super().__init__()
        self.session, self.spec, self.where = session, spec, where
        self.limits = limits or Limits()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.detach().float().cpu().numpy()
        if self.spec.layout == "nhwc":
            x = x.transpose(0, 2, 3, 1)
        x = np.ascontiguousarray(x, dtype=self.spec.dtype)
        step = self.spec.batch or len(x)
        outputs = [self._run(x[i : i + step], step) for i in range(0, len(x), step)]
        dense = to_dense_map(np.concatenate(outputs), self.where)
        return torch.from_numpy(np.ascontiguousarray(dense, dtype=np.float32))

    def _run(self, chunk: np.ndarray, batch: int) -> np.ndarray:
        """One session run; a short last chunk of a fixed-batch graph is padded, then cut."""
        n = len(chunk)
        if n < batch:
            chunk = np.concatenate([chunk, np.zeros((batch - n, *chunk.shape[1:]), chunk.dtype)])
        return _run(self.session, self.spec, chunk, self.where, self.limits)[:n]


def input_shape(spec: InputSpec, size: int) -> list[int]:
    """The input shape at ``size`` px, the graph's fixed batch or one image."""
    batch = spec.batch or 1
    return [batch, 3, size, size] if spec.layout == "nchw" else [batch, size, size, 3]


def _check_output_type(session: ort.InferenceSession, where: str) -> None:
    """Logits are floats: an integer output would be turned into labels of nothing."""
    output = session.get_outputs()[0]
    if output.type not in FLOAT_OUTPUTS:
        raise OnnxTeacherError(f"{where}: output {output.name!r} is {output.type}, a teacher returns float logits")


def fixed_size(path: str | Path, layout: str) -> int | None:
    """The input size the graph fixes, or None: lets ``--img-size`` default to it."""
    return input_spec(load_model(path), layout, str(path)).size


# ------------------------------------------------------------------ the one decision

@dataclass(frozen=True)
class DenseGraph:
    """What :func:`dense_graph` made of a teacher file: ``model`` maps images to
    ``[B, classes, h, w]``; ``session`` runs the teacher (its output laid on the grid by
    :func:`to_dense_map`, which for tokens does what the nodes appended to ``model`` do)."""

    kind: str  # the output the file had: "dense", "tokens" or "classifier"
    model: onnx.ModelProto
    session: ort.InferenceSession
    spec: InputSpec
    size: int  # the input size it was decided at
    grid: tuple[int, int]  # h, w of the map at that size
    head: Head | None = None  # the replaced head of a classifier
    diff: float = 0.0  # the check's figure (see describe)

    def describe(self) -> str:
        """What was done to the file and the check's figure, to follow the file's name."""
        h, w = self.grid
        if self.kind == "classifier":
            chain = " -> ".join(self.head.nodes)
            return (f"is a classifier ({chain}): made dense, that head replaced by a 1x1 Conv with "
                    f"{self.head.weight.shape[0]} classes; check at {self.size} px: "
                    f"max |mean of dense map - logits| / max(1, |logits|) = {self.diff:.2e}")
        if self.kind == "tokens":
            return (f"gives [B, N, C] tokens: laid on the {h} x {w} grid at {self.size} px (Transpose -> Reshape "
                    f"appended); check: max |map - tokens on the grid| = {self.diff:.2e}")
        return f"gives dense [B, C, h, w] maps ({h} x {w} at {self.size} px): used as they are"


def dense_graph(
    model: onnx.ModelProto, where: str, img_size: int, layout: str = "nchw", folder: Path | None = None,
    limits: Limits | None = None, provider: str = "cpu", device_id: int = 0, num_classes: int | None = None,
) -> DenseGraph:
    """The one decision on a teacher file, made alike for ``lvvit-label --teacher onnx:``
    and ``lvvit-label dense-teacher``: which graphs are accepted and, if refused, why.

    The graph is held to ``limits`` at ``img_size`` before anything runs; then one probe
    input decides by the output's shape: ``[B, C, h, w]`` is used as it is, ``[B, N, C]``
    tokens with ``N`` a square are laid on the grid, ``[B, C]`` logits are made dense by
    :func:`make_dense` and checked by :func:`verify_dense`; anything else is refused with
    the shape found. The probe must give finite float logits with ``num_classes`` classes
    (when given), so a teacher that cannot label the dataset is refused before any shard.
    """
    limits = limits or Limits()
    spec = input_spec(model, layout, where)
    if spec.size is not None and spec.size != img_size:
        raise OnnxTeacherError(f"{where}: the graph's input is {spec.size} px, --img-size is {img_size}")
    check_graph(model, spec.name, input_shape(spec, img_size), limits, where)
    session = make_session(model, where, provider, device_id, folder)
    _check_output_type(session, where)
    probe = _run(session, spec, _example(spec, img_size, spec.batch or 1), where, limits)
    if probe.ndim == 2:
        check_logits(torch.from_numpy(np.asarray(probe, dtype=np.float32)), num_classes, where)
        dense, head = make_dense(model, where, folder)
        x = _example(spec, img_size, spec.batch or 2)  # the check runs on the CPU
        logits = _run(session if provider == "cpu" else make_session(model, where, folder=folder), spec, x, where,
                      limits)
        session = None  # one session, one copy of the weights, at a time
        checker = make_session(dense, where, folder=folder)
        diff, grid = dense_difference(logits, _run(checker, spec, x, where, limits), spec, where)
        session = checker if provider == "cpu" else make_session(dense, where, provider, device_id, folder)
        return DenseGraph("classifier", dense, session, input_spec(dense, layout, where), img_size, grid, head, diff)
    grid = to_dense_map(probe, where)  # refuses any other shape, and N not a square
    check_logits(torch.from_numpy(np.asarray(grid, dtype=np.float32)), num_classes, where)
    if probe.ndim == 4:
        return DenseGraph("dense", model, session, spec, img_size, grid.shape[2:])
    dense = tokens_on_grid(model, grid.shape[1], where)
    diff = verify_grid(model, probe, grid, where)
    return DenseGraph("tokens", dense, session, spec, img_size, grid.shape[2:], diff=diff)


def _grid_nodes(graph: onnx.GraphProto, tokens: str, output: str) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Nodes taking ``tokens`` ``[B, N, C]`` to ``output`` ``[B, C, s, s]`` with ``s = sqrt(N)``
    computed in the graph (row-major, as :func:`to_dense_map`), and the constants they use."""
    keys = ("nchw_tokens", "shape", "n_index", "n", "n_float", "side_float", "side", "keep", "rest", "target")
    n = {key: unique_name(graph, f"dense_teacher_grid_{key}") for key in keys}
    constants = [
        numpy_helper.from_array(np.array([1], np.int64), n["n_index"]),
        numpy_helper.from_array(np.array([0, 0], np.int64), n["keep"]),  # Reshape: 0 copies B and C
        numpy_helper.from_array(np.array([-1], np.int64), n["rest"]),
    ]
    nodes = [
        helper.make_node("Transpose", [tokens], [n["nchw_tokens"]], perm=[0, 2, 1]),
        helper.make_node("Shape", [tokens], [n["shape"]]),
        helper.make_node("Gather", [n["shape"], n["n_index"]], [n["n"]], axis=0),
        helper.make_node("Cast", [n["n"]], [n["n_float"]], to=onnx.TensorProto.FLOAT),
        helper.make_node("Sqrt", [n["n_float"]], [n["side_float"]]),  # exact for a square N below 2**24
        helper.make_node("Cast", [n["side_float"]], [n["side"]], to=onnx.TensorProto.INT64),
        helper.make_node("Concat", [n["keep"], n["side"], n["rest"]], [n["target"]], axis=0),
        helper.make_node("Reshape", [n["nchw_tokens"], n["target"]], [output], name=unique_name(graph, "dense_teacher_grid")),
    ]
    return nodes, constants


def tokens_on_grid(model: onnx.ModelProto, classes: int, where: str) -> onnx.ModelProto:
    """A ``[B, N, C]`` token graph whose output, under the same name, is ``[B, C, s, s]``:
    the tokens laid on the square grid in the graph, so the file is a dense teacher too."""
    dense = copy.deepcopy(model)
    graph = dense.graph
    output = graph.output[0]
    tokens = unique_name(graph, "dense_teacher_tokens")
    for node in graph.node:  # the producer now makes ``tokens``; any reader of the output reads them
        node.output[:] = [tokens if o == output.name else o for o in node.output]
        node.input[:] = [tokens if i == output.name else i for i in node.input]
    nodes, constants = _grid_nodes(graph, tokens, output.name)
    graph.initializer.extend(constants)
    graph.node.extend(nodes)
    value_info = [v for v in graph.value_info if v.name != output.name]
    del graph.value_info[:]
    graph.value_info.extend(value_info)
    batch = output.type.tensor_type.shape.dim[0] if output.type.tensor_type.shape.dim else None
    output.CopyFrom(helper.make_tensor_value_info(
        output.name, output.type.tensor_type.elem_type,
        [(batch.dim_param or batch.dim_value or "batch") if batch is not None else "batch", classes, "height", "width"],
    ))
    try:
        onnx.checker.check_model(shapes_only(dense))
    except onnx.checker.ValidationError as e:
        raise DenseRewriteError(f"{where}: the rewritten graph does not check ({_first_line(e)})") from None
    return dense


def verify_grid(model: onnx.ModelProto, tokens: np.ndarray, grid: np.ndarray, where: str) -> float:
    """Run the nodes :func:`tokens_on_grid` appends on the probe's ``tokens`` alone (not the
    whole teacher again): they must give ``grid``, the tokens as the labeler lays them out."""
    output = model.graph.output[0]
    graph = helper.make_graph([], "grid", [helper.make_tensor_value_info(
        "tokens", output.type.tensor_type.elem_type, [None, None, tokens.shape[2]])], [helper.make_tensor_value_info(
        "grid", output.type.tensor_type.elem_type, None)])
    nodes, constants = _grid_nodes(graph, "tokens", "grid")
    graph.node.extend(nodes)
    graph.initializer.extend(constants)
    check = helper.make_model(graph, opset_imports=[o for o in model.opset_import if o.domain in ("", "ai.onnx")],
                              ir_version=model.ir_version)
    got = make_session(check, where).run(None, {"tokens": tokens})[0]
    if got.shape != grid.shape:
        raise DenseRewriteError(f"{where}: the tokens on the grid have shape {list(got.shape)}, not {list(grid.shape)}")
    diff = float(np.abs(got.astype(np.float64) - grid.astype(np.float64)).max())
    if diff != 0.0:
        raise DenseRewriteError(f"{where}: the tokens laid on the grid in the graph differ by {diff:.2e}")
    return diff


def load_onnx_teacher(
    path: str | Path, img_size: int, layout: str = "nchw", provider: str = "cpu", device_id: int = 0,
    limits: Limits | None = None, num_classes: int | None = None,
) -> OnnxTeacher:
    """A teacher from an ONNX file, as :func:`dense_graph` decides it (the decision
    ``lvvit-label dense-teacher`` makes too): dense maps and tokens as they are, a ``[B, C]``
    classifier rewritten by :func:`make_dense` and checked by :func:`verify_dense`."""
    where = str(path)
    found = dense_graph(load_model(path), where, img_size, layout, Path(path).parent, limits, provider, device_id,
                        num_classes)
    log.info("%s %s", where, found.describe())
    return OnnxTeacher(found.session, found.spec, where, limits)
