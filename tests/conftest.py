"""Shared fixtures: real servers (moto S3, Redis), a fault proxy, fake AWS credentials.

- ``aws_env`` (autouse): fake credentials and region in the environment, no IMDS, no shared
  AWS config files, so no test can ever reach real AWS.
- ``moto_endpoint`` (session): URL of a ``moto_server`` process started for the run.
- ``s3_client``: a boto3 S3 client on that server, for arranging and inspecting objects.
- ``s3_settings``: an :class:`S3TierConfig` on a fresh bucket, with short timeouts and few retries.
- ``s3_proxy``: a :class:`tests.servers.FaultProxy` in front of moto (``.endpoint_url``,
  ``.set_mode(mode, n=0)``, ``.requests``); build settings with
  ``s3_settings.model_copy(update={"endpoint_url": s3_proxy.endpoint_url})``.
- ``redis_url`` (session): ``redis://127.0.0.1:PORT/0`` of a ``redis-server`` process.

Server fixtures skip the test with an install hint when the binary is missing.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from kvtier.config import S3TierConfig
from tests.servers import FaultProxy, ServerBinaryMissing, fault_proxy, moto_server, redis_server

FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": "/nonexistent/kvtier-tests/aws-config",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/kvtier-tests/aws-credentials",
}
_AWS_ENV_REMOVED = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
)


@pytest.fixture(autouse=True)
def aws_env(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Fake AWS credentials and region; instance metadata and shared config files disabled."""
    for name in _AWS_ENV_REMOVED:
        monkeypatch.delenv(name, raising=False)
    for name, value in FAKE_AWS_ENV.items():
        monkeypatch.setenv(name, value)
    return dict(FAKE_AWS_ENV)


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """Endpoint URL of a ``moto_server`` process shared by the whole test session."""
    try:
        with moto_server() as url:
            yield url
    except ServerBinaryMissing as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """``redis://127.0.0.1:PORT/0`` of a ``redis-server`` process shared by the test session."""
    try:
        with redis_server() as url:
            yield url
    except ServerBinaryMissing as exc:
        pytest.skip(f"{exc} (CI installs it)")


@pytest.fixture
def s3_client(moto_endpoint: str, aws_env: dict[str, str]) -> Any:
    """A plain boto3 S3 client on the moto server (quick timeouts, no retries)."""
    import boto3
    from botocore.config import Config

    client = boto3.client(
        "s3",
        endpoint_url=moto_endpoint,
        region_name="us-east-1",
        config=Config(retries={"mode": "standard", "max_attempts": 1}, connect_timeout=2, read_timeout=10),
    )
    yield client
    client.close()


@pytest.fixture
def s3_settings(s3_client: Any, moto_endpoint: str) -> S3TierConfig:
    """S3 tier settings on a fresh, empty bucket, with timeouts and retries short enough for tests."""
    bucket = f"kvtier-test-{uuid.uuid4().hex[:16]}"
    s3_client.create_bucket(Bucket=bucket)
    return S3TierConfig(
        enabled=True,
        bucket=bucket,
        prefix="kvtier-test",
        endpoint_url=moto_endpoint,
        region="us-east-1",
        max_concurrency=8,
        max_attempts=3,
        connect_timeout_s=1.0,
        read_timeout_s=2.0,
    )


@pytest.fixture
def s3_proxy(moto_endpoint: str) -> Iterator[FaultProxy]:
    """A fault-injecting proxy in front of moto, in ``pass`` mode; stopped after the test."""
    with fault_proxy(moto_endpoint, hold_s=30.0, max_lifetime_s=300.0) as proxy:
        yield proxy
