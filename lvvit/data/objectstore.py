"""``s3://`` and ``gs://`` shards: requests the provider's own library signs, read by our
bounded HTTP reader.

The library does what users expect of it and what we must not redo: for S3, **boto3**
(``boto3.session.Session``: the credentials chain (environment, ``AWS_PROFILE`` and
``~/.aws/{credentials,config}``, SSO, assumed roles, container and instance roles), the
region, ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` (or ``endpoint_url`` in the profile)
for S3-compatible stores (MinIO, Ceph, R2), the profile's ``addressing_style``); for GCS,
**google-auth** (application default credentials: ``GOOGLE_APPLICATION_CREDENTIALS``,
``gcloud auth application-default login``, the metadata server), with
``STORAGE_EMULATOR_HOST`` for an emulator as google-cloud-storage reads it. The library
signs one GET (a SigV4 presigned URL, no network) or lends a bearer token, and the bytes
come through ``lvvit.data.streams``' HTTP reader, so an object-store shard keeps every
bound an ``https://`` shard has: ``--shard-timeout`` on each connect and read, the
``--shard-deadline`` watchdog over the whole exchange (headers included), the
Content-Length check, ``Range`` resume, and our retries with backoff (the library's own
retries would nest inside ours and outlive the deadline).

Why this and not ``boto3``'s ``get_object`` stream or fsspec (s3fs/gcsfs), measured against
``moto_server`` on loopback (8 objects of 2 MiB, median of 3 passes, 2 shared vCPUs, noisy):

=========================================  =====================
client                                     ms per 2 MiB object
=========================================  =====================
``aws s3 cp URL -`` (a process per read)   1643
boto3 ``get_object`` stream                11 - 30
s3fs 2026.9 ``open().read()``              13 - 35
boto3 presigned GET, read by urllib        12 - 13
=========================================  =====================

Every library is ~100x the CLI, and the presigned read is at least as fast as the others.
What decides is what each keeps: a ``get_object`` stream leaves no socket to arm the
deadline watchdog on before its headers arrive, and reports a cut body its own way; s3fs
adds a read-ahead block cache, its own retry policy and an asyncio loop that forked
loader workers must not inherit, and pins ``aiobotocore`` to a narrow botocore range (it
would fight the user's boto3). Signing with boto3 and reading with our reader gives one
code path, and one set of bounds, for every remote shard.

Permanent failures fail fast, named: an S3 error's ``<Code>`` (``NoSuchKey``,
``NoSuchBucket``, ``AccessDenied``, ``InvalidAccessKeyId``, ...) or GCS's JSON ``message``
with the HTTP status. StoreError ones are retried by ``lvvit.data.streams``: timeouts,
refused connections, 5xx, 408/429, and the S3 codes ``RequestTimeout``, ``SlowDown``,
``ExpiredToken`` (each retry signs again, with refreshed credentials). A bucket in another
region than the one configured answers with ``x-amz-bucket-region``; the request is signed
again for that region, as boto3's own redirector does. With no credentials at all, requests
go unsigned (public buckets, like ``aws s3 cp --no-sign-request``), said once in the log.

A missing library is a ``ConfigError`` naming the package to install, raised before any
shard is read (``require``).
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import re
import threading
import urllib.error
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import quote

from lvvit.data.streams import PermanentError as Permanent
from lvvit.data.streams import http_connection
from lvvit.errors import ConfigError, first_line

log = logging.getLogger(__name__)

PRESIGN_SECONDS = 3600
"""How long a signed URL stays valid; each connect (and each retry) signs a new one, so it
only has to outlive the request's start."""
ERROR_BODY_BYTES = 16384
"""Most bytes of an error response read to name the error."""
S3_TRANSIENT = frozenset({
    "RequestTimeout", "SlowDown", "Throttling", "ThrottlingException", "RequestThrottled",
    "InternalError", "ServiceUnavailable", "ExpiredToken", "TokenRefreshRequired",
})
"""S3 error codes a retry can change, whatever their HTTP status (``RequestTimeout`` is a 400)."""
GCS_READ_SCOPE = "https://www.googleapis.com/auth/devstorage.read_only"
GCS_ENDPOINT = "https://storage.googleapis.com"
CLIENT_VARIABLES = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_PROFILE", "AWS_ACCESS_KEY_ID",
                    "AWS_DEFAULT_REGION", "AWS_REGION")
"""Environment variables a cached S3 client was made under."""
PACKAGES = {"s3": ("boto3", "boto3"), "gs": ("google.auth", "google-auth")}
"""URL scheme -> (module imported, package to install)."""


class StoreError(OSError):
    """A failure a retry may change (throttled, a 5xx, an expired token)."""


class WrongRegion(Exception):
    """S3 says the bucket lives in another region than the request was signed for."""

    def __init__(self, region: str) -> None:
        super().__init__(region)
        self.region = region


@dataclass(frozen=True)
class Request:
    """One signed GET: where to send it and the headers it needs."""

    url: str
    headers: dict[str, str]


def split(url: str) -> tuple[str, str, str]:
    """``s3://bucket/key`` -> ``("s3", "bucket", "key")``; a URL with no bucket or key is a
    ``ConfigError`` naming it."""
    scheme, _, rest = url.partition("://")
    bucket, _, key = rest.partition("/")
    if not bucket or not key:
        raise ConfigError(f"{url}: expected {scheme.lower()}://BUCKET/KEY")
    return scheme.lower(), bucket, key


def require(url: str) -> None:
    """Raise a one-line ``ConfigError`` naming the package to install when the library that
    reads ``url``'s scheme is missing."""
    scheme = url.partition("://")[0].lower()
    module, package = PACKAGES[scheme]
    try:
        importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"reading {scheme}:// URLs needs the Python package {package}, which is not "
                          f"installed: pip install {package}") from None


def connector(url: str, timeout: float) -> Callable[[int, float], object]:
    """``(offset, deadline) -> connection`` for ``lvvit.data.streams``: each call signs a new
    request and opens it with the HTTP reader's bounds; a ``WrongRegion`` answer is signed
    again once for the bucket's region."""
    scheme, bucket, key = split(url)
    require(url)
    store = _S3 if scheme == "s3" else _GCS

    def explain(error: urllib.error.HTTPError) -> Exception:
        try:
            body = error.read(ERROR_BODY_BYTES) or b""
        except (OSError, ValueError):
            body = b""
        return store.explain(error, body)

    def connect(offset: int, deadline: float):
        for attempt in range(2):
            request = store.sign(bucket, key)
            try:
                return http_connection(request.url, timeout, deadline, offset, request.headers, explain)
            except WrongRegion as e:
                if attempt or e.region == _S3.regions.get(bucket):
                    raise Permanent(f"bucket {bucket} is in region {e.region}, and signing for it did not help") from None
                log.info("bucket %s is in region %s; signing for it", bucket, e.region)
                _S3.regions[bucket] = e.region
        raise AssertionError("unreachable")

    return connect


def _status_is_permanent(status: int) -> bool:
    return 300 <= status < 500 and status not in (408, 425, 429)


class _S3Store:
    """boto3 clients, one per region, made once per process and kept: we only sign with
    them (no connection of theirs is ever opened), so loader workers forked after the
    manifest was read use their parent's and start at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.clients: dict[tuple, object] = {}
        self.regions: dict[str, str] = {}  # bucket -> region learned from a redirect
        self.unsigned = False

    def client(self, region: str | None):
        """The client for ``region``, made anew when the variables that pick the store or the
        profile change (a notebook or test that points at another store)."""
        key = (region, *(os.environ.get(name) for name in CLIENT_VARIABLES))
        client = self.clients.get(key)
        if client is not None:
            return client
        with self.lock:
            if key not in self.clients:
                import boto3
                from botocore import UNSIGNED
                from botocore.config import Config

                session = boto3.session.Session()
                config = Config(signature_version="s3v4")
                if session.get_credentials() is None:
                    if not self.unsigned:
                        log.info("no AWS credentials found (environment, AWS_PROFILE, ~/.aws, instance role): "
                                 "reading s3:// unsigned, as for a public bucket")
                    self.unsigned = True
                    config = Config(signature_version=UNSIGNED)
                self.clients[key] = session.client("s3", region_name=region, config=config)
            return self.clients[key]

    def sign(self, bucket: str, key: str) -> Request:
        from botocore.exceptions import BotoCoreError

        try:
            client = self.client(self.regions.get(bucket))
            url = client.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key},
                                                ExpiresIn=PRESIGN_SECONDS)
        except BotoCoreError as e:  # credentials that could not be fetched or refreshed
            raise StoreError(f"signing the request failed: {first_line(e)}") from None
        return Request(url, {})

    def explain(self, error: urllib.error.HTTPError, body: bytes) -> Exception:
        text = body.decode("utf-8", "replace")
        code = _xml_field(text, "Code")
        message = _xml_field(text, "Message")
        region = error.headers.get("x-amz-bucket-region") if error.headers is not None else None
        if region and (error.code in (301, 307, 400) or code in ("PermanentRedirect", "AuthorizationHeaderMalformed")):
            return WrongRegion(region)
        said = f"HTTP {error.code} {code or error.reason}" + (f": {message}" if message else "")
        if code in S3_TRANSIENT or not _status_is_permanent(error.code):
            return StoreError(said)
        if self.unsigned and error.code == 403:
            said += " (no AWS credentials were found, so the request was unsigned)"
        return Permanent(said)


class _GCSStore:
    """Application default credentials from google-auth, made once per process; requests go
    to the JSON API's media download (``STORAGE_EMULATOR_HOST``: an emulator, unsigned)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.credentials = None
        self.anonymous = False

    def sign(self, bucket: str, key: str) -> Request:
        emulator = os.environ.get("STORAGE_EMULATOR_HOST")
        base = GCS_ENDPOINT
        if emulator:
            base = emulator if "://" in emulator else f"http://{emulator}"
        url = f"{base.rstrip('/')}/download/storage/v1/b/{quote(bucket, safe='')}/o/{quote(key, safe='')}?alt=media"
        token = None if emulator else self.token()
        return Request(url, {"Authorization": f"Bearer {token}"} if token else {})

    def token(self) -> str | None:
        with self.lock:
            if self.anonymous:
                return None
            import google.auth
            import google.auth.exceptions
            import google.auth.transport.requests

            if self.credentials is None:
                try:
                    self.credentials, _ = google.auth.default(scopes=[GCS_READ_SCOPE])
                except google.auth.exceptions.DefaultCredentialsError:
                    log.info("no Google application default credentials found: reading gs:// unsigned, as for "
                             "a public bucket")
                    self.anonymous = True
                    return None
            if not self.credentials.valid:
                try:
                    self.credentials.refresh(google.auth.transport.requests.Request())
                except google.auth.exceptions.TransportError as e:
                    raise StoreError(f"refreshing Google credentials failed: {e}") from None
                except google.auth.exceptions.RefreshError as e:
                    raise Permanent(f"refreshing Google credentials failed: {e}") from None
            return self.credentials.token

    def explain(self, error: urllib.error.HTTPError, body: bytes) -> Exception:
        message = ""
        try:
            detail = json.loads(body).get("error", {})
            message = str(detail.get("message", ""))[:300] if isinstance(detail, dict) else ""
        except (ValueError, AttributeError):
            message = body.decode("utf-8", "replace").strip()[:300]
        said = f"HTTP {error.code} {error.reason}" + (f": {message}" if message else "")
        if not _status_is_permanent(error.code):
            return StoreError(said)
        if self.anonymous and error.code in (401, 403):
            said += " (no Google credentials were found, so the request was unsigned)"
        return Permanent(said)


def _xml_field(text: str, name: str) -> str:
    """The first ``<name>...</name>`` of an S3 error document (a pattern, not an XML parser:
    the body is untrusted and only two short fields are wanted)."""
    match = re.search(rf"<{name}>([^<]{{1,500}})</{name}>", text)
    return match.group(1).strip() if match else ""


_S3 = _S3Store()
_GCS = _GCSStore()
