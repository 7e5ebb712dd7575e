"""The MLServer runtime that serves an export folder: validate, batch, run, answer.

MLServer provides the V2 REST and gRPC servers, health, metadata, metrics and worker
processes; this class checks each request on its own (protocol.py), turns ``image_bytes``
into rows with the evaluation preprocessing off the event loop, and hands rows to the
dynamic batcher in front of the ONNX Runtime session. MLServer's own adaptive batching is
left off (``max_batch_size: 0`` in model-settings.json); see batcher.py for why.

model-settings.json: ``parameters.uri`` is the export folder; ``parameters.extra`` holds
``provider``, ``threads``, ``max_batch_size`` and ``max_batch_delay_ms``.
"""

from __future__ import annotations

import asyncio
from functools import partial

import numpy as np
from lvvit.serving.batcher import DynamicBatcher
from lvvit.serving.engine import OnnxEngine
from lvvit.serving.metrics import batch_size_histogram, engine_seconds_histogram
from lvvit.serving.model_dir import load_model_dir
from lvvit.serving.preprocess import ImageDecodeError, preprocess
from lvvit.serving.protocol import (
    IMAGE_BYTES,
    IMAGES,
    InputSpec,
    InvalidInput,
    decode_images,
    encode_outputs,
    image_bytes_list,
    requested_outputs,
    select_input,
    top_k,
)
from mlserver import MLModel
from mlserver.logging import logger
from mlserver.types import InferenceRequest, InferenceResponse

from lvvit.data.transforms import EvalTransform


class LVViTRuntime(MLModel):
    async def load(self) -> bool:
        params = self.settings.parameters
        extra = dict(params.extra or {})
        self.model_dir = load_model_dir(params.uri)
        self.engine = OnnxEngine(
            self.model_dir.onnx_path, self.model_dir.input_name, self.model_dir.output_name,
            provider=extra.get("provider", "cpu"), threads=int(extra.get("threads", 0)),
        )
        self.spec = InputSpec(
            img_size=self.model_dir.img_size, dtype=self.model_dir.input_dtype,
            num_classes=self.model_dir.num_classes, max_batch=int(extra.get("max_batch_size", 32)),
        )
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
            "to %d rows, %.1f ms delay", self.name, md.model, md.img_size, md.num_classes,
            md.input_dtype, md.precision, md.path, ", ".join(self.engine.providers),
            self.spec.max_batch, self.batcher.max_delay_s * 1000,
        )
        return True

    def _warm_up(self) -> None:
        """One run at load, so the first client does not pay for ORT's lazy set-up."""
        self.engine.run(np.zeros((1, *self.spec.row_shape), dtype=self.spec.dtype))

    async def unload(self) -> bool:
        self.batcher.close()
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        request_input = select_input(payload, self.spec)
        outputs = requested_outputs(payload)
        k = top_k(payload, self.spec.num_classes)
        if request_input.name == IMAGES:
            rows = decode_images(request_input, self.spec)
        else:
            rows = await self._preprocess(image_bytes_list(request_input, self.spec))
        logits = await self.batcher.submit(rows)
        return InferenceResponse(
            model_name=self.name, model_version=self.version, id=payload.id,
            outputs=encode_outputs(logits, outputs, k, self.model_dir.labels),
        )

    async def _preprocess(self, files: list[bytes]) -> np.ndarray:
        """Decode + eval-crop in threads (PIL releases the GIL), one error per bad file."""
        md = self.model_dir
        normalise = md.input_dtype == "float32"
        fn = partial(preprocess, transform=EvalTransform(md.img_size, md.crop_pct),
                     mean=md.mean if normalise else None, std=md.std if normalise else None)
        loop = asyncio.get_running_loop()
        results = await asyncio.gather(
            *(loop.run_in_executor(None, fn, f) for f in files), return_exceptions=True
        )
        for i, result in enumerate(results):
            if isinstance(result, ImageDecodeError):
                raise InvalidInput(f"input '{IMAGE_BYTES}' element {i}: cannot decode image ({result})")
            if isinstance(result, BaseException):
                raise result
        return np.stack(results)

