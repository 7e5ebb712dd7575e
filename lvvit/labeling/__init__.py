"""Teacher labeling: dense teachers and ``lvvit-label``, which adds ``tlm`` records to shards."""

from lvvit.labeling.labeler import Labeler, eval_box
from lvvit.labeling.smallcnn import SmallCNN, SmallCNNConfig, load_small_cnn, save_small_cnn
from lvvit.labeling.teacher import (
    TEACHERS,
    DenseCNNTeacher,
    LVViTDenseTeacher,
    build_teacher,
    dense_topk,
)

__all__ = [
    "TEACHERS",
    "DenseCNNTeacher",
    "LVViTDenseTeacher",
    "Labeler",
    "SmallCNN",
    "SmallCNNConfig",
    "build_teacher",
    "dense_topk",
    "eval_box",
    "load_small_cnn",
    "save_small_cnn",
]
