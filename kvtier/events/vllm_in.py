"""vLLM engines' own KV events, turned into index events: the GPU tier of every node.

Decoding is defensive (``docs/global-index.md``): a batch is ``[ts, events, dp_rank]`` (trailing
fields may be missing) or a map; an event is a map with a ``"type"`` key (vLLM since PR #42892)
or a positional array with the tag first, in the field order llm-d decodes::

    BlockStored  [tag, block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium, lora_name,
                  extra_keys, group_idx, kv_cache_spec_kind, kv_cache_spec_sliding_window, ...]
    BlockRemoved [tag, block_hashes, medium, group_idx, ...]
    AllBlocksCleared [tag]

Hashes may be ints or bytes; they are only the engine's names for its blocks. The index keys
blocks by kvtier's own hash, recomputed from each stored block's token ids and its parent's
kvtier hash (remembered per engine hash), so GPU blocks and kvtier's tiers share one key space.
Only the GPU medium is taken by default (``tiers=gpu``): a node's kvtier daemon publishes its own
tiers with removals, while the ``CPU``/``STORAGE`` events kvtier's connector adds to the engine's
stream (for indexes that see nothing else) are never removed when the daemon evicts. A node that
offloads with vLLM's own connector instead, and has no kvtier daemon, takes ``tiers=all``.
Strict where a guess could be wrong: an unknown medium, a block whose parent is unknown, extra
keys kvtier cannot reproduce (multimodal items, salts it cannot place), another block size, a
hybrid model's non-first group: each is skipped and counted, never indexed under a wrong key.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack

from kvtier.blocks.hashing import ROOT_PARENT, HashExtras, hash_prompt
from kvtier.errors import InvalidRequestError
from kvtier.events.model import ENGINE_SOURCE_PREFIX, BlockEvent, IndexTier, Op, Space, index_key

log = logging.getLogger(__name__)

GPU_ONLY = frozenset({IndexTier.GPU})
ALL_TIERS = frozenset(IndexTier)
MEDIUM_TIERS = {None: IndexTier.GPU, "GPU": IndexTier.GPU, "CPU": IndexTier.HOST, "STORAGE": IndexTier.DISK,
                "FS": IndexTier.DISK, "OBJ": IndexTier.DISK, "DISK": IndexTier.DISK}
_STORED_FIELDS = ("block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id", "medium", "lora_name",
                  "extra_keys", "group_idx")
_REMOVED_FIELDS = ("block_hashes", "medium", "group_idx")

EngineHash = int | bytes


@dataclass(slots=True)
class EngineBlockStored:
    block_hashes: list[EngineHash]
    parent_block_hash: EngineHash | None
    token_ids: list[int]
    block_size: int
    medium: str | None = None
    lora_name: str | None = None
    extra_keys: list[Any] | None = None
    group_idx: int | None = None


@dataclass(slots=True)
class EngineBlockRemoved:
    block_hashes: list[EngineHash]
    medium: str | None = None
    group_idx: int | None = None


@dataclass(slots=True)
class EngineAllBlocksCleared:
    pass


EngineEvent = EngineBlockStored | EngineBlockRemoved | EngineAllBlocksCleared


@dataclass(slots=True)
class VllmEventBatch:
    ts: float
    events: list[EngineEvent]
    data_parallel_rank: int | None = None
    skipped: int = 0  # events of a type this decoder does not know


def decode_vllm_batch(payload: bytes) -> VllmEventBatch:
    """Decode one event batch; raises InvalidRequestError on anything malformed."""
    try:
        raw = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types on bad bytes
        raise InvalidRequestError(f"vLLM event batch: not valid msgpack ({exc})") from exc
    if isinstance(raw, dict):
        raw = [raw.get("ts"), raw.get("events"), raw.get("data_parallel_rank")]
    if not isinstance(raw, list) or len(raw) < 2 or not isinstance(raw[1], list):
        raise InvalidRequestError("vLLM event batch: expected [ts, events, dp_rank]")
    ts = raw[0]
    if not isinstance(ts, (int, float)):
        raise InvalidRequestError(f"vLLM event batch: ts must be a number, got {ts!r:.40}")
    batch = VllmEventBatch(float(ts), [], raw[2] if len(raw) > 2 and isinstance(raw[2], int) else None)
    for position, event in enumerate(raw[1]):
        decoded = _event(event, position)
        if decoded is None:
            batch.skipped += 1
        else:
            batch.events.append(decoded)
    return batch


def _event(event: Any, position: int) -> EngineEvent | None:
    where = f"vLLM event {position}"
    if isinstance(event, dict):
        tag, fields = event.get("type"), event
    elif isinstance(event, list) and event:
        tag = event[0]
        names = _STORED_FIELDS if tag == "BlockStored" else _REMOVED_FIELDS if tag == "BlockRemoved" else ()
        fields = dict(zip(names, event[1:], strict=False))
    else:
        raise InvalidRequestError(f"{where}: expected a map or an array with the event's tag first")
    if tag == "AllBlocksCleared":
        return EngineAllBlocksCleared()
    if tag not in ("BlockStored", "BlockRemoved"):
        return None  # a newer event type: skipped, counted
    hashes = fields.get("block_hashes")
    if not isinstance(hashes, list) or not all(_is_hash(h) for h in hashes):
        raise InvalidRequestError(f"{where}: block_hashes must be a list of ints or bytes")
    medium, group = fields.get("medium"), fields.get("group_idx")
    if medium is not None and not isinstance(medium, str) or group is not None and type(group) is not int:
        raise InvalidRequestError(f"{where}: medium must be a string and group_idx an int")
    if tag == "BlockRemoved":
        return EngineBlockRemoved(hashes, medium, group)
    tokens, size, parent = fields.get("token_ids"), fields.get("block_size"), fields.get("parent_block_hash")
    if not isinstance(tokens, list) or not all(type(t) is int for t in tokens):
        raise InvalidRequestError(f"{where}: token_ids must be a list of ints")
    if type(size) is not int or size <= 0:
        raise InvalidRequestError(f"{where}: block_size must be a positive int")
    if parent is not None and not _is_hash(parent):
        raise InvalidRequestError(f"{where}: parent_block_hash must be an int, bytes or null")
    lora, extra = fields.get("lora_name"), fields.get("extra_keys")
    if lora is not None and not isinstance(lora, str):
        raise InvalidRequestError(f"{where}: lora_name must be a string")
    return EngineBlockStored(hashes, parent, tokens, size, medium, lora, extra if isinstance(extra, list) else None, group)


def _is_hash(value: Any) -> bool:
    return type(value) is int or isinstance(value, bytes)


@dataclass(slots=True)
class TranslatorStats:
    stored: int = 0
    removed: int = 0
    unknown_medium: int = 0
    other_tier: int = 0  # a known medium the stream does not take (``tiers=gpu``)
    unknown_parent: int = 0
    unreproducible_extra_keys: int = 0
    other_block_size: int = 0
    other_group: int = 0
    cleared: int = 0
    skipped_types: int = 0
    counters: dict[str, int] = field(default_factory=dict)


class EngineEventTranslator:
    """One engine's events, as index events of source ``vllm:<endpoint>`` in ``space``.

    Keeps engine hash -> (kvtier hash, copies) for every block the engine holds, so removals
    (which carry engine hashes only) translate, and a hash stored twice (two physical copies)
    is removed only with its last copy. Not thread-safe: one subscriber thread owns it.
    """

    def __init__(self, space: Space, source: str, tiers: frozenset[IndexTier] = GPU_ONLY) -> None:
        if not source.startswith(ENGINE_SOURCE_PREFIX):
            source = ENGINE_SOURCE_PREFIX + source
        self.space = space
        self.source = source
        self.tiers = tiers
        self.stats = TranslatorStats()
        self._blocks: dict[tuple[EngineHash, IndexTier], list] = {}  # (engine hash, tier) -> [kvtier hash, copies]
        self._kvtier_of: dict[EngineHash, bytes] = {}  # engine hash -> kvtier hash (for parents), any tier

    def translate(self, batch: VllmEventBatch) -> list[BlockEvent]:
        self.stats.skipped_types += batch.skipped
        out: list[BlockEvent] = []
        for event in batch.events:
            if isinstance(event, EngineBlockStored):
                self._stored(event, out)
            elif isinstance(event, EngineBlockRemoved):
                self._removed(event, out)
            else:
                out.extend(self.clear())
        return _merged(out)

    def clear(self) -> list[BlockEvent]:
        """Forget everything (AllBlocksCleared, or a gap nobody can replay): removals for all of it."""
        by_tier: dict[IndexTier, list[int]] = {}
        for (_, tier), (kvtier_hash, _) in self._blocks.items():
            by_tier.setdefault(tier, []).append(index_key(kvtier_hash))
        self._blocks.clear()
        self._kvtier_of.clear()
        self.stats.cleared += 1
        return [BlockEvent(Op.REMOVED, tier, self.space, self.source, keys) for tier, keys in by_tier.items()]

    def _tier(self, medium: str | None) -> IndexTier | None:
        tier = MEDIUM_TIERS.get(medium.upper() if isinstance(medium, str) else medium)
        if tier is None:
            self.stats.unknown_medium += 1
        elif tier not in self.tiers:
            self.stats.other_tier += 1
            return None
        return tier

    def _stored(self, event: EngineBlockStored, out: list[BlockEvent]) -> None:
        tier = self._tier(event.medium)
        if tier is None:
            return
        if event.group_idx not in (None, 0):
            self.stats.other_group += 1
            return
        if event.block_size != self.space.block_size:
            self.stats.other_block_size += 1
            return
        if len(event.token_ids) != event.block_size * len(event.block_hashes):
            raise InvalidRequestError(f"BlockStored: {len(event.token_ids)} token ids for {len(event.block_hashes)} blocks "
                                      f"of {event.block_size}")
        if event.extra_keys and any(not _reproducible(extra, event.lora_name) for extra in event.extra_keys):
            self.stats.unreproducible_extra_keys += 1
            return
        if event.parent_block_hash is None:
            parent = ROOT_PARENT
        else:
            known = self._kvtier_of.get(event.parent_block_hash)
            if known is None:
                self.stats.unknown_parent += 1
                return
            parent = known
        keys = []
        hashes = hash_prompt(event.token_ids, event.block_size, HashExtras(lora_name=event.lora_name), parent)
        for engine_hash, kvtier_hash in zip(event.block_hashes, hashes, strict=True):
            parent = kvtier_hash
            self._kvtier_of[engine_hash] = parent
            entry = self._blocks.get((engine_hash, tier))
            if entry is None:
                self._blocks[(engine_hash, tier)] = [parent, 1]
                keys.append(index_key(parent))
            else:
                entry[1] += 1
        if keys:
            self.stats.stored += len(keys)
            out.append(BlockEvent(Op.STORED, tier, self.space, self.source, keys))

    def _removed(self, event: EngineBlockRemoved, out: list[BlockEvent]) -> None:
        tier = self._tier(event.medium)
        if tier is None or event.group_idx not in (None, 0):
            return
        keys = []
        for engine_hash in event.block_hashes:
            entry = self._blocks.get((engine_hash, tier))
            if entry is None:
                continue
            entry[1] -= 1
            if entry[1] == 0:
                del self._blocks[(engine_hash, tier)]
                keys.append(index_key(entry[0]))
                if not any((engine_hash, other) in self._blocks for other in IndexTier):
                    self._kvtier_of.pop(engine_hash, None)
        if keys:
            self.stats.removed += len(keys)
            out.append(BlockEvent(Op.REMOVED, tier, self.space, self.source, keys))


def _reproducible(extra: Any, lora_name: str | None) -> bool:
    """An extra-keys entry kvtier's hash reproduces: none, or only the LoRA name it folds in."""
    if extra is None or extra == [] or extra == ():
        return True
    return lora_name is not None and list(extra) in ([lora_name], [["lora", lora_name]])


def _merged(events: list[BlockEvent]) -> list[BlockEvent]:
    """Consecutive events of one op and tier as one."""
    merged: list[BlockEvent] = []
    for event in events:
        if merged and merged[-1].op is event.op and merged[-1].tier is event.tier:
            merged[-1].keys.extend(event.keys)
        else:
            merged.append(event)
    return merged


@dataclass(frozen=True, slots=True)
class EngineStream:
    """One engine's event stream, from ``index.engine_events``:
    ``[node=]tcp://h:5557[,replay=...][,model=M][,block_size=N][,tiers=gpu|all]`` (several engines
    may connect to one ``tcp://*:PORT`` the index binds; node and model then come from each
    message's topic). ``tiers``: which mediums to index (see the module docstring)."""

    endpoint: str
    node: str | None = None
    model: str | None = None
    replay: str | None = None
    block_size: int | None = None
    tiers: frozenset[IndexTier] = GPU_ONLY

    @property
    def binds(self) -> bool:
        """``tcp://*:5557``: the index listens and engines connect to it (vLLM's publisher connects to
        an address without a wildcard, as llm-d deploys it); otherwise the index connects to an
        engine that binds (``endpoint: tcp://*:5557`` in vLLM's config)."""
        return "*" in self.endpoint

    @classmethod
    def parse(cls, text: str) -> EngineStream:
        parts = [part.strip() for part in text.split(",") if part.strip()]
        if not parts:
            raise InvalidRequestError("an engine event stream needs an endpoint: node=tcp://host:5557")
        node, sep, endpoint = parts[0].rpartition("=")
        options: dict[str, str] = {}
        for part in parts[1:]:
            key, eq, value = part.partition("=")
            if not eq or key not in ("replay", "model", "block_size", "tiers"):
                raise InvalidRequestError(f"engine event stream option {part!r}: expected replay=, model=, block_size= or tiers=")
            options[key] = value
        if not endpoint.startswith(("tcp://", "ipc://")):
            raise InvalidRequestError(f"engine event endpoint {endpoint!r} must be tcp://host:port or ipc://path")
        size = options.get("block_size")
        if size is not None and not (size.isdigit() and int(size) > 0):
            raise InvalidRequestError(f"engine event stream option block_size={size!r}: expected a positive integer")
        tiers = {"gpu": GPU_ONLY, "all": ALL_TIERS}.get(options.get("tiers", "gpu"))
        if tiers is None:
            raise InvalidRequestError(f"engine event stream option tiers={options['tiers']!r}: expected gpu or all")
        return cls(endpoint, node if sep else None, options.get("model"), options.get("replay"), int(size) if size else None, tiers)


class VllmEventSubscriber:
    """A thread on a ZMQ SUB socket: decodes, checks sequence numbers, translates, hands on.

    Frames are ``(topic, seq 8-byte big-endian, payload)``. The node and model come from the
    stream's settings, else from the topic ``kv@<node>@<model>``; the block size from the
    settings, else from the first stored block. A gap in ``seq`` is filled from the replay socket
    when there is one; otherwise (or when the replay comes back short) the translator is cleared:
    removals for everything the engine held, then the stream goes on, so nothing stays wrong.
    """

    def __init__(self, stream: EngineStream, on_events: Callable[[str, list[BlockEvent]], None]) -> None:
        import zmq

        self.stream = stream
        self.on_events = on_events
        self.stats = {"batches": 0, "malformed": 0, "gaps": 0, "replayed": 0, "errors": 0}
        self._translators: dict[tuple[str, str], EngineEventTranslator] = {}
        self._next_seq: dict[bytes, int] = {}
        self._ctx = zmq.Context()
        self._sub = self._ctx.socket(zmq.SUB)
        self._sub.setsockopt(zmq.LINGER, 0)
        self._sub.setsockopt(zmq.SUBSCRIBE, b"")
        try:
            if stream.binds:
                self._sub.bind(stream.endpoint)
            else:
                self._sub.connect(stream.endpoint)
        except zmq.ZMQError as exc:
            self._ctx.destroy(linger=0)
            raise InvalidRequestError(f"engine events {stream.endpoint}: {exc}") from exc
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"kvtier-engine-events-{stream.endpoint}", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._ctx.destroy(linger=0)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if not self._sub.poll(200):
                    continue
                frames = self._sub.recv_multipart()
                if len(frames) != 3 or len(frames[1]) != 8:
                    self.stats["malformed"] += 1
                    log.warning("engine events %s: a message of %d frames, not (topic, seq, payload); skipped",
                                self.stream.endpoint, len(frames))
                    continue
                self._receive(frames[0], int.from_bytes(frames[1], "big"), frames[2])
            except Exception:
                self.stats["errors"] += 1
                log.exception("engine events %s: handling a batch failed", self.stream.endpoint)

    def _receive(self, topic: bytes, seq: int, payload: bytes) -> None:
        expected = self._next_seq.get(topic)
        joined_late = expected is None
        if joined_late:  # what the engine published before we listened is in its replay buffer, if any
            expected = 0 if self.stream.replay is not None else seq
        if seq < expected:
            return  # already seen (a replay overlapping the live stream)
        if seq > expected:
            self.stats["gaps"] += 1
            if not self._replay(topic, expected, seq) and not joined_late:
                for node, translator in self._translators_of(topic):
                    self.on_events(node, translator.clear())
        self._next_seq[topic] = seq + 1
        self._handle(topic, payload)

    def _handle(self, topic: bytes, payload: bytes) -> None:
        try:
            batch = decode_vllm_batch(payload)
        except InvalidRequestError as exc:
            self.stats["malformed"] += 1
            log.warning("engine events %s: %s; skipped", self.stream.endpoint, exc)
            return
        translator = self._translator(topic, batch)
        if translator is None:
            return
        node, _ = self._names(topic)
        try:
            events = translator.translate(batch)
        except InvalidRequestError as exc:
            self.stats["malformed"] += 1
            log.warning("engine events %s: %s; skipped", self.stream.endpoint, exc)
            return
        self.stats["batches"] += 1
        if events:
            self.on_events(node, events)

    def _names(self, topic: bytes) -> tuple[str, str]:
        """(node, model): the stream's settings, else the topic ``kv@<node>@<model>``."""
        kind, _, rest = topic.decode(errors="replace").partition("@")
        topic_node, _, topic_model = rest.partition("@") if kind == "kv" else ("", "", "")
        return self.stream.node or topic_node, self.stream.model or topic_model

    def _translator(self, topic: bytes, batch: VllmEventBatch) -> EngineEventTranslator | None:
        node, model = self._names(topic)
        if not node or not model:
            self.stats["malformed"] += 1
            log.warning("engine events %s: topic %r names no node and model (kv@<node>@<model>) and the stream sets none",
                        self.stream.endpoint, topic)
            return None
        key = (node, model)
        translator = self._translators.get(key)
        if translator is None:
            size = self.stream.block_size or next((e.block_size for e in batch.events if isinstance(e, EngineBlockStored)), None)
            if size is None:
                return None
            translator = self._translators[key] = EngineEventTranslator(Space(model, size), self.stream.endpoint, self.stream.tiers)
        return translator

    def _translators_of(self, topic: bytes) -> list[tuple[str, EngineEventTranslator]]:
        node, model = self._names(topic)
        translator = self._translators.get((node, model))
        return [(node, translator)] if translator is not None else []

    def _replay(self, topic: bytes, first: int, upto: int) -> bool:
        """Fetch batches ``first..upto-1`` from the replay socket; True if all of them came."""
        if self.stream.replay is None:
            return False
        import zmq

        dealer = self._ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        got: dict[int, bytes] = {}
        try:
            dealer.connect(self.stream.replay)
            dealer.send_multipart((b"", first.to_bytes(8, "big")))
            while dealer.poll(2000):
                frames = dealer.recv_multipart()
                frames = frames[1:] if frames and frames[0] == b"" else frames
                if len(frames) == 3:  # (topic, seq, payload), vLLM since PR #45177
                    reply_topic, seq_bytes, payload = frames
                elif len(frames) == 2:
                    reply_topic, (seq_bytes, payload) = topic, frames
                else:
                    break
                seq = int.from_bytes(seq_bytes, "big", signed=True)
                if seq < 0:
                    break
                if reply_topic in (topic, b"") and first <= seq < upto:
                    got[seq] = payload
        finally:
            dealer.close()
        if len(got) != upto - first:
            return False
        for seq in range(first, upto):
            self._handle(topic, got[seq])
        self.stats["replayed"] += len(got)
        return True


def subscribe_engines(index: Any, specs: list[str]) -> list[VllmEventSubscriber]:
    """One subscriber per ``index.engine_events`` entry, feeding ``index.apply_engine_events``."""
    streams = [EngineStream.parse(spec) for spec in specs]
    return [VllmEventSubscriber(stream, index.apply_engine_events) for stream in streams]
