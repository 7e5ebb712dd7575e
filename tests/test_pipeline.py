"""Train and eval loaders on tiny shards written here with tarfile, per the contract
(docs/contracts.md, "Shards" and "Training batch")."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from test_transforms import GEOMETRIC, MAP_BOX, painted_jpeg, painted_label_map, pixel_classes

from lvvit.data.labelmap import encode_tlm
from lvvit.loader.pipeline import eval_loader, train_loader
from lvvit.loader.targets import build_token_targets
from lvvit.loader.transforms import RandAugment
from lvvit.ports import free_port

JPEG = painted_jpeg(120, 90)
TLM = encode_tlm(painted_label_map())


def write_shards(
    root: Path,
    counts: list[int],
    *,
    tlm: bool = True,
    bad_jpeg: tuple[int, ...] = (),
    bad_tlm: tuple[int, ...] = (),
    manifest_counts: list[int] | None = None,
) -> Path:
    """Shards ``s-%06d.tar`` of ``counts`` samples; sample ``i`` has key ``k000i`` and
    class ``i`` so every sample can be told apart by its label."""
    root.mkdir(parents=True, exist_ok=True)
    index = 0
    entries = []
    for shard, count in enumerate(counts):
        name = f"s-{shard:06d}.tar"
        with tarfile.open(root / name, "w") as tar:
            for _ in range(count):
                members = {"jpg": b"\xff\xd8 not a jpeg" if index in bad_jpeg else JPEG, "cls": str(index).encode()}
                if tlm:
                    members["tlm"] = TLM[:30] if index in bad_tlm else TLM
                for suffix, data in members.items():
                    info = tarfile.TarInfo(f"k{index:04d}.{suffix}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                index += 1
        entries.append({"name": name, "samples": count})
    if manifest_counts is not None:
        for entry, count in zip(entries, manifest_counts, strict=True):
            entry["samples"] = count
    manifest = {"shards": entries, "total": sum(e["samples"] for e in entries)}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def test_train_batches_follow_the_contract(tmp_path: Path) -> None:
    root = write_shards(tmp_path / "d", [6, 7])
    loader = train_loader(root, batch_size=4, img_size=32, num_workers=1, shuffle_buffer=8)
    assert len(loader) == 13 // 4
    for _ in range(2):
        batches = list(loader)
        assert len(batches) == 3
    batch = batches[0]
    assert set(batch) == {"images", "labels", "tlm_values", "tlm_indices", "map_boxes", "crop_boxes", "flips"}
    assert batch["images"].dtype == torch.uint8 and batch["images"].shape == (4, 3, 32, 32)
    assert batch["images"].is_contiguous()
    assert batch["labels"].dtype == torch.int64 and batch["labels"].shape == (4,)
    assert batch["tlm_values"].dtype == torch.float32 and batch["tlm_values"].shape == (4, 2, 6, 9)
    assert batch["tlm_indices"].dtype == torch.int64 and batch["tlm_indices"].shape == (4, 2, 6, 9)
    torch.testing.assert_close(batch["map_boxes"], torch.tensor([MAP_BOX] * 4, dtype=torch.float32))
    boxes = batch["crop_boxes"]
    assert boxes.dtype == torch.float32 and boxes.shape == (4, 4)
    assert (boxes >= 0).all() and (boxes <= 1).all() and (boxes[:, 2:] > boxes[:, :2]).all()
    assert batch["flips"].dtype == torch.bool and batch["flips"].shape == (4,)
    labels = torch.cat([b["labels"] for b in batches])
    assert ((labels >= 0) & (labels < 13)).all()


def test_plain_label_shards_give_no_map_keys(tmp_path: Path) -> None:
    root = write_shards(tmp_path / "d", [5], tlm=False)
    batch = next(iter(train_loader(root, batch_size=2, img_size=32, num_workers=0)))
    assert "tlm_values" not in batch and "tlm_indices" not in batch
    assert batch["images"].shape == (2, 3, 32, 32)


def test_token_targets_from_a_batch_match_its_images(tmp_path: Path) -> None:
    """Shards -> worker transform (draft decode, geometric RandAugment, crop, flip) ->
    batch -> lvvit.loader.targets: each token's target class is the class painted under it."""
    root = write_shards(tmp_path / "d", [32])
    loader = train_loader(
        root, batch_size=32, img_size=64, num_workers=0, erase_prob=0.0,
        randaugment=RandAugment(prob=1.0, ops=GEOMETRIC),
    )  # fmt: skip
    batch = next(iter(loader))
    _, tokens = build_token_targets(
        batch["tlm_values"], batch["tlm_indices"], batch["map_boxes"], batch["crop_boxes"],
        batch["flips"], num_classes=110, out_size=4, smoothing=0.0,
    )  # fmt: skip
    prob, target = tokens.max(-1)
    centres = np.arange(4) * 16 + 8
    seen = np.stack([pixel_classes(img.permute(1, 2, 0).numpy())[np.ix_(centres, centres)].ravel() for img in batch["images"]])
    checked = (prob.numpy() > 0.5) & (seen >= 0)
    assert checked.sum() >= 60
    assert (seen == target.numpy())[checked].mean() >= 0.9
    assert batch["flips"].any() and not batch["flips"].all()


def test_corrupt_samples_are_skipped_and_reported(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = write_shards(tmp_path / "d", [4, 4], bad_jpeg=(2,), bad_tlm=(5,))
    loader = train_loader(root, batch_size=2, img_size=32, num_workers=0, shuffle_buffer=0)
    seen: set[int] = set()
    reports = {}
    with caplog.at_level(logging.WARNING, logger="lvvit.loader.pipeline"):
        for _ in range(12):  # shards are drawn at random: go on until both came round
            for batch in loader:
                seen.update(batch["labels"].tolist())
            reports.update({(s.shard, s.key): s.reason for s in loader.skipped})
            if len(reports) == 2:
                break
    assert seen <= {0, 1, 3, 4, 6, 7} and len(seen) >= 3
    assert set(reports) == {("s-000000.tar", "k0002"), ("s-000001.tar", "k0005")}
    assert reports["s-000000.tar", "k0002"] == "not a decodable image"
    assert "tlm record for sample 'k0005'" in reports["s-000001.tar", "k0005"]
    assert loader.total_skipped >= 2
    assert "s-000000.tar:k0002" in caplog.text and "s-000001.tar:k0005" in caplog.text


def test_a_dataset_where_nothing_decodes_is_an_error_not_a_hang(tmp_path: Path) -> None:
    root = write_shards(tmp_path / "d", [4], tlm=False)
    loader = train_loader(root, batch_size=2, img_size=32, num_workers=0, label_maps=True)
    with pytest.raises(RuntimeError, match=r"in a row failed to decode; the last: s-000000\.tar:k000\d \(missing field 'tlm'\)"):
        next(iter(loader))


def test_missing_shard_is_an_error_naming_it(tmp_path: Path) -> None:
    root = write_shards(tmp_path / "d", [3, 3])
    (root / "s-000001.tar").unlink()
    with pytest.raises(FileNotFoundError, match=r"s-000001\.tar"):
        train_loader(root, batch_size=2)
    with pytest.raises(FileNotFoundError, match=r"s-000001\.tar"):
        eval_loader(root, batch_size=2)
    with pytest.raises(FileNotFoundError, match="manifest"):
        train_loader(tmp_path, batch_size=2)


@pytest.mark.parametrize(("world", "workers"), [(1, 0), (2, 2), (3, 1)])
def test_eval_loader_counts_every_sample_once(tmp_path: Path, world: int, workers: int) -> None:
    # 16 slots by the manifest: sample 7 is corrupt, the last shard holds one fewer than listed.
    root = write_shards(tmp_path / "d", [5, 4, 6], tlm=False, bad_jpeg=(7,), manifest_counts=[5, 4, 7])
    counted: list[int] = []
    batch_counts, skipped = [], set()
    for rank in range(world):
        loader = eval_loader(root, batch_size=4, img_size=32, num_workers=workers, world_size=world, rank=rank)
        batches = list(loader)
        batch_counts.append(len(batches))
        assert len(batches) == len(loader)
        for batch in batches:
            assert batch["images"].shape == (4, 3, 32, 32) and batch["valid"].dtype == torch.bool
            valid = batch["valid"]
            counted += batch["labels"][valid].tolist()
            assert (batch["images"][~valid] == 0).all()
            assert all((image > 0).any() for image in batch["images"][valid])
        skipped |= {(s.shard, s.key) for s in loader.skipped}
    assert len(set(batch_counts)) == 1
    assert sorted(counted) == [i for i in range(15) if i != 7]
    assert skipped == {("s-000001.tar", "k0007"), ("s-000002.tar", "#15")}


RANK_SCRIPT = """
import json, sys
import torch.distributed as dist
from lvvit.loader.pipeline import eval_loader, train_loader

dist.init_process_group("gloo")
root, out = sys.argv[1], sys.argv[2]
train = train_loader(root, batch_size=4, img_size=32, num_workers=1, shuffle_buffer=4)
steps = [sum(1 for _ in train) for _ in range(2)]
full = all(b["images"].shape[0] == 4 for b in train)
evaluation = eval_loader(root, batch_size=4, img_size=32, num_workers=1)
labels, batches = [], 0
for batch in evaluation:
    batches += 1
    labels += batch["labels"][batch["valid"]].tolist()
results = [None] * dist.get_world_size()
dist.all_gather_object(results, {"steps": steps, "full": full, "eval_batches": batches, "labels": labels})
if dist.get_rank() == 0:
    with open(out, "w") as f:
        json.dump(results, f)
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_two_ranks_get_equal_steps_and_split_eval(tmp_path: Path) -> None:
    root = write_shards(tmp_path / "d", [7, 5, 9], bad_jpeg=(4,))
    out = tmp_path / "ranks.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    script = textwrap.dedent(RANK_SCRIPT)
    procs = [
        subprocess.Popen([sys.executable, "-c", script, str(root), str(out)], env={**env, "RANK": str(rank)})
        for rank in range(2)
    ]
    assert [p.wait(timeout=180) for p in procs] == [0, 0]
    ranks = json.loads(out.read_text())
    assert [r["steps"] for r in ranks] == [[2, 2], [2, 2]]  # 21 samples // (4 per batch * 2 ranks)
    assert all(r["full"] for r in ranks)
    assert ranks[0]["eval_batches"] == ranks[1]["eval_batches"] == 3  # ceil(ceil(21 / 2) / 4)
    labels = ranks[0]["labels"] + ranks[1]["labels"]
    assert sorted(labels) == [i for i in range(21) if i != 4]
    assert not set(ranks[0]["labels"]) & set(ranks[1]["labels"])
