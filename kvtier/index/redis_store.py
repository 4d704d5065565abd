"""The index's shared store in Redis (Valkey and ElastiCache speak the same protocol).

Keys, all under the hash tag ``{<namespace>}`` so a cluster keeps them in one slot (one
function per key format below):

- ``{ns}:epoch``: a random id made when the store is first written or read by a replica; a Redis
  that restarted empty has none, so replicas see the change and rebuild.
- ``{ns}:members``: set of the nodes that published; ``{ns}:node:<node>``: hash ``session``,
  ``seq``, ``seen`` (Redis time, ms) of a node's publisher.
- ``{ns}:nodes``: hash node -> its last heartbeat (``kvtier.events.wire``).
- ``{ns}:owned:<node>``: set of the node's source-set keys; ``{ns}:shared``: those of shared tiers.
- ``{ns}:src:<holder>|<model>|<block_size>|<source>|<tier>``: set of 8-byte index keys one source
  holds (``holder`` is the node, or for S3 the bucket location).
- ``{ns}:log``: a stream of what changed, which replicas tail: ``k`` = ``b`` (a publish batch),
  ``h`` (a heartbeat), ``e`` (engine events), ``p`` (a purged node); ``d`` = the payload.

A batch applies atomically in one round trip: a Lua script checks the session and seq in Redis
(RESYNC otherwise, nothing applied), applies every event, records the node, and appends the batch
to the log. Redis errors become :class:`IndexUnavailableError` here.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

from kvtier.errors import ConfigError, IndexUnavailableError
from kvtier.events.model import BlockEvent, NodeInfo, PublishBatch
from kvtier.events.wire import encode_batch, encode_heartbeat, pack_keys
from kvtier.index.base import ApplyStatus

DEFAULT_LOG_MAXLEN = 1_000_000
PASSWORD_ENV = "KVTIER_REDIS_PASSWORD"

# Shared Lua: apply the events of a batch (ARGV[1] namespace prefix, ARGV[2] the encoded batch).
_APPLY_EVENTS = r"""
local function src_key(p, holder, model, bs, source, tier)
  return p .. ':src:' .. holder .. '|' .. model .. '|' .. bs .. '|' .. source .. '|' .. tier
end
local function location_of(source)
  return string.match(source, '^(.*)/[^/]+$') or source
end
local function chunks(blob)
  local out = {}
  for i = 1, #blob, 8 do out[#out + 1] = string.sub(blob, i, i + 7) end
  return out
end
local function each_slice(list, fn)
  local n = #list
  for i = 1, n, 4000 do fn({unpack(list, i, math.min(i + 3999, n))}) end
end
-- events are ARGV[first], ARGV[first+1]... in groups of six: op, tier, model, block_size, source, keys blob
local function apply_events(p, node, first)
  for i = first, #ARGV, 6 do
    local op, tier, model, bs, source, blob = tonumber(ARGV[i]), tonumber(ARGV[i + 1]), ARGV[i + 2], ARGV[i + 3], ARGV[i + 4], ARGV[i + 5]
    local members = chunks(blob)
    if #members > 0 then
      local shared = (tier == 3)
      local holder = shared and location_of(source) or node
      local key = src_key(p, holder, model, bs, source, tier)
      if op == 1 then
        each_slice(members, function(part) redis.call('SADD', key, unpack(part)) end)
        if shared then redis.call('SADD', p .. ':shared', key)
        else redis.call('SADD', p .. ':owned:' .. node, key) end
      elseif shared then
        local prefix = p .. ':src:' .. holder .. '|' .. model .. '|' .. bs .. '|'
        local suffix = '|' .. tier
        for _, other in ipairs(redis.call('SMEMBERS', p .. ':shared')) do
          if string.sub(other, 1, #prefix) == prefix and string.sub(other, -#suffix) == suffix then
            each_slice(members, function(part) redis.call('SREM', other, unpack(part)) end)
          end
        end
      else
        each_slice(members, function(part) redis.call('SREM', key, unpack(part)) end)
      end
    end
  end
end
local function ensure_epoch(p, fresh)
  if redis.call('EXISTS', p .. ':epoch') == 0 then redis.call('SET', p .. ':epoch', fresh) end
end
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
"""

_PUBLISH = _APPLY_EVENTS + r"""
local p, payload, maxlen, fresh = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local node, session, seq, reset = ARGV[5], ARGV[6], tonumber(ARGV[7]), ARGV[8] == '1'
ensure_epoch(p, fresh)
local nk = p .. ':node:' .. node
local cur = redis.call('HMGET', nk, 'session', 'seq')
if not reset then
  if cur[1] ~= session or tonumber(cur[2]) == nil or tonumber(cur[2]) + 1 ~= seq then return 'RESYNC' end
else
  for _, key in ipairs(redis.call('SMEMBERS', p .. ':owned:' .. node)) do
    if not string.find(key, '|vllm:', 1, true) then
      redis.call('DEL', key)
      redis.call('SREM', p .. ':owned:' .. node, key)
    end
  end
end
apply_events(p, node, 9)
redis.call('HSET', nk, 'session', session, 'seq', seq, 'seen', now_ms())
redis.call('SADD', p .. ':members', node)
redis.call('XADD', p .. ':log', 'MAXLEN', '~', maxlen, '*', 'k', 'b', 'd', payload)
return 'OK'
"""

_HEARTBEAT = r"""
local p, node, session, seq, payload, maxlen = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local nk = p .. ':node:' .. node
local cur = redis.call('HMGET', nk, 'session', 'seq')
if cur[1] ~= session or cur[2] ~= seq then return 'RESYNC' end
local t = redis.call('TIME')
redis.call('HSET', nk, 'seen', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
redis.call('HSET', p .. ':nodes', node, payload)
redis.call('XADD', p .. ':log', 'MAXLEN', '~', maxlen, '*', 'k', 'h', 'd', payload)
return 'OK'
"""

_ENGINE_EVENTS = _APPLY_EVENTS + r"""
local p, payload, maxlen, fresh, node = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
ensure_epoch(p, fresh)
apply_events(p, node, 6)
redis.call('HSET', p .. ':node:' .. node, 'seen', now_ms())
redis.call('SADD', p .. ':members', node)
redis.call('XADD', p .. ':log', 'MAXLEN', '~', maxlen, '*', 'k', 'e', 'd', payload)
return 'OK'
"""

_PURGE = r"""
local p, node, ttl_ms, maxlen = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local nk = p .. ':node:' .. node
local seen = tonumber(redis.call('HGET', nk, 'seen'))
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if seen ~= nil and now - seen <= ttl_ms then return 0 end
for _, key in ipairs(redis.call('SMEMBERS', p .. ':owned:' .. node)) do redis.call('DEL', key) end
redis.call('DEL', p .. ':owned:' .. node, nk)
redis.call('HDEL', p .. ':nodes', node)
redis.call('SREM', p .. ':members', node)
redis.call('XADD', p .. ':log', 'MAXLEN', '~', maxlen, '*', 'k', 'p', 'd', node)
return 1
"""


def _event_args(events: list[BlockEvent]) -> list[Any]:
    args: list[Any] = []
    for event in events:
        args += [int(event.op), int(event.tier), event.space.model, event.space.block_size, event.source, pack_keys(event.keys)]
    return args


def namespace_prefix(namespace: str) -> str:
    return "{" + namespace + "}"


def epoch_key(prefix: str) -> str:
    return f"{prefix}:epoch"


def members_key(prefix: str) -> str:
    return f"{prefix}:members"


def nodes_key(prefix: str) -> str:
    return f"{prefix}:nodes"


def node_key(prefix: str, node: str) -> str:
    return f"{prefix}:node:{node}"


def owned_key(prefix: str, node: str) -> str:
    return f"{prefix}:owned:{node}"


def shared_key(prefix: str) -> str:
    return f"{prefix}:shared"


def log_key(prefix: str) -> str:
    return f"{prefix}:log"


def source_key_fields(prefix: str, key: bytes) -> tuple[str, str, int, str, int]:
    """``(holder, model, block_size, source, tier)`` of a source-set key."""
    text = key.decode()
    body = text[len(prefix) + len(":src:"):]
    holder, model, block_size, rest = body.split("|", 3)
    source, _, tier = rest.rpartition("|")
    return holder, model, int(block_size), source, int(tier)


def redis_client(url: str, *, password_file: Path | None = None, tls_ca_file: Path | None = None, timeout_s: float = 5.0) -> Any:
    """A redis-py client for ``url``; the password from the URL, ``password_file`` or $KVTIER_REDIS_PASSWORD."""
    try:
        import redis
    except ImportError:
        from kvtier.errors import MissingDependencyError

        raise MissingDependencyError("a Redis index store needs the redis package: pip install 'kvtier[redis]'") from None
    options: dict[str, Any] = {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s, "health_check_interval": 30}
    password = os.environ.get(PASSWORD_ENV)
    if password_file is not None:
        try:
            password = Path(password_file).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read the Redis password file {password_file}: {exc.strerror}") from exc
    if password and "@" not in url.partition("://")[2]:
        options["password"] = password
    if tls_ca_file is not None:
        if not url.startswith("rediss://"):
            raise ConfigError("a Redis TLS CA file needs a rediss:// URL")
        options["ssl_ca_certs"] = str(tls_ca_file)
    try:
        return redis.Redis.from_url(url, **options)
    except ValueError as exc:
        raise ConfigError(f"not a Redis URL ({exc}); expected redis://host:6379/0 or rediss://...") from None


def unavailable(exc: Exception, what: str) -> IndexUnavailableError:
    return IndexUnavailableError(f"the index's Redis store failed during {what}: {type(exc).__name__}: {exc}")


class RedisStore:
    """Writes publish batches, heartbeats and engine events into Redis (see the module docstring)."""

    def __init__(self, client: Any, namespace: str = "kvtier", *, log_maxlen: int = DEFAULT_LOG_MAXLEN) -> None:
        self.client = client
        self.prefix = namespace_prefix(namespace)
        self.log_maxlen = log_maxlen
        self._publish = client.register_script(_PUBLISH)
        self._heartbeat = client.register_script(_HEARTBEAT)
        self._engine_events = client.register_script(_ENGINE_EVENTS)
        self._purge = client.register_script(_PURGE)

    @classmethod
    def from_url(cls, url: str, *, password_file: Path | None = None, tls_ca_file: Path | None = None,
                 namespace: str = "kvtier") -> RedisStore:
        return cls(redis_client(url, password_file=password_file, tls_ca_file=tls_ca_file), namespace)

    def _run(self, script: Any, what: str, *args: Any) -> Any:
        import redis

        try:
            return script(args=[self.prefix, *args])
        except redis.RedisError as exc:
            raise unavailable(exc, what) from exc

    def publish(self, batch: PublishBatch) -> ApplyStatus:
        answer = self._run(self._publish, "a publish", encode_batch(batch), self.log_maxlen, uuid.uuid4().hex,
                           batch.node, batch.session, batch.seq, "1" if batch.reset else "0", *_event_args(batch.events))
        return ApplyStatus.RESYNC if answer == b"RESYNC" else ApplyStatus.OK

    def heartbeat(self, info: NodeInfo) -> ApplyStatus:
        answer = self._run(self._heartbeat, "a heartbeat", info.node, info.session, str(info.seq), encode_heartbeat(info),
                           self.log_maxlen)
        return ApplyStatus.RESYNC if answer == b"RESYNC" else ApplyStatus.OK

    def apply_engine_events(self, node: str, batch: PublishBatch) -> None:
        self._run(self._engine_events, "engine events", encode_batch(batch), self.log_maxlen, uuid.uuid4().hex, node,
                  *_event_args(batch.events))

    def purge_if_silent(self, node: str, ttl_s: float) -> bool:
        """Delete ``node``'s holdings if Redis has not heard from it for ``ttl_s``; True if it did."""
        return bool(self._run(self._purge, "a purge", node, int(ttl_s * 1000), self.log_maxlen))

    def close(self) -> None:
        self.client.close()
