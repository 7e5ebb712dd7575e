"""Model FLOPs utilisation in the training metrics (``StepMetrics``) and the device peak
lookup (``lvvit.train.mfu``): fakes only, no DeepSpeed, no process group."""

from __future__ import annotations

import pytest
import torch

from lvvit.train.metrics import StepMetrics, StepTotals, log_line
from lvvit.train.mfu import (
    PEAK_BF16_TFLOPS,
    device_peak_flops,
    model_flops_utilization,
    peak_tflops_by_name,
)
from lvvit.train.step import STEP_STATS

CPU = torch.device("cpu")


def totals(step_time: float = 0.5, steps: int = 2) -> StepTotals:
    return StepTotals(dict(zip(STEP_STATS, (3.0, 1.5, 0.75, 2.0, 0.0), strict=True)), steps=steps,
                      step_time=step_time, data_wait=0.25)


def named(metrics: StepMetrics, step_time: float = 0.5) -> dict[str, float]:
    return metrics.named(totals(step_time), lr=1e-3, grad_norm=None, epoch=0.5, skipped=0)


def test_mfu_from_known_numbers():
    # 256 images per 0.5 s over 4 devices: 128 img/s per device; x 1e12 FLOPs = 128 TFLOP/s
    # per device, against a 400 TFLOP/s peak: 32 %
    metrics = StepMetrics(CPU, log_every=1, global_batch=256, flops_per_sample=1e12, peak_flops=400e12,
                          world_size=4)
    out = named(metrics)
    assert out["train/images_per_sec"] == 512.0
    assert out["train/tflops_per_device"] == pytest.approx(128.0)
    assert out["train/mfu"] == pytest.approx(0.32)
    assert log_line(7, out) == "step 7 loss 1.5000 lr 0.001 512.0 img/s MFU 32.0%"


def test_mfu_follows_the_step_time():
    metrics = StepMetrics(CPU, log_every=1, global_batch=8, flops_per_sample=5e9, peak_flops=1e12)
    assert named(metrics, 0.1)["train/mfu"] == pytest.approx(8 / 0.1 * 5e9 / 1e12)
    assert named(metrics, 0.4)["train/mfu"] == pytest.approx(8 / 0.4 * 5e9 / 1e12)


def test_mfu_left_out_when_the_peak_or_the_flops_are_unknown():
    no_peak = named(StepMetrics(CPU, log_every=1, global_batch=16, flops_per_sample=2e9))
    assert "train/mfu" not in no_peak and no_peak["train/tflops_per_device"] == pytest.approx(32 * 2e9 / 1e12)
    assert "MFU" not in log_line(1, no_peak)
    for metrics in (StepMetrics(CPU, log_every=1, global_batch=16),
                    StepMetrics(CPU, log_every=1, global_batch=16, peak_flops=1e12)):
        out = named(metrics)
        assert "train/mfu" not in out and "train/tflops_per_device" not in out
        assert log_line(4, out) == "step 4 loss 1.5000 lr 0.001 32.0 img/s"


def test_existing_positional_call_is_unchanged():
    metrics = StepMetrics(CPU, 2, 16)
    assert (metrics.flops_per_sample, metrics.peak_flops, metrics.world_size) == (None, None, 1)
    assert named(metrics) == {"train/loss": 1.5, "train/cls_loss": 0.75, "train/aux_loss": 0.375,
                              "train/lr": 1e-3, "train/step_time": 0.5, "train/images_per_sec": 32.0,
                              "train/data_wait_share": 0.25, "train/epoch": 0.5,
                              "train/skipped_micro_batches": 0.0}


def test_bad_peak_or_world_size_is_refused():
    with pytest.raises(ValueError, match="peak_flops"):
        StepMetrics(CPU, 1, 16, flops_per_sample=1.0, peak_flops=0.0)
    with pytest.raises(ValueError, match="world_size"):
        StepMetrics(CPU, 1, 16, world_size=0)
    with pytest.raises(ValueError, match="peak_flops"):
        model_flops_utilization(1.0, 1.0, -1.0)


@pytest.mark.parametrize(("name", "peak"), [
    ("NVIDIA H100 80GB HBM3", 989.0),
    ("NVIDIA H100 PCIe", 756.0),
    ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.0),
    ("NVIDIA H200 NVL", 835.0),
    ("NVIDIA GH200 480GB", 989.0),
    ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA A100 80GB PCIe", 312.0),
    ("NVIDIA L40S", 362.0),
    ("NVIDIA L4", 121.0),
    ("NVIDIA A10", 125.0),
    ("NVIDIA A10G", None),
    ("Tesla V100-SXM2-16GB", None),
    ("NVIDIA GeForce RTX 4090", None),
])
def test_peak_by_device_name(name, peak):
    assert peak_tflops_by_name(name) == peak


def test_no_peak_on_the_cpu_or_for_fp32():
    assert device_peak_flops(CPU, torch.bfloat16) is None
    assert device_peak_flops("cpu", torch.float32) is None
    assert device_peak_flops("cuda", torch.float32) is None  # fp32: no table entry, on any GPU
    assert all(peak > 0 for peak in PEAK_BF16_TFLOPS.values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_peak_of_this_gpu_is_the_table_entry_for_its_name():
    name = torch.cuda.get_device_name()
    expected = peak_tflops_by_name(name)
    assert device_peak_flops("cuda", torch.bfloat16) == (None if expected is None else expected * 1e12)
