"""ONNX teachers are bounded and their outputs checked (issue 19, finding 4).

Hostile graphs are built here with ``onnx.helper``: a few KB that ask for tens of GB, a
Loop of 10^15 iterations, a size that only the pixel values decide, and teachers whose
output cannot be labels (NaN, int64, 7 classes for a 10-class dataset). Each is refused by
the real ``lvvit-label`` in one line naming the file, quickly, with a small peak RSS, and
leaves nothing in ``--out``.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import run_measured
from onnx import TensorProto, helper, numpy_helper
from test_labeling import IMG_SIZE, NUM_CLASSES, _make_shards, exit_line
from torch import nn

from lvvit.errors import ConfigError
from lvvit.labeling.cli import label as label_job
from lvvit.labeling.cli import main as label_main
from lvvit.labeling.cli import parse_args
from lvvit.labeling.labeler import Labeler
from lvvit.labeling.onnx_file import (
    MAX_LOOP_TRIPS,
    Limits,
    OnnxTeacherError,
    check_graph,
    load_model,
)
from lvvit.labeling.teacher import TeacherOutputError

VENV_BIN = Path(sys.executable).parent
GIB = 1 << 30
SMALL_PROCESS = int(1.5 * GIB)
"""Peak RSS of a refused run: the interpreter with torch and ORT, nothing of the bomb."""


def _dense_graph(extra_nodes: list, extra_inits: list, out: str = "out", classes: int = NUM_CLASSES,
                 out_type: int = TensorProto.FLOAT) -> onnx.ModelProto:
    """A dense teacher (4x4 stride-4 Conv: 32 px -> [B, classes, 8, 8]) with ``extra_nodes``
    between its map ``dense`` and the output ``out``."""
    weight = np.random.default_rng(0).standard_normal((classes, 3, 4, 4)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["images", "w"], ["dense"], kernel_shape=[4, 4], strides=[4, 4]), *extra_nodes],
        "teacher",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, IMG_SIZE, IMG_SIZE])],
        [helper.make_tensor_value_info(out, out_type, ["batch", classes, 8, 8])],
        [numpy_helper.from_array(weight, "w"), *extra_inits],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def _const(name: str, value, dtype=np.int64) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(value, dtype=dtype), name)


def _plus_mean_of(node: onnx.NodeProto, *inits: onnx.TensorProto) -> onnx.ModelProto:
    """out = dense + mean(node's output ``big``): the output depends on the bomb."""
    return _dense_graph(
        [node, helper.make_node("ReduceMean", ["big"], ["m"], keepdims=0), helper.make_node("Add", ["dense", "m"], ["out"])],
        list(inits),
    )


def _loop(trips: int) -> onnx.ModelProto:
    """out = dense + (0 + 1 + 1 ... ``trips`` times)."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("Add", ["y_in", "one"], ["y_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("y_in", TensorProto.FLOAT, [])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("y_out", TensorProto.FLOAT, [])],
        [_const("one", 1.0, np.float32)],
    )
    return _dense_graph(
        [helper.make_node("Loop", ["trips", "", "zero"], ["count"], body=body, name="spin"),
         helper.make_node("Add", ["dense", "count"], ["out"])],
        [_const("trips", trips), _const("zero", 0.0, np.float32)],
    )


HOSTILE = {
    # 10^10 floats (37 GiB) from a 16-byte shape
    "constant_of_shape": lambda: _plus_mean_of(
        helper.make_node("ConstantOfShape", ["shape"], ["big"], name="bomb",
                         value=numpy_helper.from_array(np.array([1.0], np.float32))),
        _const("shape", [100_000, 100_000]),
    ),
    # the input tiled 10^8 times
    "tile": lambda: _plus_mean_of(helper.make_node("Tile", ["images", "reps"], ["big"], name="bomb"),
                                  _const("reps", [1, 1000, 1000, 100])),
    "loop": lambda: _loop(10**15),
}
REFUSAL = {
    "constant_of_shape": r"tensor 'big' \(ConstantOfShape node 'bomb'\) would hold 38,147 MiB",
    "tile": r"tensor 'big' \(Tile node 'bomb'\) would hold",
    "loop": r"Loop node 'spin' would run 1,000,000,000,000,000 iterations",
}


def _hidden_size(elements: int) -> onnx.ModelProto:
    """A ConstantOfShape whose size depends on the pixels (0 * max(images) + elements):
    no inference can know it, so only the memory limit while running stops it."""
    return _dense_graph(
        [helper.make_node("ReduceMax", ["images"], ["peak"], keepdims=0),
         helper.make_node("Mul", ["peak", "zero"], ["nothing"]),
         helper.make_node("Add", ["nothing", "count"], ["n"]),
         helper.make_node("Cast", ["n"], ["n64"], to=TensorProto.INT64),
         helper.make_node("Reshape", ["n64", "one_dim"], ["shape"]),
         helper.make_node("ConstantOfShape", ["shape"], ["big"], name="hidden",
                          value=numpy_helper.from_array(np.array([1.0], np.float32))),
         helper.make_node("ReduceMean", ["big"], ["m"], keepdims=0),
         helper.make_node("Add", ["dense", "m"], ["out"])],
        [_const("zero", 0.0, np.float32), _const("count", float(elements), np.float32), _const("one_dim", [1])],
    )


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("bounds") / "in"
    _make_shards(folder)
    return folder


def _run_measured(cmd: list[str], timeout: float = 120) -> tuple[int, str, int]:
    """Exit code, output and peak RSS (bytes) of ``cmd``, with our entry points on PATH."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    return run_measured(cmd, env, timeout)


def _label(shards: Path, teacher: Path, out: Path, *extra: str) -> tuple[int, str, int]:
    return _run_measured([str(VENV_BIN / "lvvit-label"), "--input", str(shards), "--out", str(out),
                          "--teacher", f"onnx:{teacher}", "--workers", "1", "--no-progress", *extra])


def _assert_out_empty(out: Path) -> None:
    assert not out.exists() or not any(out.iterdir()), sorted(p.name for p in out.iterdir())


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_graph_refused_before_labeling(tmp_path, shards, name):
    teacher = tmp_path / f"{name}.onnx"
    onnx.save(HOSTILE[name](), str(teacher))
    assert teacher.stat().st_size < 4096
    rc, output, peak = _label(shards, teacher, tmp_path / "out")
    assert rc == 1, output
    errors = [line for line in output.splitlines() if line.startswith(f"{teacher}: ")]
    assert len(errors) == 1 and re.search(REFUSAL[name], errors[0]), output
    assert "Traceback" not in output
    assert peak < SMALL_PROCESS, f"peak RSS {peak / GIB:.2f} GiB"
    _assert_out_empty(tmp_path / "out")


def test_size_known_only_at_run_time_stops_at_the_memory_limit(tmp_path, shards):
    """2.2 GB that only the pixels decide: stopped near --max-teacher-memory-gib 1."""
    teacher = tmp_path / "hidden.onnx"
    onnx.save(_hidden_size(550_000_000), str(teacher))
    rc, output, peak = _label(shards, teacher, tmp_path / "out", "--max-teacher-memory-gib", "1")
    assert rc == 1, output
    assert f"{teacher}: running the teacher took this process to" in output
    assert "over --max-teacher-memory-gib 1" in output and "Traceback" not in output
    assert peak < 1.5 * GIB, f"peak RSS {peak / GIB:.2f} GiB"
    _assert_out_empty(tmp_path / "out")


def test_small_loops_and_sizes_pass_the_checks():
    model = _loop(3)
    check_graph(model, "images", [1, 3, IMG_SIZE, IMG_SIZE], Limits(), "ok.onnx")
    with pytest.raises(OnnxTeacherError, match=f"more than {MAX_LOOP_TRIPS:,}"):
        check_graph(_loop(MAX_LOOP_TRIPS + 1), "images", [1, 3, IMG_SIZE, IMG_SIZE], Limits(), "x.onnx")
    # The Conv's map is 10 x 8 x 8 floats per image: a 2 KiB budget holds it, 2 KiB for 2 images is too little.
    check_graph(_dense_graph([helper.make_node("Identity", ["dense"], ["out"])], []), "images",
                [1, 3, IMG_SIZE, IMG_SIZE], Limits(tensor_bytes=4096), "ok.onnx")
    with pytest.raises(OnnxTeacherError, match=r"tensor 'dense' \(a Conv node\) would hold 0 MiB for 1 image"):
        check_graph(_dense_graph([helper.make_node("Identity", ["dense"], ["out"])], []), "images",
                    [1, 3, IMG_SIZE, IMG_SIZE], Limits(tensor_bytes=1024), "tiny.onnx")


OUTPUTS = {
    "nan": (lambda: _dense_graph([helper.make_node("Mul", ["dense", "nan"], ["out"])],
                                 [_const("nan", np.nan, np.float32)]),
            r"the teacher's output holds 640 NaN or infinite values of 640"),
    "int64": (lambda: _dense_graph([helper.make_node("Cast", ["dense"], ["out"], to=TensorProto.INT64)], [],
                                   out_type=TensorProto.INT64),
              r"output 'out' is tensor\(int64\), a teacher returns float logits"),
    "seven_classes": (lambda: _dense_graph([helper.make_node("Identity", ["dense"], ["out"])], [], classes=7),
                      r"the teacher's output has 7 classes, the dataset has 10"),
}


@pytest.mark.parametrize("name", list(OUTPUTS))
def test_output_that_cannot_be_labels_is_refused_before_anything_is_written(tmp_path, shards, name, capsys):
    build, message = OUTPUTS[name]
    teacher = tmp_path / f"{name}.onnx"
    onnx.save(build(), str(teacher))
    out = tmp_path / "out"
    argv = ["--input", str(shards), "--out", str(out), "--teacher", f"onnx:{teacher}", "--workers", "1",
            "--no-progress"]
    assert re.match(rf"^{teacher}: {message}", exit_line(capsys, lambda: label_main(argv)))  # one line, status 1
    _assert_out_empty(out)


def test_num_classes_is_the_count_without_classes_json_and_must_agree_with_it(tmp_path, shards):
    teacher = tmp_path / "ten.onnx"
    onnx.save(_dense_graph([helper.make_node("Identity", ["dense"], ["out"])], []), str(teacher))
    base = ["--input", str(shards), "--out", str(tmp_path / "out"), "--teacher", f"onnx:{teacher}",
            "--workers", "1", "--no-progress"]
    with pytest.raises(ConfigError, match=r"^--num-classes 1000, but classes.json of .* lists 10 classes$"):
        label_job(parse_args([*base, "--num-classes", "1000"]))
    _assert_out_empty(tmp_path / "out")


class _BadAfterFirst(nn.Module):
    """A torch teacher fine on its first batch, NaN at one cell of the second."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        logits = torch.zeros(len(x), NUM_CLASSES, 2, 2)
        if self.calls == 2:
            logits[0, 3, 1, 1] = float("inf")
        return logits


def test_every_batch_of_any_teacher_is_checked():
    labeler = Labeler(_BadAfterFirst(), IMG_SIZE, topk=3, workers=1, num_classes=NUM_CLASSES, where="t.pt")
    crop, box = np.zeros((IMG_SIZE, IMG_SIZE, 3), np.uint8), (0.0, 0.0, 1.0, 1.0)
    labeler.label([crop], [box])
    with pytest.raises(TeacherOutputError, match=r"^t\.pt: the teacher's output holds 1 NaN or infinite values of 40$"):
        labeler.label([crop], [box])
    labeler.teacher.calls = 0
    with pytest.raises(TeacherOutputError, match=r"^t\.pt: the teacher's output has 10 classes, the dataset has 12$"):
        Labeler(labeler.teacher, IMG_SIZE, topk=3, workers=1, num_classes=12, where="t.pt").label([crop], [box])
    labeler.close()


def _classifier_with_external_data(folder: Path, channels: int) -> tuple[Path, int]:
    """A [B, 10] classifier whose stride-16 Conv holds ``channels`` x 768 floats as external data."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["images", "w"], ["f"], kernel_shape=[16, 16], strides=[16, 16]),
         helper.make_node("GlobalAveragePool", ["f"], ["p"]),
         helper.make_node("Flatten", ["p"], ["q"]),
         helper.make_node("Gemm", ["q", "fc"], ["out"], transB=1)],
        "classifier",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, IMG_SIZE, IMG_SIZE])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", NUM_CLASSES])],
        [numpy_helper.from_array(rng.standard_normal((channels, 3, 16, 16), dtype=np.float32), "w"),
         numpy_helper.from_array(rng.standard_normal((NUM_CLASSES, channels), dtype=np.float32) / channels, "fc")],
    )
    path = folder / "classifier.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path),
              save_as_external_data=True, location="classifier.data", size_threshold=1024)
    return path, (folder / "classifier.data").stat().st_size


def test_external_data_is_not_copied_in_memory(tmp_path):
    """dense-teacher on 128 MiB of external data peaks at about one copy over a small one's run."""
    small, _ = _classifier_with_external_data(tmp_path / "small", 64)
    big, data = _classifier_with_external_data(tmp_path / "big", 43_690)
    peaks = {}
    for path in (small, big):
        rc, output, peaks[path] = _run_measured(
            [str(VENV_BIN / "lvvit-label"), "dense-teacher", str(path), str(path.with_name("dense.onnx"))]
        )
        assert rc == 0, output
        assert "replaced by a 1x1 Conv with 10 classes" in output
    assert data > 120 << 20
    grown = peaks[big] - peaks[small]
    assert grown < 1.3 * data, f"{grown / 2**20:.0f} MiB more for {data / 2**20:.0f} MiB of data"
    # The dense graph refers to the same data file, beside it, and loads as a teacher.
    dense = load_model(big.with_name("dense.onnx"))
    assert {e.value for t in dense.graph.initializer for e in t.external_data if e.key == "location"} == {
        "classifier.data"
    }
