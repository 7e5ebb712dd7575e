"""Loading official TokenLabeling checkpoints and ours into LV-ViT.

Files are read with ``torch.load(weights_only=True)``: a checkpoint is data, and
unpickling arbitrary objects from it would run code chosen by whoever wrote it. The
only non-tensor type allowed is ``argparse.Namespace``, which the official (timm-style)
files carry as ``args``. ``load_data`` and ``check_data`` are the one place that decides
how any checkpoint file of the stack is read (DeepSpeed's files pass their own allowlist).
"""

from __future__ import annotations

import argparse
import logging
import math
import pickle
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lvvit.errors import LvvitError
from lvvit.models.lvvit import LVViT, init_linear

_logger = logging.getLogger(__name__)

SAFE_GLOBALS = [argparse.Namespace]
"""Non-tensor types a checkpoint may contain; everything else is refused."""

WEIGHT_KEYS = ("state_dict", "model", "module")
"""Container keys holding the trained weights: timm, DeiT/torchvision, DeepSpeed."""

EMA_KEYS = ("state_dict_ema", "model_ema")
"""Container keys holding the EMA weights: timm, DeiT."""

WRAPPER_PREFIXES = ("module.", "_orig_mod.")
"""Key prefixes added by DataParallel/DDP/DeepSpeed and by ``torch.compile``."""

HEAD_PREFIXES = ("head.", "aux_head.")


class CheckpointError(LvvitError, ValueError):
    """A checkpoint file that cannot be read, or whose weights do not fit the model."""


class ClassCountMismatch(CheckpointError):
    """The file's classifier has ``found`` classes where the model was asked for another count
    and re-initialised heads are not acceptable (evaluation, export, labeling)."""

    def __init__(self, path: Path, found: int, wanted: int) -> None:
        super().__init__(f"{path}: the checkpoint has {found} classes, the model {wanted}")
        self.found = found


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint file, read once: its weights (bare model names, on the CPU) and the
    ``model_args`` that our training records beside them (empty for official files)."""

    path: Path
    state: dict[str, torch.Tensor]
    model_args: dict[str, Any] = field(default_factory=dict)
    ema: bool = False
    """Whether ``state`` holds the EMA weights of the file."""

    @property
    def num_classes(self) -> int | None:
        """The class count of the stored classifier, ``None`` when the file has none."""
        head = self.state.get("head.weight")
        return head.shape[0] if head is not None and head.ndim == 2 else None


def read_checkpoint(path: str | Path, use_ema: bool = False) -> Checkpoint:
    """The weights stored in ``path`` and the ``model_args`` recorded with them.

    Accepts a raw state dict or a container dict (``state_dict``/``model``/``module``,
    with ``use_ema`` ``state_dict_ema``/``model_ema``); wrapper prefixes such as
    ``module.`` are removed so the names are those of the bare model.
    """
    path = Path(path)
    obj = load_safetensors(path) if path.suffix == ".safetensors" else load_data(path)
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{path}: expected a state dict or a checkpoint dict, found a {type(obj).__name__}"
        )
    state = _select_weights(obj, path, use_ema)
    cleaned: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"{path}: expected a mapping of parameter names to tensors, but entry {key!r} "
                f"holds a {type(value).__name__}"
            )
        cleaned[_strip_wrapper_prefixes(key)] = value
    if len(cleaned) != len(state):
        raise CheckpointError(f"{path}: parameter names collide once wrapper prefixes are removed")
    model_args = obj.get("model_args")
    if not isinstance(model_args, Mapping):
        model_args = model_args_beside(path)
    return Checkpoint(path, cleaned, dict(model_args), use_ema)


MODEL_ARGS_FILE = "lvvit_model.json"
"""``{"model_args": {...}}``, written by training into the run folder and its checkpoint
folder, so weights consolidated by other tools (DeepSpeed's ``zero_to_fp32.py``, which
writes a bare state dict) still name their architecture."""


def model_args_beside(path: Path) -> dict[str, Any]:
    """The ``model_args`` of :data:`MODEL_ARGS_FILE` beside ``path`` or one folder up (the run
    folder, where ``zero_to_fp32.py . ../fp32`` puts its output next to); ``{}`` if none."""
    from lvvit import jsonload

    for folder in (path.parent, path.parent.parent):
        candidate = folder / MODEL_ARGS_FILE
        if candidate.is_file():
            found = jsonload.load_object(candidate).get("model_args")
            if not isinstance(found, Mapping):
                raise CheckpointError(f"{candidate}: expected an object 'model_args'")
            return dict(found)
    return {}


def load_safetensors(path: Path) -> dict[str, Any]:
    """A ``.safetensors`` file (a format that holds tensors only, so nothing in it can run) as
    ``{"state_dict": ..., "model_args": ...}``; ``model_args`` from its metadata's
    ``lvvit_model_args`` when a writer put them there."""
    from safetensors import SafetensorError, safe_open

    from lvvit import jsonload

    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            state = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
            metadata = f.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from err
    out: dict[str, Any] = {"state_dict": state}
    if "lvvit_model_args" in metadata:
        out["model_args"] = jsonload.loads(metadata["lvvit_model_args"])
    return out


def read_state_dict(path: str | Path, use_ema: bool = False) -> dict[str, torch.Tensor]:
    """The weights stored in ``path`` as a plain ``name -> tensor`` dict on the CPU."""
    return read_checkpoint(path, use_ema).state


def load_checkpoint(model: LVViT, path: str | Path, use_ema: bool = False) -> None:
    """Load the file ``path`` into ``model`` (see ``load_weights``)."""
    load_weights(model, read_checkpoint(path, use_ema=use_ema))


def load_weights(model: LVViT, checkpoint: Checkpoint) -> None:
    """Load ``checkpoint`` into ``model`` strictly, adapting only what a new resolution or
    label set needs.

    ``pos_embed`` is resized when the checkpoint was trained at another resolution; the
    class and aux heads are re-initialised when the class count differs. Everything else
    must match by name and shape: the whole file is checked before the model is touched,
    so a bad file leaves the model as it was.
    """
    path, state = checkpoint.path, dict(checkpoint.state)
    target = model.state_dict()

    _adapt_pos_embed(state, target["pos_embed"], path)
    classes = checkpoint.num_classes or model.num_classes
    drop_heads = classes != model.num_classes
    if drop_heads:
        state = {k: v for k, v in state.items() if not k.startswith(HEAD_PREFIXES)}

    _check_fits(state, target, path, model, skip_prefixes=HEAD_PREFIXES if drop_heads else ())

    if drop_heads:
        _logger.warning(
            "%s: has %d classes, the model %d: head and aux_head are re-initialised",
            path, classes, model.num_classes,
        )
        for linear in (model.head, model.aux_head):
            init_linear(linear)
    model.load_state_dict(state, strict=not drop_heads)
    _logger.info("%s: loaded %d tensors%s", path, len(state), " (EMA weights)" if checkpoint.ema else "")


def resize_pos_embed(pos_embed: torch.Tensor, new_grid: int) -> torch.Tensor:
    """``pos_embed [1, 1 + g*g, D]`` for a ``new_grid`` x ``new_grid`` token grid.

    The class position is kept as is and only the grid is interpolated (bicubic, as the
    official fine-tuning at 384/448/512 does): it has no place on the grid.
    """
    if pos_embed.ndim != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"pos_embed must be [1, 1 + g*g, D], got {tuple(pos_embed.shape)}")
    cls_pos, grid = pos_embed[:, :1], pos_embed[:, 1:]
    old_grid = math.isqrt(grid.shape[1])
    if old_grid * old_grid != grid.shape[1]:
        raise ValueError(f"pos_embed has {grid.shape[1]} grid positions, not a square grid")
    if old_grid == new_grid:
        return pos_embed
    dim = grid.shape[2]
    grid = grid.reshape(1, old_grid, old_grid, dim).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, dim).to(pos_embed.dtype)
    return torch.cat((cls_pos, grid), dim=1)


def _adapt_pos_embed(state: dict[str, torch.Tensor], target: torch.Tensor, path: Path) -> None:
    """Resize ``state["pos_embed"]`` in place when only its grid differs from ``target``'s."""
    pos = state.get("pos_embed")
    if pos is None or pos.ndim != 3 or pos.shape == target.shape or pos.shape[2] != target.shape[2]:
        return  # nothing to do, or a mismatch that the fit check reports
    try:
        state["pos_embed"] = resize_pos_embed(pos, math.isqrt(target.shape[1] - 1))
    except ValueError as err:
        raise CheckpointError(f"{path}: cannot resize pos_embed: {err}") from err
    _logger.info("%s: resized pos_embed from %s to %s", path, tuple(pos.shape), tuple(target.shape))


def load_data(path: Path, allowed: Sequence[type] = tuple(SAFE_GLOBALS)) -> object:
    """``torch.load`` of ``path`` as data: tensors, plain Python values and the ``allowed``
    types only; anything else is refused before it is built, with a ``CheckpointError``
    naming the file and the refused global."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist (expected a .pth/.pth.tar/.pt file)")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is not a file (expected a .pth/.pth.tar/.pt file)")
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if refused:
            raise _refused(path, refused.group(1), allowed) from err
        raise _unreadable(path, err) from err
    except Exception as err:  # torch.load reports corrupt input with many exception types
        raise _unreadable(path, err) from err


def check_data(path: Path, allowed: Sequence[type]) -> None:
    """Refuse ``path`` unless ``load_data(path, allowed)`` would accept it, without loading
    its tensors: for files that another library (DeepSpeed) loads itself, so a refusal
    names the file. Reads only the pickle of a zip-format file; a legacy-format file is
    loaded as data and dropped."""
    path = Path(path)
    try:
        with torch.serialization.safe_globals(list(allowed)):
            refused = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except ValueError:  # not zip format: legacy torch.save or no checkpoint at all
        load_data(path, allowed)
        return
    except Exception as err:  # a truncated or foreign zip
        raise _unreadable(path, err) from err
    if refused:
        raise _refused(path, sorted(refused)[0], allowed)


def _refused(path: Path, name: str, allowed: Sequence[type]) -> CheckpointError:
    types = "".join(f", {t.__module__}.{t.__qualname__}" for t in allowed)
    return CheckpointError(
        f"{path}: refusing to unpickle {name}; a checkpoint may hold only tensors, plain "
        f"Python values{types}"
    )


def _unreadable(path: Path, err: Exception) -> CheckpointError:
    # torch wraps the unpickler's reason in paragraphs of advice that do not apply here.
    found = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", str(err))
    reason = found.group(1) if found else str(err).split("\n")[0][:200] or type(err).__name__
    return CheckpointError(
        f"{path}: not a readable PyTorch checkpoint (expected a file written by torch.save; "
        f"it may be truncated or of another format): {reason}"
    )


def _select_weights(obj: Mapping, path: Path, use_ema: bool) -> Mapping:
    keys = EMA_KEYS if use_ema else WEIGHT_KEYS
    for key in keys:
        if isinstance(obj.get(key), Mapping):
            return obj[key]
    if not use_ema and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    found = ", ".join(repr(k) for k in list(obj)[:10]) or "nothing"
    wanted = " or ".join(repr(k) for k in keys)
    if not use_ema:
        wanted = f"a raw state dict (name -> tensor) or a dict with {wanted}"
    raise CheckpointError(f"{path}: expected {wanted}; found keys {found}")


def _strip_wrapper_prefixes(key: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix) :], True
    return key


def _check_fits(
    state: Mapping[str, torch.Tensor],
    target: Mapping[str, torch.Tensor],
    path: Path,
    model: LVViT,
    skip_prefixes: tuple[str, ...],
) -> None:
    """Raise one error listing every missing, unexpected and mis-shaped tensor."""
    # Checkpoints written before PyTorch 0.4.1 lack BatchNorm's counter; BatchNorm fills it in.
    missing = [
        k for k in target
        if k not in state and not k.startswith(skip_prefixes) and not k.endswith("num_batches_tracked")
    ]
    unexpected = [k for k in state if k not in target]
    mis_shaped = [
        f"{k}: checkpoint {tuple(state[k].shape)}, model {tuple(target[k].shape)}"
        for k in state
        if k in target and state[k].shape != target[k].shape
    ]
    if not (missing or unexpected or mis_shaped):
        return
    cfg = model.cfg
    problems = [
        f"{label} ({len(items)}): {', '.join(items[:8])}{', ...' if len(items) > 8 else ''}"
        for label, items in (
            ("missing", missing), ("unexpected", unexpected), ("wrong shape", mis_shaped)
        )
        if items
    ]
    raise CheckpointError(
        f"{path}: weights do not fit the model (expected an LV-ViT with embed_dim={cfg.embed_dim}, "
        f"depth={cfg.depth}, stem_width={cfg.stem_width}, {model.num_classes} classes); "
        + "; ".join(problems)
    )
