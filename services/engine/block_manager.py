"""Paged KV block bookkeeping with a hash -> block prefix cache (no torch here).

* Every block has a ref count; a block is free when its count is 0.
* A full block whose KV is computed gets a name, the chained hash of
  ``block_hash.hash_block``; ``hash_to_block`` finds it again. Partial blocks are
  never named and never shared.
* Freed blocks with a name stay in the prefix cache (``cached_free``, in LRU
  order) and are only forgotten when they are reallocated; unnamed free blocks
  are handed out first.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from services.engine.block_hash import HashContext, hash_block
from services.engine.sequence import Sequence


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: bytes | None = None
    # the store epoch in which its KV went to the store under its name (or came from
    # it); -1: never. ``BlockManager.forget_store`` makes every earlier epoch stale
    store_epoch: int = -1


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class BlockManager:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        hash_ctx: HashContext,
        enable_prefix_caching: bool = True,
    ) -> None:
        if hash_ctx.block_size != block_size:
            raise ValueError("hash context block size differs from the block manager's")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.hash_ctx = hash_ctx
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_ids: deque[int] = deque(range(num_blocks))  # unnamed, ref 0
        self.cached_free: OrderedDict[int, None] = OrderedDict()  # named, ref 0, LRU first
        self.hash_to_block: dict[bytes, int] = {}
        self.store_epoch = 0  # see Block.store_epoch
        # moves on whenever a name joins or leaves the prefix cache: a waiting
        # sequence's prefix hits, looked up several times per schedule, are kept until then
        self.names_version = 0
        # KV events: (hash, True) when a block joins the prefix cache, (hash, False) when
        # it leaves; a worker publishes them for the gateway's KV-aware routing
        self.on_kv_event: Callable[[bytes, bool], None] | None = None

    # ---- pool ----
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_ids) + len(self.cached_free)

    @property
    def num_cached_blocks(self) -> int:
        """Named blocks (in use or free) that the prefix cache can hand out."""
        return len(self.hash_to_block)

    def _pop_free(self) -> int:
        if self.free_ids:
            bid = self.free_ids.popleft()
        else:
            bid, _ = self.cached_free.popitem(last=False)  # evict the least recently freed
            block = self.blocks[bid]
            self._forget_hash(block)
        self.blocks[bid].ref_count = 1
        self.blocks[bid].store_epoch = -1
        return bid

    def mark_in_store(self, bid: int, h: bytes | None) -> None:
        """Block ``bid``'s KV went to the store (or came from it) under the name ``h``."""
        block = self.blocks[bid]
        if h is not None and block.block_hash == h:
            block.store_epoch = self.store_epoch

    def held_by_store(self, seq: Sequence, i: int) -> bool:
        """Block ``i`` of ``seq`` came from the prefix cache and its KV is in the store
        under its name already (exported or imported by this engine)."""
        return i < seq.num_cached_tokens // self.block_size and \
            self.blocks[seq.block_table[i]].store_epoch == self.store_epoch

    def forget_store(self) -> None:
        """The store lost blocks this engine sent it (it restarted, or evicted them):
        no block counts as held there any more; each is exported again when next due.
        Safe from another thread (one integer moves on)."""
        self.store_epoch += 1

    def _forget_hash(self, block: Block) -> None:
        del self.hash_to_block[block.block_hash]
        self.names_version += 1
        if self.on_kv_event is not None:
            self.on_kv_event(block.block_hash, False)
        block.block_hash = None
        block.store_epoch = -1

    def _remember_hash(self, block: Block, h: bytes) -> None:
        block.block_hash = h
        self.hash_to_block[h] = block.block_id
        self.names_version += 1
        if self.on_kv_event is not None:
            self.on_kv_event(h, True)

    def _take(self, bids: Iterable[int]) -> None:
        """One more reference to each block (a free one leaves the free list). Many at
        once: 32 agents take an 8K prompt's 512 shared blocks each in one schedule."""
        blocks, cached_free = self.blocks, self.cached_free
        for bid in bids:
            block = blocks[bid]
            if block.ref_count == 0:
                del cached_free[bid]
            block.ref_count += 1

    # ---- hashes ----
    def seq_hashes(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        """The chained hashes of the first ``num_blocks`` full blocks of ``seq``."""
        bs = self.block_size
        hashes = seq.block_hashes
        while len(hashes) < num_blocks:
            i = len(hashes)
            parent = hashes[-1] if hashes else None
            hashes.append(hash_block(parent, seq.block_tokens(i, bs), self.hash_ctx,
                                     seq.cache_salt))
        return hashes[:num_blocks]

    def _prefix_hits(self, seq: Sequence) -> list[int]:
        """Blocks of the longest cached prefix; the last token is always left to compute."""
        if not self.enable_prefix_caching:
            return []
        max_blocks = (seq.num_tokens - 1) // self.block_size
        key = (self.names_version, max_blocks)
        if seq.prefix_hits_memo is not None and seq.prefix_hits_memo[0] == key:
            return seq.prefix_hits_memo[1]  # read only: callers copy before they change it
        hits: list[int] = []
        for h in self.seq_hashes(seq, max_blocks):
            bid = self.hash_to_block.get(h)
            if bid is None:
                break
            hits.append(bid)
        seq.prefix_hits_memo = (key, hits)
        return hits

    def prefix_hit_blocks(self, seq: Sequence) -> int:
        """How many leading blocks of a waiting ``seq`` the prefix cache would give it."""
        return len(self._prefix_hits(seq))

    @staticmethod
    def _kv_tokens(seq: Sequence, hits: list[int]) -> int:
        """Tokens whose KV the request brought, counting the cached blocks before its
        first payload (the last token is always recomputed). 0 when the prefix cache
        no longer holds all the blocks before the payloads (they are then useless)."""
        if not seq.kv_blocks or len(hits) < seq.kv_first_block:
            return 0
        return min(seq.kv_num_tokens, seq.num_tokens - 1)

    def cached_prefix_blocks(self, hashes: list[bytes]) -> int:
        """How many leading ``hashes`` the prefix cache holds now. A read-only peek that
        another thread may make: a block can still be reused before the request comes."""
        if not self.enable_prefix_caching:
            return 0
        n = 0
        for h in hashes:
            if h not in self.hash_to_block:
                break
            n += 1
        return n

    def admission_computed_tokens(self, seq: Sequence) -> int:
        """How many tokens of a waiting ``seq`` need no computing (prefix hits or KV given)."""
        hits = self._prefix_hits(seq)
        return max(len(hits) * self.block_size, self._kv_tokens(seq, hits))

    # ---- allocation ----
    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Can a waiting ``seq`` be admitted with ``num_new_tokens`` to compute?"""
        hits = self._prefix_hits(seq)
        computed = max(len(hits) * self.block_size, self._kv_tokens(seq, hits))
        needed = cdiv(computed + num_new_tokens, self.block_size) - len(hits)
        hits_free = sum(1 for b in hits if self.blocks[b].ref_count == 0)
        return needed + hits_free <= self.num_free_blocks

    def allocate(self, seq: Sequence, num_new_tokens: int) -> list[tuple[int, Any]]:
        """Give a waiting ``seq`` its blocks: prefix hits, blocks for the KV it brought,
        blocks for ``num_new_tokens`` more. Returns the KV copies to do before the
        forward, as (block id, payload)."""
        assert not seq.block_table, f"{seq} already has blocks"
        bs = self.block_size
        hits = self._prefix_hits(seq)
        self._take(hits)
        table = list(hits)
        imports: list[tuple[int, Any]] = []
        kv_tokens = self._kv_tokens(seq, hits)
        if kv_tokens:
            for i in range(len(hits), cdiv(kv_tokens, bs)):
                full = (i + 1) * bs <= kv_tokens
                h = self.seq_hashes(seq, i + 1)[i] if full else None
                hit = self.hash_to_block.get(h) if (h and self.enable_prefix_caching) else None
                if hit is not None:
                    self._take((hit,))
                    table.append(hit)
                    continue
                bid = self._pop_free()
                table.append(bid)
                imports.append((bid, seq.kv_blocks[i - seq.kv_first_block]))
                if full and self.enable_prefix_caching:
                    self._name(bid, h)
                    self.mark_in_store(bid, h)
            if seq.num_exported_blocks == 0 and seq.kv_held_blocks is None:
                seq.num_exported_blocks = kv_tokens // bs  # the caller has those already
        seq.kv_blocks = None  # copied in now (or useless); a recompute starts from tokens
        computed = max(len(hits) * bs, kv_tokens)
        for _ in range(len(table), cdiv(computed + num_new_tokens, bs)):
            table.append(self._pop_free())
        seq.block_table = table
        seq.num_computed_tokens = computed
        seq.num_cached_tokens = len(hits) * bs
        seq.num_committed_blocks = computed // bs
        return imports

    def blocks_to_append(self, seq: Sequence, num_new_tokens: int) -> int:
        """New blocks a running ``seq`` needs for ``num_new_tokens`` more tokens (after
        those its launched steps compute)."""
        needed = cdiv(seq.num_scheduled_tokens + num_new_tokens, self.block_size)
        return max(0, needed - len(seq.block_table))

    def can_append(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.blocks_to_append(seq, num_new_tokens) <= self.num_free_blocks

    def may_append(self, seq: Sequence, num_new_tokens: int) -> None:
        """Add blocks so that ``num_new_tokens`` more tokens of a running ``seq`` fit."""
        for _ in range(self.blocks_to_append(seq, num_new_tokens)):
            seq.block_table.append(self._pop_free())

    def _name(self, bid: int, h: bytes) -> None:
        block = self.blocks[bid]
        if block.block_hash is None and h not in self.hash_to_block:
            self._remember_hash(block, h)

    def commit(self, seq: Sequence) -> None:
        """Name the blocks of ``seq`` that became full and computed (call after a step)."""
        full = seq.num_computed_tokens // self.block_size
        if full <= seq.num_committed_blocks:
            return
        if self.enable_prefix_caching:
            hashes = self.seq_hashes(seq, full)
            for i in range(seq.num_committed_blocks, full):
                self._name(seq.block_table[i], hashes[i])
        seq.num_committed_blocks = full

    def deallocate(self, seq: Sequence) -> None:
        """Drop ``seq``'s references; named blocks stay findable until reallocated."""
        for bid in reversed(seq.block_table):  # tail blocks become the oldest in LRU
            block = self.blocks[bid]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {bid} freed twice"
            if block.ref_count == 0:
                if block.block_hash is not None:
                    self.cached_free[bid] = None
                else:
                    self.free_ids.append(bid)
        seq.block_table = []
        seq.num_computed_tokens = seq.num_inflight_tokens = seq.num_pending_tokens = 0
        seq.num_committed_blocks = 0

    def import_cached_block(self, block_hash: bytes) -> int | None:
        """A free block to receive the KV named ``block_hash`` from elsewhere; it joins the
        prefix cache as a free block. None when it is cached already or nothing is free."""
        if not self.enable_prefix_caching or block_hash in self.hash_to_block:
            return None
        if self.num_free_blocks == 0:
            return None
        bid = self._pop_free()
        block = self.blocks[bid]
        block.ref_count = 0
        self._remember_hash(block, block_hash)
        self.cached_free[bid] = None
        return bid

    def drop_cached_block(self, bid: int) -> None:
        """Forget a free named block (e.g. its KV copy failed)."""
        block = self.blocks[bid]
        assert block.ref_count == 0 and block.block_hash is not None
        del self.cached_free[bid]
        self._forget_hash(block)
        self.free_ids.append(bid)

    # ---- tests ----
    def check_invariants(self, seqs: Iterable[Sequence] = ()) -> None:
        """Raise AssertionError if the books do not balance for the live ``seqs``."""
        refs = [0] * self.num_blocks
        for seq in seqs:
            for bid in seq.block_table:
                refs[bid] += 1
        free = set(self.free_ids)
        cached = set(self.cached_free)
        assert len(free) == len(self.free_ids), "duplicate ids in the free list"
        assert not free & cached, "a block is both free and cached-free"
        for block in self.blocks:
            bid = block.block_id
            assert block.ref_count == refs[bid], (
                f"block {bid}: ref_count {block.ref_count}, referenced {refs[bid]} times"
            )
            if block.ref_count == 0:
                assert (bid in free) != (bid in cached), f"free block {bid} is lost"
                assert (block.block_hash is not None) == (bid in cached), f"block {bid}"
            else:
                assert bid not in free and bid not in cached, f"used block {bid} is free"
            if block.block_hash is not None:
                assert self.hash_to_block.get(block.block_hash) == bid, f"block {bid} map"
        for h, bid in self.hash_to_block.items():
            assert self.blocks[bid].block_hash == h, f"map entry of block {bid}"
        used = sum(1 for r in refs if r)
        assert self.num_free_blocks == self.num_blocks - used, "free count does not balance"
