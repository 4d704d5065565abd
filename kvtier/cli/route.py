"""``kvtier route``: the prefix-aware OpenAI-compatible router in front of vLLM replicas.

    kvtier route --replica a=http://10.0.0.5:8000 --replica b=http://10.0.0.6:8000 \\
        --index 10.0.0.9:7460 --index-fast-address 10.0.0.9:7461 --address 0.0.0.0:8080

Settings: flags, else ``[router]`` in ``--config``, else ``KVTIER_ROUTER_*``; the index's token
from ``KVTIER_ROUTER_INDEX_AUTH_TOKEN``, ``--index-token-file`` or ``KVTIER_INDEX_AUTH_TOKEN``; the
router's own API key from ``KVTIER_ROUTER_API_KEY`` or ``--api-key-file`` (required to listen
beyond loopback). See docs/routing.md.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import ssl
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from kvtier.config import RouterConfig, load_config
from kvtier.daemon.auth import read_setting_file
from kvtier.errors import ConfigError
from kvtier.index.fast_server import host_and_port
from kvtier.router.policy import POLICIES, make_policy
from kvtier.router.replicas import parse_dns_target, parse_replica

_FLAGS = {  # flag -> router setting
    "address": "address", "replica": "replicas", "replicas_dns": "replicas_dns", "policy": "policy", "index": "index",
    "index_fast_address": "index_fast_address", "index_token_file": "index_auth_token_file", "index_tls_ca_file": "index_tls_ca_file",
    "index_deadline_ms": "index_deadline_s", "tokenizer": "tokenizer", "index_model": "index_model", "api_key_file": "api_key_file",
    "upstream_api_key_file": "upstream_api_key_file", "log_decisions": "log_decisions",
}


def settings_from(args: argparse.Namespace) -> RouterConfig:
    overrides: dict[str, Any] = {}
    for flag, key in _FLAGS.items():
        value = getattr(args, flag)
        if value is None or value is False:
            continue
        overrides[key] = value / 1000 if flag == "index_deadline_ms" else value
    return load_config(args.config, overrides={"router": overrides}).router


def secret(value: SecretStr | None, path: Path | None, setting: str, env: str | None = None) -> str | None:
    """A credential from its setting, its file, or (last) an environment variable; never logged."""
    if value is not None:
        return value.get_secret_value()
    data = read_setting_file(path, setting)
    if data is not None:
        return data.decode().strip()
    return os.environ.get(env) if env else None


def build_router(settings: RouterConfig):  # noqa: ANN201 - kvtier.router.app.Router, imported lazily (Starlette)
    from kvtier.router.app import Router
    from kvtier.router.scores import IndexScores

    replicas = [parse_replica(spec) for spec in settings.replicas]
    dns = parse_dns_target(settings.replicas_dns) if settings.replicas_dns else None
    if not replicas and dns is None:
        raise ConfigError("kvtier route needs replicas: --replica [NODE=]URL (repeat it), or --replicas-dns dns:NAME:PORT")
    host, _port = host_and_port(settings.address, "router.address")
    api_key = secret(settings.api_key, settings.api_key_file, "router.api_key_file")
    if api_key is None and not _is_loopback(host):
        raise ConfigError(f"kvtier route listens on {settings.address}, beyond this machine: set an API key clients must send "
                          "(KVTIER_ROUTER_API_KEY or --api-key-file), or listen on 127.0.0.1")
    if api_key is not None and len(api_key) < 16:
        raise ConfigError("the router's API key must be at least 16 characters long")
    index_token = secret(settings.index_auth_token, settings.index_auth_token_file, "router.index_auth_token_file",
                         "KVTIER_INDEX_AUTH_TOKEN")
    ca = read_setting_file(settings.index_tls_ca_file, "router.index_tls_ca_file")
    policy = make_policy(settings.policy, settings.load_tokens_per_request, settings.max_imbalance)
    scores = None
    if settings.index_fast_address and policy.uses_index:
        tls = ssl.create_default_context(cadata=ca.decode()) if ca is not None else None
        scores = IndexScores(settings.index_fast_address, token=index_token, tls=tls, deadline_s=settings.index_deadline_s,
                             retry_after_s=settings.index_retry_after_s)
    elif policy.uses_index:
        logging.getLogger(__name__).warning("no --index-fast-address: the prefix policy routes by load only")
    list_nodes = _node_lister(settings.index, index_token, ca) if settings.index else None
    return Router(settings, replicas, policy, scores=scores, list_nodes=list_nodes, dns=dns, api_key=api_key,
                  upstream_api_key=secret(settings.upstream_api_key, settings.upstream_api_key_file, "router.upstream_api_key_file"))


def _node_lister(address: str, token: str | None, ca: bytes | None):  # noqa: ANN202
    from kvtier.index.client import IndexClient

    def list_nodes() -> dict[str, str]:
        with IndexClient(address, token=token, tls_root_certificates=ca, timeout_s=2.0) as client:
            return {status.info.node: status.info.address for status in client.nodes() if status.alive}

    return list_nodes


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _route(args: argparse.Namespace) -> int:
    import uvicorn

    settings = settings_from(args)
    router = build_router(settings)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    router_log = logging.getLogger("kvtier.router")  # replicas in and out of rotation, index fallbacks, decisions
    router_log.setLevel(logging.DEBUG if args.verbose else logging.INFO)
    router_log.addHandler(handler)
    router_log.propagate = False
    host, port = host_and_port(settings.address, "router.address")
    print(f"kvtier route: {settings.policy} policy over {len(router.replicas)} replica(s) on http://{settings.address}", flush=True)
    uvicorn.run(router.app(), host=host, port=port, log_level="warning", access_log=False, timeout_graceful_shutdown=5)
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("route", help="route OpenAI requests to the vLLM replica caching their prefix",
                                   description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="TOML config file (section [router])")
    parser.add_argument("--address", help="listen on host:port (default 127.0.0.1:8080)")
    parser.add_argument("--replica", action="append", help="a vLLM server: URL or NODE=URL (NODE: its kvtier node); repeat it")
    parser.add_argument("--replicas-dns", help="or a headless Service's name: dns:NAME:PORT, resolved again every 10 s")
    parser.add_argument("--policy", choices=POLICIES, help="prefix (default), round-robin or least-loaded")
    parser.add_argument("--index", help="the index's gRPC address (to name replicas' nodes by address)")
    parser.add_argument("--index-fast-address", help="the index's fast path host:port (scores)")
    parser.add_argument("--index-token-file", type=Path, help="file holding the index's bearer token")
    parser.add_argument("--index-tls-ca-file", type=Path, help="CA to verify a TLS index")
    parser.add_argument("--index-deadline-ms", type=float, help="route without scores past this (default 5)")
    parser.add_argument("--tokenizer", help="tokenizer path or hub name (default: the replicas' model)")
    parser.add_argument("--index-model", help="the model name daemons publish under (default: the replicas' model root)")
    parser.add_argument("--api-key-file", type=Path, help="file holding the key clients must send (or KVTIER_ROUTER_API_KEY)")
    parser.add_argument("--upstream-api-key-file", type=Path, help="file holding the replicas' --api-key")
    parser.add_argument("--log-decisions", action="store_true", default=None, help="log why each request went where it went")
    parser.set_defaults(handler=_route)
