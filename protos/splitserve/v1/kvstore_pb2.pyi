from splitserve.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DescribeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DescribeResponse(_message.Message):
    __slots__ = ("store_id", "shm_name", "shm_bytes", "hostname", "tiers", "ucx_port", "ucx_host", "host_id", "gpu")
    STORE_ID_FIELD_NUMBER: _ClassVar[int]
    SHM_NAME_FIELD_NUMBER: _ClassVar[int]
    SHM_BYTES_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    UCX_PORT_FIELD_NUMBER: _ClassVar[int]
    UCX_HOST_FIELD_NUMBER: _ClassVar[int]
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    GPU_FIELD_NUMBER: _ClassVar[int]
    store_id: str
    shm_name: str
    shm_bytes: int
    hostname: str
    tiers: _containers.RepeatedScalarFieldContainer[str]
    ucx_port: int
    ucx_host: str
    host_id: str
    gpu: CudaIpcArena
    def __init__(self, store_id: _Optional[str] = ..., shm_name: _Optional[str] = ..., shm_bytes: _Optional[int] = ..., hostname: _Optional[str] = ..., tiers: _Optional[_Iterable[str]] = ..., ucx_port: _Optional[int] = ..., ucx_host: _Optional[str] = ..., host_id: _Optional[str] = ..., gpu: _Optional[_Union[CudaIpcArena, _Mapping]] = ...) -> None: ...

class CudaIpcArena(_message.Message):
    __slots__ = ("device", "handle", "storage_bytes", "storage_offset", "ref_counter_handle", "ref_counter_offset", "event_handle", "event_sync_required", "gpu_uuid", "arena_bytes")
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    STORAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    STORAGE_OFFSET_FIELD_NUMBER: _ClassVar[int]
    REF_COUNTER_HANDLE_FIELD_NUMBER: _ClassVar[int]
    REF_COUNTER_OFFSET_FIELD_NUMBER: _ClassVar[int]
    EVENT_HANDLE_FIELD_NUMBER: _ClassVar[int]
    EVENT_SYNC_REQUIRED_FIELD_NUMBER: _ClassVar[int]
    GPU_UUID_FIELD_NUMBER: _ClassVar[int]
    ARENA_BYTES_FIELD_NUMBER: _ClassVar[int]
    device: int
    handle: bytes
    storage_bytes: int
    storage_offset: int
    ref_counter_handle: bytes
    ref_counter_offset: int
    event_handle: bytes
    event_sync_required: bool
    gpu_uuid: str
    arena_bytes: int
    def __init__(self, device: _Optional[int] = ..., handle: _Optional[bytes] = ..., storage_bytes: _Optional[int] = ..., storage_offset: _Optional[int] = ..., ref_counter_handle: _Optional[bytes] = ..., ref_counter_offset: _Optional[int] = ..., event_handle: _Optional[bytes] = ..., event_sync_required: _Optional[bool] = ..., gpu_uuid: _Optional[str] = ..., arena_bytes: _Optional[int] = ...) -> None: ...

class UcxRequest(_message.Message):
    __slots__ = ("op", "put_id", "offsets", "lengths", "secret")
    class Op(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        HELLO: _ClassVar[UcxRequest.Op]
        PUT: _ClassVar[UcxRequest.Op]
        GET: _ClassVar[UcxRequest.Op]
    HELLO: UcxRequest.Op
    PUT: UcxRequest.Op
    GET: UcxRequest.Op
    OP_FIELD_NUMBER: _ClassVar[int]
    PUT_ID_FIELD_NUMBER: _ClassVar[int]
    OFFSETS_FIELD_NUMBER: _ClassVar[int]
    LENGTHS_FIELD_NUMBER: _ClassVar[int]
    SECRET_FIELD_NUMBER: _ClassVar[int]
    op: UcxRequest.Op
    put_id: str
    offsets: _containers.RepeatedScalarFieldContainer[int]
    lengths: _containers.RepeatedScalarFieldContainer[int]
    secret: str
    def __init__(self, op: _Optional[_Union[UcxRequest.Op, str]] = ..., put_id: _Optional[str] = ..., offsets: _Optional[_Iterable[int]] = ..., lengths: _Optional[_Iterable[int]] = ..., secret: _Optional[str] = ...) -> None: ...

class UcxReply(_message.Message):
    __slots__ = ("store_id", "code", "error")
    STORE_ID_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    store_id: str
    code: int
    error: str
    def __init__(self, store_id: _Optional[str] = ..., code: _Optional[int] = ..., error: _Optional[str] = ...) -> None: ...

class LookupRequest(_message.Message):
    __slots__ = ("keys",)
    KEYS_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, keys: _Optional[_Iterable[bytes]] = ...) -> None: ...

class TierPrefix(_message.Message):
    __slots__ = ("tier", "num_blocks")
    TIER_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    tier: str
    num_blocks: int
    def __init__(self, tier: _Optional[str] = ..., num_blocks: _Optional[int] = ...) -> None: ...

class LookupResponse(_message.Message):
    __slots__ = ("num_blocks", "per_tier")
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    PER_TIER_FIELD_NUMBER: _ClassVar[int]
    num_blocks: int
    per_tier: _containers.RepeatedCompositeFieldContainer[TierPrefix]
    def __init__(self, num_blocks: _Optional[int] = ..., per_tier: _Optional[_Iterable[_Union[TierPrefix, _Mapping]]] = ...) -> None: ...

class BeginPutRequest(_message.Message):
    __slots__ = ("owner", "blocks", "block_nbytes", "packed", "device", "landing")
    OWNER_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_NBYTES_FIELD_NUMBER: _ClassVar[int]
    PACKED_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    LANDING_FIELD_NUMBER: _ClassVar[int]
    owner: str
    blocks: _containers.RepeatedCompositeFieldContainer[_common_pb2.BlockRef]
    block_nbytes: int
    packed: bool
    device: bool
    landing: bool
    def __init__(self, owner: _Optional[str] = ..., blocks: _Optional[_Iterable[_Union[_common_pb2.BlockRef, _Mapping]]] = ..., block_nbytes: _Optional[int] = ..., packed: _Optional[bool] = ..., device: _Optional[bool] = ..., landing: _Optional[bool] = ...) -> None: ...

class PutSlot(_message.Message):
    __slots__ = ("key", "present", "offset", "length")
    KEY_FIELD_NUMBER: _ClassVar[int]
    PRESENT_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    key: bytes
    present: bool
    offset: int
    length: int
    def __init__(self, key: _Optional[bytes] = ..., present: _Optional[bool] = ..., offset: _Optional[int] = ..., length: _Optional[int] = ...) -> None: ...

class BeginPutResponse(_message.Message):
    __slots__ = ("put_id", "slots", "store_id", "offsets", "spilled", "landing_offset", "landing_token")
    PUT_ID_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    STORE_ID_FIELD_NUMBER: _ClassVar[int]
    OFFSETS_FIELD_NUMBER: _ClassVar[int]
    SPILLED_FIELD_NUMBER: _ClassVar[int]
    LANDING_OFFSET_FIELD_NUMBER: _ClassVar[int]
    LANDING_TOKEN_FIELD_NUMBER: _ClassVar[int]
    put_id: str
    slots: _containers.RepeatedCompositeFieldContainer[PutSlot]
    store_id: str
    offsets: _containers.RepeatedScalarFieldContainer[int]
    spilled: bool
    landing_offset: int
    landing_token: int
    def __init__(self, put_id: _Optional[str] = ..., slots: _Optional[_Iterable[_Union[PutSlot, _Mapping]]] = ..., store_id: _Optional[str] = ..., offsets: _Optional[_Iterable[int]] = ..., spilled: _Optional[bool] = ..., landing_offset: _Optional[int] = ..., landing_token: _Optional[int] = ...) -> None: ...

class CommitPutRequest(_message.Message):
    __slots__ = ("put_id", "checksums", "abort", "host_checksums", "landing")
    PUT_ID_FIELD_NUMBER: _ClassVar[int]
    CHECKSUMS_FIELD_NUMBER: _ClassVar[int]
    ABORT_FIELD_NUMBER: _ClassVar[int]
    HOST_CHECKSUMS_FIELD_NUMBER: _ClassVar[int]
    LANDING_FIELD_NUMBER: _ClassVar[int]
    put_id: str
    checksums: _containers.RepeatedScalarFieldContainer[int]
    abort: bool
    host_checksums: _containers.RepeatedScalarFieldContainer[int]
    landing: bool
    def __init__(self, put_id: _Optional[str] = ..., checksums: _Optional[_Iterable[int]] = ..., abort: _Optional[bool] = ..., host_checksums: _Optional[_Iterable[int]] = ..., landing: _Optional[bool] = ...) -> None: ...

class CommitPutResponse(_message.Message):
    __slots__ = ("stored", "present")
    STORED_FIELD_NUMBER: _ClassVar[int]
    PRESENT_FIELD_NUMBER: _ClassVar[int]
    stored: int
    present: int
    def __init__(self, stored: _Optional[int] = ..., present: _Optional[int] = ...) -> None: ...

class PutChunk(_message.Message):
    __slots__ = ("owner", "blocks", "block_nbytes", "data")
    OWNER_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_NBYTES_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    owner: str
    blocks: _containers.RepeatedCompositeFieldContainer[_common_pb2.BlockRef]
    block_nbytes: int
    data: bytes
    def __init__(self, owner: _Optional[str] = ..., blocks: _Optional[_Iterable[_Union[_common_pb2.BlockRef, _Mapping]]] = ..., block_nbytes: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class GetRequest(_message.Message):
    __slots__ = ("owner", "keys", "longest_prefix", "packed", "device")
    OWNER_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    LONGEST_PREFIX_FIELD_NUMBER: _ClassVar[int]
    PACKED_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    owner: str
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    longest_prefix: bool
    packed: bool
    device: bool
    def __init__(self, owner: _Optional[str] = ..., keys: _Optional[_Iterable[bytes]] = ..., longest_prefix: _Optional[bool] = ..., packed: _Optional[bool] = ..., device: _Optional[bool] = ...) -> None: ...

class BlockLocation(_message.Message):
    __slots__ = ("key", "offset", "length", "checksum")
    KEY_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    key: bytes
    offset: int
    length: int
    checksum: int
    def __init__(self, key: _Optional[bytes] = ..., offset: _Optional[int] = ..., length: _Optional[int] = ..., checksum: _Optional[int] = ...) -> None: ...

class GetResponse(_message.Message):
    __slots__ = ("blocks", "store_id", "offsets", "lengths", "checksums", "on_device", "device_sums")
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    STORE_ID_FIELD_NUMBER: _ClassVar[int]
    OFFSETS_FIELD_NUMBER: _ClassVar[int]
    LENGTHS_FIELD_NUMBER: _ClassVar[int]
    CHECKSUMS_FIELD_NUMBER: _ClassVar[int]
    ON_DEVICE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_SUMS_FIELD_NUMBER: _ClassVar[int]
    blocks: _containers.RepeatedCompositeFieldContainer[BlockLocation]
    store_id: str
    offsets: _containers.RepeatedScalarFieldContainer[int]
    lengths: _containers.RepeatedScalarFieldContainer[int]
    checksums: _containers.RepeatedScalarFieldContainer[int]
    on_device: _containers.RepeatedScalarFieldContainer[bool]
    device_sums: _containers.RepeatedScalarFieldContainer[bool]
    def __init__(self, blocks: _Optional[_Iterable[_Union[BlockLocation, _Mapping]]] = ..., store_id: _Optional[str] = ..., offsets: _Optional[_Iterable[int]] = ..., lengths: _Optional[_Iterable[int]] = ..., checksums: _Optional[_Iterable[int]] = ..., on_device: _Optional[_Iterable[bool]] = ..., device_sums: _Optional[_Iterable[bool]] = ...) -> None: ...

class BlockData(_message.Message):
    __slots__ = ("index", "offset", "data", "length", "lengths", "num_blocks")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    LENGTHS_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    index: int
    offset: int
    data: bytes
    length: int
    lengths: _containers.RepeatedScalarFieldContainer[int]
    num_blocks: int
    def __init__(self, index: _Optional[int] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., length: _Optional[int] = ..., lengths: _Optional[_Iterable[int]] = ..., num_blocks: _Optional[int] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("owner", "keys")
    OWNER_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    owner: str
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, owner: _Optional[str] = ..., keys: _Optional[_Iterable[bytes]] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ("released",)
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    released: int
    def __init__(self, released: _Optional[int] = ...) -> None: ...

class PinRequest(_message.Message):
    __slots__ = ("owner", "keys", "ttl_s")
    OWNER_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    TTL_S_FIELD_NUMBER: _ClassVar[int]
    owner: str
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    ttl_s: float
    def __init__(self, owner: _Optional[str] = ..., keys: _Optional[_Iterable[bytes]] = ..., ttl_s: _Optional[float] = ...) -> None: ...

class PinResponse(_message.Message):
    __slots__ = ("num_blocks",)
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    num_blocks: int
    def __init__(self, num_blocks: _Optional[int] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TierStats(_message.Message):
    __slots__ = ("tier", "capacity_bytes", "used_bytes", "blocks", "kind", "hits", "misses", "promotions", "demotions", "evictions", "checksum_failures")
    TIER_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    MISSES_FIELD_NUMBER: _ClassVar[int]
    PROMOTIONS_FIELD_NUMBER: _ClassVar[int]
    DEMOTIONS_FIELD_NUMBER: _ClassVar[int]
    EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FAILURES_FIELD_NUMBER: _ClassVar[int]
    tier: str
    capacity_bytes: int
    used_bytes: int
    blocks: int
    kind: str
    hits: int
    misses: int
    promotions: int
    demotions: int
    evictions: int
    checksum_failures: int
    def __init__(self, tier: _Optional[str] = ..., capacity_bytes: _Optional[int] = ..., used_bytes: _Optional[int] = ..., blocks: _Optional[int] = ..., kind: _Optional[str] = ..., hits: _Optional[int] = ..., misses: _Optional[int] = ..., promotions: _Optional[int] = ..., demotions: _Optional[int] = ..., evictions: _Optional[int] = ..., checksum_failures: _Optional[int] = ...) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("blocks", "pinned_blocks", "pins", "owners", "hits", "misses", "evictions", "puts_refused", "checksum_failures", "tiers", "promotions", "demotions", "moves_pending", "landings_missed")
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    PINNED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    PINS_FIELD_NUMBER: _ClassVar[int]
    OWNERS_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    MISSES_FIELD_NUMBER: _ClassVar[int]
    EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    PUTS_REFUSED_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FAILURES_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    PROMOTIONS_FIELD_NUMBER: _ClassVar[int]
    DEMOTIONS_FIELD_NUMBER: _ClassVar[int]
    MOVES_PENDING_FIELD_NUMBER: _ClassVar[int]
    LANDINGS_MISSED_FIELD_NUMBER: _ClassVar[int]
    blocks: int
    pinned_blocks: int
    pins: int
    owners: int
    hits: int
    misses: int
    evictions: int
    puts_refused: int
    checksum_failures: int
    tiers: _containers.RepeatedCompositeFieldContainer[TierStats]
    promotions: int
    demotions: int
    moves_pending: int
    landings_missed: int
    def __init__(self, blocks: _Optional[int] = ..., pinned_blocks: _Optional[int] = ..., pins: _Optional[int] = ..., owners: _Optional[int] = ..., hits: _Optional[int] = ..., misses: _Optional[int] = ..., evictions: _Optional[int] = ..., puts_refused: _Optional[int] = ..., checksum_failures: _Optional[int] = ..., tiers: _Optional[_Iterable[_Union[TierStats, _Mapping]]] = ..., promotions: _Optional[int] = ..., demotions: _Optional[int] = ..., moves_pending: _Optional[int] = ..., landings_missed: _Optional[int] = ...) -> None: ...

class PrefetchRequest(_message.Message):
    __slots__ = ("keys",)
    KEYS_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, keys: _Optional[_Iterable[bytes]] = ...) -> None: ...

class PrefetchResponse(_message.Message):
    __slots__ = ("promoted", "resident", "missing", "failed")
    PROMOTED_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_FIELD_NUMBER: _ClassVar[int]
    MISSING_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    promoted: int
    resident: int
    missing: int
    failed: int
    def __init__(self, promoted: _Optional[int] = ..., resident: _Optional[int] = ..., missing: _Optional[int] = ..., failed: _Optional[int] = ...) -> None: ...
