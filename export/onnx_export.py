"""The ONNX graph: eval-mode LV-ViT behind a fixed serving interface, exported by
``torch.onnx`` (dynamo), checked by ``onnx.checker`` and loadable by ONNX Runtime.

The interface never changes with the compute precision: the input is float32 (normalised)
or uint8 (raw pixels, normalised in the graph) and the output is float32 logits, so a
client written for the fp32 model works unchanged against an fp16/bf16 one.
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import onnx
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from lvvit import onnxrt
from lvvit.data.decode import normalize
from lvvit.errors import first_line
from lvvit.onnxrt import SessionError, preferred_providers

if TYPE_CHECKING:
    import onnxruntime as ort

from .errors import ExportError

INPUT_NAME = "images"
OUTPUT_NAME = "logits"
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MIN_OPSET = 18
BF16_MIN_OPSET = 22
"""ONNX ``Conv`` accepts bfloat16 only from opset 22 on."""
PROTOBUF_LIMIT = 2**31 - 2**20
"""Keep a margin below protobuf's 2 GiB message limit before moving weights out of the file."""
ONNX_DTYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.UINT8: "uint8",
               onnx.TensorProto.FLOAT16: "float16", onnx.TensorProto.BFLOAT16: "bfloat16"}


class ServingModel(nn.Module):
    """The graph we ship: optional in-graph normalisation, compute in ``dtype``, fp32 logits.

    Normalisation runs in fp32 before the cast, so uint8 and float clients see the same
    numbers up to rounding; logits come back as fp32 because every client can read it.
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype, uint8_input: bool) -> None:
        super().__init__()
        self.model = fold_stem_batchnorm(model).to(dtype).eval()
        self.dtype = dtype
        self.uint8_input = uint8_input

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.uint8_input:
            images = normalize(images)  # the training pipeline's own arithmetic, in fp32
        return self.model(images.to(self.dtype)).float()


def fold_stem_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with the stem's BatchNorms folded into its convolutions.

    Folding in fp32 before any cast keeps half-precision weights as close as possible, and
    it sidesteps the exporter's own BN folding, which writes fp32 weights next to bf16
    activations (an invalid graph).
    """
    model = copy.deepcopy(model).float().eval()
    stem = model.patch_embed
    for i in (1, 2, 3):
        conv, bn = getattr(stem, f"conv{i}"), getattr(stem, f"bn{i}")
        if isinstance(bn, nn.BatchNorm2d):
            setattr(stem, f"conv{i}", fuse_conv_bn_eval(conv, bn))
            setattr(stem, f"bn{i}", nn.Identity())
    return model


def default_opset(precision: str) -> int:
    return BF16_MIN_OPSET if precision == "bf16" else MIN_OPSET


def export_onnx(
    model: nn.Module,
    path: Path,
    img_size: int,
    precision: str = "fp32",
    uint8_input: bool = False,
    opset: int | None = None,
    metadata: dict[str, str] | None = None,
) -> onnx.ModelProto:
    """Write the serving graph of ``model`` to ``path`` with a dynamic batch axis.

    One self-contained file while it fits protobuf's 2 GiB limit (every LV-ViT does);
    beyond that the weights go to ``<path>.data`` beside it. ``metadata`` lands in the
    model's ``metadata_props``.
    """
    opset = opset or default_opset(precision)
    if opset < MIN_OPSET or (precision == "bf16" and opset < BF16_MIN_OPSET):
        need = BF16_MIN_OPSET if precision == "bf16" else MIN_OPSET
        raise ExportError(f"--opset {opset}: {precision} export needs opset >= {need}")
    wrapper = ServingModel(model, PRECISIONS[precision], uint8_input).eval()
    example = torch.zeros(2, 3, img_size, img_size,
                          dtype=torch.uint8 if uint8_input else torch.float32)
    batch = torch.export.Dim("batch", min=1)
    with quiet_exporter(), torch.no_grad():
        program = torch.onnx.export(
            wrapper, (example,), dynamo=True, opset_version=opset, input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME], dynamic_shapes={"images": {0: batch}},
            external_data=False, verbose=False, optimize=True,
        )
    proto = program.model_proto
    proto.doc_string = "LV-ViT eval graph (cls + 0.5 * aux.max) exported by lvvit-export"
    onnx.helper.set_model_props(proto, metadata or {})
    save_onnx(proto, path)
    return proto


@contextmanager
def quiet_exporter() -> Iterator[None]:
    """Silence the exporter's per-pass INFO logs and its torchvision notices while it runs."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "onnxscript", "onnx_ir")]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)


def save_onnx(proto: onnx.ModelProto, path: Path) -> None:
    if proto.ByteSize() < PROTOBUF_LIMIT:
        onnx.save_model(proto, path)
    else:
        onnx.save_model(proto, path, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data")


def metadata_props(model: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


def load_onnx(path: Path) -> onnx.ModelProto:
    """Load and fully check an exported file; any defect is an ``ExportError`` naming it."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: no such ONNX file")
    try:
        proto = onnx.load_model(path)
    except Exception as err:  # protobuf reports damage as DecodeError, and others as OSError etc.
        raise ExportError(
            f"{path}: not a readable ONNX model (truncated or corrupted?): "
            f"{first_line(err, 200)}"
        ) from err
    if not proto.graph.node:
        raise ExportError(f"{path}: not a readable ONNX model (no graph; truncated or corrupted?)")
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as err:  # ValidationError, InferenceError
        raise ExportError(f"{path}: fails onnx.checker: {str(err)[:300]}") from err
    check_interface(proto, path)
    return proto


def io_spec(proto: onnx.ModelProto) -> dict[str, dict]:
    """``{"input": {...}, "output": {...}}``: name, numpy dtype and dims (``-1`` when symbolic)."""
    def one(value: onnx.ValueInfoProto) -> dict:
        tensor = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]
        return {"name": value.name, "dtype": ONNX_DTYPES.get(tensor.elem_type, str(tensor.elem_type)),
                "dims": dims}
    return {"input": one(proto.graph.input[0]), "output": one(proto.graph.output[0])}


def check_interface(proto: onnx.ModelProto, path: Path) -> None:
    """The serving contract: one input ``images [B,3,S,S]``, one output ``logits [B,C]``."""
    if len(proto.graph.input) != 1 or len(proto.graph.output) != 1:
        raise ExportError(f"{path}: expected one input and one output, found "
                          f"{len(proto.graph.input)} and {len(proto.graph.output)}")
    spec = io_spec(proto)
    inp, out = spec["input"], spec["output"]
    if inp["name"] != INPUT_NAME or out["name"] != OUTPUT_NAME:
        raise ExportError(f"{path}: expected input {INPUT_NAME!r} and output {OUTPUT_NAME!r}, "
                          f"found {inp['name']!r} and {out['name']!r}")
    if len(inp["dims"]) != 4 or inp["dims"][0] != -1 or len(out["dims"]) != 2 or out["dims"][0] != -1:
        raise ExportError(f"{path}: expected images [batch, 3, S, S] and logits [batch, C] with a "
                          f"dynamic batch axis, found {inp['dims']} and {out['dims']}")


def parity_session(path: Path) -> ort.InferenceSession:
    """The session export checks run on: CUDA when this onnxruntime has it, else the CPU;
    a missing kernel (e.g. bf16 on the CPU) becomes a clear error naming the way out."""
    providers = preferred_providers()
    try:
        return onnxrt.session(path, providers=providers, log_level=3)
    except SessionError as err:
        if "NOT_IMPLEMENTED" in err.reason:
            raise ExportError(
                f"{path.name}: ONNX Runtime ({', '.join(providers)}) has no kernel for part of this "
                f"graph ({err.reason.split(':')[-1].strip()}); bf16 graphs need a GPU provider "
                "(onnxruntime-gpu) to be checked: use --precision fp16 on CPU-only machines"
            ) from err
        raise ExportError(str(err)) from err
