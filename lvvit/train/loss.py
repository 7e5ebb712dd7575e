"""Token-labeling objective: soft CE on the class token plus mean soft CE over patch tokens.

Follows the official ``TokenLabelCrossEntropy`` / ``TokenLabelGTCrossEntropy``: the class
target is mixed with MixToken's ``lam`` (the class token saw the mixed image), the token
targets are not (the model un-mixes its aux outputs). Everything runs in float32 whatever
the logits' dtype, so bf16/fp16 training does not take log-softmax in low precision.
Tensor operations only, no host reads: ``torch.compile(fullgraph=True)`` takes the loss whole.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class LossParts(NamedTuple):
    """``loss = cls_weight * cls_loss + dense_weight * aux_loss``; parts are for logging."""

    loss: Tensor
    cls_loss: Tensor
    aux_loss: Tensor


def smoothed_one_hot(labels: Tensor, num_classes: int, smoothing: float = 0.1) -> Tensor:
    """``one_hot * (1 - eps) + eps / C`` as float32 ``[B, C]``, the same smoothing as the maps."""
    off = smoothing / num_classes
    target = torch.full((labels.shape[0], num_classes), off, device=labels.device)
    return target.scatter_(1, labels.long().view(-1, 1), 1.0 - smoothing + off)


def soft_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Mean over all leading dims of ``-sum(target * log_softmax(logits))``."""
    return -(target * F.log_softmax(logits, dim=-1)).sum(dim=-1).mean()


def mix_token_lam(mix_mask: Tensor) -> Tensor:
    """Share of each sample's own tokens after MixToken, ``1 - box_area / N``, from the
    model's bool token mask ``[H, W]``; a tensor, so a compiled loss serves every box."""
    return 1.0 - mix_mask.float().mean()


def blend_ground_truth(teacher: Tensor, one_hot: Tensor, labels: Tensor) -> Tensor:
    """Official ground-truth blend: ``ratio * teacher + (1 - ratio) * one_hot``.

    ``ratio`` is 0.5 where the teacher's top class is the label and 0.9 where it is not,
    as in ``TokenLabelGTCrossEntropy``.
    """
    agrees = teacher.argmax(dim=-1) == labels
    ratio = torch.where(agrees, 0.5, 0.9).to(teacher.dtype).unsqueeze(-1)
    return ratio * teacher + (1.0 - ratio) * one_hot


class TokenLabelingLoss(nn.Module):
    """``cls_weight * CE(cls, mix(t_cls)) + dense_weight * mean_tokens CE(aux, t_tok)``.

    With ``cls_target``/``token_target`` from :func:`lvvit.loader.targets.build_token_targets`
    both heads learn from the teacher's maps; without them (transfer, no maps) both learn
    from the smoothed one-hot label. ``ground_truth=True`` blends the label into the
    teacher's class target before MixToken mixing, as the official code does.
    """

    def __init__(
        self,
        cls_weight: float = 1.0,
        dense_weight: float = 1.0,
        smoothing: float = 0.1,
        ground_truth: bool = False,
    ) -> None:
        super().__init__()
        if cls_weight < 0 or dense_weight < 0 or cls_weight + dense_weight <= 0:
            raise ValueError(
                f"cls_weight and dense_weight must be >= 0 with a positive sum, "
                f"got {cls_weight} and {dense_weight}"
            )
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
        self.cls_weight = cls_weight
        self.dense_weight = dense_weight
        self.smoothing = smoothing
        self.ground_truth = ground_truth

    def extra_repr(self) -> str:
        return (
            f"cls_weight={self.cls_weight}, dense_weight={self.dense_weight}, "
            f"smoothing={self.smoothing}, ground_truth={self.ground_truth}"
        )

    def forward(
        self,
        outputs: tuple[Tensor, Tensor, Tensor | None],
        labels: Tensor,
        cls_target: Tensor | None = None,
        token_target: Tensor | None = None,
    ) -> LossParts:
        cls_logits, aux_logits, mix_mask = outputs
        cls_logits, aux_logits = cls_logits.float(), aux_logits.float()
        _check_shapes(cls_logits, aux_logits, mix_mask, labels, cls_target, token_target)
        batch, num_tokens, num_classes = aux_logits.shape
        one_hot = smoothed_one_hot(labels, num_classes, self.smoothing)
        if cls_target is None:
            cls_target = one_hot
            token_target = one_hot.unsqueeze(1).expand(batch, num_tokens, num_classes)
        else:
            cls_target, token_target = cls_target.float(), token_target.float()
            if self.ground_truth:
                cls_target = blend_ground_truth(cls_target, one_hot, labels)
        if mix_mask is not None:
            lam = mix_token_lam(mix_mask)
            cls_target = lam * cls_target + (1.0 - lam) * cls_target.flip(0)
        cls_loss = soft_cross_entropy(cls_logits, cls_target)
        aux_loss = soft_cross_entropy(aux_logits, token_target)
        loss = self.cls_weight * cls_loss + self.dense_weight * aux_loss
        return LossParts(loss, cls_loss, aux_loss)


def _check_shapes(
    cls_logits: Tensor,
    aux_logits: Tensor,
    mix_mask: Tensor | None,
    labels: Tensor,
    cls_target: Tensor | None,
    token_target: Tensor | None,
) -> None:
    """Name the mismatched argument: a silent broadcast would train on the wrong targets."""
    if aux_logits.dim() != 3 or cls_logits.shape != (aux_logits.shape[0], aux_logits.shape[2]):
        raise ValueError(
            f"outputs must be (cls [B, C], aux [B, N, C], mix_mask), "
            f"got cls {tuple(cls_logits.shape)} and aux {tuple(aux_logits.shape)}"
        )
    if mix_mask is not None and mix_mask.numel() != aux_logits.shape[1]:
        raise ValueError(f"mix_mask must cover the N = {aux_logits.shape[1]} tokens, got {tuple(mix_mask.shape)}")
    if labels.shape != cls_logits.shape[:1]:
        raise ValueError(f"labels must be [B] = [{cls_logits.shape[0]}], got {tuple(labels.shape)}")
    if (cls_target is None) != (token_target is None):
        raise ValueError("cls_target and token_target come together (both or neither)")
    if cls_target is not None and cls_target.shape != cls_logits.shape:
        raise ValueError(
            f"cls_target must be {tuple(cls_logits.shape)} like the class logits, "
            f"got {tuple(cls_target.shape)}"
        )
    if token_target is not None and token_target.shape != aux_logits.shape:
        raise ValueError(
            f"token_target must be {tuple(aux_logits.shape)} like the aux logits, "
            f"got {tuple(token_target.shape)} (out_size of the targets vs the model's grid?)"
        )
