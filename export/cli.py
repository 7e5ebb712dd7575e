"""``lvvit-export``: LV-ViT weights -> ONNX (checked against PyTorch in ONNX Runtime; int8:
calibrated on shards and gated on held-out accuracy), optionally a TensorRT engine, a
Triton model repository and an MLflow model version.

Exit status: 0 done; 1 an error (nothing half-written is left under --out);
2 bad arguments; 3 --trt could not run here (no tensorrt or no GPU): the ONNX export
and everything else asked for are complete.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import platform
import signal
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch

from lvvit.data.decode import IMAGENET_MEAN, IMAGENET_STD, normalize
from lvvit.digest import file_sha256
from lvvit.errors import exits_on_error
from lvvit.models import LVViT
from lvvit.train.options import AT_LEAST_0, AT_LEAST_1, POSITIVE, PROBABILITY, Range, check_ranges
from lvvit.train.preemption import Terminated, raise_on_sigterm

from .errors import ExportError, TensorRTUnavailable
from .folder import (
    FP32_FILE,
    INFO_FILE,
    LABELS_FILE,
    MODEL_FILE,
    PARITY_FILE,
    PLAN_FILE,
    check_writable,
    placeholder_names,
    read_class_names,
    staged_output,
    verify_export_dir,
    write_json,
)
from .int8 import (
    CALIBRATION_METHODS,
    FLOAT_KEPT,
    FORMAT,
    MAX_TOP1_DROP,
    MIN_AGREEMENT,
    QUANTIZED_OPS,
    ImageSource,
    accuracy_gate,
    calibration_inputs,
    labelled_batches,
    quantize,
)
from .onnx_export import (
    INPUT_NAME,
    OUTPUT_NAME,
    PRECISIONS,
    default_opset,
    export_onnx,
    load_onnx,
    parity_session,
)
from .parity import as_model_input, check_parity, parity_pixels
from .tracking import find_run_record, log_export, resolve_tracking_uri, source_datasets
from .triton import write_triton_repo
from .weights import (
    ModelSpec,
    build_model,
    read_weights,
    spec_from_model_args,
    weights_file,
)

_logger = logging.getLogger("lvvit.export")
EXIT_TRT_UNAVAILABLE = 3
RANGES = {
    "img_size": AT_LEAST_1, "num_classes": AT_LEAST_1, "embed_dim": AT_LEAST_1, "depth": AT_LEAST_1,
    "num_heads": AT_LEAST_1, "stem_width": AT_LEAST_1, "max_batch": AT_LEAST_1, "opset": AT_LEAST_1,
    "parity_batch": AT_LEAST_1, "parity_atol": AT_LEAST_0, "parity_min_top1": PROBABILITY,
    "calibration_samples": AT_LEAST_1, "int8_max_drop": Range(0, 100), "int8_min_agreement": Range(0, 100),
    "trt_workspace_gib": POSITIVE, "seed": AT_LEAST_0,
}
"""Every numeric option's allowed values (finite always), checked before any work."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lvvit-export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    g = p.add_argument_group("model (flags win over what the checkpoint records)")
    g.add_argument("--model", default=None, help="variant: lvvit_t/s/m/l (default: recorded, else lvvit_s)")
    g.add_argument("--img-size", type=int, default=None, help="input size S (default: recorded, else 224)")
    g.add_argument("--num-classes", type=int, default=None,
                   help="classes (default: recorded, else the checkpoint's head, else --classes, else 1000)")
    for name in ("embed-dim", "depth", "num-heads", "stem-width"):
        g.add_argument(f"--{name}", type=int, default=None, help="architecture override (tiny models)")
    g.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="any other LVViTConfig field, e.g. mlp_ratio=4.0 (repeatable)")
    g.add_argument("--checkpoint", type=Path, default=None,
                   help="official TokenLabeling .pth.tar, our consolidated weights, or a DeepSpeed "
                        "checkpoint folder (its 'latest' tag, or a tag folder); without it: random weights")
    g.add_argument("--ema", action="store_true", help="export the EMA weights of the checkpoint")
    g.add_argument("--classes", type=Path, default=None,
                   help="classes.json (or a text file, one name per line) -> labels.txt and ONNX metadata")

    g = p.add_argument_group("ONNX")
    g.add_argument("--out", type=Path, help="export folder (created; see docs/export.md)")
    g.add_argument("--overwrite", action="store_true", help="replace an existing --out / Triton model")
    g.add_argument("--precision", choices=sorted([*PRECISIONS, "int8"]), default="fp32",
                   help="compute precision inside the graph; I/O stay float32/uint8 in, float32 out "
                        "(int8 needs --calibration-shards)")
    g.add_argument("--max-batch", type=int, default=64, help="largest batch (parity, TensorRT, Triton)")
    g.add_argument("--uint8-input", action="store_true",
                   help="take uint8 NCHW pixels and normalise inside the graph (4x fewer bytes)")
    g.add_argument("--opset", type=int, default=None,
                   help="ONNX opset (default 18; 22 for bf16). 23 writes ONNX's own Attention op: a few "
                        "%% faster on ONNX Runtime >= 1.23 CPU, but needs TensorRT >= 10.14 (docs/export.md)")

    g = p.add_argument_group("parity (ONNX Runtime vs PyTorch fp32)")
    g.add_argument("--parity-batch", type=int, default=None,
                   help="large-batch size checked (default: --max-batch); batch 1 is always checked")
    g.add_argument("--parity-atol", type=float, default=None,
                   help="override the max |diff| allowed (default 1e-4 fp32; relative for fp16/bf16)")
    g.add_argument("--parity-min-top1", type=float, default=None, help="override the top-1 agreement needed")

    g = p.add_argument_group("int8 (static quantization, accuracy-gated)")
    g.add_argument("--calibration-shards", default=None, metavar="SOURCE",
                   help="labelled shards (any shard source) whose images calibrate the int8 graph")
    g.add_argument("--calibration-samples", type=int, default=256, metavar="N",
                   help="calibrate on the first N readable samples (manifest order; default 256)")
    g.add_argument("--calibration-method", choices=CALIBRATION_METHODS, default="minmax",
                   help="activation range estimator (default minmax: see docs/export.md)")
    g.add_argument("--eval-shards", default=None, metavar="SOURCE",
                   help="held-out labelled shards for the accuracy gate (default: the samples of "
                        "--calibration-shards after the first N)")
    g.add_argument("--int8-max-drop", type=float, default=100 * MAX_TOP1_DROP, metavar="POINTS",
                   help="largest held-out top-1 loss of the int8 graph against the fp32 graph, in "
                        f"percentage points (default {100 * MAX_TOP1_DROP:g})")
    g.add_argument("--int8-min-agreement", type=float, default=100 * MIN_AGREEMENT, metavar="PERCENT",
                   help="least share of held-out images whose int8 top-1 equals the fp32 graph's "
                        "(default 0: reported, not gated; near-ties flip under rounding)")

    g = p.add_argument_group("TensorRT")
    g.add_argument("--trt", action="store_true", help="also build model.plan (needs a GPU and tensorrt)")
    g.add_argument("--timing-cache", type=Path, default=None,
                   help="TensorRT timing cache (default ~/.cache/lvvit/tensorrt-timing.cache)")
    g.add_argument("--trt-workspace-gib", type=float, default=4.0, help="builder workspace limit")

    g = p.add_argument_group("Triton")
    g.add_argument("--triton-repo", type=Path, nargs="?", const=True, default=None, metavar="DIR",
                   help="write a Triton model repository (default folder: OUT/triton)")
    g.add_argument("--triton-prefix", default="lvvit", help="model names: PREFIX_onnx, PREFIX_trt")
    g.add_argument("--triton-gpu", action="store_true", help="GPU instances for the ONNX model (else CPU)")
    g.add_argument("--triton-trt-accelerator", action="store_true",
                   help="ONNX Runtime's TensorRT accelerator on the ONNX model (implies --triton-gpu)")

    g = p.add_argument_group("MLflow")
    g.add_argument("--mlflow-run", default=None,
                   help="log and register the model in this run (default: the run recorded in "
                        "mlflow_run.json beside the checkpoint, if any)")
    g.add_argument("--mlflow-uri", default=None, help="tracking URI (default: MLFLOW_TRACKING_URI, else recorded)")
    g.add_argument("--register-name", default="lvvit", help="registered model name ('' to skip)")
    g.add_argument("--no-mlflow", action="store_true", help="do not log even when the checkpoint is tracked")

    p.add_argument("--check", type=Path, default=None, metavar="DIR",
                   help="only verify an existing export folder and exit")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and parity inputs")
    return p


def resolve_spec(args: argparse.Namespace, model_args: dict) -> ModelSpec:
    recorded = spec_from_model_args(model_args)
    overrides = dict(recorded.get("overrides", {}))
    if args.model_arg:
        from lvvit.train.cli import parse_model_args

        overrides.update(parse_model_args(args.model_arg))
    for key in ("embed_dim", "depth", "num_heads", "stem_width"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    return ModelSpec(
        name=args.model or recorded.get("name", "lvvit_s"),
        img_size=args.img_size or recorded.get("img_size", 224),
        num_classes=args.num_classes or recorded.get("num_classes"),
        overrides=overrides,
    )


def load_model(args: argparse.Namespace, num_labels: int | None) -> tuple[LVViT, ModelSpec]:
    """Build the model; ``num_labels`` (from --classes) is the class count of last resort."""
    torch.manual_seed(args.seed)
    wfile_ctx = weights_file(args.checkpoint) if args.checkpoint else contextlib.nullcontext(None)
    with wfile_ctx as wfile:
        checkpoint = read_weights(wfile, use_ema=args.ema) if wfile else None
        spec = resolve_spec(args, checkpoint.model_args if checkpoint else {})
        if spec.num_classes is None and checkpoint is None:
            spec.num_classes = num_labels
        model = build_model(spec, checkpoint)
    spec.num_classes = model.num_classes
    return model, spec


def warn_random_weights() -> None:
    bar = "!" * 78
    _logger.warning("\n%s\n!! no --checkpoint: exporting RANDOMLY INITIALISED weights. The graph, "
                    "parity,\n!! Triton repository and serving path are real; the predictions are "
                    "noise.\n%s", bar, bar)


def torch_reference(model: LVViT, uint8_input: bool):
    """The fp32 PyTorch model on exactly what the ONNX graph receives."""
    def run(x: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(x)
        with torch.inference_mode():
            return model(normalize(t) if uint8_input else t).float().numpy()
    return run


def ort_runner(session):
    def run(x: np.ndarray) -> np.ndarray:
        return session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]
    return run


def model_info(args: argparse.Namespace, spec: ModelSpec, model: LVViT, opset: int) -> dict:
    """``model.json``: everything a server needs to feed the graph and read its answer."""
    return {
        "model": spec.name,
        "img_size": spec.img_size,
        "num_classes": model.num_classes,
        "crop_pct": model.cfg.crop_pct,
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "input_name": INPUT_NAME,
        "input_dtype": "uint8" if args.uint8_input else "float32",
        "output_name": OUTPUT_NAME,
        "precision": args.precision,
        **(int8_info(args) if args.precision == "int8" else {}),
        "max_batch": args.max_batch,
        "opset": opset,
        "source_checkpoint": str(args.checkpoint.resolve()) if args.checkpoint else None,
        "ema": bool(args.ema and args.checkpoint),
        "model_args": spec.overrides,
    }


def int8_info(args: argparse.Namespace) -> dict:
    """What a server or TensorRT needs to know about an int8 graph, and how it was made."""
    return {
        "format": FORMAT,
        "tensorrt_source": MODEL_FILE,
        "quantization": {
            "activations": "uint8 per-tensor", "weights": "int8 per-channel",
            "quantized_ops": list(QUANTIZED_OPS), "kept_float": FLOAT_KEPT,
            "calibration_method": args.calibration_method,
            "calibration_shards": args.calibration_shards, "calibration_samples": args.calibration_samples,
            "eval_shards": args.eval_shards,
        },
    }


def versions() -> dict:
    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "python": platform.python_version()}


def export_folder(args: argparse.Namespace, model: LVViT, spec: ModelSpec, names: list[str],
                  stage: Path) -> tuple[dict, Exception | None]:
    """Everything under --out, written into ``stage``. Returns model.json and the TensorRT
    error (if --trt failed): the checked ONNX export is worth keeping without an engine."""
    int8 = args.precision == "int8"
    float_precision = "fp32" if int8 else args.precision
    opset = args.opset or default_opset(float_precision)
    info = model_info(args, spec, model, opset)
    metadata = {k: v if isinstance(v, str) else json.dumps(v) for k, v in info.items()}
    metadata["class_names"] = json.dumps(names)
    onnx_path = stage / (FP32_FILE if int8 else MODEL_FILE)
    step = Timer()
    export_onnx(model, onnx_path, spec.img_size, float_precision, args.uint8_input, opset, metadata)
    load_onnx(onnx_path)
    _logger.info("exported and checked %s (opset %d, %s, %.1f MB) in %.1fs", onnx_path.name, opset,
                 float_precision, onnx_path.stat().st_size / 1e6, step())

    session = parity_session(onnx_path)
    sizes = sorted({1, args.parity_batch or args.max_batch})
    inputs = [as_model_input(parity_pixels(b, spec.img_size, seed=args.seed + 1 + i), args.uint8_input)
              for i, b in enumerate(sizes)]
    report, _ = check_parity(
        ort_runner(session), torch_reference(model, args.uint8_input), inputs, float_precision,
        f"onnxruntime:{session.get_providers()[0]}", "pytorch-fp32-eager",
        abs_tolerance=args.parity_atol, min_top1=args.parity_min_top1,
    )
    print(report.summary(), flush=True)
    report.raise_if_failed()
    parity = {"onnxruntime": report.to_dict(), "versions": versions()}
    if int8:
        parity["int8_accuracy"] = quantize_checked(args, spec, model, onnx_path, session, stage / MODEL_FILE)
        onnx_path.unlink()
        onnx_path = stage / MODEL_FILE
        session = parity_session(onnx_path)

    info["onnx_sha256"] = file_sha256(onnx_path)
    write_json(stage / INFO_FILE, info)
    (stage / LABELS_FILE).write_text("\n".join(names) + "\n", encoding="utf-8")
    write_json(stage / PARITY_FILE, parity)
    trt_error = None
    if args.trt:
        try:
            parity["tensorrt"] = build_checked_engine(args, spec, onnx_path, session, inputs, stage)
            write_json(stage / PARITY_FILE, parity)
        except ExportError as err:
            trt_error = err
        except Exception as err:  # TensorRT's bindings raise plain RuntimeError/TypeError
            trt_error = ExportError(f"TensorRT engine not built: {type(err).__name__}: {err}")
    return info, trt_error


def quantize_checked(args: argparse.Namespace, spec: ModelSpec, model: LVViT, fp32_path: Path,
                     fp32_session, out_path: Path) -> dict:
    """Calibrate and quantize ``fp32_path`` into ``out_path``, then gate it on held-out
    accuracy against the fp32 graph; a failure raises before anything is kept."""
    crop_pct, step = model.cfg.crop_pct, Timer()
    calibration = ImageSource("--calibration-shards", args.calibration_shards, limit=args.calibration_samples)
    held_out = (ImageSource("--eval-shards", args.eval_shards) if args.eval_shards else
                ImageSource("--calibration-shards", args.calibration_shards, skip=args.calibration_samples))
    batches = calibration_inputs(calibration, spec.img_size, crop_pct, args.uint8_input, model.num_classes)
    quantize(fp32_path, out_path, INPUT_NAME, batches, args.calibration_method)
    load_onnx(out_path)
    _logger.info("quantized %s to int8 (%s, %s calibration on %d images, %.1f MB) in %.1fs",
                 fp32_path.name, FORMAT, args.calibration_method, sum(len(b) for b in batches),
                 out_path.stat().st_size / 1e6, step())
    report = accuracy_gate(
        ort_runner(parity_session(out_path)), ort_runner(fp32_session),
        labelled_batches(held_out, spec.img_size, crop_pct, args.uint8_input, model.num_classes),
        f"{held_out.flag} {held_out.spec}" + (f" after sample {held_out.skip}" if held_out.skip else ""),
        max_top1_drop=args.int8_max_drop / 100, min_agreement=args.int8_min_agreement / 100,
    )
    print(report.summary(), flush=True)
    report.raise_if_failed()
    return report.to_dict()


def build_checked_engine(args, spec: ModelSpec, onnx_path: Path, session, inputs, stage: Path) -> dict:
    """Build the engine, compare it with ONNX Runtime on the parity inputs, then write it."""
    from .tensorrt import EngineRunner, build_engine, default_timing_cache

    step = Timer()
    plan = build_engine(onnx_path, spec.img_size, args.max_batch, args.precision,
                        timing_cache=args.timing_cache or default_timing_cache(),
                        workspace_gib=args.trt_workspace_gib)
    _logger.info("built TensorRT engine (%.1f MB) in %.0fs", len(plan) / 1e6, step())
    report, _ = check_parity(EngineRunner(plan), ort_runner(session), inputs, args.precision,
                             "tensorrt", f"onnxruntime:{session.get_providers()[0]}",
                             abs_tolerance=args.parity_atol, min_top1=args.parity_min_top1)
    print(report.summary(), flush=True)
    report.raise_if_failed()
    (stage / PLAN_FILE).write_bytes(plan)
    return report.to_dict()


class Timer:
    """Seconds since creation or since the previous call."""

    def __init__(self) -> None:
        self.last = time.perf_counter()

    def __call__(self) -> float:
        now = time.perf_counter()
        lap, self.last = now - self.last, now
        return lap


def log_to_mlflow(args: argparse.Namespace) -> None:
    """Log to ``--mlflow-run`` (failure is an error) or to the run that trained the checkpoint
    (failure is a warning: the user did not ask, and the export itself is complete)."""
    record = find_run_record(args.checkpoint) if args.checkpoint and not args.mlflow_run else None
    trained_by = (record or {}).get("run_id") or checkpoint_run(args)
    run_id = args.mlflow_run or trained_by
    if not run_id:
        return
    int8 = args.precision == "int8"
    datasets = source_datasets(args.calibration_shards, args.calibration_samples, args.eval_shards) if int8 else []
    try:
        uri = log_export(args.out, run_id, args.register_name,
                         resolve_tracking_uri(args.mlflow_uri, record), datasets, trained_by)
    except ExportError as err:
        if args.mlflow_run:
            raise
        _logger.warning("not logged to the training run recorded beside the checkpoint: %s", err)
        return
    _logger.info("logged to MLflow run %s as %s%s", run_id, uri,
                 f" (registered as {args.register_name!r})" if args.register_name else "")


def checkpoint_run(args: argparse.Namespace) -> str | None:
    """With ``--mlflow-run``: the run that trained the checkpoint, when its folder records one
    (an unreadable record is only a warning: the user named the run to log to)."""
    if not (args.checkpoint and args.mlflow_run):
        return None
    try:
        return (find_run_record(args.checkpoint) or {}).get("run_id")
    except ExportError as err:
        _logger.warning("the checkpoint's MLflow run is not named: %s", err)
        return None


def triton_repo_dir(args: argparse.Namespace) -> Path | None:
    if args.triton_repo is None:
        return None
    return args.out / "triton" if args.triton_repo is True else args.triton_repo


def run(args: argparse.Namespace) -> int:
    if args.check is not None:
        info = verify_export_dir(args.check)
        print(f"{args.check}: OK ({info['model']} {info['img_size']}px, {info['num_classes']} classes, "
              f"{info['precision']}, {info['input_dtype']} input)")
        return 0
    check_writable(args.out, args.overwrite)
    repo = triton_repo_dir(args)
    if repo is not None and not args.overwrite and repo != args.out / "triton":
        for model in (f"{args.triton_prefix}_onnx", f"{args.triton_prefix}_trt"):
            if (repo / model).exists():
                raise ExportError(f"{repo / model} already exists; pass --overwrite to replace it")
    names = read_class_names(args.classes) if args.classes else None
    total = Timer()
    model, spec = load_model(args, len(names) if names else None)
    if args.checkpoint is None:
        warn_random_weights()
    if names is None:
        names = placeholder_names(model.num_classes)
    elif len(names) != model.num_classes:
        raise ExportError(f"--classes {args.classes}: {len(names)} names for a "
                          f"{model.num_classes}-class model")
    _logger.info("model %s %dpx, %d classes, %.1fM parameters", spec.name, spec.img_size,
                 model.num_classes, sum(p.numel() for p in model.parameters()) / 1e6)

    with staged_output(args.out, args.overwrite) as stage:
        info, trt_error = export_folder(args, model, spec, names, stage)
    _logger.info("wrote %s in %.1fs", args.out, total())

    if repo is not None:
        written = write_triton_repo(repo, args.out, info, prefix=args.triton_prefix,
                                    gpu=args.triton_gpu or args.triton_trt_accelerator,
                                    trt_accelerator=args.triton_trt_accelerator, overwrite=args.overwrite)
        _logger.info("Triton model repository %s: %s", repo, ", ".join(p.name for p in written))

    if not args.no_mlflow:
        log_to_mlflow(args)

    if trt_error is not None:
        print(f"lvvit-export: {trt_error}", file=sys.stderr)
        return EXIT_TRT_UNAVAILABLE if isinstance(trt_error, TensorRTUnavailable) else 1
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.check is None and args.out is None:
        parser.error("--out is required (or --check DIR to verify an export)")
    if args.max_batch < 1 or not 1 <= (args.parity_batch or 1) <= args.max_batch:
        parser.error("need --max-batch >= 1 and 1 <= --parity-batch <= --max-batch")
    if args.precision == "int8" and args.check is None and not args.calibration_shards:
        parser.error("--precision int8 needs --calibration-shards SOURCE (labelled images to calibrate on)")
    check_ranges(parser, args, RANGES)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S"))
    root = logging.getLogger("lvvit")
    if not root.handlers:
        root.addHandler(handler)
    root.setLevel(logging.INFO)
    raise_on_sigterm()  # a killed export unwinds: the staging folder is removed on the way out
    with exits_on_error():  # our other errors (a checkpoint, a shard source): their one line
        try:
            code = run(args)
        except ExportError as err:
            print(f"lvvit-export: error: {err}", file=sys.stderr)
            code = 1
        except Terminated:
            print("lvvit-export: terminated (SIGTERM); nothing written", file=sys.stderr)
            code = 128 + signal.SIGTERM
    sys.exit(code)


if __name__ == "__main__":
    main()
