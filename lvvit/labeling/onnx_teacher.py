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
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import helper, numpy_helper
from torch import nn

from lvvit.labeling.onnx_file import (
    Constants,
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

LAYOUTS = ("nchw", "nhwc")
SHAPE_OPS = {"Flatten", "Reshape", "Squeeze", "Identity"}
LINEAR_OPS = {"Gemm", "MatMul", "Conv"}
LAYOUT_OPS = SHAPE_OPS | {"Transpose", "Unsqueeze", "Cast"}
"""Ops that only move or retype values: a refusal looks past them for the op it names."""
DENSE_TOLERANCE = {np.dtype(np.float32): 1e-4, np.dtype(np.float16): 1e-2}
"""Allowed |mean of dense map - logits| relative to max(1, |logits|): fp16 rounds at ~1e-3."""

FLOAT_OUTPUTS = ("tensor(float)", "tensor(float16)", "tensor(double)", "tensor(bfloat16)")


class DenseRewriteError(OnnxTeacherError):
    """A classifier head that is not global average pooling followed by one linear layer."""


# ------------------------------------------------------------------ the model's input
@dataclass(frozen=True)
class InputSpec:
    """The one image input: its name, element type, fixed batch and size (None if dynamic)."""

    name: str
    dtype: np.dtype
    batch: int | None
    size: int | None
    layout: str


def _dim(d: onnx.TensorShapeProto.Dimension) -> int | None:
    return d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None


def input_spec(model: onnx.ModelProto, layout: str, where: str) -> InputSpec:
    """The image input of ``model`` checked against ``layout`` (``[B, 3, H, W]`` or ``[B, H, W, 3]``)."""
    stored = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in stored]
    if len(inputs) != 1:
        raise OnnxTeacherError(f"{where}: a teacher takes one image input, the graph has {len(inputs)}")
    tensor = inputs[0].type.tensor_type
    elem = helper.tensor_dtype_to_np_dtype(tensor.elem_type) if tensor.elem_type else None
    if elem not in DENSE_TOLERANCE:
        raise OnnxTeacherError(f"{where}: input {inputs[0].name!r} is {elem}, expected float32 or float16")
    dims = [_dim(d) for d in tensor.shape.dim]
    shown = "[" + ", ".join(str(d) if d else "?" for d in dims) + "]"
    if len(dims) != 4:
        raise OnnxTeacherError(f"{where}: input {inputs[0].name!r} has shape {shown}, expected 4 dimensions")
    batch, *rest = dims
    channels, height, width = rest if layout == "nchw" else (rest[2], rest[0], rest[1])
    if channels not in (None, 3):
        raise OnnxTeacherError(f"{where}: input {inputs[0].name!r} has shape {shown}, not 3 channels in --layout {layout}")
    if height != width:
        raise OnnxTeacherError(f"{where}: input {inputs[0].name!r} has shape {shown}; labeling needs square inputs")
    return InputSpec(inputs[0].name, np.dtype(elem), batch, height, layout)


# ------------------------------------------------------------------ classifier -> dense
@dataclass(frozen=True)
class Head:
    """What :func:`find_head` found: the pre-pool feature map and the linear map after pooling."""

    features: str
    weight: np.ndarray  # [classes, channels]
    bias: np.ndarray  # [classes]
    nodes: tuple[str, ...]  # ops from the pooling to the output, in graph order


def _attr(node: onnx.NodeProto, name: str, default: object) -> object:
    found = next((a for a in node.attribute if a.name == name), None)
    return default if found is None else helper.get_attribute_value(found)


def _describe(node: onnx.NodeProto) -> str:
    return f"{node.op_type} (node {node.name!r})" if node.name else node.op_type


def _is_spatial_mean(node: onnx.NodeProto, consts: Mapping[str, np.ndarray]) -> bool:
    """GlobalAveragePool, or ReduceMean over H and W of NCHW (axes as attribute or input)."""
    if node.op_type == "GlobalAveragePool":
        return True
    if node.op_type != "ReduceMean":
        return False
    axes = _attr(node, "axes", None)
    if axes is None and len(node.input) > 1 and node.input[1] in consts:
        axes = consts[node.input[1]].tolist()
    return axes is not None and {a % 4 for a in axes} == {2, 3}


def _bias(values: np.ndarray, classes: int, node: onnx.NodeProto) -> np.ndarray:
    if values.size not in (1, classes):
        raise DenseRewriteError(f"{_describe(node)} adds {values.size} values to {classes} logits")
    return np.broadcast_to(values.astype(np.float64).reshape(-1), (classes,))


def _linear(node: onnx.NodeProto, data: str, const: np.ndarray | None) -> tuple[np.ndarray, str | None, float]:
    """Weight ``[classes, channels]`` of a Gemm, MatMul or 1x1 Conv applied to ``data``, the
    name of its bias input (None without one) and the bias scale (Gemm's beta)."""
    if const is None or node.input[0] != data:
        raise DenseRewriteError(f"{_describe(node)} after the pooling does not multiply by a constant weight")
    weight = const.astype(np.float64)
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if node.op_type == "Gemm":
        if _attr(node, "transA", 0):
            raise DenseRewriteError(f"{_describe(node)} transposes the pooled features (transA=1)")
        weight = _attr(node, "alpha", 1.0) * (weight if _attr(node, "transB", 0) else weight.T)
        return weight, bias, float(_attr(node, "beta", 1.0))
    if node.op_type == "MatMul":
        if weight.ndim != 2:
            raise DenseRewriteError(f"{_describe(node)} has a {weight.ndim}-D weight, expected 2-D")
        return weight.T, None, 1.0
    if weight.ndim != 4 or weight.shape[2:] != (1, 1) or _attr(node, "group", 1) != 1 or any(_attr(node, "pads", [0])):
        raise DenseRewriteError(f"{_describe(node)} after the pooling is not a plain 1x1 convolution")
    return weight[:, :, 0, 0], bias, 1.0


def _behind_layout(node: onnx.NodeProto, producers: Mapping[str, onnx.NodeProto],
                   consts: Mapping[str, np.ndarray]) -> onnx.NodeProto:
    """The op a refusal names: ``node``, or, when ``node`` only moves values around
    (Transpose, Unsqueeze, ...), the first op behind it along its data input that does
    more, e.g. the LayerNormalization between the two Transposes of ConvNeXt's head
    (channels-last LayerNorm), so the message names the op that cannot be made dense.
    ``node`` itself when only layout ops lie between it and the pooling."""
    found = node
    while found.op_type in LAYOUT_OPS:
        data = next((i for i in found.input if i and i not in consts), None)
        behind = producers.get(data) if data is not None else None
        if behind is None or _is_spatial_mean(behind, consts):
            return node
        found = behind
    return found


def find_head(model: onnx.ModelProto, where: str, folder: Path | None = None) -> Head:
    """Walk back from the output through shape ops, one optional bias Add and one linear
    layer to a spatial mean; anything else there (a nonlinearity, attention pooling) is
    refused with its op named, since applying it per location would not average out.
    ``folder`` holds the model's external data, of which only the head's is read."""
    graph = model.graph
    if len(graph.output) != 1:
        raise DenseRewriteError(f"{where}: a classifier has one output, the graph has {len(graph.output)}")
    producers = {out: node for node in graph.node for out in node.output}
    consts = Constants(graph, folder)
    name, chain = graph.output[0].name, []
    weight, bias_terms = None, []
    while True:
        node = producers.get(name)
        if node is None:
            raise DenseRewriteError(
                f"{where}: no global average pooling (GlobalAveragePool or ReduceMean over H, W) before the output"
            )
        chain.append(node.op_type)
        if _is_spatial_mean(node, consts):
            break
        data = next((i for i in node.input if i and i not in consts), None)
        if node.op_type in SHAPE_OPS and data == node.input[0]:
            name = data
            continue
        other = node.input[1] if len(node.input) == 2 and node.input[0] == data else node.input[0]
        if node.op_type == "Add" and weight is None and data is not None and other in consts:
            bias_terms.append((consts[other], 1.0, node))
            name = data
            continue
        if node.op_type in LINEAR_OPS and weight is None and data is not None:
            weight, bias_input, scale = _linear(node, data, consts.get(node.input[1]) if len(node.input) > 1 else None)
            if bias_input is not None:
                if bias_input not in consts:
                    raise DenseRewriteError(f"{where}: the bias of {_describe(node)} is not a constant")
                bias_terms.append((consts[bias_input], scale, node))
            name = data
            continue
        node = _behind_layout(node, producers, consts)
        if node.op_type == "ReduceMean":
            raise DenseRewriteError(f"{where}: {_describe(node)} does not average over H and W (axes 2, 3 of NCHW)")
        raise DenseRewriteError(
            f"{where}: {_describe(node)} sits between the pooling and the output; only "
            "Flatten/Reshape/Squeeze/Identity and one linear layer (Gemm, MatMul + Add, 1x1 Conv) can be made dense"
        )
    if weight is None:
        raise DenseRewriteError(f"{where}: no linear layer (Gemm, MatMul, 1x1 Conv) after the pooling")
    classes = weight.shape[0]
    bias = np.zeros(classes)
    for values, scale, adds in bias_terms:
        bias = bias + scale * _bias(values, classes, adds)
    return Head(node.input[0], weight, bias, tuple(reversed(chain)))


def make_dense(model: onnx.ModelProto, where: str, folder: Path | None = None) -> tuple[onnx.ModelProto, Head]:
    """The classifier with its pooling + linear head replaced by a 1x1 Conv on the features,
    whose ``[B, classes, h, w]`` output keeps the graph output's name."""
    head = find_head(model, where, folder)
    dense = copy.deepcopy(model)
    graph = dense.graph
    output = graph.output[0]
    dtype = helper.tensor_dtype_to_np_dtype(output.type.tensor_type.elem_type)
    weight_name, bias_name = _unique(graph, "dense_teacher_weight"), _unique(graph, "dense_teacher_bias")
    head_name = _unique(graph, "dense_teacher_head")
    graph.initializer.extend([
        numpy_helper.from_array(head.weight[:, :, None, None].astype(dtype), weight_name),
        numpy_helper.from_array(head.bias.astype(dtype), bias_name),
    ])
    graph.node.append(helper.make_node(
        "Conv", [head.features, weight_name, bias_name], [output.name], name=head_name, kernel_shape=[1, 1]
    ))
    _drop_replaced(graph, output.name, head_name)
    batch = output.type.tensor_type.shape.dim[0] if output.type.tensor_type.shape.dim else None
    output.CopyFrom(helper.make_tensor_value_info(
        output.name, output.type.tensor_type.elem_type,
        [(batch.dim_param or batch.dim_value or "batch") if batch is not None else "batch",
         head.weight.shape[0], "height", "width"],
    ))
    try:
        onnx.checker.check_model(shapes_only(dense))  # the weights were checked with the classifier
    except onnx.checker.ValidationError as e:
        raise DenseRewriteError(f"{where}: the rewritten graph does not check ({_first_line(e)})") from None
    return dense, head


def _unique(graph: onnx.GraphProto, base: str) -> str:
    """``base``, or ``base_1``, ``base_2``, ...: a name no tensor or node of the graph has."""
    taken = {t.name for t in graph.initializer} | {o for n in graph.node for o in n.output} | {n.name for n in graph.node}
    name, i = base, 0
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    return name


def _drop_replaced(graph: onnx.GraphProto, output: str, head_name: str) -> None:
    """Remove the old producer of ``output`` (the new head ``head_name`` replaces it) and
    every node, initializer and shape annotation nothing needs anymore."""
    nodes = [n for n in graph.node if n.name == head_name or output not in n.output]
    needed, kept = {output}, []
    for node in reversed(nodes):
        if needed.intersection(node.output):
            kept.append(node)
            needed.update(i for i in node.input if i)
    del graph.node[:]
    graph.node.extend(reversed(kept))
    initializers = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    value_info = [v for v in graph.value_info if v.name in needed and v.name != output]
    del graph.value_info[:]
    graph.value_info.extend(value_info)


# ------------------------------------------------------------------ running with ONNX Runtime
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
                  folder: Path | None = None, limits: Limits | None = None,
                  session: ort.InferenceSession | None = None) -> tuple[float, tuple[int, int]]:
    """:func:`verify_dense`'s figure and the map's ``(h, w)``; ``session``: a CPU session
    of ``original`` already made."""
    limits = limits or Limits()
    x = _example(spec, size, spec.batch or 2)
    logits = _run(session or make_session(original, where, folder=folder), spec, x, where, limits).astype(np.float64)
    maps = _run(make_session(dense, where, folder=folder), spec, x, where, limits).astype(np.float64)
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
        diff, grid = _verify_dense(model, dense, spec, img_size, where, folder, limits,
                                   session if provider == "cpu" else None)  # the check runs on the CPU
        session = make_session(dense, where, provider, device_id, folder)
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
    n = {key: _unique(graph, f"dense_teacher_grid_{key}") for key in keys}
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
        helper.make_node("Reshape", [n["nchw_tokens"], n["target"]], [output], name=_unique(graph, "dense_teacher_grid")),
    ]
    return nodes, constants


def tokens_on_grid(model: onnx.ModelProto, classes: int, where: str) -> onnx.ModelProto:
    """A ``[B, N, C]`` token graph whose output, under the same name, is ``[B, C, s, s]``:
    the tokens laid on the square grid in the graph, so the file is a dense teacher too."""
    dense = copy.deepcopy(model)
    graph = dense.graph
    output = graph.output[0]
    tokens = _unique(graph, "dense_teacher_tokens")
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
