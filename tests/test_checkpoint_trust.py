"""Checkpoint files are data (docs/training.md, "Checkpoint files are data").

A pickle whose ``__reduce__`` writes a marker file is planted in each kind of file of a real
DeepSpeed checkpoint folder (made once by a launcher-less one-process run of ``train.py``);
``train.py --resume`` and ``lvvit-export --checkpoint FOLDER`` must refuse it by name, exit
non-zero and leave no marker. Damaged folders (``latest`` naming a missing tag, truncated
model states, a garbage EMA, a missing RNG file) are named the same way.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_train import COMMON, REPO, launch, write_shards

from lvvit.models.checkpoint import CheckpointError, load_data
from lvvit.train.checkpointing import (
    EMA_FILE,
    FORCE_DATA_ONLY,
    deepspeed_loads_data_only,
    deepspeed_safe_globals,
    read_rng_file,
    rng_state,
    set_rng_state,
)

pytestmark = pytest.mark.slow

TAG = "step00000002"
RNG_FILE = "lvvit_rng_rank0.pt"
BUFFERS_FILE = "lvvit_buffers_rank0.pt"
MODEL_FILE = "mp_rank_00_model_states.pt"
OPTIM_FILE = "zero_pp_rank_0_mp_rank_00_optim_states.pt"
REFUSED_EXEC = r"refusing to unpickle (builtins\.)?exec;"


class CodeInPickle:
    """Unpickling this runs code: it creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def train_args(shards: Path, out: Path) -> list[str]:
    return ["--train-shards", str(shards), "--output", str(out), "--no-mlflow", "--no-eval",
            "--deepspeed_config", str(REPO / "ds_configs" / "cpu.json"), *COMMON]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """Two steps of a tiny ZeRO-2 run with EMA: ``OUTPUT/checkpoints/step00000002``."""
    root = tmp_path_factory.mktemp("trust")
    shards = write_shards(root / "shards", 32, 16, tlm=False, seed=5)
    out = root / "run"
    launch([*train_args(shards, out), "--max-steps", "2"], None, ranks=0)
    assert (out / "checkpoints" / "latest").read_text() == TAG
    return {"shards": shards, "out": out}


def copy_run(trained: dict[str, Path], tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the run's output to tamper with, and its tag folder."""
    out = tmp_path / "run"
    shutil.copytree(trained["out"], out)
    return out, out / "checkpoints" / TAG


def plant(path: Path, marker: Path) -> None:
    """Rewrite ``path`` as its own (trusted) content plus one object that runs code."""
    content = load_data(path, deepspeed_safe_globals())
    content["extra"] = CodeInPickle(marker)
    torch.save(content, path)


def resume(trained: dict[str, Path], out: Path) -> subprocess.CompletedProcess:
    return launch([*train_args(trained["shards"], out), "--max-steps", "3", "--resume", "latest"],
                  None, ranks=0, check=False)


def export(checkpoint: Path, out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "MLFLOW_DISABLE_TELEMETRY": "true"}
    return subprocess.run([sys.executable, "-m", "lvvit.export.cli", "--checkpoint", str(checkpoint),
                           "--out", str(out), "--no-mlflow"], env=env, capture_output=True, text=True,
                          timeout=300)


def assert_refused(proc: subprocess.CompletedProcess, path: Path, marker: Path, why: str) -> None:
    assert not marker.exists(), "the checkpoint's code ran"
    assert proc.returncode != 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert str(path) in proc.stderr, proc.stderr[-3000:]
    assert re.search(why, proc.stderr), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]


@pytest.mark.parametrize("name", [RNG_FILE, BUFFERS_FILE, MODEL_FILE, OPTIM_FILE, EMA_FILE])
def test_resume_refuses_code_in_any_checkpoint_file(trained, tmp_path, name):
    out, tag_dir = copy_run(trained, tmp_path)
    marker = tmp_path / "code-ran"
    plant(tag_dir / name, marker)
    proc = resume(trained, out)
    assert_refused(proc, tag_dir / name, marker, REFUSED_EXEC)
    assert "resumed at step" not in proc.stderr


@pytest.mark.parametrize("name", [MODEL_FILE, OPTIM_FILE, EMA_FILE])
def test_export_refuses_code_in_a_deepspeed_folder(trained, tmp_path, name):
    out, tag_dir = copy_run(trained, tmp_path)
    marker = tmp_path / "code-ran"
    plant(tag_dir / name, marker)
    proc = export(out / "checkpoints", tmp_path / "exported")
    assert_refused(proc, tag_dir / name, marker, REFUSED_EXEC)
    assert not (tmp_path / "exported" / "model.onnx").exists()


def test_universal_resume_refuses_code_in_a_parameter_file(trained, tmp_path):
    """``ds_to_universal`` writes one folder per parameter; those files are checked too."""
    out, tag_dir = copy_run(trained, tmp_path)
    universal = out / "checkpoints" / f"{TAG}_universal"
    subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(tag_dir),
                    "--output_folder", str(universal)], check=True, capture_output=True, timeout=300,
                   env={**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})
    for ours in tag_dir.glob("lvvit_*.pt"):
        shutil.copy(ours, universal / ours.name)
    target = universal / "zero" / "pos_embed" / "fp32.pt"
    marker = tmp_path / "code-ran"
    plant(target, marker)
    proc = launch([*train_args(trained["shards"], out), "--max-steps", "3", "--resume", str(universal),
                   "--universal"], None, ranks=0, check=False)
    assert_refused(proc, target, marker, REFUSED_EXEC)


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    ("damage", "named", "why"),
    [
        ("latest", "latest", "names tag 'step99999999', but there is no folder"),
        ("truncated", MODEL_FILE, "not a readable PyTorch checkpoint"),
        ("garbage_ema", EMA_FILE, "not a readable PyTorch checkpoint"),
        ("missing_rng", RNG_FILE, "is missing"),
    ],
)
def test_resume_names_the_damaged_file(trained, tmp_path, damage, named, why):
    out, tag_dir = copy_run(trained, tmp_path)
    if damage == "latest":
        (out / "checkpoints" / "latest").write_text("step99999999")
        path = out / "checkpoints" / "latest"
    else:
        path = tag_dir / named
        if damage == "truncated":
            truncate(path)
        elif damage == "garbage_ema":
            path.write_bytes(os.urandom(4096))
        else:
            path.unlink()
    proc = resume(trained, out)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if str(path) in line]
    assert lines and why in lines[-1], proc.stderr[-3000:]
    assert lines[-1].startswith("--resume: "), lines[-1]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]


# ---------------------------------------------------------------- no launch


def draws() -> tuple[float, float, float]:
    return random.random(), float(np.random.rand()), torch.rand(1).item()


def test_rng_file_is_plain_data_and_restores_every_generator(tmp_path):
    path = tmp_path / RNG_FILE
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.standard_normal()  # a cached Gaussian is part of NumPy's state
    torch.save(rng_state(), path)
    expected = draws()
    assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == []
    set_rng_state(read_rng_file(path))
    assert draws() == expected


def test_old_rng_files_are_refused_by_name(tmp_path):
    path = tmp_path / RNG_FILE
    torch.save({"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}, path)
    with pytest.raises(CheckpointError, match=rf"{RNG_FILE}: refusing to unpickle numpy.*format 1"):
        read_rng_file(path)
    torch.save({"format": 2, "python": {}, "numpy": {}, "torch": torch.get_rng_state()}, path)
    with pytest.raises(CheckpointError, match=rf"{RNG_FILE}: malformed RNG state: KeyError"):
        read_rng_file(path)


def test_deepspeed_own_loads_are_forced_to_data_only(tmp_path, monkeypatch):
    """DeepSpeed's loaders pass ``weights_only=False``; inside the block they load data only."""
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.delenv(FORCE_DATA_ONLY, raising=False)
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.fp16.loss_scaler import LossScaler

    marker = tmp_path / "code-ran"
    evil, good = tmp_path / "evil.pt", tmp_path / "good.pt"
    torch.save({"w": torch.ones(2), "x": CodeInPickle(marker)}, evil)
    torch.save({"w": torch.ones(2), "loss_scaler": LossScaler(1.0)}, good)
    with deepspeed_loads_data_only():
        with pytest.raises(Exception, match=r"Unsupported global: GLOBAL (builtins\.)?exec "):
            TorchCheckpointEngine().load(str(evil), map_location="cpu")
        with pytest.raises(Exception, match=r"Unsupported global: GLOBAL (builtins\.)?exec "):
            torch.load(evil, weights_only=False)  # as zero_to_fp32 and universal loading call it
        loaded = TorchCheckpointEngine().load(str(good), map_location="cpu")
    assert not marker.exists()
    assert isinstance(loaded["loss_scaler"], LossScaler) and loaded["loss_scaler"].cur_scale == 1.0
    assert FORCE_DATA_ONLY not in os.environ
