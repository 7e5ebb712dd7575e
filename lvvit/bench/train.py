"""Training step time: DeepSpeed ZeRO-2 (one rank) against plain PyTorch, same model,
same AdamW, same batch, measured interleaved in one process so machine noise hits both.

Both sides run ``lvvit.train.step.train_step``, the step ``train.py`` runs (targets from
label maps, model, token-labeling loss, backward, update), plus the EMA update: DeepSpeed
through its engine, PyTorch through ``PlainEngine``.

On CPU (default here) it runs a tiny LV-ViT in fp32 and prints ``ratio = deepspeed /
pytorch`` last (target <= 1.10). With ``--gpu`` it measures images/s and model FLOPs
utilisation (MFU) of real variants in bf16 under DeepSpeed ZeRO-2, e.g. LV-ViT-S @224 and
LV-ViT-L @448, with the model FLOPs and device peaks ``train.py`` logs its MFU with
(``lvvit.models.flops``, ``lvvit.train.mfu``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from lvvit.errors import ConfigError
from lvvit.models import create_model, train_flops_per_image
from lvvit.train.ema import ModelEma
from lvvit.train.engine import build_engine, ensure_dist_env, packaged_engine_config, param_groups
from lvvit.train.loss import TokenLabelingLoss
from lvvit.train.mfu import peak_tflops_by_name
from lvvit.train.step import Objective, PlainEngine, train_step


@dataclass(frozen=True)
class TrainBench:
    """What ``lvvit-bench train`` measures (its options, typed once in :func:`run`)."""

    model: str = "lvvit_t"
    img_size: int = 96
    overrides: tuple[str, ...] = ()
    batch: int = 16
    steps: int = 60
    warmup: int = 5
    rounds: int = 6
    gpu_models: str = "lvvit_s@224:256,lvvit_l@448:32"
    grad_checkpointing: bool = False
    compile: bool = False
    peak_tflops: float | None = None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="lvvit_t")
    parser.add_argument("--img-size", type=int, default=96)
    parser.add_argument("--model-arg", action="append", default=["embed_dim=96", "depth=4", "num_heads=4",
                                                                  "stem_width=32"],
                        help="architecture overrides of the CPU model (KEY=VALUE)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=60, help="measured steps per side")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=6, help="interleaved blocks per side")
    parser.add_argument("--gpu", action="store_true",
                        help="images/s and MFU of --gpu-models in bf16 under ZeRO-2 (needs CUDA)")
    parser.add_argument("--gpu-models", default="lvvit_s@224:256,lvvit_l@448:32",
                        help="NAME@SIZE:BATCH, comma separated")
    parser.add_argument("--grad-checkpointing", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model and the loss (both sides)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device bf16 peak (default: by name)")


def synthetic_batch(batch: int, img_size: int, num_classes: int, map_size: int = 7, top_k: int = 5) -> dict:
    """A loader-shaped CPU batch with random label maps and crops, fixed for every step."""
    g = torch.Generator().manual_seed(0)
    lo = torch.rand(batch, 2, generator=g) * 0.4
    size = 0.3 + torch.rand(batch, 2, generator=g) * 0.3
    return {
        "images": torch.randint(0, 256, (batch, 3, img_size, img_size), dtype=torch.uint8, generator=g),
        "labels": torch.randint(0, num_classes, (batch,), generator=g),
        "tlm_values": torch.randn(batch, top_k, map_size, map_size, generator=g),
        "tlm_indices": torch.randint(0, num_classes, (batch, top_k, map_size, map_size), generator=g),
        "map_boxes": torch.tensor([[0.0, 0.0, 1.0, 1.0]]).expand(batch, 4).contiguous(),
        "crop_boxes": torch.cat([lo, lo + size], dim=1),
        "flips": torch.rand(batch, generator=g) < 0.5,
    }


def timed_step(engine: Any, objective: Objective, batch: dict, ema: ModelEma) -> Callable[[], None]:
    """One optimizer step as ``train.py`` takes it: ``train_step``, then the EMA update.
    Shared by ``lvvit-bench train`` and the GPU check so both time the step training runs."""
    def step() -> None:
        train_step(engine, objective, [batch])
        ema.update()

    return step


def bench_objective(model: torch.nn.Module, compiled: bool, device: str, dtype: torch.dtype) -> Objective:
    """The default token-labeling loss and the model's target geometry, compiled or not."""
    loss_fn = TokenLabelingLoss()
    return Objective(loss_fn=torch.compile(loss_fn) if compiled else loss_fn, num_classes=model.cfg.num_classes,
                     token_grid=model.cfg.grid_size, smoothing=0.1, device=torch.device(device), dtype=dtype)


def step_times(step: Callable[[], None], n: int, sync: Callable[[], None]) -> list[float]:
    """Seconds of ``n`` calls of ``step``, each ended by ``sync`` (the device's, or a no-op)."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return times


def _overrides(items: list[str]) -> dict:
    from lvvit.train.cli import parse_model_args

    return parse_model_args(items)


def run_cpu(args: TrainBench) -> float:
    torch.manual_seed(0)
    kwargs = {"img_size": args.img_size, "num_classes": 100, **_overrides(list(args.overrides))}
    plain = create_model(args.model, **kwargs)
    ds_model = create_model(args.model, **kwargs)
    ds_model.load_state_dict(plain.state_dict())
    batch = synthetic_batch(args.batch, args.img_size, 100)
    plain_engine = PlainEngine(plain, torch.optim.AdamW(param_groups(plain, 0.05), lr=1e-4))
    engine = build_engine(ds_model, packaged_engine_config("cpu.json", args.batch), 0.05, compile=args.compile)
    if args.compile:
        plain.compile()
    sides = {
        "pytorch": timed_step(plain_engine, bench_objective(plain, args.compile, "cpu", torch.float32), batch,
                               ModelEma(plain, 0.99992)),
        "deepspeed": timed_step(engine, bench_objective(ds_model, args.compile, "cpu", torch.float32), batch,
                                 ModelEma(engine.module, 0.99992)),
    }
    times: dict[str, list[float]] = {k: [] for k in sides}
    for step in sides.values():
        step_times(step, args.warmup, lambda: None)
    per_round = max(args.steps // args.rounds, 1)
    for r in range(args.rounds):
        order = list(sides) if r % 2 == 0 else list(reversed(sides))  # neither side always goes first
        for name in order:
            times[name] += step_times(sides[name], per_round, lambda: None)
    med = {k: statistics.median(v) for k, v in times.items()}
    params = sum(p.numel() for p in plain.parameters())
    print(f"{args.model} {params / 1e6:.2f}M params @{args.img_size}, batch {args.batch}, fp32 CPU, "
          f"threads {torch.get_num_threads()}, {len(times['pytorch'])} steps per side"
          f"{', compiled' if args.compile else ''} (train_step: targets, model, loss, update, EMA)")
    for name, t in med.items():
        print(f"  {name:10s} median step {1000 * t:8.2f} ms  {args.batch / t:8.1f} img/s")
    ratio = med["deepspeed"] / med["pytorch"]
    print(f"ratio deepspeed/pytorch step time: {ratio:.3f} (target <= 1.10)")
    return ratio


def peak_tflops(given: float | None) -> float:
    """The device's dense bf16 peak for MFU: ``--peak-tflops``, else by the device's name."""
    if given:
        return given
    name = torch.cuda.get_device_name()
    peak = peak_tflops_by_name(name)
    if peak is None:
        raise ConfigError(f"unknown bf16 peak for {name!r}; pass --peak-tflops")
    return peak


def run_gpu(args: TrainBench) -> None:
    """Images/s and MFU per model under the packaged ``zero2.json`` (what ``train.py`` runs on a GPU)."""
    if not torch.cuda.is_available():
        raise ConfigError("--gpu needs CUDA (torch.cuda.is_available() is False)")
    peak = peak_tflops(args.peak_tflops) * 1e12
    for spec in args.gpu_models.split(","):
        name, rest = spec.split("@")
        size, batch_size = (int(v) for v in rest.split(":"))
        model = create_model(name, img_size=size).cuda()
        if args.grad_checkpointing:
            model.set_grad_checkpointing(True)
        batch = {k: v.pin_memory() for k, v in synthetic_batch(batch_size, size, model.cfg.num_classes).items()}
        flops = train_flops_per_image(model.cfg)  # model FLOPs (MFU): recomputation not counted
        engine = build_engine(model, packaged_engine_config("zero2.json", batch_size), 0.05, compile=args.compile)
        step = timed_step(engine, bench_objective(model, args.compile, "cuda", torch.bfloat16), batch,
                           ModelEma(engine.module, 0.99992))
        step_times(step, args.warmup, torch.cuda.synchronize)
        t = statistics.median(step_times(step, args.steps, torch.cuda.synchronize))
        ips = batch_size / t
        print(f"{name} @{size} batch {batch_size} bf16 ZeRO-2{' compiled' if args.compile else ''}: "
              f"{ips:8.1f} img/s, {flops / 1e9:.1f} GFLOP/img (train), MFU {100 * ips * flops / peak:.1f}%")
        del engine, model
        torch.cuda.empty_cache()


def run(args: argparse.Namespace) -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if args.gpu else "cpu")
    ensure_dist_env()
    bench = TrainBench(model=args.model, img_size=args.img_size, overrides=tuple(args.model_arg), batch=args.batch,
                       steps=args.steps, warmup=args.warmup, rounds=args.rounds, gpu_models=args.gpu_models,
                       grad_checkpointing=args.grad_checkpointing, compile=args.compile,
                       peak_tflops=args.peak_tflops)
    if args.gpu:
        run_gpu(bench)
    else:
        run_cpu(bench)
