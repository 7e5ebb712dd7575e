"""The table of docs/labeling.md ("Which models"): each family as a tiny representative
graph built in plain torch (timm and torchvision are not dependencies), accepted or
refused alike by ``lvvit-label --teacher onnx:`` and ``lvvit-label dense-teacher``, which
share one decision (:func:`lvvit.labeling.onnx_teacher.dense_graph`)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_labeling import IMG_SIZE, NUM_CLASSES, exit_line
from test_onnx_teacher import export
from torch import nn

from lvvit.labeling.cli import main as label_main
from lvvit.labeling.onnx_teacher import (
    OnnxTeacherError,
    load_model,
    load_onnx_teacher,
    make_session,
)

W = 16  # channels of the tiny backbones


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, act: type = nn.ReLU) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout), act())


class SqueezeExcite(nn.Module):
    """EfficientNet/RegNet SE: a spatial mean inside the backbone, not the head's pooling."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.reduce, self.expand = nn.Conv2d(c, c // 4, 1), nn.Conv2d(c // 4, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.expand(F.silu(self.reduce(x.mean((2, 3), keepdim=True)))).sigmoid()


class ResNet(nn.Module):
    """A residual block; head as timm (``x.mean((2, 3))``, its fast pooling, then ``fc``) or
    as torchvision (``AdaptiveAvgPool2d((1, 1))``, ``torch.flatten``, ``fc``)."""

    def __init__(self, torchvision: bool = False) -> None:
        super().__init__()
        self.torchvision = torchvision
        self.stem = conv_bn(3, W, stride=2)
        self.block = nn.Sequential(conv_bn(W, W), nn.Conv2d(W, W, 3, 1, 1, bias=False), nn.BatchNorm2d(W))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(W, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = F.relu(x + self.block(x))
        pooled = torch.flatten(self.avgpool(x), 1) if self.torchvision else x.mean((2, 3))
        return self.fc(pooled)


class EfficientNet(nn.Module):
    """MBConv (expand, depthwise, SE, project) and conv_head + BN + SiLU before the pooling."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(3, W, stride=2, act=nn.SiLU)
        self.block = nn.Sequential(conv_bn(W, 2 * W, 1, act=nn.SiLU), conv_bn(2 * W, 2 * W, groups=2 * W, act=nn.SiLU),
                                   SqueezeExcite(2 * W), nn.Conv2d(2 * W, W, 1, bias=False), nn.BatchNorm2d(W))
        self.conv_head = conv_bn(W, 2 * W, 1, act=nn.SiLU)
        self.global_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        self.classifier = nn.Linear(2 * W, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        return self.classifier(self.global_pool(self.conv_head(x + self.block(x))))


class RegNet(nn.Module):
    """A grouped bottleneck with SE; head: pooling, flatten, fc (timm's ClassifierHead)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(3, W, stride=2)
        self.block = nn.Sequential(conv_bn(W, W, 1), conv_bn(W, W, groups=2), SqueezeExcite(W),
                                   nn.Conv2d(W, W, 1, bias=False), nn.BatchNorm2d(W))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(W, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        return self.fc(self.pool(F.relu(x + self.block(x))).flatten(1))


class ViT(nn.Module):
    """Patch embedding, a class token, one pre-norm attention block, a final norm and a
    head: ``forward`` is docs/labeling.md's tokens export,
    ``head(forward_features(x)[:, num_prefix_tokens:])``; ``keep_class_token`` exports all
    17 tokens instead (16 patches and the class token: not a square)."""

    num_prefix_tokens = 1

    def __init__(self, keep_class_token: bool = False) -> None:
        super().__init__()
        self.keep_class_token = keep_class_token
        self.patch_embed = nn.Conv2d(3, W, 8, 8)  # 32 px -> 4 x 4 patches
        self.cls_token = nn.Parameter(torch.randn(1, 1, W))
        self.pos_embed = nn.Parameter(torch.randn(1, 17, W) * 0.1)
        self.norm1, self.qkv, self.proj = nn.LayerNorm(W), nn.Linear(W, 3 * W), nn.Linear(W, W)
        self.norm2, self.mlp = nn.LayerNorm(W), nn.Sequential(nn.Linear(W, 2 * W), nn.GELU(), nn.Linear(2 * W, W))
        self.norm = nn.LayerNorm(W)
        self.head = nn.Linear(W, NUM_CLASSES)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        t = self.patch_embed(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), t], 1) + self.pos_embed
        q, k, v = self.qkv(self.norm1(t)).chunk(3, -1)
        t = t + self.proj((q @ k.transpose(1, 2) / W**0.5).softmax(-1) @ v)
        return self.norm(t + self.mlp(self.norm2(t)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        start = 0 if self.keep_class_token else self.num_prefix_tokens
        return self.head(self.forward_features(x)[:, start:])


class LayerNorm2d(nn.LayerNorm):
    """ConvNeXt's channels-last LayerNorm on NCHW: permute -> LayerNorm -> permute."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNeXt(nn.Module):
    """A ConvNeXt block; head as timm's NormMlpClassifierHead: pooling (keepdim), the
    LayerNorm2d, flatten, fc."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, W, 4, 4), LayerNorm2d(W))
        self.dwconv, self.norm = nn.Conv2d(W, W, 7, 1, 3, groups=W), nn.LayerNorm(W)
        self.mlp = nn.Sequential(nn.Linear(W, 4 * W), nn.GELU(), nn.Linear(4 * W, W))
        self.head_norm, self.fc = LayerNorm2d(W), nn.Linear(W, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.mlp(self.norm(self.dwconv(x).permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
        return self.fc(self.head_norm(x.mean((2, 3), keepdim=True)).flatten(1))


class MobileNetV3(nn.Module):
    """HardSwish blocks; head as timm (pooling, 1x1 ``conv_head`` with bias, HardSwish,
    flatten, classifier) or as torchvision (pooling, flatten, Linear, HardSwish, Linear)."""

    def __init__(self, torchvision: bool = False) -> None:
        super().__init__()
        self.torchvision = torchvision
        self.features = nn.Sequential(conv_bn(3, W, stride=2, act=nn.Hardswish),
                                      conv_bn(W, W, groups=W, act=nn.Hardswish))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.conv_head = nn.Conv2d(W, 2 * W, 1)
        self.hidden = nn.Linear(W, 2 * W)
        self.classifier = nn.Linear(2 * W, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.pool(self.features(x))
        if self.torchvision:
            return self.classifier(F.hardswish(self.hidden(pooled.flatten(1))))
        return self.classifier(F.hardswish(self.conv_head(pooled)).flatten(1))


REFUSED_BY_OP = r"{path}: {op} \(node '[^']*'\) sits between the pooling and the output; only Flatten/Reshape"
FAMILIES = {
    # row of the docs' table: (the tiny graph, "classifier" / "tokens" when accepted, or the refusal)
    "resnet": (ResNet, "classifier"),
    "efficientnet": (EfficientNet, "classifier"),
    "regnet": (RegNet, "classifier"),
    "torchvision-resnet": (lambda: ResNet(torchvision=True), "classifier"),
    "vit-tokens": (ViT, "tokens"),
    "vit-with-class-token": (lambda: ViT(keep_class_token=True),
                             r"{path}: output shape \[1, 17, 10\] is neither dense logits"),
    "convnext": (ConvNeXt, REFUSED_BY_OP.replace("{op}", "LayerNormalization")),
    "mobilenetv3": (MobileNetV3, REFUSED_BY_OP.replace("{op}", "HardSwish")),
    "torchvision-mobilenetv3": (lambda: MobileNetV3(torchvision=True), REFUSED_BY_OP.replace("{op}", "HardSwish")),
}


def _net(make) -> nn.Module:
    torch.manual_seed(0)
    net = make()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):  # non-trivial statistics, folded on export
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return net.eval()


def assert_both_commands_agree(net: nn.Module, path: Path, expected: str, capsys) -> None:
    """``--teacher onnx:`` (load_onnx_teacher) and ``dense-teacher`` accept ``path`` as the
    same dense teacher, or refuse it with the same line matching ``expected``."""
    out = path.parent / "dense.onnx"
    command = ["dense-teacher", str(path), str(out), "--img-size", str(IMG_SIZE)]
    if expected not in ("classifier", "tokens"):
        with pytest.raises(OnnxTeacherError) as refused:
            load_onnx_teacher(path, IMG_SIZE, num_classes=NUM_CLASSES)
        message = str(refused.value)
        assert re.match(expected.format(path=re.escape(str(path))), message), message
        assert exit_line(capsys, lambda: label_main(command)) == message  # the same reason, word for word
        assert not out.exists()
        return
    teacher = load_onnx_teacher(path, IMG_SIZE, num_classes=NUM_CLASSES)
    assert label_main(command) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"{path} is a classifier (" if expected == "classifier" else
                              f"{path} gives [B, N, C] tokens: laid on the 4 x 4 grid at {IMG_SIZE} px")
    x = torch.randn(3, 3, IMG_SIZE, IMG_SIZE)
    maps = teacher(x).numpy()
    written = make_session(load_model(out), "dense.onnx").run(None, {"images": x.numpy()})[0]
    assert maps.shape[:2] == (3, NUM_CLASSES) and written.shape == maps.shape
    np.testing.assert_allclose(written, maps, atol=1e-5)  # the file dense-teacher writes is the labeling teacher
    with torch.no_grad():
        output = net(x).numpy()
    if expected == "classifier":
        np.testing.assert_allclose(maps.mean(axis=(2, 3)), output, atol=1e-4)  # the map averages to the logits
    else:
        np.testing.assert_allclose(maps, output.transpose(0, 2, 1).reshape(maps.shape), atol=1e-5)  # row-major grid


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_is_accepted_or_refused_alike_by_both_commands(tmp_path, capsys, family):
    make, expected = FAMILIES[family]
    net = _net(make)
    assert_both_commands_agree(net, export(net, tmp_path / f"{family}.onnx"), expected, capsys)


def test_vit_tokens_exported_with_the_docs_recipe(tmp_path, capsys):
    """The tokens export of docs/labeling.md, with its exporter call (dynamo, opset 18+,
    Slice before the head): accepted by both commands (dense-teacher used to refuse the Slice)."""
    net = _net(ViT)

    class Tokens(nn.Module):
        def __init__(self, model: nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            m = self.model
            return m.head(m.forward_features(x)[:, m.num_prefix_tokens :])

    path = tmp_path / "vit_tokens.onnx"
    torch.onnx.export(Tokens(net).eval(), (torch.zeros(2, 3, IMG_SIZE, IMG_SIZE),), str(path), dynamo=True,
                      external_data=False, input_names=["images"],
                      dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)
    assert "Slice" in {n.op_type for n in load_model(path).graph.node}
    assert_both_commands_agree(net, path, "tokens", capsys)
