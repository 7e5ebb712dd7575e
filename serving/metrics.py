"""Prometheus metrics MLServer does not have: the batches the engine actually ran.

MLServer already exports request counts and latency (``model_infer_request_success``,
``model_infer_request_failure``, ``model_infer_request_duration``, per-protocol
``rest_server_*`` and ``grpc_server_*``). These add rows per engine call and the engine's
own time, on the default registry MLServer's metrics endpoint serves (in parallel-worker
mode MLServer switches prometheus_client to multiprocess files, which these use too).
"""

from __future__ import annotations

from functools import cache

from prometheus_client import Histogram

BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


# Created on first use (after MLServer has chosen single- or multi-process values) and once
# per process, so a model reload does not register the same name twice.
@cache
def batch_size_histogram() -> Histogram:
    return Histogram("lvvit_batch_size", "Rows per engine call formed by the dynamic batcher",
                     ["model"], buckets=BATCH_BUCKETS)


@cache
def engine_seconds_histogram() -> Histogram:
    return Histogram("lvvit_engine_seconds", "Engine (ONNX Runtime) time per batch", ["model"],
                     buckets=LATENCY_BUCKETS)
