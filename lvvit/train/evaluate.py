"""Top-1/top-5/loss on the eval shards with every rank taking part.

ZeRO-3 gathers parameters inside every forward, so each rank must run the same number
of batches; the eval loader pads the last ones and marks real samples with ``valid``.
Sums are reduced across ranks, then divided: the result is exact over the eval set.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from lvvit.data.decode import normalize


@torch.no_grad()
def evaluate(
    model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], device: torch.device | str,
    dtype: torch.dtype,
) -> dict[str, float]:
    """Eval-mode outputs (``cls + 0.5 * aux.max``) against labels; counts only ``valid`` samples."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(5, dtype=torch.float64, device=device)  # loss, top1, top5, samples, batches
    for batch in batches:
        images = normalize(batch["images"].to(device)).to(dtype)
        labels = batch["labels"].to(device)
        valid = batch.get("valid", torch.ones_like(labels, dtype=torch.bool)).to(device)
        logits = model(images).float()
        loss = F.cross_entropy(logits, labels, reduction="none")
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices == labels[:, None]
        sums += torch.stack([
            loss[valid].sum().double(), top[:, 0][valid].sum().double(),
            top.any(dim=1)[valid].sum().double(), valid.sum().double(), torch.ones((), device=device).double(),
        ])
    batches_here = sums[4].item()
    counts = torch.tensor([batches_here, -batches_here], device=device)
    dist.all_reduce(counts, op=dist.ReduceOp.MAX)
    if counts[0].item() != -counts[1].item():
        raise RuntimeError(f"eval ranks ran different batch counts ({-counts[1].item():.0f}..{counts[0].item():.0f})")
    dist.all_reduce(sums)
    model.train(was_training)
    n = max(sums[3].item(), 1.0)
    return {
        "loss": sums[0].item() / n, "top1": 100.0 * sums[1].item() / n,
        "top5": 100.0 * sums[2].item() / n, "samples": sums[3].item(),
    }
