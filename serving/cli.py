"""``lvvit-serve --model-dir OUT``: serve an lvvit-export folder over the KServe v2 / Open
Inference Protocol (REST and gRPC) with MLServer, so ``tritonclient`` talks to it as to Triton.

Inputs ``images`` (the exported tensor) or ``image_bytes`` (JPEG/PNG files, preprocessed on
the server as in evaluation); outputs ``logits``, ``labels`` and ``scores`` (top-k, request
parameter ``top_k``, default 5; Triton's ``class_count`` on ``logits``). The model is version
"1" as in the Triton repository lvvit-export writes. Health at /v2/health/{live,ready},
metadata at /v2/models/NAME, Triton's model configuration at /v2/models/NAME/config,
Prometheus metrics at http://HOST:METRICS_PORT/metrics. SIGTERM or Ctrl-C
stops accepting work, lets in-flight requests finish and exits 0. See docs/serving.md.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import re
import shutil
import signal
import sys
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from lvvit.serving.connections import bound_connections
from lvvit.serving.engine import serving_providers
from lvvit.serving.model_dir import ModelDir, ModelDirError, load_model_dir
from lvvit.serving.rest import RestGuard
from lvvit.serving.settings import ServeOptions, write_settings
from lvvit.serving.triton_ext import (
    ModelConfigSchema,
    install_grpc,
    install_rest,
    model_config_text,
)
from mlserver import MLServer
from mlserver.cli.serve import load_settings
from mlserver.logging import configure_logger, logger

from lvvit.errors import ConfigError, exits_on_error
from lvvit.onnxrt import PROVIDERS, ProviderUnavailable

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def build_parser() -> argparse.ArgumentParser:
    d = ServeOptions()
    p = argparse.ArgumentParser(prog="lvvit-serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", required=True, type=Path, metavar="DIR",
                   help="lvvit-export --out folder (model.onnx, model.json, labels.txt)")
    p.add_argument("--model-name", default=d.model_name, metavar="NAME", help="name clients call (default %(default)s)")
    p.add_argument("--host", default=d.host, metavar="ADDR",
                   help="address to bind (default %(default)s: this machine only; 0.0.0.0 for all)")
    p.add_argument("--http-port", type=int, metavar="PORT", default=d.http_port, help="REST port (default %(default)s)")
    p.add_argument("--grpc-port", type=int, metavar="PORT", default=d.grpc_port, help="gRPC port (default %(default)s)")
    p.add_argument("--metrics-port", type=int, metavar="PORT", default=d.metrics_port,
                   help="Prometheus /metrics port (default %(default)s)")
    p.add_argument("--max-batch-size", type=int, metavar="N", default=d.max_batch_size,
                   help="most rows per engine call, and per request (default %(default)s)")
    p.add_argument("--max-batch-delay-ms", type=float, metavar="MS", default=d.max_batch_delay_ms,
                   help="how long a short batch waits for more rows (default %(default)s)")
    p.add_argument("--workers", type=int, metavar="N", default=d.workers,
                   help="MLServer worker processes, each with its own session and batcher; "
                        "0 runs the model in the server process (default %(default)s)")
    p.add_argument("--provider", choices=sorted(PROVIDERS), default=d.provider,
                   help="ONNX Runtime execution provider (default %(default)s)")
    p.add_argument("--threads", type=int, metavar="N", default=d.threads,
                   help="ONNX Runtime intra-op threads per session; 0 lets ORT choose (default %(default)s)")
    p.add_argument("--max-request-mb", type=float, metavar="MB", default=d.max_request_mb,
                   help="largest request body, REST and gRPC (default %(default)s MB)")
    p.add_argument("--max-image-mpix", type=float, metavar="MP", default=d.max_image_mpix,
                   help="largest image_bytes file, in megapixels (width x height from its header, "
                        "checked before decoding; default %(default)s)")
    p.add_argument("--max-request-mpix", type=float, metavar="MP", default=d.max_request_mpix,
                   help="most megapixels of image_bytes files in one request, all together "
                        "(default %(default)s)")
    p.add_argument("--decode-threads", type=int, metavar="N", default=d.decode_threads,
                   help="images decoded at once, over all requests (per worker); 0: one per CPU "
                        "core (default %(default)s)")
    p.add_argument("--read-timeout-s", type=float, metavar="S", default=d.read_timeout_s,
                   help="seconds a REST connection has to deliver a whole request (headers and "
                        "body), from its opening or the end of the previous response; one that "
                        "has not is closed (default %(default)s)")
    p.add_argument("--settings-dir", type=Path, default=None, metavar="DIR",
                   help="write MLServer's settings.json/model-settings.json here and keep them "
                        "(default: a temporary folder removed at exit)")
    p.add_argument("--debug", action="store_true", help="access logs and debug logging")
    return p


def options_from_args(args: argparse.Namespace) -> ServeOptions:
    """The checked :class:`ServeOptions` of the command line; a value out of range is a
    ``ConfigError`` naming the flag."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", args.model_name):
        raise ConfigError(f"lvvit-serve: --model-name {args.model_name!r}: use letters, digits, _ . -")
    for flag in ("max_batch_size", "max_request_mb", "max_image_mpix", "max_request_mpix", "read_timeout_s"):
        if not (math.isfinite(getattr(args, flag)) and getattr(args, flag) > 0):
            raise ConfigError(f"lvvit-serve: --{flag.replace('_', '-')} must be positive and finite")
    if min(args.max_batch_delay_ms, args.workers, args.threads, args.decode_threads) < 0:
        raise ConfigError("lvvit-serve: --max-batch-delay-ms, --workers, --threads and "
                         "--decode-threads must be >= 0")
    return ServeOptions(
        model_name=args.model_name, host=args.host, http_port=args.http_port,
        grpc_port=args.grpc_port, metrics_port=args.metrics_port,
        max_batch_size=args.max_batch_size, max_batch_delay_ms=args.max_batch_delay_ms,
        workers=args.workers, provider=args.provider, threads=args.threads,
        max_request_mb=args.max_request_mb, max_image_mpix=args.max_image_mpix,
        max_request_mpix=args.max_request_mpix, decode_threads=args.decode_threads,
        read_timeout_s=args.read_timeout_s, debug=args.debug,
    )


def check_workers_supported(workers: int) -> None:
    """MLServer 1.7.1's worker processes crash at start with uvloop >= 0.22
    (SeldonIO/MLServer#2286): refuse up front instead of serving with dead workers."""
    if workers == 0:
        return
    try:
        installed = version("uvloop")
    except PackageNotFoundError:
        return
    if tuple(int(p) for p in re.findall(r"\d+", installed)[:2]) >= (0, 22):
        raise ConfigError(
            f"lvvit-serve: --workers {workers} needs uvloop < 0.22: MLServer's worker processes "
            f"crash at start with uvloop {installed} (SeldonIO/MLServer#2286). "
            "Install 'uvloop<0.22', or serve in-process with --workers 0 (the default)."
        )


async def serve(settings_dir: Path, opts: ServeOptions, model_dir: ModelDir) -> bool:
    """Run MLServer from ``settings_dir`` until a stop signal; False if it stopped on its own
    (MLServer shuts down, without raising, when the model fails to load)."""
    settings, models = await load_settings(str(settings_dir))
    server = MLServer(settings)
    # The REST app is MLServer's own FastAPI app; the guard wraps it before it starts, and
    # its uvicorn server gets the whole-request deadline.
    rest = server._rest_server
    rest._app.add_middleware(RestGuard, max_body_bytes=opts.max_request_bytes)
    # Triton's conventions: the v2 error shape, and the model-configuration extension.
    schema = ModelConfigSchema()
    config = schema.parse(model_config_text(model_dir, opts))
    install_rest(rest._app, server._data_plane, {opts.model_name: schema.to_json(config)})
    install_grpc(server._grpc_server, server._data_plane, schema, {opts.model_name: config})
    uvicorn_config = rest._get_config
    rest._get_config = lambda: bound_connections(uvicorn_config(), opts.read_timeout_s)
    stopped_by: list[int] = []

    def on_signal(sig: int) -> None:  # replaces MLServer's handler, which does only the stop
        if not stopped_by:
            logger.info("%s: finishing in-flight requests, then exiting", signal.Signals(sig).name)
            stopped_by.append(sig)
            asyncio.get_running_loop().create_task(server.stop(sig=sig))

    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, on_signal, sig)
    base = f"{opts.host}:{opts.http_port}"
    logger.info(
        "lvvit-serve: model '%s' over REST http://%s/v2/models/%s/infer, gRPC %s:%d, "
        "metrics http://%s:%d/metrics", opts.model_name, base, opts.model_name, opts.host,
        opts.grpc_port, opts.host, opts.metrics_port,
    )
    await server.start(models)
    return bool(stopped_by)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    configure_logger()
    with exits_on_error():
        code = serve_model_dir(args)
    sys.exit(code)


def serve_model_dir(args: argparse.Namespace) -> int:
    """Check the options and the export folder, then serve until a stop signal; the exit status."""
    opts = options_from_args(args)
    check_workers_supported(opts.workers)
    try:
        model_dir = load_model_dir(args.model_dir)
        serving_providers(opts.provider)
    except (ModelDirError, ProviderUnavailable) as err:  # --model-dir, --provider: named as the server's
        raise ConfigError(f"lvvit-serve: {err}") from None
    if model_dir.max_batch is not None and opts.max_batch_size > model_dir.max_batch:
        logger.warning("--max-batch-size %d is above the export's max_batch %d (model.json); "
                       "ONNX Runtime copes, a TensorRT profile would not",
                       opts.max_batch_size, model_dir.max_batch)
    keep = args.settings_dir is not None
    settings_dir = args.settings_dir or Path(tempfile.mkdtemp(prefix="lvvit-serve-"))
    try:
        write_settings(settings_dir, model_dir, opts)
        logger.info("MLServer settings in %s%s", settings_dir,
                    "" if keep else " (temporary; --settings-dir keeps them)")
        clean = asyncio.run(serve(settings_dir, opts, model_dir))
    finally:
        if not keep:
            shutil.rmtree(settings_dir, ignore_errors=True)
    if not clean:
        logger.error("lvvit-serve: the server stopped without a stop signal "
                     "(see the model loading error above)")
        return 1
    logger.info("lvvit-serve: stopped cleanly")
    return 0


if __name__ == "__main__":
    main()
