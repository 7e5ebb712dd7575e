"""Training step time: DeepSpeed ZeRO-2 (one rank) against plain PyTorch, same model,
same AdamW, same batch, measured interleaved in one process so machine noise hits both.

On CPU (default here) it runs a tiny LV-ViT in fp32 and prints ``ratio = deepspeed /
pytorch`` last (target <= 1.10). With ``--gpu`` it measures images/s and model FLOPs
utilisation (MFU) of real variants in bf16 under DeepSpeed ZeRO-2, e.g. LV-ViT-S @224 and
LV-ViT-L @448, counting training FLOPs as 3x the forward (4x with --grad-checkpointing).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from lvvit.loss import TokenLabelingLoss
from lvvit.models import create_model
from lvvit.train.loop import ensure_dist_env, param_groups

PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}
"""Dense bf16 tensor-core peaks (vendor datasheets, no sparsity)."""


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
    parser.add_argument("--peak-tflops", type=float, default=None, help="device bf16 peak (default: by name)")


def _step_fn(model, optimizer_step, backward, images, labels, loss_fn):
    def step() -> None:
        loss = loss_fn(model(images), labels).loss
        backward(loss)
        optimizer_step()

    return step


def _time(step, n: int, sync) -> list[float]:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return times


def _ds_config(batch: int, bf16: bool) -> dict:
    cfg = {
        "train_micro_batch_size_per_gpu": batch,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.05, "torch_adam": True}},
        "zero_optimization": {"stage": 2},
        "steps_per_print": 10**9,
    }
    if bf16:
        cfg["bf16"] = {"enabled": True}
        cfg["data_types"] = {"buffer_dtype": "bf16"}  # see docs/training.md (BatchNorm)
        del cfg["optimizer"]["params"]["torch_adam"]  # fused CUDA Adam on GPU
    return cfg


def _overrides(items: list[str]) -> dict:
    from lvvit.train.config import parse_model_args

    return parse_model_args(items)


def run_cpu(args: argparse.Namespace) -> float:
    import deepspeed

    torch.manual_seed(0)
    kwargs = {"img_size": args.img_size, "num_classes": 100, **_overrides(args.model_arg)}
    plain = create_model(args.model, **kwargs)
    ds_model = create_model(args.model, **kwargs)
    ds_model.load_state_dict(plain.state_dict())
    images = torch.randn(args.batch, 3, args.img_size, args.img_size)
    labels = torch.randint(0, 100, (args.batch,))
    loss_fn = TokenLabelingLoss()

    opt = torch.optim.AdamW(param_groups(plain, 0.05), lr=1e-4)

    def plain_step() -> None:
        opt.step()
        opt.zero_grad(set_to_none=True)

    engine, *_ = deepspeed.initialize(model=ds_model, model_parameters=param_groups(ds_model, 0.05),
                                      config=_ds_config(args.batch, bf16=False))
    sides = {
        "pytorch": _step_fn(plain, plain_step, lambda loss: loss.backward(), images, labels, loss_fn),
        "deepspeed": _step_fn(engine, engine.step, engine.backward, images, labels, loss_fn),
    }
    times: dict[str, list[float]] = {k: [] for k in sides}
    for step in sides.values():
        _time(step, args.warmup, lambda: None)
    per_round = max(args.steps // args.rounds, 1)
    for r in range(args.rounds):
        order = list(sides) if r % 2 == 0 else list(reversed(sides))  # neither side always goes first
        for name in order:
            times[name] += _time(sides[name], per_round, lambda: None)
    med = {k: statistics.median(v) for k, v in times.items()}
    params = sum(p.numel() for p in plain.parameters())
    print(f"{args.model} {params / 1e6:.2f}M params @{args.img_size}, batch {args.batch}, fp32 CPU, "
          f"threads {torch.get_num_threads()}, {len(times['pytorch'])} steps per side")
    for name, t in med.items():
        print(f"  {name:10s} median step {1000 * t:8.2f} ms  {args.batch / t:8.1f} img/s")
    ratio = med["deepspeed"] / med["pytorch"]
    print(f"ratio deepspeed/pytorch step time: {ratio:.3f} (target <= 1.10)")
    return ratio


def _peak_tflops(args: argparse.Namespace) -> float:
    if args.peak_tflops:
        return args.peak_tflops
    name = torch.cuda.get_device_name()
    for key, peak in PEAK_BF16_TFLOPS.items():
        if key in name:
            return peak
    raise SystemExit(f"unknown bf16 peak for {name!r}; pass --peak-tflops")


def forward_flops(model: torch.nn.Module, images: torch.Tensor) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(images)
    return counter.get_total_flops()


def run_gpu(args: argparse.Namespace) -> None:
    """Images/s and MFU per model; the code path exists but was not run on the CPU-only dev box."""
    import deepspeed

    if not torch.cuda.is_available():
        raise SystemExit("--gpu needs CUDA (torch.cuda.is_available() is False)")
    peak = _peak_tflops(args) * 1e12
    loss_fn = TokenLabelingLoss()
    for spec in args.gpu_models.split(","):
        name, rest = spec.split("@")
        size, batch = (int(v) for v in rest.split(":"))
        model = create_model(name, img_size=size).cuda()
        if args.grad_checkpointing:
            model.set_grad_checkpointing(True)
        images = torch.randn(batch, 3, size, size, device="cuda", dtype=torch.bfloat16)
        labels = torch.randint(0, 1000, (batch,), device="cuda")
        flops = forward_flops(model.eval(), images[:1].float()) * (4 if args.grad_checkpointing else 3)
        model.train()
        engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model, 0.05),
                                          config=_ds_config(batch, bf16=True))
        step = _step_fn(engine, engine.step, engine.backward, images, labels, loss_fn)
        _time(step, args.warmup, torch.cuda.synchronize)
        t = statistics.median(_time(step, args.steps, torch.cuda.synchronize))
        ips = batch / t
        print(f"{name} @{size} batch {batch} bf16 ZeRO-2: {ips:8.1f} img/s, "
              f"{flops / 1e9:.1f} GFLOP/img (train), MFU {100 * ips * flops / peak:.1f}%")
        del engine, model
        torch.cuda.empty_cache()


def run(args: argparse.Namespace) -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if args.gpu else "cpu")
    ensure_dist_env()
    if args.gpu:
        run_gpu(args)
    else:
        run_cpu(args)
