"""Training guards, each in one launcher-less ``python train.py`` process (no DeepSpeed
launcher, tiny LV-ViT, tiny shards):

- a DeepSpeed JSON with a misspelt top-level key stops before the model is built, naming
  the key and its correction, with no output written;
- a run without ZeRO (stage 0, whose checkpoints have no optimizer partitions) still
  consolidates ``weights.pth``, and writes it even though the final eval then fails.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from test_train import COMMON, REPO, TINY_ARGS, jpeg, launch, write_shards

from lvvit.models import create_model

pytestmark = pytest.mark.slow

# 32 samples, micro batch 8, one rank, one epoch: 4 steps
ONE_EPOCH = [*COMMON, "--epochs", "1", "--cooldown-epochs", "0", "--save-every", "0"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_shards(tmp_path_factory.mktemp("guards") / "train", 32, 16, tlm=False, seed=5)


def ds_config(tmp: Path, **changes) -> Path:
    cfg = json.loads((REPO / "ds_configs" / "cpu.json").read_text()) | changes
    path = tmp / "ds.json"
    path.write_text(json.dumps(cfg))
    return path


def eval_shards_with_unknown_class(folder: Path, label: int) -> Path:
    """Eval shards whose class index is beyond the model's head: the eval itself fails."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    with wds.TarWriter(str(folder / "data-000000.tar")) as sink:
        for i in range(4):
            sink.write({"__key__": f"e{i}", "jpg": jpeg((220, 30, 30), rng), "cls": str(label).encode()})
    (folder / "manifest.json").write_text(json.dumps({"shards": [{"name": "data-000000.tar", "samples": 4}],
                                                      "total": 4}))
    return folder


def test_misspelt_deepspeed_key_stops_before_any_compute(shards, tmp_path):
    cfg = json.loads((REPO / "ds_configs" / "cpu.json").read_text())
    cfg["zero_optimisation"] = cfg.pop("zero_optimization")
    path = tmp_path / "typo.json"
    path.write_text(json.dumps(cfg))
    out = tmp_path / "out"
    start = time.monotonic()
    proc = launch(["--train-shards", str(shards), "--output", str(out), "--no-mlflow", "--no-eval",
                   "--deepspeed_config", str(path), *ONE_EPOCH], None, ranks=0, check=False)
    elapsed = time.monotonic() - start
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"--deepspeed_config {path}: unknown key 'zero_optimisation' (did you mean 'zero_optimization'?)")
    assert "Traceback" not in proc.stderr
    assert "step " not in proc.stdout + proc.stderr  # no step logged
    assert not out.exists()  # no checkpoint, not even the run folder
    assert elapsed < 120  # generous: one process start and a DeepSpeed import


def test_stage0_weights_written_although_the_final_eval_fails(shards, tmp_path):
    out = tmp_path / "out"
    eval_dir = eval_shards_with_unknown_class(tmp_path / "eval", label=9)
    proc = launch(["--train-shards", str(shards), "--eval-shards", str(eval_dir), "--output", str(out),
                   "--no-mlflow", "--deepspeed_config", str(ds_config(tmp_path, zero_optimization={"stage": 0})),
                   *ONE_EPOCH], None, ranks=0, check=False)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0, text[-3000:]
    assert "Target 9 is out of bounds" in text  # the final eval failed ...
    tag = out / "checkpoints" / "step00000004"
    assert (out / "checkpoints" / "latest").read_text() == tag.name
    assert not list(tag.glob("*optim_states.pt"))  # ... on a checkpoint without ZeRO partitions
    payload = torch.load(out / "weights.pth", map_location="cpu", weights_only=True)
    assert set(payload) == {"state_dict", "state_dict_ema", "model_args"}
    assert payload["model_args"] == {"name": "lvvit_t", "img_size": 64, "num_classes": 4, **TINY_ARGS}
    module = torch.load(tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)["module"]
    assert payload["state_dict"].keys() == module.keys()
    assert all(torch.equal(payload["state_dict"][k], v) for k, v in module.items())
    assert payload["state_dict"]["pos_embed"].dtype == torch.float32
    ema = create_model(**payload["model_args"])
    ema.load_state_dict(payload["state_dict_ema"], strict=True)
    assert not torch.equal(ema.state_dict()["head.weight"], payload["state_dict"]["head.weight"])
