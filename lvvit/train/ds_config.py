"""The DeepSpeed JSON checked before any compute: every key one DeepSpeed reads, values of its
pydantic-backed sections through DeepSpeed's own models.

DeepSpeed ignores a top-level key it does not know, so a typo such as ``zero_optimisation``
would train a whole run at ZeRO stage 0; the keys are taken from the installed DeepSpeed
(not a hand-written list), so the check follows its releases.
"""

from __future__ import annotations

import difflib
import functools
import typing
from pathlib import Path
from typing import Any

from lvvit import jsonload
from lvvit.errors import ConfigError


def load_ds_config(path: Path) -> dict:
    """The JSON as written, refused (naming the key) if it holds a key twice or one DeepSpeed
    does not read: DeepSpeed ignores an unknown top-level key, so ``zero_optimisation``
    would train a whole run at ZeRO stage 0."""
    try:
        cfg = jsonload.load_object(path)
    except ConfigError as err:  # "{path}: {problem}"
        raise ConfigError(f"--deepspeed_config {err}") from None
    check_ds_config(cfg, f"--deepspeed_config {path}")
    return cfg


Schema = dict[str, "Schema | None"]
"""Known keys of a config level; a key's value is its own schema, or ``None`` when unchecked."""


class _KeyRecorder(dict):
    """An empty config that remembers every key DeepSpeed's parser asks it for."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: set[str] = set()

    def __getitem__(self, key: str) -> Any:
        self.asked.add(key)
        return super().__getitem__(key)

    def get(self, key: str, default: Any = None) -> Any:
        self.asked.add(key)
        return super().get(key, default)

    def __contains__(self, key: object) -> bool:
        self.asked.add(str(key))
        return super().__contains__(key)

    def keys(self) -> _KeyRecorder:  # ``KEY in d.keys()`` must reach __contains__
        return self


def _model_schema(model: type) -> Schema:
    """Field names and aliases of a DeepSpeed pydantic config model, nested models included."""
    from pydantic import BaseModel

    schema: Schema = {}
    for name, field in model.model_fields.items():
        nested = next((t for t in (field.annotation, *typing.get_args(field.annotation))
                       if isinstance(t, type) and issubclass(t, BaseModel)), None)
        sub = _model_schema(nested) if nested is not None else None
        schema[name] = sub
        if field.alias:
            schema[field.alias] = sub
    return schema


def _adam_params_schema(torch_adam: bool) -> Schema:
    """``optimizer.params`` for DeepSpeed's Adam/AdamW: the keys its engine pops itself, plus the
    constructor arguments of the class it then builds (torch's with ``torch_adam``, else its
    CPU or fused Adam), less those the engine passes itself."""
    import inspect

    import torch
    from deepspeed.ops.adam import DeepSpeedCPUAdam, FusedAdam
    from deepspeed.runtime.config import ADAM_W_MODE, TORCH_ADAM_PARAM

    classes = (torch.optim.AdamW,) if torch_adam else (DeepSpeedCPUAdam, FusedAdam)
    names = {n for c in classes for n in inspect.signature(c).parameters}
    names -= {"params", "model_params", "adamw_mode"}
    # the engine pops these before building the optimizer (deepspeed/runtime/engine.py)
    names |= {TORCH_ADAM_PARAM, ADAM_W_MODE, "fp32_optimizer_states"}
    return dict.fromkeys(names)


@functools.cache
def deepspeed_schema() -> Schema:
    """The keys DeepSpeed reads, taken from the installed DeepSpeed rather than a hand-written
    list, so it follows DeepSpeed releases.

    Top level: every key DeepSpeed's public ``DeepSpeedConfig`` constructor asks a minimal
    config (one sample per rank) for, recorded, plus ``sequence_parallel_size`` (read
    by the engine). Sections:
    ``zero_optimization``, ``fp16``, ``bf16`` from their pydantic models (field names and
    aliases, nested offload models too); ``optimizer``, ``scheduler``, ``data_types`` from
    DeepSpeed's constants; Adam/AdamW ``optimizer.params`` from the optimizer classes.
    """
    import torch.distributed as dist
    from deepspeed.runtime import constants as K
    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed.runtime.precision_config import DeepSpeedBF16Config, DeepSpeedFP16Config
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    recorder = _KeyRecorder()
    # the one value its batch arithmetic needs: a micro batch of 1 on each rank of this process group
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    dict.__setitem__(recorder, K.TRAIN_BATCH_SIZE, world)
    DeepSpeedConfig(recorder)  # copies the dict shallowly: the copy records into the same set
    schema: Schema = dict.fromkeys({*recorder.asked, "sequence_parallel_size"})
    schema.update({
        "zero_optimization": _model_schema(DeepSpeedZeroConfig),
        "fp16": _model_schema(DeepSpeedFP16Config),
        "bf16": _model_schema(DeepSpeedBF16Config),
        "bfloat16": _model_schema(DeepSpeedBF16Config),
        "optimizer": {K.TYPE: None, K.OPTIMIZER_PARAMS: None, K.LEGACY_FUSION: None},
        "scheduler": {K.TYPE: None, K.SCHEDULER_PARAMS: None},
        "data_types": dict.fromkeys((K.GRAD_ACCUM_DTYPE, K.PARAM_DTYPE, K.BUFFER_DTYPE, K.KEEP_IN_FP32_MODULES)),
    })
    return schema


def _check_keys(cfg: dict, schema: Schema, where: str, origin: str) -> None:
    for key, value in cfg.items():
        name = f"{where}{key}"
        if key not in schema:
            close = difflib.get_close_matches(key, schema, n=1)
            hint = f" (did you mean {where + close[0]!r}?)" if close else ""
            raise ConfigError(f"{origin}: unknown key {name!r}{hint}")
        sub = schema[key]
        if sub is None:
            continue
        if not isinstance(value, dict):
            if sub and value is not None:
                raise ConfigError(f"{origin}: {name!r} must be a JSON object, not {value!r}")
            continue
        _check_keys(value, sub, f"{name}.", origin)


def check_ds_config(cfg: dict, origin: str = "deepspeed config") -> None:
    """Refuse, before any compute, what DeepSpeed would ignore or only reject once the model is
    built: unknown keys (with the closest known one), invalid well-known sections, a
    negative ``gradient_clipping``, and bf16/fp16 without ZeRO (stage 0 keeps the fp32
    master weights unnamed in the optimizer state, so no ``weights.pth`` could be written)."""
    from deepspeed.runtime import constants as K

    schema = deepspeed_schema()
    _check_keys(cfg, schema, "", origin)
    optimizer = cfg.get("optimizer") or {}
    params = optimizer.get(K.OPTIMIZER_PARAMS)
    if isinstance(params, dict) and str(optimizer.get(K.TYPE, "")).lower() in ("adam", "adamw"):
        _check_keys(params, _adam_params_schema(bool(params.get("torch_adam"))), "optimizer.params.", origin)
    _check_section_values(cfg, origin)
    clip = cfg.get(K.GRADIENT_CLIPPING)
    if clip is not None and (isinstance(clip, bool) or not isinstance(clip, int | float) or clip < 0):
        raise ConfigError(f"{origin}: {K.GRADIENT_CLIPPING} {clip!r} is not a number >= 0")
    zero = cfg.get("zero_optimization") or {}
    low = [k for k in ("bf16", "bfloat16", "fp16") if (cfg.get(k) or {}).get("enabled")]
    if low and zero.get("stage", 0) == 0:
        raise ConfigError(f"{origin}: {low[0]} needs zero_optimization.stage >= 1 (stage 0 keeps the fp32 "
                         "master weights where no fp32 weights.pth can be written from)")


def _check_section_values(cfg: dict, origin: str) -> None:
    """Values of the pydantic-backed sections, through DeepSpeed's own models."""
    from deepspeed.runtime.precision_config import DeepSpeedBF16Config, DeepSpeedFP16Config
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from pydantic import ValidationError

    models = {"zero_optimization": DeepSpeedZeroConfig, "fp16": DeepSpeedFP16Config,
              "bf16": DeepSpeedBF16Config, "bfloat16": DeepSpeedBF16Config}
    for key, model in models.items():
        if isinstance(cfg.get(key), dict):
            try:
                model(**cfg[key])
            except ValidationError as e:
                first = e.errors()[0]
                field = ".".join(str(part) for part in (key, *first["loc"]))
                raise ConfigError(f"{origin}: {field}: {first['msg']}") from None
