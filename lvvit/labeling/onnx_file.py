"""An ONNX teacher file read as data and run within bounds.

The file is protobuf parsed by ``onnx`` and run by ONNX Runtime without custom ops, but
running it still does whatever its ops say: a graph of a few KB can ask for a 40 GB
``ConstantOfShape`` or ``Tile``, or a ``Loop`` of 10^15 iterations. So before any session
runs, the graph's shapes are inferred at the labeling size (onnx shape inference with data
propagation, which folds the shapes that come from constants) and every intermediate is
held to a per-image budget, and every Loop and Scan must have a small trip count known
from the file. Sizes that depend on the pixel values cannot be known beforehand; for those
the process's resident memory is watched while ONNX Runtime runs, and an overrun stops the
run (ORT's terminate flag) and becomes one line naming the file.

External data stays on disk: ONNX Runtime maps it from the model's folder, so a teacher of
1.9 GB costs about 1.9 GB of memory, not one copy per load, check and serialization.
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import helper, numpy_helper

from lvvit import onnxrt
from lvvit.errors import LvvitError, first_line
from lvvit.onnxrt import ProviderUnavailable, SessionError, provider_chain

MAX_ONNX_BYTES = 2 << 30
"""Model file plus external data: protobuf's own limit for one in-memory model (2 GiB)."""

MAX_LOOP_TRIPS = 10_000
"""Iterations of a Loop or Scan (nested ones multiplied): vision graphs unroll theirs."""

DEFAULT_TENSOR_MIB = 1024
"""Largest intermediate per image: a ViT-L's attention maps at 576 px are about 110 MiB."""

MEMORY_FRACTION = 0.8
"""Default memory limit: this share of the machine's (or the container's) memory."""

POLL_SECONDS = 0.01
HARD_MARGIN = 1.25
"""Past limit x this, one op is the overrun and will not stop at the terminate flag: exit."""
GRACE_SECONDS = 5.0
"""How long a run over the limit may take to stop at the terminate flag before the exit."""

SMALL_TENSOR = 4096
"""Elements of a stored tensor kept for shape inference (shapes, repeats, axes); larger
ones are handed over as typed inputs, their values not being needed for shapes."""


class OnnxTeacherError(LvvitError, ValueError):
    """An ONNX teacher file that cannot be used; the message names the file and the cause."""


def _first_line(error: Exception) -> str:
    return next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)


# ------------------------------------------------------------------ reading the file as data
def graph_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every tensor a graph stores (initializers, Constant values), subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            for sub in _subgraphs(attr):
                yield from graph_tensors(sub)


def _subgraphs(attr: onnx.AttributeProto) -> list[onnx.GraphProto]:
    return [attr.g, *attr.graphs] if attr.HasField("g") else list(attr.graphs)


def _is_external(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location == onnx.TensorProto.EXTERNAL


def has_external_data(model: onnx.ModelProto) -> bool:
    return any(_is_external(t) for t in graph_tensors(model.graph))


def _external_bytes(model: onnx.ModelProto, path: Path) -> int:
    """Bytes of external data the model references; refuses locations outside its folder."""
    folder = path.parent.resolve()
    files = set()
    for tensor in graph_tensors(model.graph):
        if not _is_external(tensor):
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        target = (folder / location).resolve()
        if not location or Path(location).is_absolute() or ".." in Path(location).parts or not target.is_relative_to(
            folder
        ):
            raise OnnxTeacherError(
                f"{path}: tensor {tensor.name!r} points at external data {location!r} outside the model's folder"
            )
        if not target.is_file():
            raise OnnxTeacherError(f"{path}: external data file {location!r} of tensor {tensor.name!r} is missing")
        files.add(target)
    return sum(f.stat().st_size for f in files)


def load_model(path: str | Path) -> onnx.ModelProto:
    """The checked graph, its external data left on disk (read by ONNX Runtime, or one
    tensor at a time by :class:`Constants`), or a one-line :class:`OnnxTeacherError`."""
    path = Path(path)
    if not path.is_file():
        raise OnnxTeacherError(f"ONNX teacher {path} does not exist")
    size = path.stat().st_size
    if size > MAX_ONNX_BYTES:
        raise OnnxTeacherError(f"{path}: {size} bytes, more than the {MAX_ONNX_BYTES}-byte limit for a teacher")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf raises DecodeError and friends: all mean "not an ONNX model"
        raise OnnxTeacherError(f"{path}: not a readable ONNX model ({type(e).__name__}: {e})") from None
    size += _external_bytes(model, path)
    if size > MAX_ONNX_BYTES:
        raise OnnxTeacherError(f"{path}: {size} bytes with external data, more than {MAX_ONNX_BYTES}")
    try:
        onnx.checker.check_model(str(path))  # by path: external data is checked where it lies, not loaded
    except Exception as e:
        raise OnnxTeacherError(f"{path}: not a valid ONNX model ({first_line(e, limit=None)})") from None
    return model


class Constants(Mapping[str, np.ndarray]):
    """A graph's initializers and Constant values by name, each read when it is looked up:
    finding a classifier's head reads the head's weights, not a backbone kept on disk."""

    def __init__(self, graph: onnx.GraphProto, folder: Path | None) -> None:
        self._tensors = {t.name: t for t in graph.initializer}
        for node in graph.node:
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                self._tensors[node.output[0]] = node.attribute[0].t
        self._folder = "" if folder is None else str(folder)

    def __getitem__(self, name: str) -> np.ndarray:
        return numpy_helper.to_array(self._tensors[name], self._folder)

    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)


# ------------------------------------------------------------------ bounds before running
@dataclass(frozen=True)
class Limits:
    """Per-image size of any intermediate, and the resident memory allowed while running."""

    tensor_bytes: int = DEFAULT_TENSOR_MIB << 20
    memory_bytes: int = field(default_factory=lambda: default_memory_bytes())


def default_memory_bytes() -> int:
    """:data:`MEMORY_FRACTION` of the machine's memory, or of the cgroup's limit if lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    cgroup = Path("/sys/fs/cgroup/memory.max")
    text = cgroup.read_text().strip() if cgroup.is_file() else ""
    if text.isdigit():
        total = min(total, int(text))
    return int(total * MEMORY_FRACTION)


def shapes_only(model: onnx.ModelProto, input_name: str | None = None, shape: list[int] | None = None) -> onnx.ModelProto:
    """The model with its large or external stored tensors given as typed inputs, and the
    input ``input_name`` fixed to ``shape``: shape inference and ``onnx.checker`` see every
    shape without the weights being copied or looked for on disk."""
    graph = model.graph
    inputs = {i.name: i for i in graph.input}
    if input_name is not None:
        elem = inputs[input_name].type.tensor_type.elem_type
        inputs[input_name] = helper.make_tensor_value_info(input_name, elem, shape)
    initializers, nodes = [], []
    for tensor in graph.initializer:
        if _is_external(tensor) or math.prod(tensor.dims) > SMALL_TENSOR:
            inputs[tensor.name] = helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims))
        else:
            initializers.append(tensor)
    for node in graph.node:
        value = node.attribute[0].t if node.op_type == "Constant" and node.attribute[:1] and node.attribute[0].name == "value" else None
        if value is not None and (_is_external(value) or math.prod(value.dims) > SMALL_TENSOR):
            inputs[node.output[0]] = helper.make_tensor_value_info(node.output[0], value.data_type, list(value.dims))
        else:
            nodes.append(node)
    skeleton = helper.make_model(
        helper.make_graph(nodes, graph.name, list(inputs.values()), list(graph.output), initializers),
        opset_imports=model.opset_import, ir_version=model.ir_version,
    )
    skeleton.functions.extend(model.functions)
    return skeleton


def _all_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            for sub in _subgraphs(attr):
                yield from _all_graphs(sub)


def _shapes(model: onnx.ModelProto) -> dict[str, tuple[int | None, ...]]:
    """Every inferred tensor shape of every graph, ``None`` for a dimension not known."""
    shapes = {}
    for graph in _all_graphs(model.graph):
        for info in [*graph.input, *graph.value_info, *graph.output]:
            tensor = info.type.tensor_type
            if tensor.HasField("shape"):
                shapes[info.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim)
        shapes.update({t.name: tuple(t.dims) for t in graph.initializer})
    return shapes


def _producers(model: onnx.ModelProto) -> dict[str, str]:
    found = {}
    for graph in _all_graphs(model.graph):
        for node in graph.node:
            label = f"{node.op_type} node {node.name!r}" if node.name else f"a {node.op_type} node"
            found.update(dict.fromkeys(node.output, label))
    return found


def check_graph(model: onnx.ModelProto, input_name: str, shape: list[int], limits: Limits, where: str) -> None:
    """Refuse, in one line naming the tensor or node, a graph that at input ``shape``
    (batch first) would make an intermediate larger than ``limits.tensor_bytes`` per image,
    or that loops more than :data:`MAX_LOOP_TRIPS` times or an unknown number of times."""
    try:
        inferred = onnx.shape_inference.infer_shapes(
            shapes_only(model, input_name, shape), check_type=False, strict_mode=False, data_prop=True
        )
    except Exception as e:  # onnx's inference errors: a graph it cannot follow is not one we can bound
        raise OnnxTeacherError(f"{where}: shape inference failed ({_first_line(e)})") from None
    shapes = _shapes(inferred)
    _check_loops(inferred.graph, shapes, {}, 1, where)
    _check_sizes(inferred, shapes, max(1, shape[0]), limits, where)


def _check_sizes(model: onnx.ModelProto, shapes: dict, images: int, limits: Limits, where: str) -> None:
    producers = _producers(model)
    budget = limits.tensor_bytes * images
    elems = {}
    for graph in _all_graphs(model.graph):
        for info in [*graph.value_info, *graph.output]:
            elems[info.name] = info.type.tensor_type.elem_type
    for name, elem in elems.items():
        dims = shapes.get(name)
        if not dims or None in dims or not elem or elem == onnx.TensorProto.STRING:
            continue
        made_by = producers.get(name, "the graph")
        if any(d < 0 for d in dims):
            raise OnnxTeacherError(f"{where}: tensor {name!r} ({made_by}) has an invalid inferred shape {list(dims)}")
        size = math.prod(dims) * helper.tensor_dtype_to_np_dtype(elem).itemsize
        if size > budget:
            raise OnnxTeacherError(
                f"{where}: tensor {name!r} ({made_by}) would hold {size / 2**20:,.0f} MiB for {images} image(s) "
                f"of shape {list(dims)}, more than --max-teacher-tensor-mib {limits.tensor_bytes / 2**20:g} per image"
            )


def _check_loops(graph: onnx.GraphProto, shapes: dict, scope: dict, outer: int, where: str) -> None:
    """Each Loop's trip count is a constant of the file and each Scan's length is inferred;
    nested trip counts multiply, and the product is held to :data:`MAX_LOOP_TRIPS`."""
    scope = {**scope, **{t.name: t for t in graph.initializer}}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute[:1] and node.attribute[0].name == "value":
            scope[node.output[0]] = node.attribute[0].t
        label = f"{node.op_type} node {node.name!r}" if node.name else f"a {node.op_type} node"
        trips = outer
        if node.op_type == "Loop":
            trips *= _loop_trips(node, scope, f"{where}: {label}")
        elif node.op_type == "Scan":
            trips *= _scan_trips(node, shapes, f"{where}: {label}")
        if trips > MAX_LOOP_TRIPS:
            raise OnnxTeacherError(
                f"{where}: {label} would run {trips:,} iterations (nested loops multiplied), "
                f"more than {MAX_LOOP_TRIPS:,}"
            )
        for attr in node.attribute:
            for sub in _subgraphs(attr):
                _check_loops(sub, shapes, scope, trips, where)


def _loop_trips(node: onnx.NodeProto, scope: dict, label: str) -> int:
    count = node.input[0] if node.input else ""
    tensor = scope.get(count) if count else None
    value = None
    if tensor is not None and not _is_external(tensor) and math.prod(tensor.dims) == 1:
        value = int(numpy_helper.to_array(tensor).reshape(-1)[0])
    if value is None:
        raise OnnxTeacherError(
            f"{label} has no trip count stored in the file (a while loop, or a count computed at run time); "
            f"a teacher's loops need one of at most {MAX_LOOP_TRIPS:,}"
        )
    return max(value, 0)


def _scan_trips(node: onnx.NodeProto, shapes: dict, label: str) -> int:
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    scanned = list(node.input)[len(node.input) - int(attrs.get("num_scan_inputs", 0)) :]
    axes = list(attrs.get("scan_input_axes", [])) or [0] * len(scanned)
    lengths = [shapes.get(name, ())[axis] if len(shapes.get(name, ())) > axis >= 0 else None
               for name, axis in zip(scanned, axes, strict=False)]
    if not lengths or None in lengths:
        raise OnnxTeacherError(f"{label} scans a sequence whose length cannot be inferred at the labeling size")
    return max(lengths)


# ------------------------------------------------------------------ running within bounds
def make_session(
    model: onnx.ModelProto, where: str, provider: str = "cpu", device_id: int = 0, folder: Path | None = None
) -> ort.InferenceSession:
    """An ORT session on ``provider`` with as many threads as torch uses (ranks share cores).

    External data is read by ONNX Runtime from ``folder`` (the model's), which maps it
    instead of copying it; ORT's errors are quiet here, reaching the user once as our line.
    """
    try:
        chain = provider_chain(provider, "--onnx-provider", device_id=device_id)
        return onnxrt.session(model.SerializeToString(), providers=chain, threads=torch.get_num_threads(),
                              inter_threads=1, log_level=4, where=where,
                              external_data=folder if folder is not None and has_external_data(model) else None)
    except (ProviderUnavailable, SessionError) as e:
        raise OnnxTeacherError(str(e)) from None


def resident_bytes() -> int:
    """This process's resident memory, from ``/proc/self/statm`` (cheap enough to poll)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _MemoryWatch:
    """A thread that polls resident memory while one session run is in flight: over the
    limit it sets the run's terminate flag (ORT stops at the next op or loop iteration);
    if one op keeps growing past the margin, or the run does not stop, it exits the
    process with the same one line, since nothing inside ORT would stop it sooner."""

    def __init__(self, options: ort.RunOptions, limit: int, where: str) -> None:
        self.options, self.limit, self.where = options, limit, where
        self.peak = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="teacher-memory", daemon=True)

    def __enter__(self) -> _MemoryWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()

    def message(self) -> str:
        return (f"{self.where}: running the teacher took this process to {self.peak / 2**30:.2f} GiB, over "
                f"--max-teacher-memory-gib {self.limit / 2**30:g}")

    def _watch(self) -> None:
        stopped = None
        while not self._done.wait(POLL_SECONDS):
            rss = resident_bytes()
            if rss <= self.limit:
                continue
            self.peak = max(self.peak, rss)
            if stopped is None:
                self.options.terminate = True
                stopped = time.monotonic()
            if rss > self.limit * HARD_MARGIN or time.monotonic() - stopped > GRACE_SECONDS:
                sys.stderr.write(self.message() + "\n")
                sys.stderr.flush()
                os._exit(1)


def bounded_run(session: ort.InferenceSession, feeds: dict, limits: Limits, where: str,
                outputs: list[str] | None = None) -> list[np.ndarray]:
    """``session.run`` under the memory limit; an overrun is an :class:`OnnxTeacherError`,
    any other ORT error is raised as it is for the caller to word."""
    options = ort.RunOptions()
    options.log_severity_level = 4
    with _MemoryWatch(options, limits.memory_bytes, where) as watch:
        try:
            return session.run(outputs, feeds, options)
        except Exception:
            if watch.peak:
                raise OnnxTeacherError(watch.message()) from None
            raise
