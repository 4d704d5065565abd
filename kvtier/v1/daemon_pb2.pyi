from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ReserveStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RESERVE_STATUS_UNSPECIFIED: _ClassVar[ReserveStatus]
    RESERVED: _ClassVar[ReserveStatus]
    ALREADY_PRESENT: _ClassVar[ReserveStatus]
    NO_SPACE: _ClassVar[ReserveStatus]
RESERVE_STATUS_UNSPECIFIED: ReserveStatus
RESERVED: ReserveStatus
ALREADY_PRESENT: ReserveStatus
NO_SPACE: ReserveStatus

class LayoutDescriptor(_message.Message):
    __slots__ = ("model", "model_revision", "dtype", "num_layers", "num_kv_heads", "head_size", "head_size_v", "block_size", "tp_rank", "tp_size", "pp_rank", "pp_size", "page_layout", "kv_format", "extra")
    class ExtraEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_REVISION_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_SIZE_FIELD_NUMBER: _ClassVar[int]
    HEAD_SIZE_V_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    TP_RANK_FIELD_NUMBER: _ClassVar[int]
    TP_SIZE_FIELD_NUMBER: _ClassVar[int]
    PP_RANK_FIELD_NUMBER: _ClassVar[int]
    PP_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_LAYOUT_FIELD_NUMBER: _ClassVar[int]
    KV_FORMAT_FIELD_NUMBER: _ClassVar[int]
    EXTRA_FIELD_NUMBER: _ClassVar[int]
    model: str
    model_revision: str
    dtype: str
    num_layers: int
    num_kv_heads: int
    head_size: int
    head_size_v: int
    block_size: int
    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int
    page_layout: str
    kv_format: str
    extra: _containers.ScalarMap[str, str]
    def __init__(self, model: _Optional[str] = ..., model_revision: _Optional[str] = ..., dtype: _Optional[str] = ..., num_layers: _Optional[int] = ..., num_kv_heads: _Optional[int] = ..., head_size: _Optional[int] = ..., head_size_v: _Optional[int] = ..., block_size: _Optional[int] = ..., tp_rank: _Optional[int] = ..., tp_size: _Optional[int] = ..., pp_rank: _Optional[int] = ..., pp_size: _Optional[int] = ..., page_layout: _Optional[str] = ..., kv_format: _Optional[str] = ..., extra: _Optional[_Mapping[str, str]] = ...) -> None: ...

class RegisterLayoutRequest(_message.Message):
    __slots__ = ("layout", "expected_layout_id", "prefill_tokens_per_s")
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_LAYOUT_ID_FIELD_NUMBER: _ClassVar[int]
    PREFILL_TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    layout: LayoutDescriptor
    expected_layout_id: str
    prefill_tokens_per_s: float
    def __init__(self, layout: _Optional[_Union[LayoutDescriptor, _Mapping]] = ..., expected_layout_id: _Optional[str] = ..., prefill_tokens_per_s: _Optional[float] = ...) -> None: ...

class RegisterLayoutResponse(_message.Message):
    __slots__ = ("layout_id", "block_nbytes", "arena_path", "arena_nbytes", "daemon_instance", "fast_socket_path", "prefill_tokens_per_s", "wants_block_descriptions")
    LAYOUT_ID_FIELD_NUMBER: _ClassVar[int]
    BLOCK_NBYTES_FIELD_NUMBER: _ClassVar[int]
    ARENA_PATH_FIELD_NUMBER: _ClassVar[int]
    ARENA_NBYTES_FIELD_NUMBER: _ClassVar[int]
    DAEMON_INSTANCE_FIELD_NUMBER: _ClassVar[int]
    FAST_SOCKET_PATH_FIELD_NUMBER: _ClassVar[int]
    PREFILL_TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    WANTS_BLOCK_DESCRIPTIONS_FIELD_NUMBER: _ClassVar[int]
    layout_id: str
    block_nbytes: int
    arena_path: str
    arena_nbytes: int
    daemon_instance: str
    fast_socket_path: str
    prefill_tokens_per_s: float
    wants_block_descriptions: bool
    def __init__(self, layout_id: _Optional[str] = ..., block_nbytes: _Optional[int] = ..., arena_path: _Optional[str] = ..., arena_nbytes: _Optional[int] = ..., daemon_instance: _Optional[str] = ..., fast_socket_path: _Optional[str] = ..., prefill_tokens_per_s: _Optional[float] = ..., wants_block_descriptions: _Optional[bool] = ...) -> None: ...

class BlockDescription(_message.Message):
    __slots__ = ("block_hash", "parent_hash", "token_ids", "lora_name")
    BLOCK_HASH_FIELD_NUMBER: _ClassVar[int]
    PARENT_HASH_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    LORA_NAME_FIELD_NUMBER: _ClassVar[int]
    block_hash: bytes
    parent_hash: bytes
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    lora_name: str
    def __init__(self, block_hash: _Optional[bytes] = ..., parent_hash: _Optional[bytes] = ..., token_ids: _Optional[_Iterable[int]] = ..., lora_name: _Optional[str] = ...) -> None: ...

class DescribeBlocksRequest(_message.Message):
    __slots__ = ("blocks",)
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    blocks: _containers.RepeatedCompositeFieldContainer[BlockDescription]
    def __init__(self, blocks: _Optional[_Iterable[_Union[BlockDescription, _Mapping]]] = ...) -> None: ...

class DescribeBlocksResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LookupRequest(_message.Message):
    __slots__ = ("layout_id", "block_hashes", "refresh")
    LAYOUT_ID_FIELD_NUMBER: _ClassVar[int]
    BLOCK_HASHES_FIELD_NUMBER: _ClassVar[int]
    REFRESH_FIELD_NUMBER: _ClassVar[int]
    layout_id: str
    block_hashes: _containers.RepeatedScalarFieldContainer[bytes]
    refresh: bool
    def __init__(self, layout_id: _Optional[str] = ..., block_hashes: _Optional[_Iterable[bytes]] = ..., refresh: _Optional[bool] = ...) -> None: ...

class LookupResponse(_message.Message):
    __slots__ = ("tiers",)
    TIERS_FIELD_NUMBER: _ClassVar[int]
    tiers: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, tiers: _Optional[_Iterable[str]] = ...) -> None: ...

class Slot(_message.Message):
    __slots__ = ("block_hash", "offset", "nbytes", "reservation_id", "checksum")
    BLOCK_HASH_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    block_hash: bytes
    offset: int
    nbytes: int
    reservation_id: int
    checksum: int
    def __init__(self, block_hash: _Optional[bytes] = ..., offset: _Optional[int] = ..., nbytes: _Optional[int] = ..., reservation_id: _Optional[int] = ..., checksum: _Optional[int] = ...) -> None: ...

class ReserveRequest(_message.Message):
    __slots__ = ("client_id", "layout_id", "block_hashes", "block_nbytes", "daemon_instance")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_ID_FIELD_NUMBER: _ClassVar[int]
    BLOCK_HASHES_FIELD_NUMBER: _ClassVar[int]
    BLOCK_NBYTES_FIELD_NUMBER: _ClassVar[int]
    DAEMON_INSTANCE_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    layout_id: str
    block_hashes: _containers.RepeatedScalarFieldContainer[bytes]
    block_nbytes: int
    daemon_instance: str
    def __init__(self, client_id: _Optional[str] = ..., layout_id: _Optional[str] = ..., block_hashes: _Optional[_Iterable[bytes]] = ..., block_nbytes: _Optional[int] = ..., daemon_instance: _Optional[str] = ...) -> None: ...

class ReserveResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[ReserveResult]
    def __init__(self, results: _Optional[_Iterable[_Union[ReserveResult, _Mapping]]] = ...) -> None: ...

class ReserveResult(_message.Message):
    __slots__ = ("status", "slot")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    SLOT_FIELD_NUMBER: _ClassVar[int]
    status: ReserveStatus
    slot: Slot
    def __init__(self, status: _Optional[_Union[ReserveStatus, str]] = ..., slot: _Optional[_Union[Slot, _Mapping]] = ...) -> None: ...

class CommitRequest(_message.Message):
    __slots__ = ("client_id", "reservation_ids", "checksums")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    RESERVATION_IDS_FIELD_NUMBER: _ClassVar[int]
    CHECKSUMS_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    reservation_ids: _containers.RepeatedScalarFieldContainer[int]
    checksums: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, client_id: _Optional[str] = ..., reservation_ids: _Optional[_Iterable[int]] = ..., checksums: _Optional[_Iterable[int]] = ...) -> None: ...

class CommitResponse(_message.Message):
    __slots__ = ("committed",)
    COMMITTED_FIELD_NUMBER: _ClassVar[int]
    committed: int
    def __init__(self, committed: _Optional[int] = ...) -> None: ...

class AbortRequest(_message.Message):
    __slots__ = ("client_id", "reservation_ids")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    RESERVATION_IDS_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    reservation_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, client_id: _Optional[str] = ..., reservation_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class AbortResponse(_message.Message):
    __slots__ = ("aborted",)
    ABORTED_FIELD_NUMBER: _ClassVar[int]
    aborted: int
    def __init__(self, aborted: _Optional[int] = ...) -> None: ...

class AcquireRequest(_message.Message):
    __slots__ = ("client_id", "layout_id", "block_hashes", "ttl_ms", "daemon_instance")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_ID_FIELD_NUMBER: _ClassVar[int]
    BLOCK_HASHES_FIELD_NUMBER: _ClassVar[int]
    TTL_MS_FIELD_NUMBER: _ClassVar[int]
    DAEMON_INSTANCE_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    layout_id: str
    block_hashes: _containers.RepeatedScalarFieldContainer[bytes]
    ttl_ms: int
    daemon_instance: str
    def __init__(self, client_id: _Optional[str] = ..., layout_id: _Optional[str] = ..., block_hashes: _Optional[_Iterable[bytes]] = ..., ttl_ms: _Optional[int] = ..., daemon_instance: _Optional[str] = ...) -> None: ...

class AcquireResponse(_message.Message):
    __slots__ = ("lease_id", "slots", "expires_in_ms")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_IN_MS_FIELD_NUMBER: _ClassVar[int]
    lease_id: int
    slots: _containers.RepeatedCompositeFieldContainer[Slot]
    expires_in_ms: int
    def __init__(self, lease_id: _Optional[int] = ..., slots: _Optional[_Iterable[_Union[Slot, _Mapping]]] = ..., expires_in_ms: _Optional[int] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("client_id", "lease_id")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    lease_id: int
    def __init__(self, client_id: _Optional[str] = ..., lease_id: _Optional[int] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PrefetchRequest(_message.Message):
    __slots__ = ("layout_id", "block_hashes", "wait_ms", "block_us", "allowance_us", "lease", "lease_ttl_ms", "client_id", "daemon_instance")
    LAYOUT_ID_FIELD_NUMBER: _ClassVar[int]
    BLOCK_HASHES_FIELD_NUMBER: _ClassVar[int]
    WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_US_FIELD_NUMBER: _ClassVar[int]
    ALLOWANCE_US_FIELD_NUMBER: _ClassVar[int]
    LEASE_FIELD_NUMBER: _ClassVar[int]
    LEASE_TTL_MS_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    DAEMON_INSTANCE_FIELD_NUMBER: _ClassVar[int]
    layout_id: str
    block_hashes: _containers.RepeatedScalarFieldContainer[bytes]
    wait_ms: int
    block_us: int
    allowance_us: int
    lease: bool
    lease_ttl_ms: int
    client_id: str
    daemon_instance: str
    def __init__(self, layout_id: _Optional[str] = ..., block_hashes: _Optional[_Iterable[bytes]] = ..., wait_ms: _Optional[int] = ..., block_us: _Optional[int] = ..., allowance_us: _Optional[int] = ..., lease: _Optional[bool] = ..., lease_ttl_ms: _Optional[int] = ..., client_id: _Optional[str] = ..., daemon_instance: _Optional[str] = ...) -> None: ...

class PrefetchResponse(_message.Message):
    __slots__ = ("host_blocks", "done", "gave_up", "lease_id", "slots", "expires_in_ms")
    HOST_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    GAVE_UP_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_IN_MS_FIELD_NUMBER: _ClassVar[int]
    host_blocks: int
    done: bool
    gave_up: bool
    lease_id: int
    slots: _containers.RepeatedCompositeFieldContainer[Slot]
    expires_in_ms: int
    def __init__(self, host_blocks: _Optional[int] = ..., done: _Optional[bool] = ..., gave_up: _Optional[bool] = ..., lease_id: _Optional[int] = ..., slots: _Optional[_Iterable[_Union[Slot, _Mapping]]] = ..., expires_in_ms: _Optional[int] = ...) -> None: ...

class DisconnectRequest(_message.Message):
    __slots__ = ("client_id",)
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    def __init__(self, client_id: _Optional[str] = ...) -> None: ...

class DisconnectResponse(_message.Message):
    __slots__ = ("released_leases", "aborted_reservations")
    RELEASED_LEASES_FIELD_NUMBER: _ClassVar[int]
    ABORTED_RESERVATIONS_FIELD_NUMBER: _ClassVar[int]
    released_leases: int
    aborted_reservations: int
    def __init__(self, released_leases: _Optional[int] = ..., aborted_reservations: _Optional[int] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TierStats(_message.Message):
    __slots__ = ("name", "kind", "capacity_bytes", "used_bytes", "blocks", "hits", "misses", "bytes_in", "bytes_out", "evictions", "dropped", "demotions", "promotions", "corrupt", "errors")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    MISSES_FIELD_NUMBER: _ClassVar[int]
    BYTES_IN_FIELD_NUMBER: _ClassVar[int]
    BYTES_OUT_FIELD_NUMBER: _ClassVar[int]
    EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    DEMOTIONS_FIELD_NUMBER: _ClassVar[int]
    PROMOTIONS_FIELD_NUMBER: _ClassVar[int]
    CORRUPT_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: str
    capacity_bytes: int
    used_bytes: int
    blocks: int
    hits: int
    misses: int
    bytes_in: int
    bytes_out: int
    evictions: int
    dropped: int
    demotions: int
    promotions: int
    corrupt: int
    errors: int
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[str] = ..., capacity_bytes: _Optional[int] = ..., used_bytes: _Optional[int] = ..., blocks: _Optional[int] = ..., hits: _Optional[int] = ..., misses: _Optional[int] = ..., bytes_in: _Optional[int] = ..., bytes_out: _Optional[int] = ..., evictions: _Optional[int] = ..., dropped: _Optional[int] = ..., demotions: _Optional[int] = ..., promotions: _Optional[int] = ..., corrupt: _Optional[int] = ..., errors: _Optional[int] = ...) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("tiers", "pending_demotions", "active_leases", "pinned_blocks", "active_reservations", "uptime_s", "node", "version", "publish", "clients")
    TIERS_FIELD_NUMBER: _ClassVar[int]
    PENDING_DEMOTIONS_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_LEASES_FIELD_NUMBER: _ClassVar[int]
    PINNED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_RESERVATIONS_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PUBLISH_FIELD_NUMBER: _ClassVar[int]
    CLIENTS_FIELD_NUMBER: _ClassVar[int]
    tiers: _containers.RepeatedCompositeFieldContainer[TierStats]
    pending_demotions: int
    active_leases: int
    pinned_blocks: int
    active_reservations: int
    uptime_s: float
    node: str
    version: str
    publish: PublishStatus
    clients: _containers.RepeatedCompositeFieldContainer[ClientCounters]
    def __init__(self, tiers: _Optional[_Iterable[_Union[TierStats, _Mapping]]] = ..., pending_demotions: _Optional[int] = ..., active_leases: _Optional[int] = ..., pinned_blocks: _Optional[int] = ..., active_reservations: _Optional[int] = ..., uptime_s: _Optional[float] = ..., node: _Optional[str] = ..., version: _Optional[str] = ..., publish: _Optional[_Union[PublishStatus, _Mapping]] = ..., clients: _Optional[_Iterable[_Union[ClientCounters, _Mapping]]] = ...) -> None: ...

class ReportCountersRequest(_message.Message):
    __slots__ = ("client_id", "role", "counters", "failures")
    class CountersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class FailuresEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    COUNTERS_FIELD_NUMBER: _ClassVar[int]
    FAILURES_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    role: str
    counters: _containers.ScalarMap[str, int]
    failures: _containers.ScalarMap[str, int]
    def __init__(self, client_id: _Optional[str] = ..., role: _Optional[str] = ..., counters: _Optional[_Mapping[str, int]] = ..., failures: _Optional[_Mapping[str, int]] = ...) -> None: ...

class ReportCountersResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ClientCounters(_message.Message):
    __slots__ = ("client_id", "role", "counters", "failures", "age_s")
    class CountersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class FailuresEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    COUNTERS_FIELD_NUMBER: _ClassVar[int]
    FAILURES_FIELD_NUMBER: _ClassVar[int]
    AGE_S_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    role: str
    counters: _containers.ScalarMap[str, int]
    failures: _containers.ScalarMap[str, int]
    age_s: float
    def __init__(self, client_id: _Optional[str] = ..., role: _Optional[str] = ..., counters: _Optional[_Mapping[str, int]] = ..., failures: _Optional[_Mapping[str, int]] = ..., age_s: _Optional[float] = ...) -> None: ...

class PublishStatus(_message.Message):
    __slots__ = ("target", "publishing", "session", "seq", "pending_events", "last_published_age_s", "resyncs", "last_error")
    TARGET_FIELD_NUMBER: _ClassVar[int]
    PUBLISHING_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    PENDING_EVENTS_FIELD_NUMBER: _ClassVar[int]
    LAST_PUBLISHED_AGE_S_FIELD_NUMBER: _ClassVar[int]
    RESYNCS_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    target: str
    publishing: bool
    session: str
    seq: int
    pending_events: int
    last_published_age_s: float
    resyncs: int
    last_error: str
    def __init__(self, target: _Optional[str] = ..., publishing: _Optional[bool] = ..., session: _Optional[str] = ..., seq: _Optional[int] = ..., pending_events: _Optional[int] = ..., last_published_age_s: _Optional[float] = ..., resyncs: _Optional[int] = ..., last_error: _Optional[str] = ...) -> None: ...
