"""What ships with the package and what it lets users run (docs/training.md):

- the DeepSpeed configs are package data: the default resolves through ``importlib.resources``,
  also in a wheel installed away from the checkout, and the root ``ds_configs/`` that users
  pass on the command line holds identical copies;
- the ``zero_to_fp32.py`` that DeepSpeed leaves in a checkpoint folder runs in this
  environment and gives the same weights as our own consolidation (``weights.pth``).
"""

from __future__ import annotations

import importlib.resources
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from test_train import COMMON, REPO, launch, write_shards

from lvvit.models import create_model
from lvvit.models.checkpoint import load_data, load_weights, read_checkpoint
from lvvit.train.config import DS_CONFIGS_PACKAGE, default_ds_config_path

ROOT_CONFIGS = REPO / "ds_configs"


def test_root_configs_are_the_packaged_ones():
    packaged = {p.name: p.read_bytes() for p in importlib.resources.files(DS_CONFIGS_PACKAGE).iterdir()
                if p.name.endswith(".json")}
    root = {p.name: p.read_bytes() for p in ROOT_CONFIGS.glob("*.json")}
    assert set(packaged) == {"cpu.json", "zero1.json", "zero2.json", "zero3.json", "zero3_offload.json"}
    assert root == packaged


def test_default_config_resolves_through_importlib_resources(monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    path = default_ds_config_path()
    assert path == Path(str(importlib.resources.files(DS_CONFIGS_PACKAGE) / "cpu.json"))
    assert path.read_bytes() == (ROOT_CONFIGS / "cpu.json").read_bytes()


@pytest.mark.slow
def test_an_installed_wheel_finds_its_default_config(tmp_path):
    """Built and installed away from the checkout, the default config is the wheel's own."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "dist"), str(REPO)], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("lvvit-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {f"lvvit/train/ds_configs/{p.name}" for p in ROOT_CONFIGS.glob("*.json")} <= set(names)
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    code = "from lvvit.train.config import default_ds_config_path as d; print(d())"
    env = {**os.environ, "PYTHONPATH": str(site), "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    found = Path(proc.stdout.strip())
    assert found == site / "lvvit" / "train" / "ds_configs" / "cpu.json"
    assert found.read_bytes() == (ROOT_CONFIGS / "cpu.json").read_bytes()


@pytest.mark.slow
def test_deepspeeds_zero_to_fp32_runs_and_matches_our_weights(tmp_path):
    """Two steps of a one-process ZeRO-2 run; the checkpoint folder's own script, run as
    docs/training.md shows, writes the weights that our consolidation writes."""
    shards = write_shards(tmp_path / "shards", 32, 16, tlm=False, seed=5)
    out = tmp_path / "run"
    launch(["--train-shards", str(shards), "--output", str(out), "--no-mlflow", "--no-eval",
            "--deepspeed_config", str(ROOT_CONFIGS / "cpu.json"), *COMMON, "--max-steps", "2"], None, ranks=0)
    checkpoints = out / "checkpoints"
    script = checkpoints / "zero_to_fp32.py"
    assert script.is_file()
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(script), ".", "../fp32", "--safe_serialization"],  # as the docs
                          cwd=checkpoints, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours_proc = subprocess.run([sys.executable, "-m", "lvvit.train.checkpointing", str(checkpoints), "--out",
                                str(tmp_path / "ours.pth")], env=env, capture_output=True, text=True, timeout=300)
    assert ours_proc.returncode == 0, ours_proc.stderr[-3000:]
    from safetensors.torch import load_file

    theirs = load_file(out / "fp32" / "model.safetensors")
    ours_file = load_data(tmp_path / "ours.pth")
    ours = ours_file["state_dict"]
    # the bare state dict still names its architecture: OUTPUT/lvvit_model.json, one folder up
    converted = read_checkpoint(out / "fp32" / "model.safetensors")
    assert converted.model_args == ours_file["model_args"] and converted.model_args["depth"] == 2
    model = create_model(**converted.model_args)
    load_weights(model, converted)
    assert torch.equal(model.state_dict()["head.weight"], ours["head.weight"])
    assert set(theirs) <= set(ours)
    # zero_to_fp32 writes parameters and the buffers DeepSpeed recorded; ours has them all.
    assert {k for k in ours if k not in theirs} <= {k for k in ours if "num_batches_tracked" in k}
    assert any(k.endswith("running_mean") for k in theirs)
    for key, value in theirs.items():
        assert value.dtype == ours[key].dtype, key
        assert torch.equal(value, ours[key]), key
