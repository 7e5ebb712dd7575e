"""INT8 export: static quantization of the checked fp32 graph, calibrated on shard images and
accepted only if it keeps its accuracy on held-out labelled shards.

Images come through the eval transform (the server's own preprocessing), so calibration
and the accuracy gate see what clients send. Without ``--eval-shards`` the calibration
source is split deterministically: its first ``--calibration-samples`` readable samples
(manifest order) calibrate, every later one is held out. The graph is QDQ with uint8
activations and per-channel int8 weights on the MatMul, Gemm and Conv nodes that have a
weight; the attention products (two activations), LayerNorm, Softmax, GELU and the
residual adds stay float (docs/export.md has the measurements).
One QDQ file serves both ONNX Runtime's CPU provider and TensorRT's explicit INT8 builder.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from lvvit.data.source import ShardUnavailable, SourceError
from lvvit.loader.pipeline import eval_loader

from .errors import ExportError, ParityError
from .parity import as_model_input

_logger = logging.getLogger(__name__)

FORMAT = "QDQ"
QUANTIZED_OPS = ("MatMul", "Gemm", "Conv")
"""Quantizing the adds, muls and Softmax too (ORT's default) doubles the logit error for no
speed on the CPU provider (docs/export.md)."""
FLOAT_KEPT = "MatMul of two activations (attention q.k and attn.v); the input convolution (pixels)"
"""Quantized, these made batch 8 slower than fp32 on the CPU provider (docs/export.md)."""
CALIBRATION_METHODS = ("minmax", "percentile", "entropy")
MAX_TOP1_DROP = 0.005
"""Largest loss of held-out top-1 accuracy (fp32 minus int8), as a fraction: the gate is on
accuracy, what a deployment loses."""
MIN_AGREEMENT = 0.0
"""Least share of held-out images whose int8 top-1 equals the fp32 graph's; off by default
(reported only): a trained model's near-ties flip under any rounding, so an 8-epoch demo
model lost 1.1-1.4 % agreement at equal or better top-1 (``--int8-min-agreement`` sets it)."""
READ_BATCH = 16

Runner = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class ImageSource:
    """Labelled images for one purpose: where from, and which samples of it."""

    flag: str
    spec: str
    skip: int = 0
    limit: int | None = None


def labelled_batches(source: ImageSource, img_size: int, crop_pct: float, uint8_input: bool,
                     num_classes: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(model input, labels)`` batches of the readable samples ``skip .. skip+limit`` of
    ``source``, through the eval transform; read errors name the flag and the source. A label
    outside the model's ``num_classes`` is refused: no prediction could match it, and both
    graphs would score "0 % vs 0 %", which passes any drop limit."""
    try:
        loader = eval_loader(source.spec, READ_BATCH, img_size, crop_pct, num_workers=0,
                             world_size=1, rank=0)
        seen, taken = 0, 0
        for batch in loader:
            valid = batch["valid"]
            images, labels = batch["images"][valid], batch["labels"][valid].numpy()
            lo = min(max(source.skip - seen, 0), len(labels))
            seen += len(labels)
            hi = len(labels) if source.limit is None else min(len(labels), lo + source.limit - taken)
            if hi > lo:
                taken += hi - lo
                check_labels(labels[lo:hi], num_classes, source)
                yield as_model_input(images[lo:hi], uint8_input), labels[lo:hi]
            if source.limit is not None and taken >= source.limit:
                return
    except (SourceError, ShardUnavailable, ValueError, OSError) as err:
        raise ExportError(f"{source.flag} {source.spec}: {err}") from err


def check_labels(labels: np.ndarray, num_classes: int, source: ImageSource) -> None:
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if len(bad):
        raise ExportError(f"{source.flag} {source.spec}: label {int(bad[0])} is outside the model's "
                          f"classes 0..{num_classes - 1}")


def calibration_inputs(source: ImageSource, img_size: int, crop_pct: float, uint8_input: bool,
                       num_classes: int) -> list[np.ndarray]:
    """All calibration batches, read once (quantize_static needs them before it starts)."""
    batches = [x for x, _ in labelled_batches(source, img_size, crop_pct, uint8_input, num_classes)]
    count = sum(len(x) for x in batches)
    if count == 0:
        raise ExportError(f"{source.flag} {source.spec}: no readable labelled images to calibrate on")
    if source.limit is not None and count < source.limit:
        _logger.warning("%s %s: only %d images for calibration (asked for %d)", source.flag,
                        source.spec, count, source.limit)
    return batches


def float_kept_nodes(path: Path) -> list[str]:
    """Nodes of ``path`` that stay float among the quantized op types: the MatMuls with no
    weight (initializer) input, and the first convolution, the one that reads the pixels.

    Why the input convolution: on the demo's trained model, quantizing it alone took top-1
    agreement with fp32 from 100 % to 98.3 % (drop 1.7 points, gate failed); kept float,
    every other node quantized, agreement is 100 %. It is a few percent of the stem's
    work (3 input channels), so it costs little speed (docs/export.md)."""
    import onnx

    graph = onnx.load_model(path, load_external_data=False).graph
    weights = {t.name for t in graph.initializer}
    kept = [n.name for n in graph.node if n.op_type == "MatMul" and not weights & set(n.input)]
    convs = [n.name for n in graph.node if n.op_type == "Conv"]  # nodes are in topological order
    return kept + convs[:1]


def quantize(fp32_path: Path, out_path: Path, input_name: str, batches: list[np.ndarray],
             method: str) -> None:
    """Static QDQ quantization of ``fp32_path`` into ``out_path`` (metadata kept)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(batches)

        def get_next(self) -> dict | None:
            x = next(self.batches, None)
            return None if x is None else {input_name: x}

    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
               "entropy": CalibrationMethod.Entropy}
    with quiet_quantizer():
        quantize_static(
            str(fp32_path), str(out_path), Reader(), quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
            op_types_to_quantize=list(QUANTIZED_OPS), nodes_to_exclude=float_kept_nodes(fp32_path),
            calibrate_method=methods[method],
        )


@contextlib.contextmanager
def quiet_quantizer() -> Iterator[None]:
    """ONNX Runtime's quantizer logs through the root logger: its first ``logging.warning``
    would install a root handler that doubles every later line of ours, and it advises a
    pre-processing step that fails on this graph (symbolic shape inference) and measured no
    faster when run without it (docs/export.md)."""
    root = logging.getLogger()
    handler, level = logging.NullHandler(), root.level
    root.addHandler(handler)
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the histogram calibrators print
            yield
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


@dataclass
class AccuracyReport:
    """The int8 graph against the fp32 graph on held-out labelled images."""

    source: str
    images: int
    fp32_top1: float
    int8_top1: float
    top1_agreement: float
    max_top1_drop: float = MAX_TOP1_DROP
    min_agreement: float = MIN_AGREEMENT

    @property
    def top1_drop(self) -> float:
        return self.fp32_top1 - self.int8_top1

    @property
    def passed(self) -> bool:
        tiny = 1e-9  # a drop of exactly the limit passes despite float rounding of the two shares
        return self.top1_agreement >= self.min_agreement - tiny and self.top1_drop <= self.max_top1_drop + tiny

    def to_dict(self) -> dict:
        return {**asdict(self), "top1_drop": self.top1_drop, "passed": self.passed}

    def summary(self) -> str:
        need = f"need {100 * self.min_agreement:g}%" if self.min_agreement > 0 else "not gated"
        return (f"int8 accuracy gate on {self.images} held-out images of {self.source}: "
                f"{'PASS' if self.passed else 'FAIL'}: top-1 {100 * self.int8_top1:.2f}% "
                f"(fp32 {100 * self.fp32_top1:.2f}%, drop {100 * self.top1_drop:.2f} points, "
                f"allowed {100 * self.max_top1_drop:g}), agreement with fp32 "
                f"{100 * self.top1_agreement:.2f}% ({need})")

    def raise_if_failed(self) -> None:
        if not self.passed:
            raise ParityError(self.summary() + "; nothing written")


def accuracy_gate(int8: Runner, fp32: Runner, batches: Iterator[tuple[np.ndarray, np.ndarray]], source: str,
                  max_top1_drop: float = MAX_TOP1_DROP, min_agreement: float = MIN_AGREEMENT) -> AccuracyReport:
    """Top-1 of both graphs against the labels, and how often they agree, under the limits."""
    n = right8 = right32 = agree = 0
    for x, labels in batches:
        top8, top32 = int8(x).argmax(1), fp32(x).argmax(1)
        n += len(labels)
        right8 += int((top8 == labels).sum())
        right32 += int((top32 == labels).sum())
        agree += int((top8 == top32).sum())
    if n == 0:
        raise ExportError(f"{source}: no held-out images left for the int8 accuracy gate "
                          "(give --eval-shards, or lower --calibration-samples)")
    return AccuracyReport(source, n, right32 / n, right8 / n, agree / n, max_top1_drop, min_agreement)
