"""The DeepSpeed engine and its config, built one way for ``train.py``, ``lvvit-bench train``
and the GPU check, so that the benchmarks time the configuration users train with.

``fill_ds_config`` turns a DeepSpeed JSON (a packaged one or ``--deepspeed_config``) into the
run's: batch sizes, optimizer rate and decay, clipping, BatchNorm buffer dtype.
``build_engine`` wraps a model in ``deepspeed.initialize`` with our parameter groups and,
for training, the per-step lr schedule.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from lvvit.ports import free_port


def ensure_dist_env() -> None:
    """Defaults so ``python train.py`` runs as one rank without the launcher (no mpi4py probe)."""
    if "RANK" in os.environ:
        return
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))


def init_distributed() -> tuple[int, int, torch.device]:
    """Process group, this rank's device, quiet logs off rank 0: ``(rank, world, device)``."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    ensure_dist_env()
    deepspeed.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    release_shm_buffer(rank)
    if rank != 0:
        logging.getLogger("lvvit").setLevel(logging.WARNING)
    # before any tensor is placed: DeepSpeed only selects the rank's GPU inside initialize()
    get_accelerator().set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return rank, world, torch.device(get_accelerator().current_device_name())


def release_shm_buffer(rank: int) -> None:
    """Unlink this rank's name of the shared-memory all-reduce buffer that DeepSpeed's CPU
    communication op creates in ``/dev/shm`` (67 MB per rank) and never removes: every run
    on the CPU accelerator would otherwise leave its buffers in RAM until reboot. All ranks
    have mapped each other's buffers once ``init_distributed`` returns; after a barrier the
    names are no longer needed, and the memory is freed when the last rank exits."""
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu":  # the same on every rank: all or none wait
        return
    dist.barrier()
    name = (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{rank}")
    with contextlib.suppress(FileNotFoundError):  # DeepSpeed without the op: no buffer
        os.unlink(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No decay on ``model.no_weight_decay()``, biases and every 1-D tensor (norms)."""
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") or name in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def engine_dtype(engine) -> torch.dtype:
    if engine.bfloat16_enabled():
        return torch.bfloat16
    return torch.float16 if engine.fp16_enabled() else torch.float32


def fill_ds_config(
    ds_config: dict, *, micro_batch: int, grad_accum: int, global_batch: int, lr: float,
    weight_decay: float, clip_grad: float | None = None, universal: bool = False,
) -> dict:
    """A copy of the JSON with the run's batch sizes, optimizer rate/decay and clipping.

    The optimizer type and its other settings stay the JSON's (e.g. ``torch_adam``); the
    JSON's scheduler is dropped (ours runs per step, see ``lvvit.train.schedule``).
    """
    cfg = json.loads(json.dumps(ds_config))
    cfg["train_micro_batch_size_per_gpu"] = micro_batch
    cfg["gradient_accumulation_steps"] = grad_accum
    cfg["train_batch_size"] = global_batch
    opt = cfg.setdefault("optimizer", {"type": "AdamW", "params": {}})
    params = opt.setdefault("params", {})
    params["lr"] = lr
    params["weight_decay"] = weight_decay
    if clip_grad is not None:
        cfg["gradient_clipping"] = clip_grad
    cfg.pop("scheduler", None)
    low = "bf16" if cfg.get("bf16", {}).get("enabled") else "fp16" if cfg.get("fp16", {}).get("enabled") else None
    if low is not None:
        # DeepSpeed casts parameters only; BatchNorm (the stem) then meets low-precision
        # weights with fp32 running statistics, which its kernels refuse.
        cfg.setdefault("data_types", {}).setdefault("buffer_dtype", low)
    if universal:
        cfg.setdefault("checkpoint", {})["load_universal"] = True
    return cfg


def packaged_engine_config(name: str, micro_batch: int, torch_adam: bool = False) -> dict:
    """A packaged JSON (``zero2.json``, ``cpu.json``) filled for one rank at ``micro_batch``,
    as ``train.py`` fills it (lr and decay of the JSON). ``torch_adam`` swaps DeepSpeed's
    fused Adam for torch's AdamW, which needs no JIT build."""
    from lvvit.train.config import packaged_ds_config
    from lvvit.train.ds_config import load_ds_config

    raw = load_ds_config(packaged_ds_config(name))
    params = raw.get("optimizer", {}).get("params", {})
    cfg = fill_ds_config(raw, micro_batch=micro_batch, grad_accum=1, global_batch=micro_batch,
                         lr=params.get("lr", 1e-3), weight_decay=params.get("weight_decay", 0.05))
    if torch_adam:
        cfg["optimizer"]["params"]["torch_adam"] = True
    return cfg


def build_engine(
    model: torch.nn.Module, ds_config: dict, weight_decay: float,
    schedule: Callable[[int], float] | None = None, compile: bool = False,
):
    """``model`` inside a DeepSpeed engine with ``param_groups``; ``schedule`` (a multiplier
    of the peak lr per optimizer step) drives a ``LambdaLR``. ``compile`` compiles the module
    in place, so state_dict keys (checkpoints) stay the same."""
    import deepspeed

    scheduler = None if schedule is None else (lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule))
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=param_groups(model, weight_decay),
                                           config=ds_config, lr_scheduler=scheduler)
    if compile:
        engine.compile()
    return engine


def weights_finite(engine, device: torch.device) -> bool:
    """Collective: whether every rank's (partition of the) weights is finite."""
    bad = torch.zeros(1, device=device)
    for p in engine.module.parameters():
        local = p.ds_tensor if hasattr(p, "ds_tensor") else p.data
        if not torch.isfinite(local).all():
            bad.fill_(1)
            break
    dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return bad.item() == 0


__all__ = ["build_engine", "engine_dtype", "ensure_dist_env", "fill_ds_config", "init_distributed",
           "packaged_engine_config", "param_groups", "seed_everything", "weights_finite"]
