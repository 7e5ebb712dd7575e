"""Does the exported model compute what the PyTorch model computes?

The reference is always the fp32 PyTorch model in eval mode: for a half-precision export
the report measures the whole error a deployment adds, not just kernel differences.
Inputs are seeded random uint8 pixels, normalised for float-input graphs, so parity is
checked on values in the range real images take.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from lvvit.data.decode import normalize

from .errors import ParityError

ABS_TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2, "bf16": 1e-1, "int8": 2.5e-1}
"""Max |candidate - reference| allowed on the logits. For fp16/bf16/int8 it scales with the
logit range: ``tol * max(1, max|reference|)`` (their rounding error is relative). The int8
entry is for a TensorRT INT8 engine against ONNX Runtime running the same QDQ graph: both
quantize identically, only the float parts and accumulation order differ."""
MIN_TOP1 = {"fp32": 1.0, "fp16": 0.99, "bf16": 0.99, "int8": 0.95}

Runner = Callable[[np.ndarray], np.ndarray]


@dataclass
class BatchParity:
    batch: int
    max_abs_diff: float
    allowed_abs_diff: float
    top1_agreement: float
    passed: bool


@dataclass
class ParityReport:
    """What is compared with what, under which limits, and the outcome per batch size."""

    candidate: str
    reference: str
    precision: str
    abs_tolerance: float
    min_top1: float
    batches: list[BatchParity] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.batches) and all(b.passed for b in self.batches)

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}

    def summary(self) -> str:
        lines = [f"parity {self.candidate} vs {self.reference} ({self.precision}): "
                 f"{'PASS' if self.passed else 'FAIL'}"]
        lines += [
            f"  batch {b.batch:>4}: max |diff| {b.max_abs_diff:.3g} (allowed {b.allowed_abs_diff:.3g}), "
            f"top-1 agreement {100 * b.top1_agreement:.2f}% (need {100 * self.min_top1:.0f}%)"
            for b in self.batches
        ]
        return "\n".join(lines)

    def raise_if_failed(self) -> None:
        if not self.passed:
            raise ParityError(f"{self.candidate} fails parity with {self.reference}:\n{self.summary()}")


def parity_pixels(batch: int, img_size: int, seed: int = 0) -> torch.Tensor:
    """Seeded uint8 ``[batch, 3, S, S]`` pixels: the same ones every run, for every candidate."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, img_size, img_size), generator=gen, dtype=torch.uint8)


def as_model_input(pixels: torch.Tensor, uint8_input: bool) -> np.ndarray:
    """What a client sends for ``pixels``: the raw uint8 array, or the normalised floats."""
    return pixels.numpy() if uint8_input else normalize(pixels).numpy()


def compare_batch(reference: np.ndarray, candidate: np.ndarray, precision: str,
                  abs_tolerance: float, min_top1: float) -> BatchParity:
    if candidate.shape != reference.shape:
        raise ParityError(f"output shape {candidate.shape} differs from the reference {reference.shape}")
    reference = reference.astype(np.float64)
    diff = float(np.abs(candidate.astype(np.float64) - reference).max())
    allowed = abs_tolerance
    if precision != "fp32":
        allowed *= max(1.0, float(np.abs(reference).max()))
    top1 = float((candidate.argmax(1) == reference.argmax(1)).mean())
    ok = bool(np.isfinite(diff) and diff <= allowed and top1 >= min_top1)
    return BatchParity(len(reference), diff, allowed, top1, ok)


def check_parity(
    candidate: Runner,
    reference: Runner,
    inputs: Sequence[np.ndarray],
    precision: str,
    candidate_name: str,
    reference_name: str,
    abs_tolerance: float | None = None,
    min_top1: float | None = None,
) -> tuple[ParityReport, list[np.ndarray]]:
    """Run both on every input; returns the report and the candidate's outputs."""
    report = ParityReport(
        candidate=candidate_name, reference=reference_name, precision=precision,
        abs_tolerance=ABS_TOLERANCE[precision] if abs_tolerance is None else abs_tolerance,
        min_top1=MIN_TOP1[precision] if min_top1 is None else min_top1,
    )
    outputs = []
    for x in inputs:
        out = candidate(x)
        report.batches.append(compare_batch(reference(x), out, precision,
                                            report.abs_tolerance, report.min_top1))
        outputs.append(out)
    return report, outputs
