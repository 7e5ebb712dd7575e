"""ASGI middleware in front of MLServer's REST app: a request size limit, and Triton's
binary-tensor extension for request bodies.

MLServer's REST side parses every body as JSON, so ``tritonclient.http`` with its default
``binary_data=True`` (a JSON header of ``Inference-Header-Content-Length`` bytes followed
by raw tensor bytes) fails there. Here such a body is rewritten before MLServer sees it:
each binary input becomes base64 data with ``content_type: "base64"`` (one string per
BYTES element, one string for a numeric tensor), which protocol.py decodes straight into
numpy without a JSON list of floats. Responses stay JSON tensors, which ``tritonclient``
reads the same way (``InferResult`` falls back to JSON when the response has no binary
header), so the client's defaults work unchanged.

Bodies over ``max_body_bytes`` (compressed or after gzip/deflate decompression) get 413
before anything is parsed; nothing of them is kept.
"""

from __future__ import annotations

import base64
import struct
import zlib

import orjson

Scope = dict
BINARY_HEADER = b"inference-header-content-length"
DECOMPRESS = {b"gzip": 16 + zlib.MAX_WBITS, b"deflate": zlib.MAX_WBITS}
DRAIN_FACTOR = 4
"""Refused bodies up to this many times the limit are read and dropped before the 413."""


class BadRequest(ValueError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def unpack_bytes_elements(blob: bytes, where: str) -> list[bytes]:
    """Triton's BYTES serialisation: each element is a little-endian uint32 length + bytes."""
    items, offset = [], 0
    while offset < len(blob):
        if offset + 4 > len(blob):
            raise BadRequest(400, f"{where}: truncated BYTES element length at byte {offset}")
        (size,) = struct.unpack_from("<I", blob, offset)
        offset += 4
        if offset + size > len(blob):
            raise BadRequest(400, f"{where}: BYTES element of {size} bytes runs past the data")
        items.append(blob[offset:offset + size])
        offset += size
    return items


def binary_to_json(body: bytes, header_length: int) -> bytes:
    """A binary-extension request body -> the equivalent JSON body (base64 for binary parts)."""
    if not 0 < header_length <= len(body):
        raise BadRequest(400, f"Inference-Header-Content-Length {header_length} does not fit "
                              f"a body of {len(body)} bytes")
    try:
        header = orjson.loads(body[:header_length])
    except orjson.JSONDecodeError as err:
        raise BadRequest(400, f"binary request: JSON header is not valid JSON ({err})") from err
    offset = header_length
    for tensor in header.get("inputs") or []:
        params = tensor.get("parameters") or {}
        size = params.pop("binary_data_size", None)
        if size is None:
            continue
        where = f"input '{tensor.get('name')}'"
        if not isinstance(size, int) or size < 0 or offset + size > len(body):
            raise BadRequest(400, f"{where}: binary_data_size {size} runs past the request body")
        blob = body[offset:offset + size]
        offset += size
        if tensor.get("datatype") == "BYTES":
            elements = unpack_bytes_elements(blob, where)
        else:
            elements = [blob]
        tensor["data"] = [base64.b64encode(e).decode("ascii") for e in elements]
        params["content_type"] = "base64"
        tensor["parameters"] = params
    if offset != len(body):
        raise BadRequest(400, f"binary request: {len(body) - offset} bytes after the last tensor")
    return orjson.dumps(header)


def decompress(body: bytes, encoding: bytes, limit: int) -> bytes:
    """gzip/deflate body, bounded: a small request cannot expand past the size limit."""
    inflater = zlib.decompressobj(DECOMPRESS[encoding])
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as err:
        raise BadRequest(400, f"body is not valid {encoding.decode()} data ({err})") from err
    if len(out) > limit:
        raise BadRequest(413, f"request body is over {limit} bytes once decompressed "
                              f"(--max-request-mb)")
    return out


class RestGuard:
    """Size limit + binary tensors for POSTs; everything else passes straight through."""

    def __init__(self, app, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        try:
            body = await self._read_body(headers, receive)
            encoding = headers.get(b"content-encoding", b"").strip().lower()
            if encoding in DECOMPRESS:
                body = decompress(body, encoding, self.max_body_bytes)
            if BINARY_HEADER in headers:
                try:
                    header_length = int(headers[BINARY_HEADER])
                except ValueError:
                    raise BadRequest(400, "Inference-Header-Content-Length is not an integer") from None
                body = binary_to_json(body, header_length)
        except BadRequest as err:
            await _reply_error(send, err.status, str(err))
            return
        # The body is now whole and plain: describe it as such to the app behind.
        drop = {b"content-length", b"transfer-encoding", BINARY_HEADER}
        if encoding in DECOMPRESS:
            drop.add(b"content-encoding")
        new_headers = [(k, v) for k, v in scope["headers"] if k not in drop]
        new_headers.append((b"content-length", str(len(body)).encode()))
        await self.app({**scope, "headers": new_headers}, _replay(body, receive), send)

    async def _read_body(self, headers: dict, receive) -> bytes:
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            if int(declared) <= DRAIN_FACTOR * self.max_body_bytes:
                await _discard_body(receive, int(declared))
            raise BadRequest(413, f"request body of {int(declared)} bytes is over the server's "
                                  f"limit of {self.max_body_bytes} (--max-request-mb)")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise BadRequest(400, "client disconnected")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                if message.get("more_body", False):
                    await _discard_body(receive, DRAIN_FACTOR * self.max_body_bytes - size)
                raise BadRequest(413, f"request body is over the server's limit of "
                                      f"{self.max_body_bytes} bytes (--max-request-mb)")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


async def _discard_body(receive, budget: int) -> None:
    """Read up to ``budget`` more bytes of a refused body without keeping them: clients that
    send the whole body before reading (http.client, tritonclient.http) then get the 413,
    not a broken pipe."""
    while budget > 0:
        message = await receive()
        if message["type"] == "http.disconnect" or not message.get("more_body", False):
            return
        budget -= len(message.get("body", b""))


def _replay(body: bytes, receive):
    sent = False

    async def replay_receive():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # later calls wait for the disconnect, as the server would

    return replay_receive


async def _reply_error(send, status: int, message: str) -> None:
    payload = orjson.dumps({"error": message})
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})
