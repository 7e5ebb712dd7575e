"""A classifier made dense, as graph surgery: a head of global average pooling followed by
one linear layer becomes that linear layer applied at every location of the pre-pool
feature map (a 1x1 Conv). Both are linear, so the mean of the map over locations is exactly
the classifier's logits (``lvvit.labeling.onnx_teacher.verify_dense`` checks it on the
rewritten graph). A head that is not of that form is refused naming the op in the way.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from lvvit.labeling.onnx_file import (
    Constants,
    OnnxTeacherError,
    _first_line,
    shapes_only,
)

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
    weight_name, bias_name = unique_name(graph, "dense_teacher_weight"), unique_name(graph, "dense_teacher_bias")
    head_name = unique_name(graph, "dense_teacher_head")
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


def unique_name(graph: onnx.GraphProto, base: str) -> str:
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
