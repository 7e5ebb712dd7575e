"""The GPU check: one short script for the day a GPU is lent, writing one markdown table.

Rows: LV-ViT-S @224 bf16 training images/s and MFU under ZeRO-2 on one GPU, eager and
compiled; LV-ViT-L @448 and @512 peak memory with activation checkpointing at the recipe's
micro batch (docs/imagenet.md); eval images/s; label generation images/s with an LV-ViT-L
teacher at 448. Training rows time ``lvvit.train.step.train_step`` through the helpers of
``lvvit-bench train``; label generation runs ``Labeler.label`` (teacher, top-k, copy to the
host) on ready-made crops. Each row is measured on its own: a failure is written into the
table as ``failed: <reason>`` and the next row runs.

``--dry-run`` runs every row on the CPU with a tiny model at tiny sizes (fp32 training,
no MFU or memory figures), so the script is known to run end to end before a GPU is lent.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lvvit import atomic
from lvvit.errors import ConfigError, exits_on_error, first_line

TINY = {"embed_dim": 48, "depth": 2, "num_heads": 2, "stem_width": 16}
"""The dry run's stand-in for every variant."""


@dataclass(frozen=True)
class Sizes:
    """What each row runs at: the real figures, or the dry run's tiny ones."""

    train: tuple[str, int, int]
    """(model, img_size, micro batch) of the training throughput rows."""
    memory: tuple[tuple[str, int, int], ...]
    """(model, img_size, micro batch) of the peak-memory rows (activation checkpointing)."""
    eval: tuple[str, int, int]
    label: tuple[str, int, int]
    steps: int
    warmup: int
    overrides: dict


GPU_SIZES = Sizes(train=("lvvit_s", 224, 128), memory=(("lvvit_l", 448, 64), ("lvvit_l", 512, 64)),
                  eval=("lvvit_s", 224, 256), label=("lvvit_l", 448, 64), steps=20, warmup=5, overrides={})
DRY_SIZES = Sizes(train=("lvvit_t", 64, 4), memory=(("lvvit_t", 64, 2), ("lvvit_t", 96, 2)),
                  eval=("lvvit_t", 64, 4), label=("lvvit_t", 64, 4), steps=2, warmup=1, overrides=TINY)


@dataclass(frozen=True)
class Options:
    """What the command line says about how the training rows run, read once in ``main``."""

    fused_adam: bool
    """DeepSpeed's fused Adam (as ``zero2.json``) instead of torch's AdamW."""
    peak_tflops: float | None
    """``--peak-tflops``: the device's dense bf16 peak for MFU; None: by the device's name,
    looked up by a GPU row, so an unknown device fails that row alone."""


@dataclass
class Check:
    """One row of the table: what was measured and the figure, or why there is none."""

    name: str
    setting: str
    result: str = ""
    seconds: float = 0.0
    """Wall time of the row, set-up and compilation included (the budget is 8 minutes)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m lvvit.bench.gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="the markdown table to write")
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU (a test of the script)")
    p.add_argument("--fused-adam", action="store_true",
                   help="DeepSpeed's fused Adam as in ds_configs/zero2.json (JIT-built on first use; "
                        "default: torch's AdamW, which needs no build)")
    p.add_argument("--peak-tflops", type=float, default=None, help="device bf16 peak for MFU (default: by name)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with exits_on_error():
        os.environ.setdefault("DS_ACCELERATOR", "cpu" if args.dry_run else "cuda")
        if not args.dry_run and not torch.cuda.is_available():
            raise ConfigError("the GPU check needs CUDA (torch.cuda.is_available() is False); "
                              "use --dry-run for the CPU rehearsal")
        from lvvit.train.engine import ensure_dist_env

        ensure_dist_env()
        sizes = DRY_SIZES if args.dry_run else GPU_SIZES
        device = "cpu" if args.dry_run else "cuda"
        options = Options(fused_adam=args.fused_adam, peak_tflops=args.peak_tflops)
        checks = run_checks(options, sizes, device)
        atomic.write_text(args.out, render(checks, device, args.dry_run))
        print(args.out.read_text())


def run_checks(options: Options, sizes: Sizes, device: str) -> list[Check]:
    name, size, batch = sizes.train
    mem_rows = [(f"{m} @{s} peak memory, grad checkpointing", (m, s, b)) for m, s, b in sizes.memory]
    plan: list[tuple[Check, Callable[[], str]]] = [
        (Check(f"{name} @{size} training, eager", f"ZeRO-2, batch {batch}"),
         lambda: train_throughput(options, sizes, sizes.train, device, compiled=False)),
        (Check(f"{name} @{size} training, --compile", f"ZeRO-2, batch {batch}"),
         lambda: train_throughput(options, sizes, sizes.train, device, compiled=True)),
        *[(Check(title, f"ZeRO-2, batch {spec[2]}"),
           lambda spec=spec: train_peak_memory(options, sizes, spec, device)) for title, spec in mem_rows],
        (Check(f"{sizes.eval[0]} @{sizes.eval[1]} eval", f"batch {sizes.eval[2]}"),
         lambda: eval_throughput(sizes, device)),
        (Check(f"label generation, {sizes.label[0]} teacher @{sizes.label[1]}", f"batch {sizes.label[2]}, top-5"),
         lambda: label_throughput(sizes, device)),
    ]
    for check, measure in plan:
        start = time.perf_counter()
        check.result = attempt(measure)
        check.seconds = time.perf_counter() - start
        print(f"{check.name}: {check.result} ({check.seconds:.0f} s)", flush=True)
    return [check for check, _ in plan]


def attempt(measure: Callable[[], str]) -> str:
    """The measurement's figure, or ``failed: <first line of the error>``; memory is freed
    either way so that one row's failure does not starve the next."""
    try:
        return measure()
    except Exception as err:  # every row is independent: record and go on
        return f"failed: {first_line(err, 200)}"
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def render(checks: list[Check], device: str, dry_run: bool) -> str:
    where = torch.cuda.get_device_name() if device == "cuda" else "CPU (dry run, tiny model)"
    lines = [f"GPU check on {where}; torch {torch.__version__}"
             f"{', bf16' if not dry_run else ', fp32'}; {time.strftime('%Y-%m-%d %H:%M')}", "",
             "| check | setting | result | wall s |", "| --- | --- | --- | ---: |"]
    lines += [f"| {c.name} | {c.setting} | {c.result.replace('|', '/')} | {c.seconds:.0f} |" for c in checks]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------- training rows


def _engine(options: Options, sizes: Sizes, spec: tuple[str, int, int], device: str,
            grad_checkpointing: bool):
    """The model under DeepSpeed as ``train.py`` builds it: the packaged ``zero2.json`` (the dry
    run: ``cpu.json``, fp32) at this micro batch, torch's AdamW unless ``--fused-adam``."""
    from lvvit.models import create_model
    from lvvit.train.engine import build_engine, packaged_engine_config

    name, size, batch = spec
    model = create_model(name, img_size=size, **sizes.overrides).to(device)
    model.set_grad_checkpointing(grad_checkpointing)
    config = packaged_engine_config("cpu.json" if device == "cpu" else "zero2.json", batch,
                                    torch_adam=device == "cpu" or not options.fused_adam)
    return build_engine(model, config, 0.05), model


def _train_step(engine, model, spec: tuple[str, int, int], device: str, compiled: bool) -> Callable[[], None]:
    from lvvit.bench.train import bench_objective, synthetic_batch, timed_step
    from lvvit.train.ema import ModelEma

    _, size, batch = spec
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    data = synthetic_batch(batch, size, model.cfg.num_classes)
    if device == "cuda":
        data = {k: v.pin_memory() for k, v in data.items()}
    if compiled:
        engine.compile()
    return timed_step(engine, bench_objective(model, compiled, device, dtype), data, ModelEma(engine.module, 0.99992))


def _median_step_seconds(step: Callable[[], None], sizes: Sizes, device: str) -> float:
    from lvvit.bench.train import step_times

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    step_times(step, sizes.warmup, sync)
    return statistics.median(step_times(step, sizes.steps, sync))


def train_throughput(options: Options, sizes: Sizes, spec: tuple[str, int, int], device: str,
                     compiled: bool) -> str:
    from lvvit.bench.train import peak_tflops
    from lvvit.models import train_flops_per_image

    engine, model = _engine(options, sizes, spec, device, grad_checkpointing=False)
    try:
        step = _train_step(engine, model, spec, device, compiled)
        ips = spec[2] / _median_step_seconds(step, sizes, device)
        if device == "cpu":
            return f"{ips:.1f} img/s (MFU n/a on CPU)"
        flops = train_flops_per_image(model.cfg)  # model FLOPs, as train.py's MFU
        return f"{ips:.0f} img/s, MFU {100 * ips * flops / (peak_tflops(options.peak_tflops) * 1e12):.1f}%"
    finally:
        del engine, model


def train_peak_memory(options: Options, sizes: Sizes, spec: tuple[str, int, int], device: str) -> str:
    engine, model = _engine(options, sizes, spec, device, grad_checkpointing=True)
    try:
        step = _train_step(engine, model, spec, device, compiled=False)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        seconds = _median_step_seconds(step, sizes, device)
        ips = f"{spec[2] / seconds:.0f} img/s"
        if device == "cpu":
            return f"n/a on CPU ({ips})"
        return f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB peak allocated ({ips})"
    finally:
        del engine, model


# ------------------------------------------------------------------------- inference rows


def _throughput(run: Callable[[], object], batch: int, sizes: Sizes, device: str) -> float:
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(sizes.warmup):
        run()
    sync()
    start = time.perf_counter()
    for _ in range(sizes.steps):
        run()
    sync()
    return batch * sizes.steps / (time.perf_counter() - start)


def eval_throughput(sizes: Sizes, device: str) -> str:
    """The eval forward as ``train.py`` evaluates: uint8 images to the device, normalised,
    bf16 autocast on the GPU."""
    from lvvit.data.decode import normalize
    from lvvit.models import create_model

    name, size, batch = sizes.eval
    model = create_model(name, img_size=size, **sizes.overrides).to(device).eval()
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
    if device == "cuda":
        images = images.pin_memory()

    @torch.inference_mode()
    def run() -> torch.Tensor:
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            return model(normalize(images.to(device, non_blocking=True)))

    return f"{_throughput(run, batch, sizes, device):.0f} img/s"


def label_throughput(sizes: Sizes, device: str) -> str:
    """``Labeler.label`` on ready crops: teacher forward, top-k, copy back (no JPEG decode)."""
    from lvvit.labeling.labeler import Labeler
    from lvvit.labeling.teacher import LVViTDenseTeacher
    from lvvit.models import create_model

    name, size, batch = sizes.label
    teacher = LVViTDenseTeacher(create_model(name, img_size=size, **sizes.overrides))
    labeler = Labeler(teacher, img_size=size, batch_size=batch, device=device,
                      precision="fp32" if device == "cpu" else "bf16", workers=1)
    rng = np.random.default_rng(0)
    crops = list(rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8))
    boxes = [(0.0, 0.0, 1.0, 1.0)] * batch
    try:
        return f"{_throughput(lambda: labeler.label(crops, boxes), batch, sizes, device):.0f} img/s"
    finally:
        labeler.close()


if __name__ == "__main__":
    main()
