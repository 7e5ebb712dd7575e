"""Inference throughput: ONNX Runtime (CPU) against PyTorch eager on the same LV-ViT and the
same inputs, images/s at batch 1, 8 and 32, plus the int8 QDQ graph lvvit-export writes
(calibrated here on seeded random pixels: throughput only, the weights are random); with a
GPU also ORT CUDA and TensorRT fp16 against PyTorch bf16. The sides run in alternating
rounds so a noisy shared machine slows all alike; each figure is the median round.
Targets: ORT fp32 >= 1.3x eager at batch 1; int8 >= 2.0x eager fp32 at batch 1 on one
thread and >= 1.5x ORT fp32 at every batch size.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lvvit import onnxrt
from lvvit.bench.data import cpu_info
from lvvit.models import create_model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="lvvit_t", help="variant (random weights)")
    parser.add_argument("--img-size", type=int, default=224, help="input size")
    parser.add_argument("--batches", default="1,8,32", help="comma-separated batch sizes")
    parser.add_argument("--threads", type=int, default=0,
                        help="intra-op threads for both sides (0: torch's default)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating timing rounds per batch size")
    parser.add_argument("--min-seconds", type=float, default=1.0, help="least time per side per round")
    parser.add_argument("--opsets", default=None,
                        help="comma-separated ONNX opsets to export (default: lvvit-export's, 18); each graph "
                             "is one more ORT side of the same rounds (18,23: 23 writes ONNX's Attention op)")
    parser.add_argument("--opt-level", choices=list(onnxrt.OPT_LEVELS), default="all",
                        help="ORT graph optimisation level of the main comparison")
    parser.add_argument("--no-int8", dest="int8", action="store_false",
                        help="skip the int8 graph (static QDQ quantization, as lvvit-export --precision int8)")
    parser.add_argument("--no-sweep", dest="sweep", action="store_false",
                        help="skip the batch-1 sweep over ORT graph optimisation levels")


@dataclass(frozen=True)
class Settings:
    """The command line of one run, read once in :func:`run`."""

    model: str
    img_size: int
    threads: int
    """Intra-op threads of both sides; 0: torch's default."""
    rounds: int
    min_seconds: float
    opt_level: str
    sweep: bool


def throughput(fn: Callable[[], object], batch: int, min_seconds: float) -> float:
    """Images/s of ``fn`` over at least ``min_seconds`` (and 3 calls), after one warm-up call."""
    fn()
    calls, start = 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - start < min_seconds:
        fn()
        calls += 1
    return calls * batch / (time.perf_counter() - start)


def compare(sides: dict[str, Callable[[], object]], batch: int, rounds: int, min_seconds: float) -> dict:
    """Median images/s of each side over ``rounds`` alternating rounds."""
    runs: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(rounds):
        for name, fn in sides.items():
            runs[name].append(throughput(fn, batch, min_seconds))
    return {name: statistics.median(values) for name, values in runs.items()}


def print_table(title: str, rows: list[tuple[int, dict[str, float]]]) -> None:
    names = list(rows[0][1])
    print(f"\n{title}")
    print(f"{'batch':>6} " + " ".join(f"{n + ' img/s':>26}" for n in names))
    for batch, result in rows:
        print(f"{batch:>6} " + " ".join(f"{result[n]:>26.1f}" for n in names))


def cpu_benchmark(settings: Settings, model: torch.nn.Module, onnx_paths: dict[int | str, Path], batches: list[int]) -> list[str]:
    """PyTorch eager against one ORT CPU session per exported graph (fp32 per opset, and
    the int8 graph under the key "int8"), all in the same rounds."""
    threads = settings.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    sessions = {key: onnxrt.session(path, threads=threads, opt_level=settings.opt_level)
                for key, path in onnx_paths.items()}
    names = {key: f"ort opset {key} ({settings.opt_level})" if key != "int8" else "ort int8 qdq"
             for key in sessions}
    fp32_name = names[next(iter(sessions))]
    rows, ratios = [], []
    for batch in batches:
        x = torch.randn(batch, 3, settings.img_size, settings.img_size)
        x_np = x.numpy()

        def eager(x=x):
            with torch.inference_mode():
                return model(x)

        sides = {"pytorch eager": eager, **{names[opset]: (lambda s=s, x_np=x_np: s.run(None, {"images": x_np}))
                                            for opset, s in sessions.items()}}
        result = compare(sides, batch, settings.rounds, settings.min_seconds)
        rows.append((batch, result))
        ratios.append(f"batch {batch}: " + ", ".join(
            f"{result[names[key]] / result['pytorch eager']:.2f}x ({'int8' if key == 'int8' else f'opset {key}'})"
            for key in sessions) + (f", int8 / ORT fp32 {result[names['int8']] / result[fp32_name]:.2f}x"
                                   if "int8" in sessions else ""))
    print_table(f"CPU, {threads} threads: {settings.model} @ {settings.img_size}, fp32 (and int8)", rows)

    if settings.sweep:
        opset, path = next(iter(onnx_paths.items()))  # the first fp32 graph
        x_np = np.random.default_rng(0).standard_normal((1, 3, settings.img_size, settings.img_size), np.float32)
        levels = {level: onnxrt.session(path, threads=threads, opt_level=level) for level in onnxrt.OPT_LEVELS}
        sweep = compare({f"ort {level}": (lambda s=s: s.run(None, {"images": x_np}))
                         for level, s in levels.items()}, 1, settings.rounds, settings.min_seconds)
        print_table(f"ORT graph optimisation levels, batch 1, opset {opset}", [(1, sweep)])
    return ratios


def gpu_benchmark(settings: Settings, model: torch.nn.Module, batches: list[int], workdir: Path) -> list[str]:
    """ORT CUDA and TensorRT, both on an fp16 graph, against PyTorch bf16 eager."""
    from lvvit.export.onnx_export import export_onnx
    from lvvit.export.tensorrt import EngineRunner, build_engine

    fp16_path = workdir / "model_fp16.onnx"
    export_onnx(model, fp16_path, settings.img_size, precision="fp16")
    bf16_model = create_model(settings.model, img_size=settings.img_size).eval()
    bf16_model.load_state_dict(model.state_dict())
    bf16_model = bf16_model.to("cuda", torch.bfloat16)
    sides_available = onnxrt.CUDA in onnxrt.preferred_providers()
    session = onnxrt.session(fp16_path, providers=[onnxrt.CUDA]) if sides_available else None
    engine = EngineRunner(build_engine(fp16_path, settings.img_size, max(batches), "fp16"))
    rows, ratios = [], []
    for batch in batches:
        x = torch.randn(batch, 3, settings.img_size, settings.img_size)
        x_np = x.numpy()

        # every side takes host memory and returns host memory, as a server would
        def eager(x=x):
            with torch.inference_mode():
                return bf16_model(x.to("cuda", torch.bfloat16)).float().cpu()

        sides = {"pytorch bf16": eager, "tensorrt fp16": lambda x_np=x_np: engine(x_np)}
        if session is not None:
            sides["ort cuda fp16"] = lambda x_np=x_np: session.run(None, {"images": x_np})
        result = compare(sides, batch, settings.rounds, settings.min_seconds)
        rows.append((batch, result))
        base = result["pytorch bf16"]
        ratios.append(f"batch {batch}: " + ", ".join(
            f"{name} {ips / base:.2f}x" for name, ips in result.items() if name != "pytorch bf16"))
    print_table(f"GPU {torch.cuda.get_device_name()}: {settings.model} @ {settings.img_size}", rows)
    return ratios


def machine() -> str:
    """CPU model, whether it has AVX-512 VNNI (ONNX Runtime's fast int8 path), and the load."""
    name, flags = cpu_info()
    simd = "AVX-512 VNNI" if "avx512_vnni" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return f"{name} ({simd}), {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}"


def int8_graph(fp32_path: Path, img_size: int, out: Path) -> Path:
    """The int8 graph lvvit-export would write, calibrated on 16 seeded random images."""
    from lvvit.export.int8 import quantize
    from lvvit.export.onnx_export import INPUT_NAME
    from lvvit.export.parity import as_model_input, parity_pixels

    batches = [as_model_input(parity_pixels(8, img_size, seed=s), uint8_input=False) for s in (1, 2)]
    quantize(fp32_path, out, INPUT_NAME, batches, "minmax")
    return out


def run(args: argparse.Namespace) -> None:
    from lvvit.export.onnx_export import default_opset, export_onnx

    batches = [int(b) for b in args.batches.split(",")]
    opsets = [int(o) for o in args.opsets.split(",")] if args.opsets else [default_opset("fp32")]
    torch.manual_seed(0)
    model = create_model(args.model, img_size=args.img_size).eval()
    print(f"{args.model} @ {args.img_size}, random weights, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters; {machine()}")
    with tempfile.TemporaryDirectory(prefix="lvvit-bench-infer-") as tmp:
        onnx_paths: dict[int | str, Path] = {opset: Path(tmp) / f"model_opset{opset}.onnx" for opset in opsets}
        for opset, path in onnx_paths.items():
            export_onnx(model, path, args.img_size, opset=opset)
        if args.int8:
            onnx_paths["int8"] = int8_graph(onnx_paths[opsets[0]], args.img_size, Path(tmp) / "model_int8.onnx")
        settings = Settings(args.model, args.img_size, args.threads, args.rounds, args.min_seconds,
                            args.opt_level, args.sweep)
        cpu_ratios = cpu_benchmark(settings, model, onnx_paths, batches)
        gpu_ratios = None
        if torch.cuda.is_available():
            gpu_ratios = gpu_benchmark(settings, model, batches, Path(tmp))
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")
    if gpu_ratios is None:
        print("\nGPU comparison (ORT CUDA, TensorRT fp16 vs PyTorch bf16) skipped: no CUDA GPU visible")
    else:
        print("\nGPU ratios vs PyTorch bf16: " + "; ".join(gpu_ratios))
    print("\nORT CPU / PyTorch eager (images/s ratio, targets at batch 1: fp32 >= 1.3x, int8 >= 2.0x on one "
          "thread; int8 / ORT fp32 >= 1.5x at every batch): " + "; ".join(cpu_ratios))
