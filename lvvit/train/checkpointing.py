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

Every file of a tag is read as data (docs/training.md, "Checkpoint files are data"): ours
with ``load_data`` and no allowlist, DeepSpeed's through its own loaders inside
``deepspeed_loads_data_only`` after ``check_tag_files`` has refused, by name, any file
holding more than tensors, plain values and DeepSpeed's few data types.
"""

from __future__ import annotations

import contextlib
import logging
import random
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from lvvit import atomic
from lvvit.environ import scoped_environ
from lvvit.errors import ConfigError, exits_on_error, first_line
from lvvit.models.checkpoint import MODEL_ARGS_FILE, CheckpointError, check_data, load_data
from lvvit.train.ema import ModelEma
from lvvit.train.state import GlobalBatchMismatch, TrainState

log = logging.getLogger("lvvit.train")

TAG_RE = re.compile(r"^step(\d{8})$")
EMA_FILE = "lvvit_ema.pt"
WEIGHTS_FILE = "weights.pth"
RNG_FORMAT = 2
"""``lvvit_rng_rankR.pt`` layout: tensors and plain values. Format 1 pickled NumPy objects and
is refused (it cannot be read as data)."""
FORCE_DATA_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
FORCE_PICKLE = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


def step_tag(step: int) -> str:
    return f"step{step:08d}"


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` through ``lvvit.atomic``: a crash never leaves a complete-looking file."""
    with atomic.atomic_path(path) as tmp:
        torch.save(obj, tmp)


def rng_state() -> dict[str, Any]:
    """This process's Python, NumPy and torch RNG as tensors and plain values, so the file
    loads with ``weights_only=True`` and no allowlist."""
    py_version, py_state, py_gauss = random.getstate()
    _, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "format": RNG_FORMAT,
        "python": {"version": py_version, "state": torch.tensor(py_state, dtype=torch.int64),
                   "gauss_next": py_gauss},
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "torch": torch.get_rng_state(),
    }


RngStates = tuple[tuple, tuple, torch.Tensor]


def parse_rng_state(state: Any) -> RngStates:
    """The (python, numpy, torch) states ``random``/``np.random``/``torch`` take, checked so that
    restoring them cannot fail half way. Raises ``ValueError`` naming the field at fault."""
    if not isinstance(state, dict) or state.get("format") != RNG_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"not an RNG state of format {RNG_FORMAT} (format: {found!r})")
    try:
        py, npy, torch_state = state["python"], state["numpy"], state["torch"]
        python = (int(py["version"]), tuple(int(x) for x in _tensor(py["state"], 625, "python.state").tolist()),
                  None if py["gauss_next"] is None else float(py["gauss_next"]))
        keys = _tensor(npy["keys"], 624, "numpy.keys").numpy().astype(np.uint32)
        numpy_ = ("MT19937", keys, int(npy["pos"]), int(npy["has_gauss"]), float(npy["cached_gaussian"]))
    except (KeyError, TypeError) as err:
        raise ValueError(f"malformed RNG state: {type(err).__name__}: {err}") from err
    expected = torch.get_rng_state()
    if not isinstance(torch_state, torch.Tensor) or torch_state.dtype != expected.dtype or (
            torch_state.shape != expected.shape):
        raise ValueError(f"'torch' is not a {expected.dtype} tensor of shape {tuple(expected.shape)}")
    return python, numpy_, torch_state


def _tensor(value: Any, numel: int, field: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.dtype != torch.int64 or value.shape != (numel,):
        raise ValueError(f"'{field}' is not an int64 tensor of {numel} values")
    return value


def set_rng_state(states: RngStates) -> None:
    python, numpy_, torch_state = states
    random.setstate(python)
    np.random.set_state(numpy_)
    torch.set_rng_state(torch_state)


def read_rng_file(path: Path) -> RngStates:
    """A rank's RNG file as data, checked; ``CheckpointError`` naming the file otherwise."""
    try:
        state = load_data(path, allowed=())
    except CheckpointError as err:
        if "refusing to unpickle numpy" not in str(err):
            raise
        raise CheckpointError(f"{err} (an RNG file of format 1, which pickled NumPy state)") from err
    try:
        return parse_rng_state(state)
    except ValueError as err:
        raise CheckpointError(f"{path}: {err}") from err


def read_ema_file(path: Path) -> dict[str, torch.Tensor]:
    """``lvvit_ema.pt`` as data: a mapping of names to tensors, or a ``CheckpointError``."""
    state = load_data(path, allowed=())
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected an EMA (parameter names -> tensors), found a "
                              f"{type(state).__name__}")
    bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: expected an EMA (parameter names -> tensors); entry {bad[0]!r} "
                              f"holds a {type(state[bad[0]]).__name__}")
    return state


def deepspeed_safe_globals() -> list[type]:
    """The non-tensor types in DeepSpeed's own files (listed from real ZeRO-1/2/3, bf16 and
    universal checkpoints): the optimizer partitions' loss scaler (``DynamicLossScaler``
    under fp16), ZeRO stage and fragment addresses. Rebuilding them sets attributes and
    runs none of the file's code."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def deepspeed_loads_data_only() -> Iterator[None]:
    """Every ``torch.load`` inside the block loads data only (``weights_only=True`` with
    ``deepspeed_safe_globals``), DeepSpeed's own included: its checkpoint engine,
    ``zero_to_fp32`` and universal-checkpoint loading pass ``weights_only=False``, and torch's
    ``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` overrides that argument at every call."""
    with scoped_environ({FORCE_DATA_ONLY: "1", FORCE_PICKLE: None}), \
            torch.serialization.safe_globals(deepspeed_safe_globals()):
        yield


def rank_buffers(module: torch.nn.Module, ema: ModelEma | None = None) -> dict[str, torch.Tensor]:
    """This rank's floating-point buffers (BatchNorm running statistics) and, as ``ema.NAME``,
    their EMA shadows. Each rank's are its own until the epoch end averages them, and
    DeepSpeed (like ``lvvit_ema.pt``) saves only rank 0's, so without these a resumed rank
    would carry rank 0's statistics into that average."""
    out = {n: b.detach().cpu().clone() for n, b in module.named_buffers() if b.dtype.is_floating_point}
    if ema is not None:
        out.update({f"ema.{k}": ema.shadow[k].detach().cpu().clone() for k in ema.buffers})
    return out


def read_buffers_file(path: Path, module: torch.nn.Module, ema: ModelEma | None) -> dict[str, torch.Tensor]:
    """A rank's buffers file as data, each name and shape the module's; ``CheckpointError`` else."""
    state = load_data(path, allowed=())
    expected = rank_buffers(module, ema)
    if not isinstance(state, dict) or set(state) != set(expected):
        raise CheckpointError(f"{path}: its buffers are not the model's floating-point buffers")
    for name, value in state.items():
        if not isinstance(value, torch.Tensor) or value.shape != expected[name].shape:
            raise CheckpointError(f"{path}: '{name}' is not a tensor of shape {tuple(expected[name].shape)}")
    return state


def check_tag_files(tag_dir: Path) -> None:
    """Refuse a tag before DeepSpeed reads it if any of its files (universal ones included)
    holds more than data; the error names the file. Ours (``lvvit_*``) are checked as read."""
    allowed = deepspeed_safe_globals()
    for path in sorted(Path(tag_dir).rglob("*.pt")):
        if not path.name.startswith("lvvit_"):
            check_data(path, allowed)


def read_latest(directory: Path, name: str = "latest") -> str:
    """The tag that ``directory/name`` points at, checked to be a folder beside it."""
    path = Path(directory) / name
    if not path.is_file():
        raise CheckpointError(f"no checkpoint in {directory} (no '{name}' file)")
    tag = path.read_bytes()[:256].decode(errors="replace").strip()
    if not tag or "/" in tag or tag in (".", "..") or not (path.parent / tag).is_dir():
        raise CheckpointError(f"{path} names tag {tag!r}, but there is no folder {path.parent / tag}")
    return tag


def write_latest(directory: Path, tag: str) -> None:
    """Point ``latest`` (DeepSpeed's format: the tag name) at a complete tag, atomically."""
    atomic.write_text(directory / "latest", tag)


@dataclass(frozen=True)
class SavePolicy:
    """Which steps end in a checkpoint: every ``--save-every`` (epoch ends save anyway) and
    ``--max-steps``, where the run stops."""

    every: int
    max_steps: int | None

    def stops(self, step: int) -> bool:
        return self.max_steps is not None and step >= self.max_steps

    def due(self, step: int, epoch_done: bool) -> bool:
        return self.stops(step) or bool(self.every and step % self.every == 0 and not epoch_done)


class Checkpointer:
    """Saves on every rank (DeepSpeed needs all of them), keeps the newest ``keep`` tags.

    Owns the run's ``TrainState`` (written into DeepSpeed's client state under ``lvvit``,
    checked on resume), the ``SavePolicy`` and the consolidated ``weights.pth``.
    """

    def __init__(self, engine, directory: Path, keep: int, ema: ModelEma | None, state: TrainState,
                 policy: SavePolicy) -> None:
        if keep < 1:  # rotation would delete the tag just written (train.py refuses --keep < 1)
            raise ValueError(f"keep must be >= 1, not {keep}")
        self.engine = engine
        self.directory = Path(directory)
        self.keep = keep
        self.ema = ema
        self.state = state
        self.policy = policy
        self.last_tag: str | None = None
        self.loaded_from: Path | None = None  # the tag folder ``resume`` loaded
        self.weights_written = False

    def client_state(self, extra: dict[str, Any]) -> dict[str, Any]:
        """Ours under ``lvvit`` (the state and ``extra``); the empty ``universal_checkpoint_info``
        tells DeepSpeed's ``ds_to_universal`` that plain data-parallel weights need no
        re-sharding rules."""
        return {"universal_checkpoint_info": {}, "lvvit": {**self.state.state_dict(), **extra}}

    def save(self, extra: dict[str, Any]) -> str:
        """Collective: the current step as a tag with the state and ``extra`` in its client state."""
        tag = step_tag(self.engine.global_steps)
        self.state.step = self.engine.global_steps
        ema_state = self.ema.full_state_dict() if self.ema is not None else None
        self.engine.save_checkpoint(str(self.directory), tag=tag, client_state=self.client_state(extra),
                                    save_latest=False)
        rank = dist.get_rank()
        atomic_torch_save(rng_state(), self.directory / tag / f"lvvit_rng_rank{rank}.pt")
        atomic_torch_save(rank_buffers(self.engine.module, self.ema),
                          self.directory / tag / f"lvvit_buffers_rank{rank}.pt")
        if rank == 0 and ema_state is not None:
            atomic_torch_save(ema_state, self.directory / tag / EMA_FILE)
        if rank == 0 and "model_args" in extra:  # for weights that other tools consolidate
            for folder in (self.directory, self.directory.parent):
                atomic.write_json(folder / MODEL_ARGS_FILE, {"model_args": extra["model_args"]})
        dist.barrier()  # every rank's files of the tag are complete
        if rank == 0:
            write_latest(self.directory, tag)
            self._rotate()
        dist.barrier()
        self.last_tag = tag
        return tag

    def saved_current(self) -> bool:
        """Whether the engine's current step is saved already (the last tag is its)."""
        return self.last_tag == step_tag(self.engine.global_steps)

    def write_weights(self, out: Path, model_args: dict[str, Any]) -> None:
        """Collective: consolidated fp32 weights (+ EMA) of the last tag, written by rank 0."""
        if dist.get_rank() == 0:
            consolidate(self.directory, self.last_tag, out, model_args)
            log.info("wrote %s", out)
        dist.barrier()
        self.weights_written = True

    def _rotate(self) -> None:
        tags = sorted(t.name for t in self.directory.iterdir() if t.is_dir() and TAG_RE.match(t.name))
        for old in tags[: max(len(tags) - self.keep, 0)]:
            shutil.rmtree(self.directory / old, ignore_errors=True)

    def resume(self, which: str) -> dict[str, Any]:
        """Load model, optimizer, scheduler and step; restore the state, EMA and this rank's RNG;
        returns our client state (``lvvit``: the MLflow run id among it).

        ``which``: ``latest``, a tag in the checkpoint folder, or a tag folder anywhere. Every
        rank checks every file of the tag before DeepSpeed reads any, so a bad file stops all
        ranks alike with one line naming it (``ConfigError``).
        """
        try:
            tag_dir = self.locate(which)
            check_tag_files(tag_dir)
            rng = self.read_rng(tag_dir)
            buffers_file = tag_dir / f"lvvit_buffers_rank{dist.get_rank()}.pt"
            buffers = read_buffers_file(buffers_file, self.engine.module, self.ema) if buffers_file.is_file() else None
            if self.ema is not None:
                self.restore_ema(tag_dir)
        except (CheckpointError, FileNotFoundError) as err:
            raise ConfigError(f"--resume: {err}") from None
        ours = self.load_engine(tag_dir).get("lvvit", {})
        if buffers is not None:  # this rank's own statistics over rank 0's (older tags: rank 0's)
            own = dict(self.engine.module.named_buffers())
            if self.ema is not None:
                own.update({f"ema.{k}": self.ema.shadow[k] for k in self.ema.buffers})
            with torch.no_grad():
                for name, value in buffers.items():
                    own[name].copy_(value)
        try:
            self.state.load_state_dict(ours)
        except GlobalBatchMismatch as err:
            raise ConfigError(f"--resume {tag_dir}: {err}") from None
        self.state.step = self.engine.global_steps
        if rng is not None:
            set_rng_state(rng)
        self.last_tag = tag_dir.name
        self.loaded_from = tag_dir
        return ours

    def locate(self, which: str) -> Path:
        """The tag folder ``which`` names; ``latest`` is read (``latest_universal`` under
        ``--universal``, as DeepSpeed does) and must name a folder beside it."""
        if which == "latest":
            universal = self.engine.load_universal_checkpoint()
            return self.directory / read_latest(self.directory, "latest_universal" if universal else "latest")
        candidate = Path(which)
        tag_dir = candidate if candidate.is_dir() else self.directory / which
        if not tag_dir.is_dir():
            raise CheckpointError(f"no checkpoint folder {tag_dir}")
        return tag_dir

    def read_rng(self, tag_dir: Path) -> RngStates | None:
        """This rank's RNG file, read and checked. A tag is saved by every rank, so a missing
        file is an error, except under ``--universal``, where ranks beyond the saving run's
        count have none and keep their fresh seeds."""
        rank = dist.get_rank()
        path = tag_dir / f"lvvit_rng_rank{rank}.pt"
        if path.is_file():
            return read_rng_file(path)
        if self.engine.load_universal_checkpoint():
            return None
        raise CheckpointError(f"{path} is missing (every rank saves its RNG; was the tag copied whole?)")

    def restore_ema(self, tag_dir: Path) -> None:
        """The tag's EMA into ``self.ema``; checked whole first, so a bad file changes nothing."""
        path = tag_dir / EMA_FILE
        if not path.is_file():
            raise CheckpointError(f"{path} is missing; pass --no-model-ema or copy it there")
        state = read_ema_file(path)
        try:
            self.ema.load_full_state_dict(state)
        except ValueError as err:
            raise CheckpointError(f"{path}: {err}") from err

    def load_engine(self, tag_dir: Path) -> dict[str, Any]:
        """DeepSpeed's load of the (already checked) tag, its loads forced to data only."""
        try:
            with deepspeed_loads_data_only():
                load_path, client_state = self.engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
        except Exception as err:  # DeepSpeed reports damaged files with many exception types
            raise ConfigError(f"--resume: DeepSpeed cannot load {tag_dir}: {first_line(err)}") from None
        if load_path is None:
            raise ConfigError(f"--resume: DeepSpeed could not load a checkpoint from {tag_dir}")
        return client_state


def consolidate(
    checkpoint_dir: Path, tag: str | None, out: Path, model_args: dict[str, Any] | None = None
) -> Path:
    """fp32 weights (+ EMA) of a tag in the official layout: ``{'state_dict', 'state_dict_ema',
    'model_args'}``. Reads the fp32 master copy from the optimizer partitions, so bf16 runs
    lose nothing. Runs in one process, after the ranks have saved. The weights are written
    even when the EMA cannot be read (that error is raised after the write).
    """
    checkpoint_dir = Path(checkpoint_dir)
    if tag is None:
        tag = read_latest(checkpoint_dir)
    tag_dir = checkpoint_dir / tag
    if not tag_dir.is_dir():
        raise CheckpointError(f"no checkpoint folder {tag_dir}")
    check_tag_files(tag_dir)
    try:
        with deepspeed_loads_data_only():
            state_dict = fp32_state_dict(checkpoint_dir, tag)
    except (ValueError, OSError):  # these name the file already
        raise
    except Exception as err:  # DeepSpeed's zero_to_fp32 reports damaged files with many types
        raise CheckpointError(f"{tag_dir}: cannot merge DeepSpeed's partitions: {first_line(err)}") from err
    state_dict = {k: v.detach().float() if v.is_floating_point() else v for k, v in state_dict.items()}
    if model_args is None:
        model_args = client_state_of(checkpoint_dir, tag).get("model_args", {})
    payload: dict[str, Any] = {"state_dict": state_dict, "model_args": model_args}
    ema_file = checkpoint_dir / tag / EMA_FILE
    try:
        if ema_file.exists():
            ema = read_ema_file(ema_file)
            # the EMA averages floating tensors only; integer buffers come from the weights
            payload["state_dict_ema"] = {k: ema.get(k, v) for k, v in state_dict.items()}
    finally:
        atomic_torch_save(payload, Path(out))
    return Path(out)


def fp32_state_dict(checkpoint_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """The fp32 weights of a tag. Under ZeRO 1-3 the fp32 master copy sits in the optimizer
    partitions (``*zero_pp_rank_*optim_states.pt``), which DeepSpeed's ``zero_to_fp32`` merges.
    Without ZeRO (stage 0) there are no partitions and no ``param_shapes`` (``zero_to_fp32``
    fails on them with a TypeError), and the module saved in ``mp_rank_00_model_states.pt`` is
    itself the full fp32 weights: the config check refuses bf16/fp16 at stage 0.
    """
    tag_dir = Path(checkpoint_dir) / tag
    if any(tag_dir.glob("*zero_pp_rank_*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=tag)
    path = tag_dir / "mp_rank_00_model_states.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{tag_dir}: neither ZeRO optimizer partitions nor {path.name}")
    module = torch.load(path, map_location="cpu", weights_only=True)["module"]
    low = sorted(k for k, v in module.items() if v.is_floating_point() and v.dtype != torch.float32)
    if low:
        raise ValueError(f"{path}: {low[0]} is {module[low[0]].dtype} and there is no fp32 master copy (ZeRO stage 0)")
    return module


def client_state_of(checkpoint_dir: Path, tag: str) -> dict[str, Any]:
    """Our client state from a tag's model-states file (any ZeRO stage)."""
    files = sorted((Path(checkpoint_dir) / tag).glob("*model_states.pt"))
    if not files:
        raise FileNotFoundError(f"no *model_states.pt in {Path(checkpoint_dir) / tag}")
    state = load_data(files[0], deepspeed_safe_globals())
    ours = state.get("lvvit", {}) if isinstance(state, dict) else None
    if not isinstance(ours, dict):
        raise CheckpointError(f"{files[0]}: expected DeepSpeed's model states with our 'lvvit' client state")
    return ours


def main(argv: list[str] | None = None) -> None:
    """``python -m lvvit.train.checkpointing CKPT_DIR [--tag T] --out weights.pth``."""
    import argparse

    p = argparse.ArgumentParser(description="Consolidate a DeepSpeed checkpoint into fp32 weights (+ EMA).")
    p.add_argument("checkpoint_dir", type=Path, help="OUTPUT/checkpoints")
    p.add_argument("--tag", default=None, help="default: the 'latest' one")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    with exits_on_error():
        try:
            path = consolidate(args.checkpoint_dir, args.tag, args.out)
        except (CheckpointError, FileNotFoundError) as err:
            raise ConfigError(f"error: {err}") from None
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
