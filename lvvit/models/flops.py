"""Analytic FLOPs of an LV-ViT, for model FLOPs utilisation (MFU).

Counted: the matrix multiplications and convolutions, two FLOPs per multiply-add, at
``cfg.img_size`` (or the size given): the stem's four convolutions, each block's QKV and
output projections, its attention scores (``q @ k^T``) and the weighted sum of values
(``attn @ v``), its two MLP layers, the class head on the class token and the aux head on
every patch token. Left out, as in the usual MFU accounting (PaLM, Megatron): biases,
BatchNorm and LayerNorm, ReLU/GELU, the softmax and its scaling, residual adds, stochastic
depth, MixToken's swaps, ``pos_embed``, the loss and the optimizer: together well under 1 %
of the total for the real variants.

The count equals what ``torch.utils.flop_counter.FlopCounterMode`` measures for the same
model under the math attention backend (the tests hold it to that). Note that on the CPU
(torch 2.13) ``FlopCounterMode`` does not count the fused
``aten._scaled_dot_product_flash_attention_for_cpu`` at all, so a measured forward there
misses the attention scores; on CUDA its flash, efficient and cuDNN kernels are counted.
"""

from __future__ import annotations

from lvvit.models.lvvit import LVViTConfig


def _sizes(cfg: LVViTConfig, img_size: int | None) -> tuple[int, int, int]:
    """(image side, stem output side, patch tokens) at ``img_size`` (default ``cfg.img_size``)."""
    size = cfg.img_size if img_size is None else img_size
    if size % cfg.patch_size:
        raise ValueError(f"img_size {size} is not a multiple of patch_size {cfg.patch_size}")
    stem_side = (size + 2 * 3 - 7) // 2 + 1  # conv1: 7x7, stride 2, pad 3
    return size, stem_side, (size // cfg.patch_size) ** 2


def stem_input_conv_flops(cfg: LVViTConfig, img_size: int | None = None) -> float:
    """Forward FLOPs of the stem's first convolution (3 -> stem width, 7x7/2)."""
    _, side, _ = _sizes(cfg, img_size)
    return 2.0 * side * side * cfg.stem_width * cfg.in_chans * 7 * 7


def block_flops(cfg: LVViTConfig, img_size: int | None = None) -> float:
    """Forward FLOPs of one transformer block on ``1 + N`` tokens."""
    _, _, patches = _sizes(cfg, img_size)
    tokens, dim, hidden = patches + 1, cfg.embed_dim, int(cfg.embed_dim * cfg.mlp_ratio)
    qkv_proj = tokens * dim * 3 * dim + tokens * dim * dim
    attention = 2 * tokens * tokens * dim  # q @ k^T and attn @ v over all heads
    mlp = 2 * tokens * dim * hidden
    return 2.0 * (qkv_proj + attention + mlp)


def forward_flops_per_image(cfg: LVViTConfig, img_size: int | None = None) -> float:
    """FLOPs of one image's forward pass (see the module docstring for what is counted)."""
    _, side, patches = _sizes(cfg, img_size)
    width, proj = cfg.stem_width, cfg.patch_size // 2
    stem = stem_input_conv_flops(cfg, img_size) + 2.0 * (
        2 * side * side * width * width * 3 * 3  # conv2, conv3: 3x3/1
        + patches * cfg.embed_dim * width * proj * proj  # proj: (patch/2)x(patch/2) stride patch/2
    )
    heads = 2.0 * (1 + patches) * cfg.embed_dim * cfg.num_classes  # head on cls, aux_head on patches
    return stem + cfg.depth * block_flops(cfg, img_size) + heads


def train_flops_per_image(cfg: LVViTConfig, img_size: int | None = None, recompute: bool = False) -> float:
    """Model FLOPs of one image's training step: forward + backward.

    The backward pass costs two forwards (the gradients of each layer's input and of its
    weights), except that the images need no gradient: the first convolution's input
    gradient is not computed. So ``3 x forward - conv1``. This is the MFU numerator: with
    ``recompute=True`` the blocks' forward is counted once more, as activation checkpointing
    (``--grad-checkpointing``) runs it again in backward: hardware FLOPs (HFU), not MFU.
    """
    flops = 3.0 * forward_flops_per_image(cfg, img_size) - stem_input_conv_flops(cfg, img_size)
    if recompute:
        flops += cfg.depth * block_flops(cfg, img_size)
    return flops


__all__ = ["block_flops", "forward_flops_per_image", "stem_input_conv_flops", "train_flops_per_image"]
