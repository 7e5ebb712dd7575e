"""Typed errors: each of ours is a ``LvvitError`` (and still the builtin it was), and the one
"JSON object from a file" reader names the file in every refusal."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from lvvit.export.errors import ExportError, ParityError, TensorRTUnavailable
from lvvit.serving.model_dir import ModelDirError

from lvvit import jsonload
from lvvit.data.imagefolder import ShardBuildError
from lvvit.data.labelmap import LabelMapError
from lvvit.data.shards import EmptyBuildError
from lvvit.data.source import SourceError
from lvvit.demo.stages import StageFailed
from lvvit.errors import ConfigError, DataError, LvvitError, describe, exits_on_error
from lvvit.labeling.onnx_file import OnnxTeacherError
from lvvit.labeling.onnx_teacher import DenseRewriteError
from lvvit.labeling.teacher import TeacherOutputError
from lvvit.models.checkpoint import CheckpointError, ClassCountMismatch
from lvvit.onnxrt import ProviderUnavailable, SessionError

TYPED = {
    SourceError: (DataError, ValueError),
    LabelMapError: (DataError, ValueError),
    ShardBuildError: (DataError, RuntimeError),
    EmptyBuildError: (DataError, RuntimeError),
    ProviderUnavailable: (ConfigError, RuntimeError),
    SessionError: (LvvitError, ValueError),
    CheckpointError: (LvvitError, ValueError),
    ClassCountMismatch: (LvvitError, ValueError),
    TeacherOutputError: (LvvitError, ValueError),
    OnnxTeacherError: (LvvitError, ValueError),
    DenseRewriteError: (LvvitError, ValueError),
    ModelDirError: (LvvitError, ValueError),
    ExportError: (LvvitError, RuntimeError),
    ParityError: (LvvitError, RuntimeError),
    TensorRTUnavailable: (LvvitError, RuntimeError),
    StageFailed: (LvvitError, RuntimeError),
}


@pytest.mark.parametrize("cls", list(TYPED), ids=lambda c: c.__name__)
def test_our_errors_are_typed_and_keep_their_builtin_base(cls):
    ours, builtin = TYPED[cls]
    assert issubclass(cls, ours) and issubclass(cls, builtin)


def test_an_entry_point_prints_our_error_in_one_line_and_exits_1(capsys):
    with pytest.raises(SystemExit) as exited, exits_on_error():
        raise SourceError("/data/train: no shards")
    assert exited.value.code == 1
    assert capsys.readouterr().err == "/data/train: no shards\n"
    assert describe(ClassCountMismatch(Path("w.pt"), 10, 2)) == "w.pt: the checkpoint has 10 classes, the model 2"
    with pytest.raises(KeyError), exits_on_error():  # not ours: a bug, with its traceback
        raise KeyError("x")


def test_load_object_reads_a_json_object(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"a": [1, {"b": null}]}')
    assert jsonload.load_object(path) == {"a": [1, {"b": None}]}
    assert jsonload.load_object(str(path)) == {"a": [1, {"b": None}]}


@pytest.mark.parametrize(("text", "problem"), [
    (None, "no such file"),
    ("", "not valid JSON (Expecting value: line 1 column 1 (char 0))"),
    ('{"a" 1}', "not valid JSON (Expecting ':' delimiter: line 1 column 6 (char 5))"),
    ("[1, 2]", "expected a JSON object, got an array"),
    ('"text"', "expected a JSON object, got a string"),
    ("3.5", "expected a JSON object, got a number"),
    ("null", "expected a JSON object, got null"),
    ('{"a": 1, "a": 2}', "key 'a' appears twice"),
    ("[" * 40 + "]" * 40, "nested deeper than 32 levels (at character 32)"),
    (b'{"a": "\xff"}', "'utf-8' codec can't decode byte 0xff in position 7: invalid start byte"),
])
def test_load_object_refuses_naming_the_file(tmp_path, text, problem):
    path = tmp_path / "c.json"
    if isinstance(text, bytes):
        path.write_bytes(text)
    elif text is not None:
        path.write_text(text)
    with pytest.raises(ConfigError, match=f"^{re.escape(f'{path}: {problem}')}$"):
        jsonload.load_object(path)


def test_load_object_of_a_folder_is_unreadable(tmp_path):
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(tmp_path))}: cannot be read \(Is a directory\)$"):
        jsonload.load_object(tmp_path)
