"""DeepSpeed checkpoints with our training state, rotation, and consolidated fp32 weights.

A tag folder ``OUTPUT/checkpoints/stepNNNNNNNN/`` holds DeepSpeed's files (model and
optimizer partitions, lr scheduler, global step, and our small client state: epoch,
position in the epoch, MLflow run id) plus ours: ``lvvit_ema.pt`` (the full EMA, written by
rank 0, so it re-slices onto any rank count) and ``lvvit_rng_rankR.pt`` (each rank's RNG).
``latest`` is ours, not DeepSpeed's: DeepSpeed's rank 0 writes it (in place, not atomically)
as soon as its own files are saved, while other ranks may still be writing their
partitions and before our EMA/RNG files exist. We save with ``save_latest=False`` and
rank 0 replaces ``latest`` atomically only after a barrier that follows every rank's files,
so a run killed mid-save resumes from the previous, complete tag; the half-written folder
is rewritten when the resumed run reaches that step again.
"""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from lvvit import atomic
from lvvit.train.ema import ModelEma

TAG_RE = re.compile(r"^step(\d{8})$")
EMA_FILE = "lvvit_ema.pt"
WEIGHTS_FILE = "weights.pth"


def step_tag(step: int) -> str:
    return f"step{step:08d}"


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` through ``lvvit.atomic``: a crash never leaves a complete-looking file."""
    with atomic.atomic_path(path) as tmp:
        torch.save(obj, tmp)


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def write_latest(directory: Path, tag: str) -> None:
    """Point ``latest`` (DeepSpeed's format: the tag name) at a complete tag, atomically."""
    atomic.write_text(directory / "latest", tag)


class Checkpointer:
    """Saves on every rank (DeepSpeed needs all of them), keeps the newest ``keep`` tags."""

    def __init__(self, engine, directory: Path, keep: int, ema: ModelEma | None) -> None:
        self.engine = engine
        self.directory = Path(directory)
        self.keep = keep
        self.ema = ema
        self.last_tag: str | None = None
        self.loaded_from: Path | None = None  # the tag folder ``resume`` loaded

    def save(self, client_state: dict[str, Any]) -> str:
        tag = step_tag(self.engine.global_steps)
        ema_state = self.ema.full_state_dict() if self.ema is not None else None
        self.engine.save_checkpoint(str(self.directory), tag=tag, client_state=client_state, save_latest=False)
        rank = dist.get_rank()
        atomic_torch_save(rng_state(), self.directory / tag / f"lvvit_rng_rank{rank}.pt")
        if rank == 0 and ema_state is not None:
            atomic_torch_save(ema_state, self.directory / tag / EMA_FILE)
        dist.barrier()  # every rank's files of the tag are complete
        if rank == 0:
            write_latest(self.directory, tag)
            self._rotate()
        dist.barrier()
        self.last_tag = tag
        return tag

    def _rotate(self) -> None:
        tags = sorted(t.name for t in self.directory.iterdir() if t.is_dir() and TAG_RE.match(t.name))
        for old in tags[: max(len(tags) - self.keep, 0)]:
            shutil.rmtree(self.directory / old, ignore_errors=True)

    def resume(self, which: str) -> dict[str, Any]:
        """Load model, optimizer, scheduler and step; restore EMA and this rank's RNG.

        ``which``: ``latest``, a tag in the checkpoint folder, or a tag folder anywhere.
        """
        directory, tag = self.directory, None
        if which != "latest":
            candidate = Path(which)
            if candidate.is_dir():
                directory, tag = candidate.parent, candidate.name
            else:
                tag = which
        if tag is None and not (directory / "latest").exists():
            raise SystemExit(f"--resume: no checkpoint in {directory} (no 'latest' file)")
        if tag is not None and not (directory / tag).is_dir():
            raise SystemExit(f"--resume: no checkpoint folder {directory / tag}")
        load_path, client_state = self.engine.load_checkpoint(str(directory), tag=tag)
        if load_path is None:
            raise SystemExit(f"--resume: DeepSpeed could not load a checkpoint from {directory}")
        tag_dir = Path(load_path).parent
        if self.ema is not None:
            ema_file = tag_dir / EMA_FILE
            if not ema_file.exists():
                raise SystemExit(f"--resume: {ema_file} is missing; pass --no-model-ema or copy it there")
            self.ema.load_full_state_dict(torch.load(ema_file, map_location="cpu"))
        rng_file = tag_dir / f"lvvit_rng_rank{dist.get_rank()}.pt"
        if rng_file.exists():
            set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=False))
        self.last_tag = tag_dir.name
        self.loaded_from = tag_dir
        return client_state


def consolidate(
    checkpoint_dir: Path, tag: str | None, out: Path, model_args: dict[str, Any] | None = None
) -> Path:
    """fp32 weights (+ EMA) of a tag in the official layout: ``{'state_dict', 'state_dict_ema',
    'model_args'}``. Reads the fp32 master copy from the optimizer partitions, so bf16 runs
    lose nothing. Runs in one process, after the ranks have saved.
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    checkpoint_dir = Path(checkpoint_dir)
    if tag is None:
        tag = (checkpoint_dir / "latest").read_text().strip()
    state_dict = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=tag)
    state_dict = {k: v.detach().float() if v.is_floating_point() else v for k, v in state_dict.items()}
    payload: dict[str, Any] = {"state_dict": state_dict}
    ema_file = checkpoint_dir / tag / EMA_FILE
    if ema_file.exists():
        ema = torch.load(ema_file, map_location="cpu")
        # the EMA averages floating tensors only; integer buffers come from the weights
        payload["state_dict_ema"] = {k: ema.get(k, v) for k, v in state_dict.items()}
    if model_args is None:
        model_args = client_state_of(checkpoint_dir, tag).get("model_args", {})
    payload["model_args"] = model_args
    atomic_torch_save(payload, Path(out))
    return Path(out)


def client_state_of(checkpoint_dir: Path, tag: str) -> dict[str, Any]:
    """Our client state from a tag's model-states file (any ZeRO stage)."""
    files = sorted((Path(checkpoint_dir) / tag).glob("*model_states.pt"))
    if not files:
        raise FileNotFoundError(f"no *model_states.pt in {Path(checkpoint_dir) / tag}")
    state = torch.load(files[0], map_location="cpu", weights_only=False)
    return state.get("lvvit", {})


def main(argv: list[str] | None = None) -> None:
    """``python -m lvvit.train.checkpointing CKPT_DIR [--tag T] --out weights.pth``."""
    import argparse

    p = argparse.ArgumentParser(description="Consolidate a DeepSpeed checkpoint into fp32 weights (+ EMA).")
    p.add_argument("checkpoint_dir", type=Path, help="OUTPUT/checkpoints")
    p.add_argument("--tag", default=None, help="default: the 'latest' one")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    path = consolidate(args.checkpoint_dir, args.tag, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
