"""The one configuration model of kvtier.

Read from, in increasing priority: defaults, a TOML file, ``KVTIER_<SECTION>_<KEY>`` environment
variables (e.g. ``KVTIER_DISK_CAPACITY=200GiB``, ``KVTIER_S3_BUCKET=kv-cache``) and explicit
overrides (command-line flags). Sizes accept ``"64GiB"``-style strings and are parsed once here.
Validation errors become :class:`ConfigError` naming the field and the problem.

S3 credentials are never part of this model: boto3 takes them from the standard AWS chain
(environment, shared config, web identity / IRSA, instance metadata).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Literal

import tomllib
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, SecretStr, ValidationError, field_validator

from kvtier.errors import ConfigError
from kvtier.units import parse_size


def _size_field(value: int | str) -> int:
    try:
        return parse_size(value)
    except ConfigError as exc:
        raise ValueError(str(exc)) from None  # pydantic adds the field's location


ByteSize = Annotated[int, BeforeValidator(_size_field)]

ENV_PREFIX = "KVTIER_"


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/kvtier`` or ``~/.cache/kvtier``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "kvtier"


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class HostTierConfig(_Section):
    """Host-memory tier: one shared-memory arena that engine workers map and copy into."""

    # Arena size; 0 means auto: a quarter of available memory, capped at 64 GiB and by the free
    # space of the arena's filesystem (/dev/shm is often small in containers).
    capacity: ByteSize = 0
    # Arena pages; a slab of one slot size is one page (or a run of pages for larger blocks).
    slab_size: ByteSize = Field(default=parse_size("16MiB"), gt=0)
    # Directory of the arena file; must be a memory filesystem (tmpfs) for speed.
    shm_dir: Path = Path("/dev/shm")
    # Arena file name inside shm_dir; empty picks "kvtier-<pid>-<n>-arena". Arena files of that
    # form left by a kvtier process that died are removed at start.
    name: str = ""
    # Map every arena page on a background thread from the start (0.5-2 s per GiB, without
    # delaying start-up) rather than take a page fault on each page's first use while serving.
    prefault: bool = True


class ODirectMode(str, Enum):
    AUTO = "auto"  # use O_DIRECT when the filesystem accepts it, buffered I/O otherwise
    ON = "on"  # require O_DIRECT (error at start if the filesystem refuses it)
    OFF = "off"


class DiskTierConfig(_Section):
    """Local NVMe tier: one file per block, written to a temporary name and renamed."""

    enabled: bool = True
    path: Path = Field(default_factory=lambda: default_cache_dir() / "disk")
    capacity: ByteSize = parse_size("64GiB")
    o_direct: ODirectMode = ODirectMode.AUTO
    fsync: bool = False  # fsync each block before it becomes visible (power-loss durability)


class S3TierConfig(_Section):
    """Object tier: any S3-compatible endpoint through boto3."""

    enabled: bool = False
    bucket: str = ""
    prefix: str = "kvtier"  # key prefix inside the bucket; objects are <prefix>/<layout_id>/<hash>
    endpoint_url: str | None = None  # None = AWS; set for MinIO, moto, S3 Express endpoints...
    region: str | None = None
    capacity: ByteSize = 0  # 0 = unbounded (bucket lifecycle rules age objects out)
    max_concurrency: int = Field(default=16, ge=1, le=1024)
    max_attempts: int = Field(default=5, ge=1, le=20)  # retries with backoff on throttling and 5xx
    connect_timeout_s: float = Field(default=2.0, gt=0)
    read_timeout_s: float = Field(default=10.0, gt=0)
    multipart_threshold: ByteSize = parse_size("16MiB")
    multipart_chunk_size: ByteSize = parse_size("8MiB")

    @field_validator("prefix")
    @classmethod
    def _strip_prefix(cls, value: str) -> str:
        return value.strip("/")


class WriteMode(str, Enum):
    WRITE_BACK = "write-back"  # put returns once in host memory; lower tiers filled in background
    WRITE_THROUGH = "write-through"  # put returns once every enabled tier holds the block


class ChainConfig(_Section):
    """Policy of the tier chain."""

    write_mode: WriteMode = WriteMode.WRITE_BACK
    eviction: Literal["lru", "s3fifo"] = "lru"
    lease_ttl_s: float = Field(default=30.0, gt=0)  # leases not released by then expire
    demotion_threads: int = Field(default=2, ge=1, le=64)
    promotion_threads: int = Field(default=8, ge=1, le=256)  # concurrent reads when prefetching from disk/S3
    demotion_queue_limit: int = Field(default=65536, ge=1)  # pending demotions beyond this are dropped


def default_socket_path() -> Path:
    """``$XDG_RUNTIME_DIR/kvtier/kvtier.sock``, else ``~/.cache/kvtier/run/kvtier.sock``."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(runtime) / "kvtier" if runtime else default_cache_dir() / "run"
    return base / "kvtier.sock"


class DaemonConfig(_Section):
    """The node daemon: where it listens, how it authenticates TCP peers, its timeouts."""

    # This node's name in the index: on Kubernetes the node name (NODE_NAME, set from the downward
    # API's spec.nodeName, as deploy/ does), else the host name.
    node: str = Field(default_factory=lambda: os.environ.get("NODE_NAME") or os.uname().nodename, min_length=1, max_length=253)
    socket_path: Path = Field(default_factory=default_socket_path)  # local clients; mode 0660, folder 0750
    # Optional TCP listener ("host:port"), for peers and remote tools. Refused unless a token or
    # mutual TLS is configured: every TCP call must authenticate.
    tcp_address: str | None = None
    auth_token: SecretStr | None = None  # bearer token for TCP calls (prefer KVTIER_DAEMON_AUTH_TOKEN)
    auth_token_file: Path | None = None  # or read it from this file (e.g. a Kubernetes Secret)
    tls_cert_file: Path | None = None  # server certificate for the TCP listener
    tls_key_file: Path | None = None
    tls_client_ca_file: Path | None = None  # set to require client certificates (mTLS)
    metrics_address: str | None = "127.0.0.1:9400"  # Prometheus /metrics; None disables
    reservation_ttl_s: float = Field(default=60.0, gt=0)  # uncommitted slots are reclaimed after this
    reaper_interval_s: float = Field(default=1.0, gt=0)  # how often expired leases/reservations are reclaimed
    max_message_bytes: ByteSize = parse_size("8MiB")  # larger requests get RESOURCE_EXHAUSTED
    max_blocks_per_request: int = Field(default=65536, ge=1)
    grace_period_s: float = Field(default=10.0, ge=0)  # in-flight calls may finish within this on SIGTERM
    flush_timeout_s: float = Field(default=60.0, ge=0)  # write-back flush deadline on shutdown
    workers: int = Field(default=8, ge=1, le=256)  # gRPC handler threads per listener
    # Also serve the hot calls (lookup, reserve, commit, acquire, release...) as msgpack frames on
    # "<socket_path>.fast" (docs/daemon-fast-path.md): tens of microseconds instead of gRPC's ~0.5 ms.
    fast_path: bool = True
    max_local_connections: int = Field(default=256, ge=1, le=4096)  # fast-path connections (one thread each)
    # CPUs the daemon runs on: "inherit" (whatever it was started with), "all" (every CPU its
    # cgroup allows: what a daemon started from inside a pinned engine needs) or a list "0-3,8".
    cpu_affinity: str = "inherit"

    @field_validator("cpu_affinity")
    @classmethod
    def _check_cpu_affinity(cls, value: str) -> str:
        value = value.strip()
        if value not in ("inherit", "all"):
            from kvtier.daemon.detach import parse_cpu_list

            try:
                if not parse_cpu_list(value):
                    raise ValueError(f"{value!r} names no CPU")
            except ConfigError as exc:
                raise ValueError(f"{exc}; or use 'inherit' or 'all'") from None
        return value


class IndexConfig(_Section):
    """``kvtier index serve``: the global index routers query and daemons publish to."""

    address: str = "127.0.0.1:7460"  # TCP listener ("host:port"); every call authenticates (token or mTLS)
    # Where the index keeps its state: "memory" (one replica), or a Redis URL ("redis://host:6379/0",
    # "rediss://..." for TLS) shared by several replicas; Valkey and ElastiCache work the same.
    store: str = "memory"
    namespace: str = "kvtier"  # prefix of every Redis key
    redis_password_file: Path | None = None  # else the URL's password, or KVTIER_REDIS_PASSWORD
    redis_tls_ca_file: Path | None = None  # CA bundle for rediss:// (default: the system's)
    heartbeat_ttl_s: float = Field(default=15.0, gt=0)  # a node silent this long leaves every answer
    # Tier weights of the score: the share of recomputing a block that holding it there saves.
    weights: dict[str, float] = Field(default_factory=dict)  # e.g. {"host": 0.9, "disk": 0.8, "s3": 0.5}
    # vLLM engines' KV-event endpoints to subscribe to (their GPU tier): "node=tcp://host:5557",
    # optionally "node=tcp://host:5557,replay=tcp://host:5558,model=NAME"; node and model default to
    # the events' topic "kv@<node>@<model>".
    engine_events: list[str] = Field(default_factory=list)
    auth_token: SecretStr | None = None  # bearer token (prefer KVTIER_INDEX_AUTH_TOKEN)
    auth_token_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_client_ca_file: Path | None = None  # set to require client certificates (mTLS)
    workers: int = Field(default=8, ge=1, le=256)  # gRPC handler threads
    # The fast path for routers: Score and LookupBlocks as msgpack frames on TCP ("host:port", same
    # token or mTLS as the gRPC listener), ~0.6 ms less per call than gRPC; "" turns it off.
    fast_address: str = "127.0.0.1:7461"
    max_fast_connections: int = Field(default=256, ge=1)  # each has a thread of its own

    @field_validator("weights")
    @classmethod
    def _check_weights(cls, value: dict[str, float]) -> dict[str, float]:
        tiers = ("gpu", "host", "disk", "s3")
        for tier, weight in value.items():
            if tier not in tiers:
                raise ValueError(f"unknown tier {tier!r}; expected one of {', '.join(tiers)}")
            if not 0 <= weight <= 1:
                raise ValueError(f"the weight of {tier} must be between 0 and 1, got {weight}")
        return value


class PublishConfig(_Section):
    """What the daemon tells the index: every block it stores and drops, per tier, and a heartbeat."""

    # None: the daemon keeps an index of its own tiers, served on its socket (kvtier index score
    # --index unix:<socket>). Else a `kvtier index serve` address ("host:port", "unix:/path") or
    # a Redis URL ("redis://...", "rediss://...") to write into directly.
    index: str | None = None
    auth_token: SecretStr | None = None  # the index's bearer token (prefer KVTIER_PUBLISH_AUTH_TOKEN)
    auth_token_file: Path | None = None
    tls_ca_file: Path | None = None  # to verify a TLS index (or rediss://)
    tls_cert_file: Path | None = None  # client certificate and key, for an index that requires mutual TLS
    tls_key_file: Path | None = None
    redis_password_file: Path | None = None
    namespace: str = "kvtier"  # Redis key prefix, as the index's
    interval_s: float = Field(default=0.2, gt=0)  # batches go out at most this often
    heartbeat_s: float = Field(default=2.0, gt=0)  # keep well under the index's heartbeat_ttl_s
    max_batch_keys: int = Field(default=65536, ge=1)  # block keys per batch (a re-sync sends several)
    max_pending_keys: int = Field(default=4_000_000, ge=1)  # beyond this, queued events are dropped for a re-sync
    # Also publish the tiers as vLLM KV events (ZMQ PUB, e.g. "tcp://*:5560"), for routers built
    # for vLLM's events such as llm-d's indexer; topic "kv@<node>@<model>" (docs/global-index.md).
    vllm_events: str | None = None
    vllm_events_replay: str | None = None  # ROUTER socket answering replay requests ("tcp://*:5561")
    vllm_events_encoding: Literal["map", "array"] = "map"  # map: vLLM >= PR #42892 (0.32); array: older, positional
    vllm_events_buffer: int = Field(default=10_000, ge=1)  # batches kept for replay
    block_descriptions: int = Field(default=1_000_000, ge=1)  # token ids kept for the blocks clients described


class RouterConfig(_Section):
    """``kvtier route``: an OpenAI-compatible proxy that sends each request to the replica
    holding most of its prompt's prefix (docs/routing.md)."""

    address: str = "127.0.0.1:8080"  # HTTP listener; a non-loopback address needs an API key
    # The vLLM replicas: "URL" or "NODE=URL" (NODE: the kvtier node name its daemon publishes
    # under; without it, the node whose heartbeat address has the URL's host).
    replicas: list[str] = Field(default_factory=list)
    # Or a headless Service: "dns:NAME:PORT", resolved again every discovery_interval_s.
    replicas_dns: str | None = None
    discovery_interval_s: float = Field(default=10.0, gt=0)
    policy: Literal["prefix", "round-robin", "least-loaded"] = "prefix"
    index: str | None = None  # the index's gRPC address (ListNodes); scores go to index_fast_address
    index_fast_address: str | None = None  # the index's fast path ("host:port"); None: no scores (least-loaded)
    index_auth_token: SecretStr | None = None  # the index's bearer token (else KVTIER_INDEX_AUTH_TOKEN)
    index_auth_token_file: Path | None = None
    index_tls_ca_file: Path | None = None
    index_deadline_s: float = Field(default=0.005, gt=0, le=1)  # a score later than this is not waited for
    index_retry_after_s: float = Field(default=1.0, ge=0)  # after an index failure, route without it this long
    tokenizer: str | None = None  # default: the model the replicas serve (their /v1/models root)
    index_model: str | None = None  # the model name daemons publish under (default: the replicas' model root)
    # The prefix policy's cost of a replica, in prompt tokens: the tokens it would compute, plus
    # the prefill tokens of requests it has not answered yet, plus this many per running request.
    load_tokens_per_request: int = Field(default=256, ge=0)
    # A replica with this many more requests in flight than the least busy one takes no more
    # until the others catch up, whatever its cache holds (no pile-up on one hot replica).
    max_imbalance: int = Field(default=8, ge=1)
    metrics_interval_s: float = Field(default=0.5, gt=0)  # replicas' /metrics polls (running, waiting)
    health_interval_s: float = Field(default=2.0, gt=0)  # a replica taken out is tried again this often
    connect_timeout_s: float = Field(default=2.0, gt=0)
    request_timeout_s: float = Field(default=600.0, gt=0)
    # Clients must send "Authorization: Bearer <key>" on /v1 (prefer KVTIER_ROUTER_API_KEY or the file).
    api_key: SecretStr | None = None
    api_key_file: Path | None = None
    # Sent to the replicas (their --api-key) in place of the client's key (KVTIER_ROUTER_UPSTREAM_API_KEY).
    upstream_api_key: SecretStr | None = None
    upstream_api_key_file: Path | None = None
    log_decisions: bool = False  # log why each request went where it went


class PeerConfig(_Section):
    """Cross-node reuse (docs/peer.md): on a local miss, pull the blocks another node's daemon
    holds, or read the ones another node wrote to the shared S3 bucket. Needs an index shared by
    the nodes (``publish.index``) to find holders, and ``daemon.tcp_address`` to serve peers."""

    enabled: bool = True  # takes effect only with a shared index (publish.index set)
    # The data path: "nixl" (NIXL only; a peer without it is skipped), "tcp" (the gRPC stream) or
    # "auto" (NIXL where both sides have it, else the gRPC stream, logged once per peer).
    transport: Literal["auto", "nixl", "tcp"] = "auto"
    # NIXL backend: UCX (any network; loopback in tests) or LIBFABRIC (EFA). LIBFABRIC is never
    # replaced silently: a daemon that cannot load it does not start.
    nixl_backend: Literal["UCX", "LIBFABRIC"] = "UCX"
    # Pause of NIXL's progress thread between polls: NIXL's Python API polls without one, which
    # keeps a core busy in every idle daemon; 100 us costs ~3% of a core and no measurable speed.
    nixl_progress_delay_us: int = Field(default=100, ge=0, le=100_000)
    # The address peers reach this daemon at (published with its heartbeat); default: the host
    # of daemon.tcp_address, or POD_IP / this host's address when that is a wildcard.
    advertise_address: str | None = None
    # How peers authenticate to this daemon's peers: the daemon's own token or mTLS settings
    # apply. What this daemon presents to peers (default: daemon.auth_token / auth_token_file):
    auth_token: SecretStr | None = None  # prefer KVTIER_PEER_AUTH_TOKEN
    auth_token_file: Path | None = None
    tls_ca_file: Path | None = None  # to verify peers' TLS certificates
    tls_cert_file: Path | None = None  # client certificate and key, for peers that require mutual TLS
    tls_key_file: Path | None = None
    timeout_s: float = Field(default=5.0, gt=0)  # a whole fetch (offer, transfer, checks) ends by then
    index_timeout_s: float = Field(default=0.05, gt=0)  # a lookup asks the index for holders at most this long
    holder_wait_s: float = Field(default=1.0, ge=0)  # how long a holder may promote blocks from its disk
    max_blocks_per_fetch: int = Field(default=256, ge=1, le=65536)
    fetch_threads: int = Field(default=4, ge=1, le=64)
    backoff_s: float = Field(default=1.0, gt=0)  # a failing peer is skipped this long, doubling per failure
    max_backoff_s: float = Field(default=60.0, gt=0)
    # The TCP path's block stream (ZeroMQ) listens on daemon.tcp_address's host at this port;
    # 0 picks a free one (set one to open it in a NetworkPolicy). Offers carry its address.
    stream_port: int = Field(default=0, ge=0, le=65535)


class KVTierConfig(_Section):
    daemon: DaemonConfig = DaemonConfig()
    host: HostTierConfig = HostTierConfig()
    disk: DiskTierConfig = DiskTierConfig()
    s3: S3TierConfig = S3TierConfig()
    chain: ChainConfig = ChainConfig()
    index: IndexConfig = IndexConfig()
    publish: PublishConfig = PublishConfig()
    router: RouterConfig = RouterConfig()
    peer: PeerConfig = PeerConfig()

    def __repr__(self) -> str:
        return f"KVTierConfig({self.model_dump_json()})"


def _env_overrides(env: Mapping[str, str]) -> dict[str, dict[str, str]]:
    sections = KVTierConfig.model_fields
    found: dict[str, dict[str, str]] = {}
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX):
            continue
        rest = name[len(ENV_PREFIX) :].lower()
        section, _, key = rest.partition("_")
        if section not in sections or not key:
            continue
        section_model = sections[section].annotation
        if key not in section_model.model_fields:  # type: ignore[union-attr]
            valid = ", ".join(f"{ENV_PREFIX}{section.upper()}_{k.upper()}" for k in section_model.model_fields)  # type: ignore[union-attr]
            raise ConfigError(f"unknown setting {name}; valid ones are: {valid}")
        found.setdefault(section, {})[key] = value
    return found


def _merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"])
        if item["type"] == "extra_forbidden":
            lines.append(f"  {where}: unknown setting (valid settings are listed in the README, section Configuration)")
        else:
            lines.append(f"  {where}: {item['msg']} (got {item.get('input')!r})")
    return "invalid kvtier configuration:\n" + "\n".join(lines)


def load_config(
    path: str | Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> KVTierConfig:
    """Build the configuration from a TOML file, the environment and overrides (highest wins)."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text())
        except FileNotFoundError as exc:
            raise ConfigError(f"config file {path} does not exist") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    data = _merge(data, _env_overrides(os.environ if env is None else env))
    data = _merge(data, overrides or {})
    try:
        return KVTierConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None
