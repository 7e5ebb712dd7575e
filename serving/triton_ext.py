"""Triton's conventions that MLServer lacks, added to lvvit-serve's REST and gRPC servers.

- **The v2 error shape on REST.** Every client error is an HTTP 4xx whose body is
  ``{"error": "..."}`` (KServe v2 / Open Inference Protocol), including the ones FastAPI
  answers by itself: a body that is not JSON or not an inference request (FastAPI: 422
  ``{"detail": [...]}``; here 400) and unknown routes or methods (404/405 ``{"detail"}``).
  MLServer's own errors (unknown model or version: 404; protocol.py's ``InvalidInput``:
  400) already have that shape.
- **The model-configuration extension.** ``GET /v2/models/NAME[/versions/V]/config``
  answers with the Triton ``ModelConfig`` (its JSON form) of the ``onnxruntime_onnx``
  model that ``lvvit-export --triton-repo`` writes for the same folder (export/triton.py's
  ``onnx_config_text``, with this server's name, batch limit, delay and device), and gRPC
  ``ModelConfig`` answers with the same message, so ``tritonclient``'s
  ``get_model_config`` works over both. It describes the ONNX model: lvvit-serve's extra
  input (``image_bytes``) and outputs (``labels``, ``scores``) are in the model metadata.

Triton's ``ModelConfig`` schema comes from the ``model_config.proto`` that ``tritonclient``
ships, loaded into a private descriptor pool: ``tritonclient.grpc`` itself cannot be imported
beside MLServer (both define the ``inference`` gRPC messages).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import grpc
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from google.protobuf import (
    descriptor_pb2,
    descriptor_pool,
    json_format,
    message_factory,
    text_format,
)
from google.protobuf.descriptor import FieldDescriptor
from lvvit.export.triton import onnx_config_text
from lvvit.serving.model_dir import ModelDir
from lvvit.serving.settings import ServeOptions
from mlserver.errors import MLServerError
from mlserver.grpc.utils import STATUS_CODE_MAPPING
from mlserver.rest.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

GRPC_SERVICE = "inference.GRPCInferenceService"
INT64_TYPES = (FieldDescriptor.CPPTYPE_INT64, FieldDescriptor.CPPTYPE_UINT64)


def model_config_text(model_dir: ModelDir, opts: ServeOptions) -> str:
    """``config.pbtxt`` text of the served model: the Triton repository's ``onnxruntime_onnx``
    config for this export, with the name, batch limit and delay this server uses."""
    info = {
        "img_size": model_dir.img_size, "input_name": model_dir.input_name,
        "input_dtype": model_dir.input_dtype, "output_name": model_dir.output_name,
        "num_classes": model_dir.num_classes, "precision": model_dir.precision,
    }
    return onnx_config_text(
        opts.model_name, info, gpu=opts.provider != "cpu",
        trt_accelerator=opts.provider == "tensorrt", max_batch=opts.max_batch_size,
        max_queue_delay_us=round(opts.max_batch_delay_ms * 1000),
    )


class ModelConfigSchema:
    """Triton's ``ModelConfig`` and the ``ModelConfig`` RPC's request and response messages,
    in a descriptor pool of their own."""

    def __init__(self) -> None:
        origin = importlib.util.find_spec("tritonclient").origin
        path = Path(origin).parent / "grpc" / "model_config_pb2.py"
        spec = importlib.util.spec_from_file_location("lvvit_triton_model_config_pb2", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        pool = descriptor_pool.DescriptorPool()
        config_file = descriptor_pb2.FileDescriptorProto.FromString(module.DESCRIPTOR.serialized_pb)
        pool.Add(config_file)
        rpc = descriptor_pb2.FileDescriptorProto(
            name="lvvit_model_config_rpc.proto", package="inference",
            dependency=[config_file.name], syntax="proto3",
        )
        request = rpc.message_type.add(name="ModelConfigRequest")
        for number, name in ((1, "name"), (2, "version")):
            request.field.add(name=name, number=number, type=FieldDescriptor.TYPE_STRING,
                              label=FieldDescriptor.LABEL_OPTIONAL)
        response = rpc.message_type.add(name="ModelConfigResponse")
        response.field.add(name="config", number=1, type=FieldDescriptor.TYPE_MESSAGE,
                           type_name=".inference.ModelConfig", label=FieldDescriptor.LABEL_OPTIONAL)
        pool.Add(rpc)

        def message(name: str):
            return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"inference.{name}"))

        self.ModelConfig = message("ModelConfig")
        self.Request = message("ModelConfigRequest")
        self.Response = message("ModelConfigResponse")

    def parse(self, text: str):
        return text_format.Parse(text, self.ModelConfig())

    def to_json(self, config) -> dict:
        """Proto3 JSON with the .proto field names, int64 values as numbers (as Triton's
        ``/config`` writes ``dims``), not the JSON mapping's strings."""
        as_dict = json_format.MessageToDict(config, preserving_proto_field_name=True)
        return _int64_as_numbers(as_dict, config.DESCRIPTOR)


def _int64_as_numbers(value: dict, descriptor) -> dict:
    for key, item in value.items():
        field = descriptor.fields_by_name.get(key)
        if field is None:
            continue
        if field.cpp_type in INT64_TYPES:
            value[key] = [int(v) for v in item] if isinstance(item, list) else int(item)
        elif field.message_type is not None:
            sub = field.message_type
            if sub.GetOptions().map_entry:
                value_field = sub.fields_by_name["value"]
                if value_field.message_type is not None:
                    for v in item.values():
                        _int64_as_numbers(v, value_field.message_type)
                elif value_field.cpp_type in INT64_TYPES:
                    value[key] = {k: int(v) for k, v in item.items()}
            else:
                for v in item if isinstance(item, list) else [item]:
                    _int64_as_numbers(v, sub)
    return value


# ------------------------------------------------------------------------------- REST


def _error(status: int, message: str) -> Response:
    return Response(status_code=status, content={"error": message})


def describe_validation_errors(errors: list[dict]) -> str:
    """FastAPI's validation errors as one sentence: what is wrong, and where."""
    parts = []
    for err in errors:
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        if err.get("type") == "json_invalid":
            why = (err.get("ctx") or {}).get("error") or err.get("msg", "")
            at = f" at character {loc[-1]}" if loc else ""
            parts.append(f"request body is not valid JSON ({why}{at})")
        else:
            parts.append(f"{'.'.join(loc) or 'request body'}: {err.get('msg', 'invalid')}")
    shown = "; ".join(parts[:5]) + (f"; and {len(parts) - 5} more" if len(parts) > 5 else "")
    return f"invalid inference request: {shown}" if parts else "invalid request"


def install_rest(app: FastAPI, data_plane, configs: dict[str, dict]) -> None:
    """The v2 error shape for FastAPI's own errors, and the ``/config`` routes (``configs``:
    model name -> Triton ModelConfig JSON). Call before the app serves its first request."""

    async def validation_error(request, exc: RequestValidationError) -> Response:
        return _error(400, describe_validation_errors(exc.errors()))

    async def http_error(request, exc: StarletteHTTPException) -> Response:
        return _error(exc.status_code, str(exc.detail))

    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)

    async def model_config(model_name: str, model_version: str | None = None) -> dict:
        await data_plane.model_metadata(model_name, model_version)  # 404 {"error"} if unknown
        config = configs.get(model_name)
        if config is None:
            raise StarletteHTTPException(404, f"Model {model_name} has no configuration")
        return config

    app.add_api_route("/v2/models/{model_name}/config", model_config, methods=["GET"])
    app.add_api_route("/v2/models/{model_name}/versions/{model_version}/config", model_config,
                      methods=["GET"])


# ------------------------------------------------------------------------------- gRPC


def install_grpc(grpc_server, data_plane, schema: ModelConfigSchema, configs: dict) -> None:
    """Adds the ``ModelConfig`` RPC to MLServer's gRPC server (``configs``: model name ->
    ModelConfig message) when MLServer creates it at start."""

    async def model_config(request, context):
        try:
            await data_plane.model_metadata(request.name, request.version or None)
        except MLServerError as err:
            await context.abort(STATUS_CODE_MAPPING.get(err.status_code, grpc.StatusCode.UNKNOWN),
                                str(err))
        config = configs.get(request.name)
        if config is None:
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"Model {request.name} has no configuration")
        return schema.Response(config=config)

    handler = grpc.method_handlers_generic_handler(GRPC_SERVICE, {
        "ModelConfig": grpc.unary_unary_rpc_method_handler(
            model_config, request_deserializer=schema.Request.FromString,
            response_serializer=schema.Response.SerializeToString),
    })
    create = grpc_server._create_server

    def create_with_model_config():
        server = create()
        server.add_generic_rpc_handlers((handler,))
        return server

    grpc_server._create_server = create_with_model_config
