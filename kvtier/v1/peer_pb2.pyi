from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class OfferRequest(_message.Message):
    __slots__ = ("layout_id", "block_hashes", "puller", "wait_s", "ttl_s", "want_nixl")
    LAYOUT_ID_FIELD_NUMBER: _ClassVar[int]
    BLOCK_HASHES_FIELD_NUMBER: _ClassVar[int]
    PULLER_FIELD_NUMBER: _ClassVar[int]
    WAIT_S_FIELD_NUMBER: _ClassVar[int]
    TTL_S_FIELD_NUMBER: _ClassVar[int]
    WANT_NIXL_FIELD_NUMBER: _ClassVar[int]
    layout_id: str
    block_hashes: bytes
    puller: str
    wait_s: float
    ttl_s: float
    want_nixl: bool
    def __init__(self, layout_id: _Optional[str] = ..., block_hashes: _Optional[bytes] = ..., puller: _Optional[str] = ..., wait_s: _Optional[float] = ..., ttl_s: _Optional[float] = ..., want_nixl: _Optional[bool] = ...) -> None: ...

class OfferedBlock(_message.Message):
    __slots__ = ("block_hash", "offset", "nbytes", "checksum")
    BLOCK_HASH_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    block_hash: bytes
    offset: int
    nbytes: int
    checksum: int
    def __init__(self, block_hash: _Optional[bytes] = ..., offset: _Optional[int] = ..., nbytes: _Optional[int] = ..., checksum: _Optional[int] = ...) -> None: ...

class NixlEndpoint(_message.Message):
    __slots__ = ("agent", "metadata", "arena_base", "backend")
    AGENT_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    ARENA_BASE_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    agent: str
    metadata: bytes
    arena_base: int
    backend: str
    def __init__(self, agent: _Optional[str] = ..., metadata: _Optional[bytes] = ..., arena_base: _Optional[int] = ..., backend: _Optional[str] = ...) -> None: ...

class OfferResponse(_message.Message):
    __slots__ = ("lease_id", "ttl_s", "blocks", "nixl", "instance", "stream_endpoint", "ticket")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    TTL_S_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NIXL_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    STREAM_ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    TICKET_FIELD_NUMBER: _ClassVar[int]
    lease_id: int
    ttl_s: float
    blocks: _containers.RepeatedCompositeFieldContainer[OfferedBlock]
    nixl: NixlEndpoint
    instance: str
    stream_endpoint: str
    ticket: bytes
    def __init__(self, lease_id: _Optional[int] = ..., ttl_s: _Optional[float] = ..., blocks: _Optional[_Iterable[_Union[OfferedBlock, _Mapping]]] = ..., nixl: _Optional[_Union[NixlEndpoint, _Mapping]] = ..., instance: _Optional[str] = ..., stream_endpoint: _Optional[str] = ..., ticket: _Optional[bytes] = ...) -> None: ...

class ReleaseOfferRequest(_message.Message):
    __slots__ = ("lease_id", "puller")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    PULLER_FIELD_NUMBER: _ClassVar[int]
    lease_id: int
    puller: str
    def __init__(self, lease_id: _Optional[int] = ..., puller: _Optional[str] = ...) -> None: ...

class ReleaseOfferResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
