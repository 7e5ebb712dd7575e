"""V2 (Open Inference Protocol) tensors <-> model rows, with the checks a client deserves.

Every check runs per request, before batching, and fails with ``InvalidInput`` (HTTP 400,
gRPC INVALID_ARGUMENT) naming the tensor and what is wrong, so one bad request never
reaches the batch its neighbours ride in. Float tensors must be finite (NaN would come back
as null logits) and JSON data must be numbers (numpy would read the string "nan" as NaN).

Inputs: ``images`` (the exported tensor, ``[n, 3, S, S]`` FP32 or UINT8 as in model.json)
or ``image_bytes`` (BYTES ``[n]`` or ``[n, 1]``: encoded JPEG/PNG files). Outputs:
``logits`` FP32 ``[n, C]``, ``labels`` BYTES ``[n, k]`` (class names, best first) and
``scores`` FP32 ``[n, k]`` (softmax probabilities); ``k`` is the request parameter
``top_k`` (default 5). Binary payloads may be sent base64-encoded in JSON with the input
parameter ``content_type: "base64"`` (MLServer's convention): one string per BYTES element,
or one string holding the raw little-endian tensor for ``images``.

Triton's classification extension: a requested ``logits`` output with the parameter
``classification: N`` (tritonclient's ``class_count``) comes back as BYTES ``[n, N]``
strings ``"<value>:<index>:<label>"``, highest value first, as Triton writes them.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Any

import numpy as np
from mlserver.codecs import StringCodec
from mlserver.errors import MLServerError
from mlserver.types import InferenceRequest, MetadataTensor, RequestInput, ResponseOutput

IMAGES, IMAGE_BYTES = "images", "image_bytes"
LOGITS, LABELS, SCORES = "logits", "labels", "scores"
OUTPUTS = (LOGITS, LABELS, SCORES)
CLASSIFICATION = "classification"  # Triton's requested-output parameter (class_count)
DEFAULT_TOP_K = 5
V2_DTYPES = {"float32": "FP32", "uint8": "UINT8"}
NON_NUMERIC_KINDS = {"U": "strings", "S": "strings", "b": "booleans", "O": "nulls or mixed values"}


class InvalidInput(MLServerError):
    """A client error: comes back as HTTP 400 / gRPC INVALID_ARGUMENT with this message."""

    def __init__(self, msg: str) -> None:
        super().__init__(msg, status_code=400)


@dataclass(frozen=True)
class InputSpec:
    """What the served model accepts; built once from model.json and the server limits."""

    img_size: int
    dtype: str  # "float32" | "uint8"
    num_classes: int
    max_batch: int

    @property
    def row_shape(self) -> tuple[int, int, int]:
        return (3, self.img_size, self.img_size)

    @property
    def v2_dtype(self) -> str:
        return V2_DTYPES[self.dtype]


def metadata_tensors(spec: InputSpec) -> tuple[list[MetadataTensor], list[MetadataTensor]]:
    """Inputs and outputs as the model metadata endpoint reports them (-1: variable)."""
    inputs = [
        MetadataTensor(name=IMAGES, datatype=spec.v2_dtype, shape=[-1, *spec.row_shape]),
        MetadataTensor(name=IMAGE_BYTES, datatype="BYTES", shape=[-1]),
    ]
    outputs = [
        MetadataTensor(name=LOGITS, datatype="FP32", shape=[-1, spec.num_classes]),
        MetadataTensor(name=LABELS, datatype="BYTES", shape=[-1, -1]),
        MetadataTensor(name=SCORES, datatype="FP32", shape=[-1, -1]),
    ]
    return inputs, outputs


def _is_base64(request_input: RequestInput) -> bool:
    params = request_input.parameters
    return params is not None and params.content_type == "base64"


def _b64(text: Any, where: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, TypeError, ValueError) as err:
        raise InvalidInput(f"{where}: content_type is base64 but the data is not ({err})") from err


def select_input(payload: InferenceRequest, spec: InputSpec) -> RequestInput:
    """The one input a request may carry: ``images`` or ``image_bytes``."""
    accepted = (f"'{IMAGES}' ({spec.v2_dtype} [-1, {', '.join(map(str, spec.row_shape))}]) "
                f"or '{IMAGE_BYTES}' (BYTES [-1])")
    names = [i.name for i in payload.inputs]
    for name in names:
        if name not in (IMAGES, IMAGE_BYTES):
            raise InvalidInput(f"unknown input '{name}'; this model takes {accepted}")
    if len(names) != 1:
        raise InvalidInput(
            f"expected exactly one input, {accepted}; got {len(names)} ({', '.join(names)})"
        )
    return payload.inputs[0]


def batch_size(request_input: RequestInput, spec: InputSpec) -> int:
    """Rows in the input, checked against the server's limit."""
    shape = list(request_input.shape)
    n = shape[0] if shape else 0
    if n < 1:
        raise InvalidInput(f"input '{request_input.name}': shape {shape} has no batch rows")
    if n > spec.max_batch:
        raise InvalidInput(
            f"input '{request_input.name}': batch of {n} is above this server's limit of "
            f"{spec.max_batch} (--max-batch-size); split the request"
        )
    return n


def decode_images(request_input: RequestInput, spec: InputSpec) -> np.ndarray:
    """The ``images`` tensor as a ``[n, 3, S, S]`` array of the model's dtype, finite."""
    rows = _images_array(request_input, spec)
    if rows.dtype.kind == "f":
        finite = np.isfinite(rows.reshape(len(rows), -1)).all(axis=1)
        if not finite.all():  # NaN would run through the model and come back as null logits
            bad = np.flatnonzero(~finite)
            raise InvalidInput(f"input '{IMAGES}': row {bad[0]} holds NaN or infinite values "
                               f"({len(bad)} of {len(rows)} rows do); send finite {spec.v2_dtype} values")
    return rows


def _images_array(request_input: RequestInput, spec: InputSpec) -> np.ndarray:
    where = f"input '{IMAGES}'"
    if request_input.datatype != spec.v2_dtype:
        raise InvalidInput(
            f"{where}: datatype {request_input.datatype} but this model takes {spec.v2_dtype}"
        )
    shape = list(request_input.shape)
    if len(shape) != 4 or tuple(shape[1:]) != spec.row_shape:
        raise InvalidInput(
            f"{where}: shape {shape} but this model takes [n, {', '.join(map(str, spec.row_shape))}]"
        )
    n = batch_size(request_input, spec)
    count = n * int(np.prod(spec.row_shape))
    data = request_input.data.root
    dtype = np.dtype(spec.dtype)
    if _is_base64(request_input):
        blob = _b64(data[0] if isinstance(data, list) and len(data) == 1 else data, where)
        if len(blob) != count * dtype.itemsize:
            raise InvalidInput(
                f"{where}: {len(blob)} bytes of data for shape {shape} "
                f"({count * dtype.itemsize} expected)"
            )
        return np.frombuffer(blob, dtype=dtype.newbyteorder("<")).astype(dtype).reshape(shape)
    try:
        raw = np.asarray(data)
    except (TypeError, ValueError) as err:
        raise InvalidInput(f"{where}: data is not a numeric {spec.v2_dtype} tensor ({err})") from err
    if raw.dtype.kind not in "iuf":  # numpy would turn the strings "nan" or "1e9" into floats
        held = NON_NUMERIC_KINDS.get(raw.dtype.kind, raw.dtype.name)
        raise InvalidInput(f"{where}: data holds {held}, not numbers; "
                           f"{spec.v2_dtype} data must be JSON numbers")
    if raw.size != count:
        raise InvalidInput(f"{where}: {raw.size} values for shape {shape} ({count} expected)")
    if dtype == np.uint8:
        values = raw.astype(np.float64)
        if values.min() < 0 or values.max() > 255 or not np.all(values == np.round(values)):
            raise InvalidInput(f"{where}: UINT8 values must be integers in 0..255")
    return raw.astype(dtype).reshape(shape)


def image_bytes_list(request_input: RequestInput, spec: InputSpec) -> list[bytes]:
    """The encoded files in an ``image_bytes`` input, one per row."""
    where = f"input '{IMAGE_BYTES}'"
    if request_input.datatype != "BYTES":
        raise InvalidInput(f"{where}: datatype {request_input.datatype} but it must be BYTES")
    shape = list(request_input.shape)
    if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)):
        raise InvalidInput(f"{where}: shape {shape} but it must be [n] or [n, 1]")
    n = batch_size(request_input, spec)
    data = request_input.data.root
    items = data if isinstance(data, list) else [data]
    if len(items) != n:
        raise InvalidInput(f"{where}: {len(items)} elements for shape {shape} ({n} expected)")
    base64_encoded = _is_base64(request_input)
    files = []
    for i, item in enumerate(items):
        if base64_encoded:
            files.append(_b64(item, f"{where} element {i}"))
        elif isinstance(item, bytes):
            files.append(item)
        elif isinstance(item, str):  # JSON strings cannot hold binary files: say how to send them
            raise InvalidInput(
                f"{where} element {i}: a JSON string is not an image file; send raw bytes "
                f"(gRPC or the HTTP binary-tensor extension) or base64 with content_type 'base64'"
            )
        else:
            raise InvalidInput(f"{where} element {i}: expected bytes, got {type(item).__name__}")
    return files


def top_k(payload: InferenceRequest, num_classes: int) -> int:
    """The ``top_k`` request parameter (default 5, capped by the class count)."""
    params = payload.parameters
    value = (params.model_extra or {}).get("top_k") if params is not None else None
    if value is None:
        return min(DEFAULT_TOP_K, num_classes)
    try:
        k = int(value)
        if k != float(value):
            raise ValueError
    except (TypeError, ValueError):
        raise InvalidInput(f"parameter 'top_k': {value!r} is not an integer") from None
    if not 1 <= k <= num_classes:
        raise InvalidInput(f"parameter 'top_k': {k} is outside 1..{num_classes}")
    return k


def requested_outputs(payload: InferenceRequest) -> list[str]:
    """Outputs the client asked for (all of them when it named none)."""
    if not payload.outputs:
        return list(OUTPUTS)
    names = [o.name for o in payload.outputs]
    for name in names:
        if name not in OUTPUTS:
            raise InvalidInput(f"unknown output '{name}'; this model returns {', '.join(OUTPUTS)}")
    return names


def classifications(payload: InferenceRequest, num_classes: int) -> dict[str, int]:
    """Triton's classification extension: requested outputs with the parameter
    ``classification: N`` (``InferRequestedOutput(name, class_count=N)`` in tritonclient,
    int64_param over gRPC) -> {output name: N}, N capped at the class count as Triton does.
    Only ``logits`` can be classified: ``labels`` and ``scores`` are top-k already."""
    wanted = {}
    for output in payload.outputs or []:
        params = output.parameters
        value = (params.model_extra or {}).get(CLASSIFICATION) if params is not None else None
        if value is None:
            continue
        where = f"output '{output.name}': parameter '{CLASSIFICATION}'"
        if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
            raise InvalidInput(f"{where}: {value!r} is not an integer")
        count = int(value)
        if count < 0:
            raise InvalidInput(f"{where}: {count} is negative")
        if count == 0:  # tritonclient's class_count=0: no classification
            continue
        if output.name != LOGITS:
            raise InvalidInput(f"{where}: only '{LOGITS}' can be classified "
                               f"('{LABELS}' and '{SCORES}' are top-k already, see top_k)")
        wanted[output.name] = min(count, num_classes)
    return wanted


def classification_strings(values: np.ndarray, count: int, labels: tuple[str, ...]) -> np.ndarray:
    """Rows of values -> ``[n, count]`` strings ``"<value>:<index>:<label>"``, highest value
    first: Triton's format (value as C++ ``std::to_string`` writes a float, i.e. ``%f``)."""
    top = np.argsort(-values, axis=-1, kind="stable")[:, :count]
    picked = np.take_along_axis(values, top, axis=-1)
    return np.array([[f"{v:f}:{i}:{labels[i]}" for v, i in zip(vals, idx, strict=True)]
                     for vals, idx in zip(picked.tolist(), top.tolist(), strict=True)],
                    dtype=object).reshape(top.shape)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def encode_outputs(logits: np.ndarray, names: list[str], k: int, labels: tuple[str, ...],
                   classify: dict[str, int] | None = None) -> list[ResponseOutput]:
    """``logits`` rows -> the requested V2 outputs, in the order asked; an output in
    ``classify`` comes back as Triton's classification strings (BYTES ``[n, N]``)."""
    logits = np.asarray(logits, dtype=np.float32)
    probs = softmax(logits.astype(np.float64))
    top = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
    outputs = {}
    if LOGITS in (classify or {}):
        strings = classification_strings(logits, classify[LOGITS], labels)
        out = StringCodec.encode_output(LOGITS, strings.ravel().tolist())
        out.shape = list(strings.shape)
        outputs[LOGITS] = out
    elif LOGITS in names:
        outputs[LOGITS] = ResponseOutput(name=LOGITS, datatype="FP32", shape=list(logits.shape),
                                         data=logits.ravel().tolist())
    if SCORES in names:
        scores = np.take_along_axis(probs, top, axis=-1).astype(np.float32)
        outputs[SCORES] = ResponseOutput(name=SCORES, datatype="FP32", shape=list(scores.shape),
                                         data=scores.ravel().tolist())
    if LABELS in names:
        out = StringCodec.encode_output(LABELS, [labels[i] for i in top.ravel()])
        out.shape = list(top.shape)
        outputs[LABELS] = out
    return [outputs[name] for name in names]
