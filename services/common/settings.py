"""Cluster settings: one YAML file (or the embedded default) -> typed dataclasses.

Every service reads the same file and picks its own section, so one config
describes a whole cluster. Unknown keys are errors, not silently ignored.
"""

from __future__ import annotations

import dataclasses
import re
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

from services.engine.config import EngineOptions
from splitserve.v1 import common_pb2

MiB = 1 << 20
# priority class names (lower case, as the config writes them) -> the proto's values
PRIORITY_CLASSES = {
    n.removeprefix("PRIORITY_CLASS_").lower(): v
    for n, v in common_pb2.PriorityClass.items() if v != common_pb2.PRIORITY_CLASS_UNSPECIFIED
}


@dataclass
class Endpoint:
    host: str = "127.0.0.1"
    port: int = 0
    http_port: int = 0  # /metrics, /healthz, /readyz; 0 -> none

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass
class WorkerEndpoint(Endpoint):
    """A prefill or decode worker: where it listens, and the model it serves."""

    model: str = ""  # a name of models:; "" -> the first (or only) model


@dataclass(kw_only=True)
class ModelSettings(EngineOptions):
    """The served model, and every engine option (``EngineOptions``: dtype, device,
    block_size, max_model_len, num_kv_blocks, max_num_seqs, max_num_batched_tokens,
    attention_backend, enforce_eager, gpu_memory_utilization, kv_cache_memory_gb,
    enable_prefix_caching, seed) with the engine's own defaults."""

    name: str = "tiny-llama"  # the model id clients ask for
    path: str = "dummy:tiny-llama"  # a local HF directory or dummy:<shape>
    tokenizer: str | None = None  # tokenizer.json; None -> beside the weights / built in
    cpu_threads: int | None = None  # torch threads of a CPU worker; None -> cores / CPU workers


@dataclass
class KVStoreSettings(Endpoint):
    """The KV store. ``tiers``, fastest first, each a mapping with ``kind`` (a tier kind
    of ``kvstore.tiers``: cpu, disk, ...), ``bytes`` (an int or a size such as
    ``256MiB``/``4GiB``) and the kind's own keys (disk: ``path``, ``fsync``, ``admit``;
    cpu: ``shm``). Empty -> one cpu tier of ``cpu_bytes`` (shared memory when ``shm``)."""

    port: int = 50060
    http_port: int = 8060
    cpu_bytes: int = 256 * MiB
    shm: bool = True  # expose the CPU arena as shared memory to workers on this host
    pin_ttl_s: float = 300.0  # pins of an owner nobody releases expire after this
    tiers: list[dict[str, Any]] = field(default_factory=list)
    # a tier above the last filled past demote_high of its bytes has its coldest blocks
    # moved down, in the background, until it is at demote_low (1.0, 1.0: off)
    demote_high: float = 0.9
    demote_low: float = 0.8
    # prefill workers take a new prompt's held prefix from the store; false: they compute
    # whatever their own engine lacks (a baseline for benchmarks)
    prefix_reuse: bool = True

    _UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2,
              "g": 1000**3, "gb": 1000**3, "t": 1000**4, "tb": 1000**4, "kib": 1 << 10,
              "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}

    def __post_init__(self) -> None:
        if not 0.0 < self.demote_low <= self.demote_high <= 1.0:
            raise SettingsError(f"kvstore: need 0 < demote_low <= demote_high <= 1, got "
                                f"demote_low={self.demote_low}, demote_high={self.demote_high}")
        for i, t in enumerate(self.tiers):
            where = f"kvstore.tiers[{i}]"
            if not isinstance(t, dict) or not isinstance(t.get("kind"), str):
                raise SettingsError(f"{where}: expected a mapping with a 'kind' "
                                    f"(cpu, disk, ...), got {t!r}")
            if "bytes" not in t:
                raise SettingsError(f"{where}.bytes: missing (the tier's size, e.g. 4GiB)")
            t["bytes"] = self.parse_size(t["bytes"], f"{where}.bytes")

    @classmethod
    def parse_size(cls, value: Any, where: str = "size") -> int:
        """``4096``, ``"256MiB"``, ``"4 GiB"``, ``"1.5GB"`` -> bytes (> 0)."""
        n: float | None = None
        if isinstance(value, int) and not isinstance(value, bool):
            n = value
        elif isinstance(value, str):
            m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", value)
            if m and m.group(2).lower() in cls._UNITS:
                n = float(m.group(1)) * cls._UNITS[m.group(2).lower()]
        if n is None or n <= 0:
            raise SettingsError(f"{where}: expected a positive size in bytes (an int or "
                                f"a string like '256MiB', '4GiB'), got {value!r}")
        return int(n)

    def tier_specs(self) -> list[dict[str, Any]]:
        """The tiers to build, fastest first (``cpu_bytes``/``shm`` when none are set)."""
        if not self.tiers:
            return [{"kind": "cpu", "bytes": self.cpu_bytes, "shm": self.shm}]
        return [dict(t) for t in self.tiers]


@dataclass
class PreemptionSettings:
    """Who may take a full decode batch's place from whom (``gateway.preemption``)."""

    enabled: bool = True  # false: a higher class waits for a free place instead
    max_per_request: int = 2  # a request is paused at most this many times
    min_class_gap: int = 1  # a class preempts only classes at least this far below it
    protected: list[str] = field(default_factory=list)  # classes never preempted: [high, ...]

    def __post_init__(self) -> None:
        if self.max_per_request < 0:
            raise SettingsError("gateway.preemption.max_per_request: must be >= 0, got "
                                f"{self.max_per_request}")
        if self.min_class_gap < 1:
            raise SettingsError("gateway.preemption.min_class_gap: must be >= 1 (a class "
                                f"never preempts its own), got {self.min_class_gap}")
        unknown = [c for c in self.protected if c.lower() not in PRIORITY_CLASSES]
        if unknown:
            raise SettingsError(f"gateway.preemption.protected: unknown class(es) {unknown}; "
                                f"known: {sorted(PRIORITY_CLASSES)}")

    def protected_classes(self) -> frozenset[int]:
        return frozenset(PRIORITY_CLASSES[c.lower()] for c in self.protected)


@dataclass
class GatewaySettings(Endpoint):
    port: int = 50051
    http_port: int = 8051
    routing: str = "round_robin"  # round_robin | least_loaded | kv_aware
    max_queue: int = 256  # requests waiting for a slot; beyond -> RESOURCE_EXHAUSTED
    max_inflight: int = 64  # requests being served at once
    max_prompt_bytes: int = 1 * MiB  # UTF-8 bytes of prompt text / chat contents, before tokenizing
    max_chat_messages: int = 1024  # messages of one chat request
    max_request_s: float = 600.0  # the deadline of a request that sets no deadline_ms
    # a request that finds every worker of a phase unhealthy (one that missed its load
    # polls while busy, one restarting) waits this long for one before UNAVAILABLE
    worker_wait_s: float = 5.0
    tokenizer_threads: int = 2  # threads tokenizing prompts (off the serving event loop)
    # API keys the gateway accepts (metadata "x-api-key" or "authorization: Bearer KEY");
    # empty -> no key needed. A key names its tenant: its requests, aborts and cache salt.
    api_keys: list[str] = field(default_factory=list)
    # The OpenAI-compatible HTTP front (/v1/models, /v1/completions, /v1/chat/completions);
    # 0 -> off. Test clusters get a free port of their own (launcher.with_free_ports).
    openai_port: int = 8000
    openai_max_connections: int = 256  # open connections; one more is answered 503
    openai_max_body_bytes: int = 4 * MiB  # a larger request body is answered 413
    openai_header_timeout_s: float = 10.0  # to receive a whole request (head and body)
    openai_idle_timeout_s: float = 30.0  # a keep-alive connection with no request is closed
    # TLS on the gateway's public fronts (gRPC and the OpenAI HTTP front): PEM paths,
    # both or neither; None -> plaintext
    tls_cert: str | None = None
    tls_key: str | None = None
    # Order of requests waiting for a slot: fcfs | priority (class, then arrival) |
    # deadline (class, then earliest deadline_ms first)
    queue_policy: str = "priority"
    # Aging: a waiting request's class rises by one per this many seconds waited, so a
    # low class waits at most (class gap) x this behind later higher-class arrivals; 0 -> off
    queue_aging_s: float = 10.0
    preemption: PreemptionSettings = field(default_factory=PreemptionSettings)
    max_migrations: int = 3  # worker failures one request survives; then UNAVAILABLE
    # A request with a session_id keeps its prompt's and answer's KV pinned in the store
    # for the next turn this long after it ends (each turn renews it); 0 -> sessions off
    session_ttl_s: float = 600.0
    # KV blocks one client (an API key's tenant) keeps pinned in sessions through this
    # gateway; beyond, its oldest sessions are let go; 0 -> no cap
    session_max_blocks: int = 4096
    # kv_aware: this many prompt tokens to compute weigh as one request in flight; a block
    # the worker must fetch from the store costs store_block_cost of computing it
    route_token_weight: int = 512
    route_store_block_cost: float = 0.25


@dataclass
class TransferSettings:
    # auto | cuda_ipc | shm | ucx | grpc (auto: the fastest that works, in that order)
    transport: str = "auto"
    chunk_bytes: int = 4 * MiB  # payload bytes per gRPC stream message
    ucx: bool = True  # the store listens on UCX when ucxx (splitserve[ucx]) is installed
    ucx_port: int = 0  # the store's UCX port; 0 -> a free one (Describe announces it)
    ucx_connect_timeout_s: float = 5.0  # a worker's connect + hello to the store's listener
    fallback_cooldown_s: float = 10.0  # a transport that failed mid-request sits out this long


def _default_prefill() -> list[WorkerEndpoint]:
    return [WorkerEndpoint(port=50071, http_port=8071)]


def _default_decode() -> list[WorkerEndpoint]:
    return [WorkerEndpoint(port=50081, http_port=8081)]


@dataclass
class ClusterSettings:
    """``model`` is the one served model; a cluster of several lists them in ``models``
    instead (``model`` is then the first of them) and names each worker's model on its
    ``prefill``/``decode`` entry."""

    model: ModelSettings = field(default_factory=ModelSettings)
    models: list[ModelSettings] = field(default_factory=list)  # [] -> [model]
    kvstore: KVStoreSettings = field(default_factory=KVStoreSettings)
    prefill: list[WorkerEndpoint] = field(default_factory=_default_prefill)
    decode: list[WorkerEndpoint] = field(default_factory=_default_decode)
    gateway: GatewaySettings = field(default_factory=GatewaySettings)
    transfer: TransferSettings = field(default_factory=TransferSettings)
    redis_url: str | None = None  # the cluster registry (redis://host:port/db); None -> config
    registry_ttl_s: float = 3.0  # a member whose heartbeat is this old has left the cluster
    registry_heartbeat_s: float = 0.5  # how often members refresh their key and live load
    registry_namespace: str = "splitserve"  # key prefix: clusters sharing one Redis differ here
    # internal calls (gateway/worker/store) carry it; env SPLITSERVE_CLUSTER_SECRET overrides
    cluster_secret: str | None = None
    log_level: str = "info"
    ready_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        if self.models and self.model not in self.models:
            if self.model != ModelSettings():
                raise SettingsError(BOTH_MODEL_SECTIONS)
            self.model = self.models[0]
        check_models(self)

    def served_models(self) -> list[ModelSettings]:
        """Every model of the cluster, in config order (the first is the default)."""
        return self.models or [self.model]

    def model_of(self, endpoint: Endpoint) -> ModelSettings:
        """The model a worker entry serves (a plain ``Endpoint`` built in code, with no
        ``model``, serves the first one)."""
        name = getattr(endpoint, "model", "")
        served = self.served_models()
        if not name:
            return served[0]
        for model in served:
            if model.name == name:
                return model
        raise SettingsError(f"{name!r} is not a model of this cluster; name one of: "
                            f"{', '.join(m.name for m in served)} (or add it to models:)")

    def to_dict(self) -> dict[str, Any]:
        """The settings as a mapping ``from_dict`` takes back, with the model section in
        use: ``model`` or ``models``."""
        data = dataclasses.asdict(self)
        del data["model" if self.models else "models"]
        return data

    def dump_yaml(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


class SettingsError(ValueError):
    """A configuration problem, with the key path that caused it."""


BOTH_MODEL_SECTIONS = ("both 'model:' and 'models:' are set; a cluster of one model "
                       "uses 'model:', of several 'models:' (move the 'model:' section "
                       "into the 'models:' list)")


def check_models(settings: ClusterSettings) -> None:
    """Model names are set and unique; every worker entry names a model of the cluster."""
    names = [m.name for m in settings.served_models()]
    for i, name in enumerate(names):
        where = f"models[{i}].name" if settings.models else "model.name"
        if not name:
            raise SettingsError(f"{where}: empty; give every model the id clients ask for")
        if name in names[:i]:
            raise SettingsError(f"{where}: {name!r} is given twice; model names must be "
                                "unique")
    for role in ("prefill", "decode"):
        for i, ep in enumerate(getattr(settings, role)):
            try:
                settings.model_of(ep)
            except SettingsError as e:
                raise SettingsError(f"{role}[{i}].model: {e}") from None


def _convert(value: Any, hint: Any, where: str) -> Any:
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _convert(value, args[0], where)
    if origin is list:
        if not isinstance(value, list):
            raise SettingsError(f"{where}: expected a list, got {type(value).__name__}")
        (item,) = get_args(hint)
        return [_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and not isinstance(value, hint):
        raise SettingsError(f"{where}: expected {hint.__name__}, got {value!r}")
    if hint is int and isinstance(value, bool):
        raise SettingsError(f"{where}: expected int, got {value!r}")
    return value


def from_dict(cls: type, data: Any, where: str = "config") -> Any:
    """Builds dataclass ``cls`` from a mapping, rejecting unknown keys."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SettingsError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise SettingsError(f"{where}: unknown key(s) {unknown}; known: {sorted(names)}")
    kwargs = {k: _convert(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    return cls(**kwargs)


def load_settings(path: str | Path | None = None) -> ClusterSettings:
    """Reads a cluster YAML file; ``None`` gives the embedded laptop default."""
    if path is None:
        return ClusterSettings()
    p = Path(path)
    if not p.is_file():
        raise SettingsError(f"config file {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise SettingsError(f"{p}: not valid YAML: {e}") from e
    if isinstance(data, dict) and "model" in data and data.get("models"):
        raise SettingsError(f"{p}: {BOTH_MODEL_SECTIONS}")
    return from_dict(ClusterSettings, data, str(p))
