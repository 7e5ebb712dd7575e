"""The demo's teacher: a SmallCNN trained on the digits' training split.

A real token-labeling run takes a strong pretrained teacher (NFNet-F6 for the official
maps); the demo has no downloads, so it trains its own in seconds. Its per-location
classifier is what ``lvvit-label --teacher smallcnn`` turns into dense score maps.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lvvit import atomic
from lvvit.data.decode import EvalTransform, normalize
from lvvit.labeling.smallcnn import SmallCNN, SmallCNNConfig, save_small_cnn


def load_image_folder(root: Path, img_size: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """All images of ``root/<class>/*.jpg`` as uint8 ``[N, 3, S, S]`` and their labels."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    transform = EvalTransform(img_size=img_size, crop_pct=1.0)
    images, labels = [], []
    for index, name in enumerate(classes):
        for path in sorted((root / name).glob("*.jpg")):
            images.append(transform(path.read_bytes()))
            labels.append(index)
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return pixels, torch.tensor(labels), classes


def random_shift(images: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ``pad`` px (edge-padded): the one augmentation digits need."""
    B, _, H, W = images.shape
    padded = F.pad(images, (pad, pad, pad, pad), mode="replicate")
    dx, dy = torch.randint(0, 2 * pad + 1, (2, B), generator=generator).tolist()
    return torch.stack([padded[i, :, y : y + H, x : x + W] for i, (x, y) in enumerate(zip(dx, dy, strict=True))])


def train_teacher(
    train_root: Path, out: Path, img_size: int, epochs: int = 12, batch_size: int = 64, seed: int = 0
) -> dict[str, float]:
    """Train, save with ``save_small_cnn`` and return the final training accuracy."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    pixels, labels, classes = load_image_folder(train_root, img_size)
    model = SmallCNN(SmallCNNConfig(num_classes=len(classes)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    steps = epochs * -(-len(labels) // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps)
    model.train()
    correct = seen = 0
    for epoch in range(epochs):
        order = torch.randperm(len(labels), generator=generator)
        correct = seen = 0
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            x = normalize(random_shift(pixels[idx], img_size // 16, generator))
            logits = model(x)
            loss = F.cross_entropy(logits, labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            correct += int((logits.argmax(1) == labels[idx]).sum())
            seen += len(idx)
        print(f"    teacher epoch {epoch + 1}/{epochs}: loss {loss.item():.3f}, train top-1 {correct / seen:.3f}", flush=True)
    with atomic.atomic_path(out) as tmp:
        save_small_cnn(model, tmp)
    return {"train_top1": correct / seen}


@torch.no_grad()
def evaluate_teacher(checkpoint: Path, val_root: Path, img_size: int) -> float:
    """Held-out top-1 of the saved teacher, as a plain classifier."""
    from lvvit.labeling.smallcnn import load_small_cnn

    model = load_small_cnn(checkpoint).eval()
    pixels, labels, _ = load_image_folder(val_root, img_size)
    predictions = torch.cat([model(normalize(chunk)).argmax(1) for chunk in pixels.split(256)])
    return float((predictions == labels).float().mean())
