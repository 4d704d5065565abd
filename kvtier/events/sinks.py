"""Where a daemon publishes: its own in-memory index, ``kvtier index serve``, or Redis directly."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvtier.config import KVTierConfig
from kvtier.daemon.auth import read_setting_file, resolve_token
from kvtier.errors import ConfigError
from kvtier.events.publisher import PublishSink
from kvtier.index.factory import REDIS_SCHEMES
from kvtier.index.memory import MemoryIndex

if TYPE_CHECKING:
    from kvtier.index.client import IndexClient

LOCAL_TARGET = "local"


def s3_location_of(config: KVTierConfig) -> str:
    """The shared S3 tier's location, ``s3://bucket/prefix``, or "" without one."""
    if not config.s3.enabled:
        return ""
    return f"s3://{config.s3.bucket}/{config.s3.prefix.strip('/')}"


def redacted(url: str) -> str:
    """A store URL without its credentials, for logs and status."""
    scheme, sep, rest = url.partition("://")
    return f"{scheme}{sep}{rest.rpartition('@')[2]}" if sep else url


def open_sink(config: KVTierConfig) -> tuple[PublishSink, str, MemoryIndex | None]:
    """The sink ``publish.index`` names, a label for it, and the local index when it is one."""
    publish = config.publish
    target = (publish.index or "").strip()
    if not target:
        local = MemoryIndex(heartbeat_ttl_s=max(config.index.heartbeat_ttl_s, 5 * publish.heartbeat_s))
        return local, LOCAL_TARGET, local
    if target.startswith(REDIS_SCHEMES):
        from kvtier.index.redis import RedisStore

        store = RedisStore.from_url(target, password_file=publish.redis_password_file, tls_ca_file=publish.tls_ca_file,
                                    namespace=publish.namespace)
        return store, redacted(target), None
    return index_client_for(config), target, None


def index_client_for(config: KVTierConfig, timeout_s: float = 5.0) -> IndexClient:
    """A client of the ``kvtier index serve`` that ``publish.index`` names, with its credentials."""
    from kvtier.index.client import IndexClient

    publish = config.publish
    target = (publish.index or "").strip()
    token = resolve_token(publish, "publish")
    ca = read_setting_file(publish.tls_ca_file, "publish.tls_ca_file")
    cert = read_setting_file(publish.tls_cert_file, "publish.tls_cert_file")
    key = read_setting_file(publish.tls_key_file, "publish.tls_key_file")
    if (cert is None) != (key is None):
        raise ConfigError("set both publish.tls_cert_file and publish.tls_key_file for mutual TLS")
    if token is None and ca is None and not target.startswith("unix:"):
        raise ConfigError(f"publish.index {target!r} is a TCP index: set KVTIER_PUBLISH_AUTH_TOKEN (or publish.auth_token_file), "
                          "the token `kvtier index serve` was started with, or publish.tls_ca_file (+ tls_cert_file, tls_key_file)")
    return IndexClient(target, token=token, tls_root_certificates=ca, tls_client_cert=(key, cert) if cert else None,
                       timeout_s=timeout_s)

