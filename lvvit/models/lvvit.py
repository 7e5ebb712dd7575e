"""LV-ViT (Jiang et al., "All Tokens Matter", arXiv 2104.10858).

Module and parameter names follow the official TokenLabeling code so that its
checkpoints load with ``strict=True`` and no key renaming.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

MixBox = tuple[int, int, int, int]
"""MixToken box on the token grid as ``(x0, y0, x1, y1)``: rows ``y0:y1``, columns ``x0:x1``."""


@dataclass(frozen=True)
class LVViTConfig:
    """Architecture of one variant. ``img_size`` only sets the length of ``pos_embed``.

    The named variants (``lvvit.models.MODEL_CONFIGS``) take ``drop_path_rate`` and
    ``crop_pct`` from their official recipe (``lvvit.models.recipe_for``); the eval transform
    reads ``crop_pct`` here so that a ``--model-arg crop_pct=...`` override travels with the
    model (export metadata, eval loader).
    """

    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 3.0
    stem_width: int = 64
    skip_lam: float = 1.0
    drop_path_rate: float = 0.1
    patch_size: int = 16
    img_size: int = 224
    num_classes: int = 1000
    in_chans: int = 3
    mix_token: bool = True
    crop_pct: float = 0.9

    @property
    def grid_size(self) -> int:
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        return self.img_size // self.patch_size


def drop_path(x: torch.Tensor, prob: float, training: bool) -> torch.Tensor:
    """Stochastic depth per sample: the residual branch of a whole sample is dropped."""
    if prob == 0.0 or not training:
        return x
    keep = 1.0 - prob
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask / keep


class DropPath(nn.Module):
    def __init__(self, prob: float = 0.0) -> None:
        super().__init__()
        self.prob = prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.prob, self.training)

    def extra_repr(self) -> str:
        return f"prob={self.prob}"


class PatchEmbed4_2(nn.Module):
    """Convolutional stem: 7x7/2 conv, two 3x3 convs, then an 8x8/8 projection (16x overall)."""

    def __init__(self, in_chans: int, width: int, embed_dim: int, patch_size: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, width, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        proj = patch_size // 2
        self.proj = nn.Conv2d(width, embed_dim, kernel_size=proj, stride=proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)), inplace=True)
        x = F.relu(self.bn2(self.conv2(x)), inplace=True)
        x = F.relu(self.bn3(self.conv3(x)), inplace=True)
        return self.proj(x)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block; residual branches are scaled down by ``skip_lam``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, skip_lam: float, drop_path_prob: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path_prob)
        self.skip_lam = skip_lam

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x))) / self.skip_lam
        return x + self.drop_path(self.mlp(self.norm2(x))) / self.skip_lam


def init_linear(m: nn.Linear) -> None:
    """Official init of every Linear (timm ViT style): trunc-normal std 0.02, zero bias."""
    nn.init.trunc_normal_(m.weight, std=0.02)
    if m.bias is not None:
        nn.init.zeros_(m.bias)


def sample_mix_box(grid_h: int, grid_w: int, generator: torch.Generator | None = None) -> MixBox:
    """CutMix-style box on the token grid: lam ~ Beta(1, 1), side fraction sqrt(1 - lam), clipped.

    Drawn from torch's RNG (the given generator, else the global one) so that a run seeded
    with ``torch.manual_seed`` mixes the same way every time, on every rank alike.
    """
    lam = torch.rand((), generator=generator).item()
    cut = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(grid_h * cut), int(grid_w * cut)
    cy = int(torch.randint(grid_h, (), generator=generator))
    cx = int(torch.randint(grid_w, (), generator=generator))
    y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, grid_h)
    x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, grid_w)
    return x0, y0, x1, y1


def box_mask(box: MixBox, grid_h: int, grid_w: int) -> torch.Tensor:
    """The box as a bool mask ``[grid_h, grid_w]`` (True inside), on the CPU."""
    x0, y0, x1, y1 = box
    mask = torch.zeros(grid_h, grid_w, dtype=torch.bool)
    mask[y0:y1, x0:x1] = True
    return mask


@torch.compiler.disable
def sample_mix_mask(grid_h: int, grid_w: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """A MixToken box (:func:`sample_mix_box`) as a mask on ``device``.

    Why a mask and not the box's four ints: a compiled model would specialize on those ints
    and re-compile for every new box, and a compiled loss on the ``lam`` they give. As a
    tensor the box is data: one graph serves every box. Kept out of the compiled graph
    (the draw is Python on the CPU generator) and copied without waiting for the device.
    """
    return box_mask(sample_mix_box(grid_h, grid_w, generator), grid_h, grid_w).to(device, non_blocking=True)


def swap_masked_with_flipped(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Replace the masked tokens of ``x [B, H, W, C]`` by those of ``x.flip(0)``.

    Swapping twice is the identity, which is how the aux outputs are un-mixed.
    """
    return torch.where(mask[:, :, None], x.flip(0), x)


class LVViT(nn.Module):
    """LV-ViT with a class head on the class token and an aux head on every patch token.

    Train mode returns ``(cls_logits [B, C], aux_logits [B, N, C], mix_mask)`` with the aux
    tokens already moved back to the sample they came from; ``mix_mask`` is the swapped
    box as a bool ``[H, W]`` token mask, ``None`` when MixToken is off. Eval mode returns
    ``cls + 0.5 * aux.max(1)``, the official test-time
    combination, with no data-dependent control flow so it exports to ONNX.
    """

    def __init__(self, cfg: LVViTConfig, mix_generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_classes = cfg.num_classes
        self.mix_token = cfg.mix_token
        self.mix_generator = mix_generator
        self.grad_checkpointing = False
        dim = cfg.embed_dim
        self.patch_embed = PatchEmbed4_2(cfg.in_chans, cfg.stem_width, dim, cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.grid_size**2 + 1, dim))
        # On the CPU even under a ``torch.device("meta")`` context, where .tolist() cannot read.
        rates = torch.linspace(0, cfg.drop_path_rate, cfg.depth, device="cpu").tolist()
        self.blocks = nn.ModuleList(
            Block(dim, cfg.num_heads, cfg.mlp_ratio, cfg.skip_lam, rate) for rate in rates
        )
        self.norm = nn.LayerNorm(dim, eps=1e-5)
        self.head = nn.Linear(dim, cfg.num_classes)
        self.aux_head = nn.Linear(dim, cfg.num_classes)
        self.init_weights()

    def init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                init_linear(m)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def reset_classifier(self, num_classes: int) -> None:
        """New class and aux heads (transfer to another label set), where the old ones lived."""
        dim, like = self.cfg.embed_dim, self.head.weight
        self.cfg = replace(self.cfg, num_classes=num_classes)
        self.num_classes = num_classes
        self.head = nn.Linear(dim, num_classes, device=like.device, dtype=like.dtype)
        self.aux_head = nn.Linear(dim, num_classes, device=like.device, dtype=like.dtype)
        for head in (self.head, self.aux_head):
            init_linear(head)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in backward: memory for compute at 448/512."""
        self.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        """Names excluded from weight decay besides biases and other 1-D parameters."""
        return {"pos_embed", "cls_token"}

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Class token + position embedding + blocks + final norm on ``x [B, N, D]``."""
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.pos_embed
        for blk in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return self.norm(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Normed tokens ``[B, 1 + N, D]`` of images ``[B, 3, H, W]``; never mixes."""
        return self.forward_tokens(self.patch_embed(x).flatten(2).transpose(1, 2))

    def forward(self, x: torch.Tensor):
        x = self.patch_embed(x).permute(0, 2, 3, 1)  # B, H, W, D
        B, H, W, D = x.shape
        mask = None
        if self.training and self.mix_token:
            mask = sample_mix_mask(H, W, self.mix_generator, x.device)
            x = swap_masked_with_flipped(x, mask)
        x = self.forward_tokens(x.reshape(B, H * W, D))
        cls = self.head(x[:, 0])
        aux = self.aux_head(x[:, 1:])
        if not self.training:
            return cls + 0.5 * aux.max(dim=1).values
        if mask is not None:
            aux = swap_masked_with_flipped(aux.reshape(B, H, W, -1), mask).reshape(B, H * W, -1)
        return cls, aux, mask
