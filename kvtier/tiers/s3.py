"""The object tier: blocks as objects in any S3-compatible bucket, through boto3.

Object layout::

    key   <prefix>/<layout_id>/<32 hex digits of the block hash>   (just <layout_id>/<hash> when
                                                                    the prefix is empty)
    body  the 64-byte record header (kvtier.blocks.record) followed by the payload

A ``PUT`` (or a completed multipart upload) is atomic in S3, so a reader sees the whole block or
none. Every read checks the header and the payload checksum and raises :class:`CorruptBlockError`
on damage; the damaged object is left for the chain to delete.

Credentials come only from the standard AWS chain (environment, shared config and credentials
files, web identity / IRSA, container and instance metadata); nothing here takes a secret. The
addressing style (virtual-host or path) is botocore's ``auto`` unless the shared AWS config sets
``s3 = addressing_style = path`` (handy for MinIO behind a host name).

Failure behaviour:

- Every request is bounded by ``connect_timeout_s`` / ``read_timeout_s`` and retried by botocore
  (standard mode: exponential backoff with jitter) up to ``max_attempts`` on throttling
  (SlowDown, 503), 5xx, timeouts and dropped connections.
- An absent object (``NoSuchKey``/404) is a miss: ``get`` returns None, ``contains`` False.
- When retries are exhausted, or the endpoint cannot be reached, the call raises
  :class:`TierUnavailableError` naming the endpoint and bucket. No botocore or boto3 exception
  leaves this module.
- At open the bucket is checked (``HeadBucket``): a missing bucket or refused access is a
  :class:`ConfigError`, an unreachable endpoint a :class:`TierUnavailableError`.
"""

from __future__ import annotations

import io
import logging
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import boto3
import boto3.exceptions
import botocore.exceptions
import urllib3.exceptions
from botocore.config import Config
from s3transfer.manager import TransferConfig, TransferManager

from kvtier.blocks.keys import BlockKey, block_key_of
from kvtier.blocks.record import HEADER_NBYTES, decode_header, encode_header, verify_payload
from kvtier.config import S3TierConfig
from kvtier.errors import ConfigError, InvalidRequestError, KVTierError, TierUnavailableError
from kvtier.tiers.base import Buffer, PutRequest, StoredBlock, Tier

if sys.version_info >= (3, 12):
    from typing import override
else:  # pragma: no cover - Python 3.10/3.11
    from typing_extensions import override

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

#: Every foreign exception a boto3 call can raise; translated at the boundary.
_FOREIGN_ERRORS = (
    botocore.exceptions.BotoCoreError,
    botocore.exceptions.ClientError,
    boto3.exceptions.Boto3Error,
    urllib3.exceptions.HTTPError,
    OSError,
)
#: Failures while streaming a response body, which botocore does not retry by itself.
_STREAM_ERRORS = (
    botocore.exceptions.ResponseStreamingError,
    botocore.exceptions.ReadTimeoutError,
    botocore.exceptions.IncompleteReadError,
    urllib3.exceptions.HTTPError,
)
_NOT_FOUND_CODES = frozenset({"NoSuchKey", "NotFound", "404"})
_DENIED_CODES = frozenset({"AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"})


def object_key(prefix: str, key: BlockKey) -> str:
    """The S3 object key of ``key``: ``<prefix>/<layout_id>/<hash hex>``, no leading slash."""
    return f"{prefix}/{key}" if prefix else str(key)


def _error_code(exc: BaseException) -> tuple[str, int | None]:
    """``(code, HTTP status)`` of a ClientError, ``("", None)`` for anything else."""
    if not isinstance(exc, botocore.exceptions.ClientError):
        return "", None
    code = str(exc.response.get("Error", {}).get("Code", ""))
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code, status


def _is_not_found(exc: BaseException) -> bool:
    code, status = _error_code(exc)
    return code in _NOT_FOUND_CODES or (status == 404 and code != "NoSuchBucket")


def client_config(settings: S3TierConfig) -> Config:
    """The botocore configuration the tier uses (also the benchmark's plain-boto3 bound)."""
    options: dict[str, Any] = {
        # total_max_attempts counts the first request; botocore's "max_attempts" key counts retries.
        "retries": {"mode": "standard", "total_max_attempts": settings.max_attempts},
        "connect_timeout": settings.connect_timeout_s,
        "read_timeout": settings.read_timeout_s,
        # Batch helpers and the multipart transfer each run up to max_concurrency requests.
        "max_pool_connections": 2 * settings.max_concurrency,
    }
    if "request_checksum_calculation" in Config.OPTION_DEFAULTS:
        # Blocks carry their own XXH3 checksum; skip the extra CRC that some S3-compatible
        # endpoints (older MinIO, Ceph) reject.
        options["request_checksum_calculation"] = "when_required"
        options["response_checksum_validation"] = "when_required"
    return Config(**options)


class S3Tier(Tier):
    """Blocks stored as objects in one bucket under a key prefix (see the module docstring)."""

    kind = "s3"

    def __init__(self, settings: S3TierConfig, name: str = "s3") -> None:
        super().__init__(name, settings.capacity or None)
        if not settings.bucket:
            raise ConfigError("the S3 tier needs a bucket: set s3.bucket (KVTIER_S3_BUCKET)")
        self.settings = settings
        self.bucket = settings.bucket
        self.prefix = settings.prefix.strip("/")
        self._where = (
            f"endpoint {settings.endpoint_url or 'AWS S3'}"
            f"{f' ({settings.region})' if settings.region else ''}, bucket {self.bucket!r}"
        )
        self._closed = False
        self._lock = threading.Lock()
        try:
            # Sessions are not thread-safe, clients are: build one client and share it.
            session = boto3.session.Session()
            self._client: Any = session.client(
                "s3",
                endpoint_url=settings.endpoint_url,
                region_name=settings.region,
                config=client_config(settings),
            )
        except _FOREIGN_ERRORS as exc:
            raise ConfigError(f"cannot build an S3 client for {self._where}: {exc}") from exc
        self._transfer = TransferManager(
            self._client,
            TransferConfig(
                multipart_threshold=settings.multipart_threshold,
                multipart_chunksize=settings.multipart_chunk_size,
                max_request_concurrency=settings.max_concurrency,
            ),
        )
        self._pool = ThreadPoolExecutor(settings.max_concurrency, thread_name_prefix=f"kvtier-{name}")
        try:
            self._check_bucket()
        except BaseException:
            self.close()
            raise

    # ---- helpers ------------------------------------------------------------------------------

    def _check_bucket(self) -> None:
        try:
            self._client.head_bucket(Bucket=self.bucket)
        except botocore.exceptions.NoCredentialsError as exc:
            raise ConfigError(
                f"no AWS credentials found for {self._where}: provide them through the standard "
                "chain (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, IRSA or instance role)"
            ) from exc
        except botocore.exceptions.ClientError as exc:
            code, status = _error_code(exc)
            if code in {"NoSuchBucket", "NotFound", "404"} or status == 404:
                raise ConfigError(
                    f"S3 bucket {self.bucket!r} does not exist at {self._where}: create it or fix KVTIER_S3_BUCKET"
                ) from exc
            if code in _DENIED_CODES or status == 403:
                raise ConfigError(
                    f"access to S3 bucket {self.bucket!r} denied at {self._where}: check the AWS "
                    "credentials chain and the bucket policy"
                ) from exc
            raise self._unavailable("open", "", exc) from exc
        except _FOREIGN_ERRORS as exc:
            raise self._unavailable("open", "", exc) from exc

    def _unavailable(self, action: str, obj_key: str, exc: BaseException) -> TierUnavailableError:
        code, status = _error_code(exc)
        what = f"{action} {obj_key}".strip()
        if code == "NoSuchBucket":
            detail = f"bucket {self.bucket!r} no longer exists"
        elif status is not None:
            detail = f"{code or 'error'} (HTTP {status}) after up to {self.settings.max_attempts} attempts: {exc}"
        elif isinstance(exc, botocore.exceptions.NoCredentialsError):
            detail = "no AWS credentials in the standard chain"
        else:
            detail = (
                f"endpoint unreachable or not answering after up to {self.settings.max_attempts} "
                f"attempts ({type(exc).__name__}: {exc})"
            )
        return TierUnavailableError(f"S3 tier {self.name!r}: {what} failed at {self._where}: {detail}", tier=self.name)

    def _key(self, key: BlockKey) -> str:
        return object_key(self.prefix, key)

    def _check_open(self) -> None:
        if self._closed:
            raise TierUnavailableError(f"S3 tier {self.name!r} is closed", tier=self.name)

    def _map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        """Run ``fn`` over ``items`` on the shared pool, keeping order (inline for one item)."""
        self._check_open()
        if len(items) <= 1:
            return [fn(item) for item in items]
        return list(self._pool.map(fn, items))

    # ---- primitives ---------------------------------------------------------------------------

    @override
    def stored_nbytes(self, payload_nbytes: int) -> int:
        return payload_nbytes + HEADER_NBYTES

    @override
    def put(self, key: BlockKey, payload: Buffer, checksum: int) -> None:
        """Upload header + payload: one ``PutObject``, or a multipart upload above the threshold."""
        self._check_open()
        obj_key = self._key(key)
        view = memoryview(payload)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        body = encode_header(key, view.nbytes, checksum) + view
        try:
            if len(body) > self.settings.multipart_threshold:
                self._transfer.upload(io.BytesIO(body), self.bucket, obj_key).result()
            else:
                self._client.put_object(Bucket=self.bucket, Key=obj_key, Body=body)
        except _FOREIGN_ERRORS as exc:
            raise self._unavailable("put", obj_key, exc) from exc

    @override
    def get(self, key: BlockKey) -> bytes | None:
        """Download and verify the block; None when absent, CorruptBlockError when damaged."""
        self._check_open()
        obj_key = self._key(key)
        where = f"s3://{self.bucket}/{obj_key}"
        fetched = self._fetch(obj_key)
        if fetched is None:
            return None
        raw_header, payload = fetched
        header = decode_header(raw_header, tier=self.name, where=where)
        verify_payload(header, key, payload, tier=self.name, where=where)
        return payload

    def _fetch(self, obj_key: str) -> tuple[bytes, bytes] | None:
        """``GetObject`` and read the body as (header bytes, payload); a body cut off midway is
        fetched again, up to ``max_attempts`` times in all."""
        for attempt in range(1, self.settings.max_attempts + 1):
            try:
                response = self._client.get_object(Bucket=self.bucket, Key=obj_key)
            except _FOREIGN_ERRORS as exc:
                if _is_not_found(exc):
                    return None
                raise self._unavailable("get", obj_key, exc) from exc
            stream = response["Body"]
            try:
                return stream.read(HEADER_NBYTES), stream.read()
            except _STREAM_ERRORS as exc:
                if attempt == self.settings.max_attempts:
                    raise self._unavailable("get", obj_key, exc) from exc
                logger.debug("S3 tier %r: reading %r failed (%s); fetching it again", self.name, obj_key, exc)
            except _FOREIGN_ERRORS as exc:
                raise self._unavailable("get", obj_key, exc) from exc
            finally:
                stream.close()
        raise AssertionError("unreachable")  # pragma: no cover

    @override
    def contains(self, key: BlockKey) -> bool:
        """``HeadObject``: whether the object exists (its bytes are not checked)."""
        self._check_open()
        obj_key = self._key(key)
        try:
            self._client.head_object(Bucket=self.bucket, Key=obj_key)
        except _FOREIGN_ERRORS as exc:
            if _is_not_found(exc):
                return False
            raise self._unavailable("head", obj_key, exc) from exc
        return True

    @override
    def delete(self, key: BlockKey) -> bool:
        """``HeadObject`` then ``DeleteObject`` (S3 does not say whether a delete removed anything)."""
        if not self.contains(key):
            return False
        obj_key = self._key(key)
        try:
            self._client.delete_object(Bucket=self.bucket, Key=obj_key)
        except _FOREIGN_ERRORS as exc:
            if _is_not_found(exc):
                return False
            raise self._unavailable("delete", obj_key, exc) from exc
        return True

    @override
    def scan(self) -> Iterator[StoredBlock]:
        """List every block under the prefix (paginated); objects that are not blocks are skipped."""
        self._check_open()
        list_prefix = f"{self.prefix}/" if self.prefix else ""
        skipped = 0
        try:
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=list_prefix, PaginationConfig={"PageSize": 1000}
            )
            for page in pages:
                for item in page.get("Contents", ()):
                    stored = self._parse_listing(item["Key"][len(list_prefix) :], item["Key"], int(item["Size"]))
                    if stored is None:
                        skipped += 1
                    else:
                        yield stored
        except _FOREIGN_ERRORS as exc:
            raise self._unavailable("list", list_prefix, exc) from exc
        if skipped:
            logger.warning(
                "S3 tier %r: skipped %d objects under %r that are not kvtier blocks", self.name, skipped, list_prefix
            )

    def _parse_listing(self, rest: str, obj_key: str, size: int) -> StoredBlock | None:
        try:
            key = block_key_of(rest)
        except InvalidRequestError:
            logger.debug("S3 tier %r: ignoring foreign object %r", self.name, obj_key)
            return None
        if self._key(key) != obj_key or size < HEADER_NBYTES:  # non-canonical hex, or truncated
            logger.debug("S3 tier %r: ignoring object %r (%d bytes)", self.name, obj_key, size)
            return None
        return StoredBlock(key, size - HEADER_NBYTES)

    # ---- parallel batch helpers ---------------------------------------------------------------

    @override
    def put_many(self, requests: Sequence[PutRequest]) -> list[KVTierError | None]:
        """Upload in parallel on the shared pool (``max_concurrency`` requests in flight)."""

        def one(request: PutRequest) -> KVTierError | None:
            try:
                self.put(request.key, request.payload, request.checksum)
            except KVTierError as exc:
                return exc
            return None

        return self._map(one, requests)

    @override
    def get_many(self, keys: Sequence[BlockKey]) -> list[bytes | KVTierError | None]:
        """Download in parallel; per key the payload, None when absent, or the kvtier error."""

        def one(key: BlockKey) -> bytes | KVTierError | None:
            try:
                return self.get(key)
            except KVTierError as exc:
                return exc

        return self._map(one, keys)

    @override
    def contains_many(self, keys: Iterable[BlockKey]) -> list[bool]:
        """``HeadObject`` in parallel; raises TierUnavailableError if any of them fails."""
        return self._map(self.contains, list(keys))

    @override
    def close(self) -> None:
        """Stop the worker pool and the transfer manager and close the client's connections."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._pool.shutdown(wait=True)
        self._transfer.shutdown()
        close_client = getattr(self._client, "close", None)
        if close_client is not None:
            close_client()

    def __repr__(self) -> str:
        return f"S3Tier(name={self.name!r}, bucket={self.bucket!r}, prefix={self.prefix!r}, endpoint={self.settings.endpoint_url!r})"
