"""``kvtier route``'s settings: what it refuses to start with, and what it builds."""

from __future__ import annotations

import pytest

from kvtier.cli.main import build_parser
from kvtier.cli.route import build_router, settings_from
from kvtier.errors import ConfigError


def settings(*argv: str):
    return settings_from(build_parser().parse_args(["route", *argv]))


def test_it_needs_replicas() -> None:
    with pytest.raises(ConfigError, match="--replica"):
        build_router(settings())


def test_it_listens_beyond_loopback_only_with_an_api_key(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.delenv("KVTIER_ROUTER_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="API key"):
        build_router(settings("--address", "0.0.0.0:8080", "--replica", "http://10.0.0.5:8000"))
    short = tmp_path / "short"
    short.write_text("abc\n")
    with pytest.raises(ConfigError, match="16 characters"):
        build_router(settings("--address", "0.0.0.0:8080", "--replica", "http://10.0.0.5:8000", "--api-key-file", str(short)))
    monkeypatch.setenv("KVTIER_ROUTER_API_KEY", "k" * 24)
    router = build_router(settings("--address", "0.0.0.0:8080", "--replica", "a=http://10.0.0.5:8000"))
    assert [(r.node, r.url) for r in router.replicas] == [("a", "http://10.0.0.5:8000")]


def test_flags_reach_the_settings_and_the_policy() -> None:
    router = build_router(settings("--replica", "http://10.0.0.5:8000", "--replica", "http://10.0.0.6:8000", "--policy", "round-robin",
                                   "--index-fast-address", "127.0.0.1:7461", "--index-deadline-ms", "20"))
    assert router.policy.name == "round-robin"
    assert router.scores is None  # a policy that does not use the index never asks it
    router = build_router(settings("--replica", "http://10.0.0.5:8000", "--index-fast-address", "127.0.0.1:7461",
                                   "--index-deadline-ms", "20"))
    assert router.policy.name == "prefix" and router.scores.deadline_s == pytest.approx(0.02)
    with pytest.raises(ConfigError, match="NODE=URL"):
        build_router(settings("--replica", "10.0.0.5:8000"))


def test_a_headless_service_name_becomes_one_replica_per_address() -> None:
    """``--replicas-dns``: every address the name resolves to is a replica (here: localhost),
    and a replica already known keeps its record (its load) across resolutions."""
    import asyncio

    router = build_router(settings("--replicas-dns", "dns:localhost:8000"))

    async def resolve_twice() -> tuple[list[str], bool]:
        await router._resolve_dns()
        first = list(router.replicas)
        await router._resolve_dns()
        return [r.url for r in router.replicas], all(a is b for a, b in zip(first, router.replicas))

    urls, kept = asyncio.run(resolve_twice())
    assert "http://127.0.0.1:8000" in urls and kept
