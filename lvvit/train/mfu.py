"""Model FLOPs utilisation (MFU): the model FLOPs a run achieves over the devices' peak.

``achieved = flops_per_sample x samples per second``, with ``flops_per_sample`` the model's
training FLOPs (``lvvit.models.train_flops_per_image``: forward + backward, recomputation
not counted), and ``peak`` the dense tensor-core peak of the devices the samples ran on.
The peak comes from the table below by the CUDA device's name, for bf16 and fp16 only: on
the CPU, an unknown GPU or another dtype (fp32 runs on CUDA cores or TF32, whichever
``torch.backends`` allows) there is no known peak, and MFU is left out rather than shown
as a made-up number, unless the caller gives a peak.
"""

from __future__ import annotations

import re

import torch

PEAK_BF16_TFLOPS: dict[str, float] = {
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H200 NVL": 835.0,
    "GH200": 989.0,
    "H200": 989.0,
    "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10": 125.0,
}
"""Dense bf16/fp16 tensor-core peaks in TFLOP/s (vendor datasheets, half the figure "with
sparsity"), most specific first. A key matches a device name (``torch.cuda.get_device_name``,
e.g. ``NVIDIA H100 80GB HBM3``, ``NVIDIA A100-SXM4-80GB``) when each of its words is a whole
word of the name (split at spaces and ``-``), so ``A10`` matches neither ``A100`` nor ``A10G``
and ``H200`` not ``GH200``; the first key that matches wins."""

HALF_DTYPES = (torch.bfloat16, torch.float16)


def peak_tflops_by_name(name: str) -> float | None:
    """The dense bf16 peak (TFLOP/s) of the GPU called ``name``; ``None`` when not in the table."""
    words = set(re.split(r"[\s\-]+", name.upper()))
    for key, peak in PEAK_BF16_TFLOPS.items():
        if all(word in words for word in key.upper().split()):
            return peak
    return None


def device_peak_flops(device: torch.device | str, dtype: torch.dtype) -> float | None:
    """Peak FLOP/s of one ``device`` for matrix products in ``dtype``; ``None`` when unknown:
    not a CUDA device, a GPU missing from :data:`PEAK_BF16_TFLOPS`, or not bf16/fp16."""
    device = torch.device(device)
    if device.type != "cuda" or dtype not in HALF_DTYPES or not torch.cuda.is_available():
        return None
    peak = peak_tflops_by_name(torch.cuda.get_device_name(device))
    return None if peak is None else peak * 1e12


def model_flops_utilization(flops_per_sample: float, samples_per_second: float, peak_flops: float) -> float:
    """MFU as a fraction (0.4 is 40 %): achieved model FLOP/s over ``peak_flops``, the peak of
    all the devices that processed those samples together."""
    if peak_flops <= 0:
        raise ValueError(f"peak_flops must be positive, got {peak_flops}")
    return flops_per_sample * samples_per_second / peak_flops


__all__ = ["PEAK_BF16_TFLOPS", "device_peak_flops", "model_flops_utilization", "peak_tflops_by_name"]
