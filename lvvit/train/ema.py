"""Exponential moving average of the weights that works under every ZeRO stage.

Each rank averages what it holds: the full parameter under ZeRO-1/2, its own flat
partition (``param.ds_tensor``) under ZeRO-3, so the average costs no communication per
step. The shadow is fp32 whatever the training precision; it averages the weights the
forward uses (bf16 ones under bf16 training, whose rounding averages out over the
~12,500-step horizon of decay 0.99992). Checkpoints hold the full
average (gathered), so a resume on another number of ranks re-slices it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn


def _is_partitioned(param: torch.Tensor) -> bool:
    """ZeRO-3 keeps small parameters whole on every rank (``ds_persist``); the rest live
    as flat partitions in ``ds_tensor`` and are gathered for each forward."""
    return hasattr(param, "ds_tensor") and not getattr(param, "ds_persist", False)


def _local(param: torch.Tensor) -> torch.Tensor:
    """What this rank stores of ``param`` and what its forward reads."""
    return param.ds_tensor if _is_partitioned(param) else param.data


def average_buffers(tensors: Iterable[torch.Tensor]) -> None:
    """All-reduce mean in place. Each rank's BatchNorm statistics drift apart (DeepSpeed,
    unlike DDP, does not broadcast buffers); timm's ``distribute_bn(reduce=True)`` does the
    same before every evaluation."""
    world = dist.get_world_size()
    for t in tensors:
        dist.all_reduce(t)
        t.div_(world)


def _gather(param: torch.Tensor) -> torch.Tensor:
    """The whole fp32 value of a ZeRO-3 parameter from every rank's partition (a collective)."""
    shard = param.ds_tensor.detach().float().contiguous()
    full = shard.new_empty(shard.numel() * dist.get_world_size())
    dist.all_gather_into_tensor(full, shard)
    return full[: param.ds_numel].view(param.ds_shape)


def _initial(param: torch.Tensor) -> torch.Tensor:
    """Starting shadow. A persistent ZeRO-3 parameter is still an empty placeholder until the
    first forward gathers it, so its whole value is assembled from the partitions."""
    if hasattr(param, "ds_tensor") and not _is_partitioned(param):
        return _gather(param)
    return _local(param).detach().float().clone()


class ModelEma:
    """``shadow = decay * shadow + (1 - decay) * weights`` after every optimizer step."""

    def __init__(self, module: nn.Module, decay: float) -> None:
        self.decay = decay
        self.params = dict(module.named_parameters())
        self.buffers = {k: b for k, b in module.named_buffers() if b.dtype.is_floating_point}
        self.shadow = {k: _initial(p) for k, p in self.params.items()}
        self.shadow.update({k: b.detach().float().clone() for k, b in self.buffers.items()})

    @torch.no_grad()
    def update(self) -> None:
        for k, p in self.params.items():
            self.shadow[k].lerp_(_local(p).float(), 1.0 - self.decay)
        for k, b in self.buffers.items():
            self.shadow[k].lerp_(b.float(), 1.0 - self.decay)

    def reduce_buffers(self) -> None:
        """Average the buffer shadows (BatchNorm statistics) across ranks, as for the model."""
        average_buffers(self.shadow[k] for k in self.buffers)

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Run the module with the averaged weights inside the block (for evaluation)."""
        saved = {}
        with torch.no_grad():
            for k, t in self._targets():
                saved[k] = t.clone()
                t.copy_(self.shadow[k])
        try:
            yield
        finally:
            with torch.no_grad():
                for k, t in self._targets():
                    t.copy_(saved[k])

    def _targets(self) -> Iterator[tuple[str, torch.Tensor]]:
        for k, p in self.params.items():
            yield k, _local(p)
        yield from self.buffers.items()

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole average on CPU; a collective under ZeRO-3 (call on every rank)."""
        out = {}
        for k, p in self.params.items():
            shard = self.shadow[k]
            if _is_partitioned(p):
                full = shard.new_empty(shard.numel() * dist.get_world_size())
                dist.all_gather_into_tensor(full, shard.contiguous())
                out[k] = full[: p.ds_numel].view(p.ds_shape).cpu()
            else:
                out[k] = shard.cpu().clone()
        out.update({k: self.shadow[k].cpu().clone() for k in self.buffers})
        return out

    def load_full_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Take a full average (any rank count) and keep this rank's part of it. Every entry
        is checked before any is copied, so a bad state leaves the average as it was; the
        ``ValueError`` names the entries at fault."""
        missing = sorted(set(self.shadow) - set(state))
        if missing:
            raise ValueError(f"EMA state lacks {len(missing)} entries: {', '.join(missing[:5])}")
        wrong = [f"{k} {tuple(state[k].shape)} (model {self._full_shape(k)})"
                 for k in self.shadow if tuple(state[k].shape) != self._full_shape(k)]
        if wrong:
            raise ValueError(f"EMA entries of the wrong shape: {', '.join(wrong[:5])}")
        for k in self.shadow:
            value = state[k].float()
            p = self.params.get(k)
            if p is not None and _is_partitioned(p):
                n = self.shadow[k].numel()
                flat = value.flatten()
                start = dist.get_rank() * n
                piece = torch.zeros(n, dtype=torch.float32)
                chunk = flat[start : start + n]
                piece[: chunk.numel()] = chunk
                value = piece
            self.shadow[k].copy_(value.view_as(self.shadow[k]))

    def _full_shape(self, key: str) -> tuple[int, ...]:
        """The whole tensor's shape: a ZeRO-3 partition's shadow holds only a flat slice."""
        p = self.params.get(key)
        if p is not None and _is_partitioned(p):
            return tuple(p.ds_shape)
        return tuple(self.shadow[key].shape)
