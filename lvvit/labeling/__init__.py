"""Teacher labeling: dense teachers and ``lvvit-label``, which adds ``tlm`` records to shards."""

from lvvit.labeling.labeler import Labeler, eval_box
from lvvit.labeling.onnx_teacher import OnnxTeacher, OnnxTeacherError, load_onnx_teacher, make_dense
from lvvit.labeling.smallcnn import SmallCNN, SmallCNNConfig, load_small_cnn, save_small_cnn
from lvvit.labeling.teacher import (
    TEACHERS,
    DenseCNNTeacher,
    LVViTDenseTeacher,
    TeacherOutputError,
    build_teacher,
    check_logits,
    dense_topk,
)

__all__ = [
    "TEACHERS",
    "DenseCNNTeacher",
    "LVViTDenseTeacher",
    "Labeler",
    "OnnxTeacher",
    "OnnxTeacherError",
    "SmallCNN",
    "SmallCNNConfig",
    "TeacherOutputError",
    "build_teacher",
    "check_logits",
    "dense_topk",
    "eval_box",
    "load_onnx_teacher",
    "load_small_cnn",
    "make_dense",
    "save_small_cnn",
]
