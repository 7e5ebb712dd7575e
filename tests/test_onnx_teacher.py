"""ONNX teachers for lvvit-label: classifiers made dense, token graphs, two ranks, refusals."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from test_labeling import (
    CORRUPT,
    IMG_SIZE,
    NUM_CLASSES,
    TOPK,
    _launch_two_ranks,
    _make_shards,
    _members,
    exit_line,
)
from torch import nn

from lvvit.data.labelmap import decode_tlm
from lvvit.errors import ConfigError
from lvvit.labeling.cli import label as label_job
from lvvit.labeling.cli import main as label_main
from lvvit.labeling.cli import parse_args
from lvvit.labeling.labeler import Labeler
from lvvit.labeling.onnx_teacher import (
    DenseRewriteError,
    OnnxTeacherError,
    input_spec,
    load_model,
    load_onnx_teacher,
    make_dense,
    make_session,
    verify_dense,
)
from lvvit.labeling.smallcnn import SmallCNN, SmallCNNConfig, export_small_cnn_onnx, save_small_cnn

VENV_BIN = Path(sys.executable).parent
WIDTH = 16  # feature channels; 32 px in -> 8 x 8 feature map


class Net(nn.Module):
    """Conv features (BN folded on export) and a head picked by name."""

    def __init__(self, head: str) -> None:
        super().__init__()
        self.head = head
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, WIDTH, 3, 2, 1), nn.ReLU()
        )
        self.fc = nn.Linear(WIDTH, NUM_CLASSES)
        self.conv = nn.Conv2d(WIDTH, NUM_CLASSES, 1)
        self.attn = nn.Conv2d(WIDTH, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x)
        gap = F.adaptive_avg_pool2d(f, 1)
        heads = {
            "flatten": lambda: self.fc(torch.flatten(gap, 1)),
            "reshape": lambda: self.fc(gap.reshape(f.shape[0], -1)),
            "mean": lambda: self.fc(f.mean(dim=(2, 3))),
            "matmul": lambda: f.mean(dim=(2, 3), keepdim=True).flatten(1) @ self.fc.weight.T + self.fc.bias,
            "conv": lambda: self.conv(gap).squeeze(-1).squeeze(-1),
            "hardswish": lambda: self.fc(F.hardswish(torch.flatten(gap, 1))),
            "softmax": lambda: self.fc(torch.flatten(gap, 1)).softmax(-1),
            "attention": lambda: self.fc((f.flatten(2) * self.attn(f).flatten(2).softmax(-1)).sum(-1)),
            "tokens": lambda: self.fc(f.flatten(2).transpose(1, 2)),  # [B, 64, C]: the 8 x 8 grid
            "seven_tokens": lambda: self.fc(f.flatten(2).transpose(1, 2)[:, :7]),
            "rank3": lambda: self.conv(f).flatten(2),  # [B, C, h * w]
            "map": lambda: self.conv(f),  # already dense: [B, C, h, w]
        }
        return heads[self.head]()

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        """The reference dense map: the head's linear layer at every location."""
        f = self.features(x)
        if self.head in ("conv", "map"):
            return self.conv(f)
        return F.conv2d(f, self.fc.weight[:, :, None, None], self.fc.bias)


def make_net(head: str, seed: int = 0) -> Net:
    torch.manual_seed(seed)
    net = Net(head)
    bn = net.features[1]
    bn.running_mean.uniform_(-0.2, 0.2)  # non-trivial BN statistics, folded into the conv on export
    bn.running_var.uniform_(0.5, 1.5)
    return net.eval()


def export(net: nn.Module, path: Path, opset: int = 17, batch: int | None = None, dtype=torch.float32) -> Path:
    """TorchScript exporter (fast, offline); dynamic batch unless ``batch`` is fixed."""
    example = torch.zeros(batch or 2, 3, IMG_SIZE, IMG_SIZE, dtype=dtype)
    axes = None if batch else {"images": {0: "batch"}, "out": {0: "batch"}}
    torch.onnx.export(net.to(dtype), (example,), str(path), dynamo=False, opset_version=opset,
                      input_names=["images"], output_names=["out"], dynamic_axes=axes)
    return path


HEADS = [
    ("flatten", 17, ("GlobalAveragePool", "Flatten", "Gemm")),
    ("reshape", 17, ("GlobalAveragePool", "Reshape", "Gemm")),
    ("mean", 17, ("ReduceMean", "Gemm")),  # axes as an attribute
    ("mean", 18, ("ReduceMean", "Gemm")),  # from opset 18: axes as an input
    ("matmul", 17, ("ReduceMean", "Flatten", "MatMul", "Add")),
    ("conv", 17, ("GlobalAveragePool", "Conv", "Squeeze", "Squeeze")),
]


@pytest.mark.parametrize(("head", "opset", "chain"), HEADS, ids=[f"{h}-opset{o}" for h, o, _ in HEADS])
def test_classifier_made_dense_averages_to_its_logits(tmp_path, head, opset, chain):
    net = make_net(head)
    model = load_model(export(net, tmp_path / "net.onnx", opset))
    dense, found = make_dense(model, "net.onnx")
    assert found.nodes == chain
    assert [n.op_type for n in dense.graph.node][-1] == "Conv"
    assert not {"GlobalAveragePool", "ReduceMean", "Gemm", "MatMul", "Flatten"} & {n.op_type for n in dense.graph.node}
    spec = input_spec(model, "nchw", "net.onnx")
    assert verify_dense(model, dense, spec, IMG_SIZE, "net.onnx") <= 1e-4

    x = torch.randn(3, 3, IMG_SIZE, IMG_SIZE)
    maps = make_session(dense, "net.onnx").run(None, {"images": x.numpy()})[0]
    with torch.no_grad():
        logits, reference = net(x).numpy(), net.dense(x).numpy()
    assert maps.shape == (3, NUM_CLASSES, 8, 8)
    np.testing.assert_allclose(maps.mean(axis=(2, 3)), logits, atol=1e-4)  # mean over locations = logits
    np.testing.assert_allclose(maps, reference, atol=1e-4)  # and each location is the head there


@pytest.mark.parametrize(("head", "op"), [("hardswish", "HardSwish"), ("softmax", "Softmax"), ("attention", "ReduceSum")])
def test_head_that_cannot_be_made_dense_is_refused_by_op(tmp_path, head, op, capsys):
    path = export(make_net(head), tmp_path / f"{head}.onnx")
    with pytest.raises(DenseRewriteError, match=rf"{head}\.onnx: {op} .*sits between the pooling and the output"):
        make_dense(load_model(path), str(path))
    line = exit_line(capsys, lambda: label_main(["dense-teacher", str(path), str(tmp_path / "out.onnx")]))
    assert re.match(rf"{re.escape(str(path))}: {op} .*sits between the pooling and the output", line)  # one line
    assert not (tmp_path / "out.onnx").exists()


def test_dense_teacher_command_writes_the_checked_graph(tmp_path, capsys):
    net = make_net("flatten")
    src = export(net, tmp_path / "classifier.onnx")
    assert label_main(["dense-teacher", str(src), str(tmp_path / "dense.onnx"), "--img-size", str(IMG_SIZE)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"{src} is a classifier (GlobalAveragePool -> Flatten -> Gemm): made dense, "
                              "that head replaced by a 1x1 Conv with 10 classes; check at 32 px: ")
    figure = float(printed.split("max(1, |logits|) = ")[1].split()[0])
    assert 0 <= figure <= 1e-4
    dense = load_model(tmp_path / "dense.onnx")
    x = torch.randn(2, 3, IMG_SIZE, IMG_SIZE)
    out = make_session(dense, "dense.onnx").run(None, {"images": x.numpy()})[0]
    np.testing.assert_allclose(out, net.dense(x).detach().numpy(), atol=1e-4)
    same = ["dense-teacher", str(src), str(src)]
    assert exit_line(capsys, lambda: label_main(same)) == "OUT must differ from IN: the classifier is kept"


def test_dense_teacher_command_takes_tokens_and_dense_graphs_as_labeling_does(tmp_path, capsys):
    """Tokens (here fp16 with a fixed batch) get the grid in the graph; a dense map is
    written as it is; the written graph gives what ``--teacher onnx:`` labels with."""
    x = torch.randn(2, 3, IMG_SIZE, IMG_SIZE)
    for head, dtype, printed in [("tokens", torch.half, "gives [B, N, C] tokens: laid on the 8 x 8 grid at 32 px"),
                                 ("map", torch.float, "gives dense [B, C, h, w] maps (8 x 8 at 32 px): used as")]:
        src = export(make_net(head), tmp_path / f"{head}.onnx", batch=2, dtype=dtype)
        out = tmp_path / f"{head}_dense.onnx"
        assert label_main(["dense-teacher", str(src), str(out)]) == 0  # the graph's fixed 32 px
        assert capsys.readouterr().out.startswith(f"{src} {printed}")
        written = load_model(out)
        assert [d.dim_value for d in written.graph.output[0].type.tensor_type.shape.dim][:2] == [2, NUM_CLASSES]
        maps = make_session(written, "out").run(None, {"images": x.numpy().astype(dtype_np(dtype))})[0]
        labeling = load_onnx_teacher(src, IMG_SIZE)(x).numpy()
        assert maps.shape == (2, NUM_CLASSES, 8, 8)
        np.testing.assert_array_equal(maps.astype(np.float32), labeling)
        with torch.no_grad():
            reference = make_net(head).dense(x).numpy()
        np.testing.assert_allclose(labeling, reference, atol=2e-2 if dtype == torch.half else 1e-4)


def dtype_np(dtype: torch.dtype) -> type:
    return np.float16 if dtype == torch.half else np.float32


def test_fp16_and_fixed_batch_graphs(tmp_path):
    """An fp16 graph exported with batch 1: fed float16 in chunks of one, float32 out."""
    net = make_net("flatten")
    teacher = load_onnx_teacher(export(make_net("flatten"), tmp_path / "h.onnx", batch=1, dtype=torch.half), IMG_SIZE)
    assert teacher.spec.batch == 1 and teacher.spec.dtype == np.float16
    x = torch.randn(3, 3, IMG_SIZE, IMG_SIZE)
    out = teacher(x)
    assert out.dtype == torch.float32 and out.shape == (3, NUM_CLASSES, 8, 8)
    with torch.no_grad():
        reference = net.dense(x)
    torch.testing.assert_close(out, reference, atol=2e-2, rtol=2e-2)
    # A batch of 3 through a fixed batch of 2 pads the last chunk and drops the padding.
    fixed = load_onnx_teacher(export(make_net("tokens"), tmp_path / "b2.onnx", batch=2), IMG_SIZE)
    torch.testing.assert_close(fixed(x), reference, atol=1e-4, rtol=1e-4)


class _FromNHWC(nn.Module):
    """A graph that takes ``[B, H, W, 3]``, as TensorFlow exports do."""

    def __init__(self, net: Net) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.permute(0, 3, 1, 2))


def test_nhwc_graph_and_bgr_order_with_own_mean_std(tmp_path):
    net = make_net("flatten")
    example = torch.zeros(2, IMG_SIZE, IMG_SIZE, 3)
    torch.onnx.export(_FromNHWC(net).eval(), (example,), str(tmp_path / "nhwc.onnx"), dynamo=False, opset_version=17,
                      input_names=["images"], dynamic_axes={"images": {0: "batch"}})
    with pytest.raises(OnnxTeacherError, match=r"nhwc\.onnx: input 'images' has shape \[\?, 32, 32, 3\], not 3 channels"):
        load_onnx_teacher(tmp_path / "nhwc.onnx", IMG_SIZE)  # --layout nchw is the default
    teacher = load_onnx_teacher(tmp_path / "nhwc.onnx", IMG_SIZE, layout="nhwc")
    x = torch.randn(2, 3, IMG_SIZE, IMG_SIZE)  # the labeler always hands NCHW
    torch.testing.assert_close(teacher(x), net.dense(x).detach(), atol=1e-4, rtol=1e-4)

    # The labeler reorders RGB crops to BGR, then normalises with the given mean/std.
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 0.125)
    labeler = Labeler(nn.Identity(), IMG_SIZE, topk=3, workers=1, mean=mean, std=std, channel_order="bgr")
    crop = np.zeros((IMG_SIZE, IMG_SIZE, 3), np.uint8)
    crop[..., 0], crop[..., 1], crop[..., 2] = 255, 51, 0  # R, G, B
    (label_map,) = labeler.label([crop], [(0.0, 0.0, 1.0, 1.0)])
    labeler.close()
    expected = {0: (0.0 - 0.1) / 0.5, 1: (0.2 - 0.2) / 0.25, 2: (1.0 - 0.3) / 0.125}  # B, G, R
    assert label_map.indices[:, 0, 0].tolist() == [2, 1, 0]
    np.testing.assert_allclose(label_map.values[:, 0, 0], [expected[2], expected[1], expected[0]], atol=1e-2)


def test_token_graph_labels_shards(tmp_path):
    """``[B, N, C]`` tokens on the 8 x 8 grid label shards like the torch network does."""
    net = make_net("tokens")
    path = export(net, tmp_path / "tokens.onnx")
    _make_shards(tmp_path / "in")
    args = ["--input", str(tmp_path / "in"), "--topk", str(TOPK), "--workers", "1", "--no-progress"]
    assert label_main([*args, "--out", str(tmp_path / "out"), "--teacher", f"onnx:{path}",
                       "--img-size", str(IMG_SIZE)]) == 0
    torch.save({"state_dict": net.state_dict()}, tmp_path / "net.pt")
    assert label_main([*args, "--out", str(tmp_path / "ref"), "--teacher", "test_onnx_teacher:dense_factory",
                       "--teacher-checkpoint", str(tmp_path / "net.pt"), "--img-size", str(IMG_SIZE)]) == 0
    assert_same_labels(tmp_path / "out", tmp_path / "ref", shards=3)


def dense_factory(checkpoint, img_size, **kwargs) -> nn.Module:
    """``--teacher test_onnx_teacher:dense_factory``: the token Net's map as a torch teacher."""
    net = Net("tokens")
    net.load_state_dict(torch.load(checkpoint, weights_only=True)["state_dict"])

    class Dense(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net.dense(x)

    return Dense()


def assert_same_labels(out: Path, ref: Path, shards: int) -> None:
    """Same samples; top-k indices equal and values within 1e-3 per cell."""
    names = [f"train-{s:06d}.tar" for s in range(shards)]
    assert sorted(p.name for p in out.glob("*.tar")) == names
    compared = 0
    for name in names:
        got, want = _members(out / name), _members(ref / name)
        assert got.keys() == want.keys()
        for member in (m for m in got if m.endswith(".tlm")):
            a, b = decode_tlm(got[member]), decode_tlm(want[member])
            np.testing.assert_array_equal(a.indices, b.indices)
            np.testing.assert_allclose(a.values.astype(np.float32), b.values.astype(np.float32), atol=1e-3, rtol=1e-3)
            assert a.box == b.box
            compared += 1
    assert compared == 11 - len(CORRUPT)


@pytest.fixture(scope="module")
def smallcnn(tmp_path_factory) -> tuple[Path, Path]:
    """A SmallCNN checkpoint and the same network exported (dynamo) as a [B, C] classifier."""
    torch.manual_seed(0)
    model = SmallCNN(SmallCNNConfig(num_classes=NUM_CLASSES, widths=(8, 16)))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    folder = tmp_path_factory.mktemp("smallcnn")
    save_small_cnn(model, folder / "smallcnn.pt")
    export_small_cnn_onnx(folder / "smallcnn.pt", folder / "smallcnn.onnx", IMG_SIZE)
    return folder / "smallcnn.pt", folder / "smallcnn.onnx"


@pytest.mark.slow
def test_onnx_teacher_on_two_ranks_matches_torch_teacher(tmp_path, smallcnn):
    checkpoint, onnx_file = smallcnn
    _make_shards(tmp_path / "in")
    common = ["--input", str(tmp_path / "in"), "--topk", str(TOPK), "--batch-size", "3", "--workers", "1",
              "--no-progress"]
    # No --img-size: the exported graph fixes 32 px, and that becomes the labeling size.
    proc = _launch_two_ranks([*common, "--out", str(tmp_path / "onnx"), "--teacher", f"onnx:{onnx_file}"])
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log
    assert "this rank (0 of 2) has 2" in log and "this rank (1 of 2) has 1" in log
    assert log.count("is a classifier (ReduceMean -> Gemm): made dense") == 2  # on each rank
    assert label_main([*common, "--out", str(tmp_path / "torch"), "--teacher", "smallcnn",
                       "--teacher-checkpoint", str(checkpoint), "--img-size", str(IMG_SIZE)]) == 0
    assert_same_labels(tmp_path / "onnx", tmp_path / "torch", shards=3)

    settings = json.loads((tmp_path / "onnx" / "label-settings.json").read_text())
    assert settings["teacher_checkpoint_sha256"] == hashlib.sha256(onnx_file.read_bytes()).hexdigest()
    assert settings["img_size"] == IMG_SIZE and settings["channel_order"] == "rgb" and settings["layout"] == "nchw"
    # Other input conventions on resume would mix two kinds of maps: refused by name.
    onnx_args = [*common, "--out", str(tmp_path / "onnx"), "--teacher", f"onnx:{onnx_file}"]
    with pytest.raises(ConfigError, match=r"holds labels made with other settings \(channel_order, mean differ"):
        label_job(parse_args([*onnx_args, "--mean", "0.5", "0.5", "0.5", "--channel-order", "bgr"]))
    with pytest.raises(ConfigError, match=rf"^{onnx_file}: the graph's input is 32 px, --img-size is 64$"):
        label_job(parse_args([*onnx_args, "--img-size", "64"]))


def test_teacher_flags_are_checked(tmp_path, smallcnn):
    checkpoint, onnx_file = smallcnn
    base = ["--input", str(tmp_path), "--out", str(tmp_path / "out")]
    with pytest.raises(ConfigError, match=r"^--teacher smallcnn needs --teacher-checkpoint"):
        label_job(parse_args([*base, "--teacher", "smallcnn"]))
    with pytest.raises(ConfigError, match=r"^--teacher-checkpoint, --precision fp16: not used with --teacher onnx:"):
        label_job(parse_args([*base, "--teacher", f"onnx:{onnx_file}", "--teacher-checkpoint", str(checkpoint),
                          "--precision", "fp16"]))
    with pytest.raises(OnnxTeacherError, match="--onnx-provider cuda: ONNX Runtime here has"):
        load_onnx_teacher(onnx_file, IMG_SIZE, provider="cuda")


@pytest.mark.parametrize(("head", "shape"), [("rank3", r"\[1, 10, 64\]"), ("seven_tokens", r"\[1, 7, 10\]")])
def test_wrong_output_shape_is_a_named_error(tmp_path, head, shape):
    path = export(make_net(head), tmp_path / f"{head}.onnx")
    with pytest.raises(OnnxTeacherError, match=rf"{head}\.onnx: output shape {shape} is neither dense logits"):
        load_onnx_teacher(path, IMG_SIZE)


class _Marker:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.write_text, (self.path, "unpickled"))


def test_corrupt_and_hostile_files_are_data(tmp_path, smallcnn):
    _, onnx_file = smallcnn
    good = onnx_file.read_bytes()
    (tmp_path / "cut.onnx").write_bytes(good[: len(good) // 2])
    with pytest.raises(OnnxTeacherError, match=r"cut\.onnx: not a (readable|valid) ONNX model"):
        load_model(tmp_path / "cut.onnx")

    # External data may only come from the model's own folder.
    model = onnx.load(str(onnx_file))
    tensor = model.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value="../secret.bin")
    (tmp_path / "models").mkdir()
    (tmp_path / "secret.bin").write_bytes(b"\0" * 4096)
    onnx.save(model, str(tmp_path / "models" / "escape.onnx"))
    with pytest.raises(OnnxTeacherError, match=r"escape\.onnx: tensor .* points at external data '\.\./secret\.bin'"):
        load_model(tmp_path / "models" / "escape.onnx")

    # A pickle named .onnx is never unpickled: the real CLI refuses it in one line.
    marker = tmp_path / "marker"
    (tmp_path / "payload.onnx").write_bytes(pickle.dumps(_Marker(marker)))
    _make_shards(tmp_path / "in")
    proc = subprocess.run(
        [str(VENV_BIN / "lvvit-label"), "--input", str(tmp_path / "in"), "--out", str(tmp_path / "out"),
         "--teacher", f"onnx:{tmp_path / 'payload.onnx'}", "--no-progress"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode != 0 and not marker.exists()
    assert f"{tmp_path / 'payload.onnx'}: not a" in proc.stderr
    assert "Traceback" not in proc.stderr
