"""A request as the engine sees it (no torch here)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from enum import Enum, auto
from typing import Any


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. ``temperature == 0`` is greedy.

    ``max_tokens`` bounds the number of output tokens of the request, counting the
    ones handed in with ``add_request(output_token_ids=...)``: a decode worker that
    continues after a prefill worker passes the request's original params.
    Seeded sampling is a pure function of (seed, output index, logits).
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int = -1
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k == 0 or self.top_k < -1:
            raise ValueError(f"top_k must be -1 (off) or >= 1, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


_counter = itertools.count()


class Sequence:
    """Token ids, progress and the block table of one request."""

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: Seq[int],
        params: SamplingParams,
        output_token_ids: Seq[int] = (),
        kv_blocks: list[Any] | None = None,
        kv_num_tokens: int = 0,
        export_kv: bool = False,
        cache_salt: str = "",
        kv_first_block: int = 0,
        kv_held_blocks: int | None = None,
    ) -> None:
        self.seq_id = next(_counter)
        self.request_id = request_id
        self.params = params
        self.token_ids: list[int] = list(prompt_token_ids) + list(output_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.status = SequenceStatus.WAITING
        self.finish_reason: str | None = None
        self.num_computed_tokens = 0  # tokens whose KV is in the cache
        # work launched but not yet processed (async scheduling): tokens whose KV a
        # launched step computes, and sampled tokens not yet appended to token_ids
        self.num_inflight_tokens = 0
        self.num_pending_tokens = 0
        self.num_cached_tokens = 0  # of those, found in the prefix cache (not computed)
        self.block_table: list[int] = []
        self.cache_salt = cache_salt  # prefix-cache hits only between equal salts
        self.block_hashes: list[bytes] = []  # chained hashes of the full blocks, lazily
        # BlockManager's last prefix-cache lookup: ((names version, blocks), hit block ids)
        self.prefix_hits_memo: tuple[tuple[int, int], list[int]] | None = None
        self.num_committed_blocks = 0  # full computed blocks offered to the prefix cache
        # KV handed in with the request: payloads copied into blocks on admission
        self.kv_blocks = kv_blocks
        self.kv_num_tokens = kv_num_tokens
        # kv_blocks[0] is block kv_first_block: the blocks before it are in the prefix cache
        self.kv_first_block = kv_first_block
        self.num_imported_blocks = 0  # blocks [0, n) came with the request (not exported)
        self.export_kv = export_kv
        # the store holds (pinned for this request) its first kv_held_blocks blocks: the
        # exports start there. None: it holds the blocks the request brought (kv_blocks)
        self.kv_held_blocks = kv_held_blocks
        self.num_exported_blocks = kv_held_blocks or 0
        self.num_preemptions = 0

    # ---- tokens ----
    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_scheduled_tokens(self) -> int:
        """Tokens whose KV is computed or being computed: where the next chunk starts."""
        return self.num_computed_tokens + self.num_inflight_tokens

    @property
    def num_planned_tokens(self) -> int:
        """Tokens including the sampled ones still on their way to the host."""
        return len(self.token_ids) + self.num_pending_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    def block_tokens(self, i: int, block_size: int) -> list[int]:
        return self.token_ids[i * block_size : (i + 1) * block_size]

    def __repr__(self) -> str:
        return (
            f"Sequence({self.request_id!r}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens}, status={self.status.name})"
        )
