"""The MLServer runtime that serves an export folder: validate, batch, run, answer.

MLServer provides the V2 REST and gRPC servers, health, metadata, metrics and worker
processes; this class checks each request on its own (protocol.py), turns ``image_bytes``
into rows with the evaluation preprocessing off the event loop, and hands rows to the
dynamic batcher in front of the ONNX Runtime session. MLServer's own adaptive batching is
left off (``max_batch_size: 0`` in model-settings.json); see batcher.py for why.

model-settings.json: ``parameters.uri`` is the export folder; ``parameters.extra`` holds
``provider``, ``threads``, ``max_batch_size``, ``max_batch_delay_ms``,
``max_image_pixels``, ``max_request_pixels`` and ``decode_threads``.

Decoding is bounded: files are checked against the pixel limits from their headers before
any decoding, and decode on a pool of ``decode_threads`` threads shared by all requests,
so at most that many images are in decoded form at once whatever the request rate.
"""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import numpy as np
from lvvit.serving.batcher import DynamicBatcher
from lvvit.serving.engine import OnnxEngine
from lvvit.serving.metrics import batch_size_histogram, engine_seconds_histogram
from lvvit.serving.model_dir import load_model_dir
from lvvit.serving.preprocess import (
    ImageDecodeError,
    PixelLimits,
    open_checked,
    preprocess,
    return_freed_memory,
)
from lvvit.serving.protocol import (
    IMAGE_BYTES,
    IMAGES,
    InputSpec,
    InvalidInput,
    classifications,
    decode_images,
    encode_outputs,
    image_bytes_list,
    requested_outputs,
    select_input,
    top_k,
)
from lvvit.serving.settings import ServeOptions
from mlserver import MLModel
from mlserver.logging import logger
from mlserver.types import InferenceRequest, InferenceResponse
from PIL import Image

from lvvit.data.decode import EvalTransform


class LVViTRuntime(MLModel):
    async def load(self) -> bool:
        params = self.settings.parameters
        extra = dict(params.extra or {})
        self.model_dir = load_model_dir(params.uri)
        self.engine = OnnxEngine(
            self.model_dir.onnx_path, self.model_dir.input_name, self.model_dir.output_name,
            provider=extra.get("provider", "cpu"), threads=int(extra.get("threads", 0)),
            int8=self.model_dir.precision == "int8",
        )
        self.spec = InputSpec(
            img_size=self.model_dir.img_size, dtype=self.model_dir.input_dtype,
            num_classes=self.model_dir.num_classes, max_batch=int(extra.get("max_batch_size", 32)),
        )
        defaults = ServeOptions()
        self.limits = PixelLimits(
            per_image=int(extra.get("max_image_pixels", defaults.max_image_pixels)),
            per_request=int(extra.get("max_request_pixels", defaults.max_request_pixels)),
        )
        # PIL's own decompression-bomb guard (in this server process) follows the same limit.
        Image.MAX_IMAGE_PIXELS = self.limits.per_image
        threads = int(extra.get("decode_threads", 0)) or len(os.sched_getaffinity(0))
        self.decoder = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="lvvit-decode")
        sizes = batch_size_histogram().labels(self.name)
        seconds = engine_seconds_histogram().labels(self.name)

        def observe(rows: int, elapsed: float) -> None:
            sizes.observe(rows)
            seconds.observe(elapsed)

        self.batcher = DynamicBatcher(
            self.engine.run, self.spec.max_batch,
            float(extra.get("max_batch_delay_ms", 5.0)) / 1000.0, on_batch=observe,
        )
        self._warm_up()
        md = self.model_dir
        logger.info(
            "model '%s': %s %dpx, %d classes, %s input, %s, from %s on %s; dynamic batching up "
            "to %d rows, %.1f ms delay; image_bytes up to %.0f MP each, %.0f MP per request, "
            "%d decode threads", self.name, md.model, md.img_size, md.num_classes,
            md.input_dtype, md.precision, md.path, ", ".join(self.engine.providers),
            self.spec.max_batch, self.batcher.max_delay_s * 1000,
            self.limits.per_image / 1e6, self.limits.per_request / 1e6, threads,
        )
        return True

    def _warm_up(self) -> None:
        """One run at load, so the first client does not pay for ORT's lazy set-up."""
        self.engine.run(np.zeros((1, *self.spec.row_shape), dtype=self.spec.dtype))

    async def unload(self) -> bool:
        self.batcher.close()
        self.decoder.shutdown(wait=False, cancel_futures=True)
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        request_input = select_input(payload, self.spec)
        outputs = requested_outputs(payload)
        k = top_k(payload, self.spec.num_classes)
        classify = classifications(payload, self.spec.num_classes)
        if request_input.name == IMAGES:
            rows = decode_images(request_input, self.spec)
        else:
            rows = await self._preprocess(image_bytes_list(request_input, self.spec))
        logits = await self.batcher.submit(rows)
        return InferenceResponse(
            model_name=self.name, model_version=self.version, id=payload.id,
            outputs=encode_outputs(logits, outputs, k, self.model_dir.labels, classify),
        )

    async def _preprocess(self, files: list[bytes]) -> np.ndarray:
        """Check the pixel limits from the headers, then decode + eval-crop on the decode
        pool (PIL releases the GIL), one error per bad file."""
        opened = open_checked(files, self.limits)
        md = self.model_dir
        normalise = md.input_dtype == "float32"
        fn = partial(preprocess, transform=EvalTransform(md.img_size, md.crop_pct),
                     mean=md.mean if normalise else None, std=md.std if normalise else None)
        loop = asyncio.get_running_loop()
        results = await asyncio.gather(
            *(loop.run_in_executor(self.decoder, fn, img) for img in opened), return_exceptions=True
        )
        return_freed_memory()
        for i, result in enumerate(results):
            if isinstance(result, ImageDecodeError):
                raise InvalidInput(f"input '{IMAGE_BYTES}' element {i}: cannot decode image ({result})")
            if isinstance(result, BaseException):
                raise result
        return np.stack(results)

