"""LLMEngine: requests in, tokens (and KV blocks) out, one step at a time.

Not thread-safe: call it from one thread (a worker runs its step loop on one).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence as Seq
from pathlib import Path
from typing import Any

from services.engine.block_hash import HashContext, block_hashes
from services.engine.block_manager import BlockManager, cdiv
from services.engine.config import EngineConfig, ModelConfig
from services.engine.model_runner import ModelRunner
from services.engine.outputs import EngineStats, ExportedBlock, StepOutput, SwappedOut
from services.engine.scheduler import Scheduler, SchedulerOutput
from services.engine.sequence import SamplingParams, Sequence

log = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, config: EngineConfig, use_tqdm: bool = True) -> None:
        self.config = config.finalize()
        self.model_config: ModelConfig = config.model_config
        self.hash_ctx = HashContext(config.model_id, config.block_size, config.dtype)
        self.runner = ModelRunner(config, use_tqdm=use_tqdm)
        self.kv_cache = self.runner.kv_cache
        self.block_manager = BlockManager(
            self.kv_cache.num_blocks, config.block_size, self.hash_ctx, config.enable_prefix_caching
        )
        self.scheduler = Scheduler(
            self.block_manager,
            config.max_num_seqs,
            config.max_num_batched_tokens,
            config.max_model_len,
            self.model_config.eos_token_ids,
        )
        self.seqs: dict[str, Sequence] = {}
        self._steps = self._computed = self._generated = self._finished = self._aborted = 0
        self._swapped_bytes: dict[int, int] = {}  # seq_id -> bytes of its swapped-out KV
        self.num_swapped_out = 0
        if config.preemption_mode == "swap":
            self.scheduler.on_preempt = self._swap_out_preempted

    # ---- facts ----
    @property
    def block_size(self) -> int:
        return self.config.block_size

    @property
    def block_nbytes(self) -> int:
        """Bytes of one exported/imported KV block payload."""
        return self.kv_cache.block_nbytes

    @property
    def num_kv_blocks(self) -> int:
        return self.kv_cache.num_blocks

    @property
    def tokenizer_path(self) -> Path | None:
        return self.config.tokenizer_path

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self.model_config.eos_token_ids

    def block_hashes(self, token_ids: Seq[int]) -> list[bytes]:
        """Chained hashes of the full blocks of ``token_ids`` as this engine names them."""
        return block_hashes(token_ids, self.hash_ctx)

    # ---- requests ----
    def add_request(
        self,
        request_id: str,
        prompt_token_ids: Seq[int],
        params: SamplingParams | None = None,
        *,
        output_token_ids: Seq[int] = (),
        kv_blocks: Seq[Any] | None = None,
        kv_num_tokens: int = 0,
        export_kv: bool = False,
        cache_salt: str = "",
        kv_first_block: int = 0,
    ) -> None:
        """Queue a request.

        ``output_token_ids``: tokens already generated (elsewhere); they count toward
        ``params.max_tokens``. ``kv_blocks``/``kv_num_tokens``: KV of the first
        ``kv_num_tokens`` tokens of prompt+outputs, from block ``kv_first_block`` on
        (the blocks before it are expected in the prefix cache; if they are gone by
        admission, the payloads are dropped and computed), one payload of ``block_nbytes``
        per block (the last may be partial); only the rest is computed.
        ``export_kv``: report each full block as it completes (and the partial
        tail at the end) in ``StepOutput.exported_blocks`` / ``tail_block``.
        ``cache_salt``: prefix-cache hits only between requests of the same salt.
        """
        params = params or SamplingParams()
        cfg = self.config
        if request_id in self.seqs:
            raise ValueError(f"request {request_id!r} is already running")
        if not prompt_token_ids:
            raise ValueError(f"request {request_id!r}: empty prompt")
        tokens = list(prompt_token_ids) + list(output_token_ids)
        vocab = self.model_config.vocab_size
        bad = next((t for t in tokens if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"request {request_id!r}: token id {bad} outside [0, {vocab})")
        if len(tokens) > cfg.max_model_len:
            raise ValueError(
                f"request {request_id!r}: {len(tokens)} tokens exceed max_model_len "
                f"{cfg.max_model_len}"
            )
        if len(output_token_ids) >= params.max_tokens:
            raise ValueError(
                f"request {request_id!r}: already has {len(output_token_ids)} output tokens, "
                f"max_tokens is {params.max_tokens}"
            )
        worst = min(len(prompt_token_ids) + params.max_tokens, cfg.max_model_len)
        if cdiv(worst, cfg.block_size) > self.num_kv_blocks:
            raise ValueError(
                f"request {request_id!r} may need {cdiv(worst, cfg.block_size)} KV blocks, "
                f"the cache has {self.num_kv_blocks}"
            )
        if kv_num_tokens or kv_blocks:
            self._check_kv(len(tokens), kv_blocks, kv_num_tokens, kv_first_block)
        seq = Sequence(
            request_id,
            prompt_token_ids,
            params,
            output_token_ids=output_token_ids,
            kv_blocks=list(kv_blocks) if kv_blocks else None,
            kv_num_tokens=kv_num_tokens,
            export_kv=export_kv,
            cache_salt=cache_salt,
            kv_first_block=kv_first_block,
        )
        self.seqs[request_id] = seq
        self.scheduler.add(seq)

    def _check_kv(self, num_tokens: int, kv_blocks: Seq[Any] | None, kv_num_tokens: int,
                  kv_first_block: int) -> None:
        bs = self.config.block_size
        if not 0 < kv_num_tokens <= num_tokens:
            raise ValueError(f"kv_num_tokens={kv_num_tokens} for {num_tokens} tokens")
        want = cdiv(kv_num_tokens, bs) - kv_first_block
        if kv_first_block < 0 or want < 0:
            raise ValueError(f"kv_first_block={kv_first_block} for {kv_num_tokens} KV tokens")
        if kv_blocks is None or len(kv_blocks) != want:
            raise ValueError(
                f"{kv_num_tokens} KV tokens from block {kv_first_block} need {want} "
                f"payloads, got {0 if kv_blocks is None else len(kv_blocks)}"
            )
        for payload in kv_blocks:
            self.kv_cache.check_payload(payload)

    def cached_prefix_blocks(self, hashes: Seq[bytes]) -> int:
        """How many leading blocks named by ``hashes`` the prefix cache holds now (a peek
        that a worker's other threads may make; see ``BlockManager``)."""
        return self.block_manager.cached_prefix_blocks(list(hashes))

    def abort(self, request_id: str) -> bool:
        """Drop a request and free its blocks; False if it is not (or no longer) here."""
        seq = self.scheduler.abort(request_id)
        if seq is None:
            return False
        del self.seqs[request_id]
        self._aborted += 1
        return True

    def swap_out(self, request_id: str) -> SwappedOut | None:
        """Take a request out with the KV it has computed so far (to resume it later or
        in another engine without recomputing); its blocks are freed here."""
        seq = self.seqs.get(request_id)
        if seq is None:
            return None
        bs = self.block_size
        n = seq.num_computed_tokens if seq.block_table else 0
        full = n // bs
        hashes = self.block_manager.seq_hashes(seq, full)
        want = [(i, hashes[i], bs) for i in range(full)]
        if n % bs:
            want.append((full, None, n % bs))
        payloads, wait = self.kv_cache.export_blocks_async(
            [seq.block_table[i] for i, _, _ in want]
        )
        blocks = [
            ExportedBlock(i, h, p, k, wait) for (i, h, k), p in zip(want, payloads, strict=True)
        ]
        out = SwappedOut(
            request_id, seq.prompt_token_ids, seq.output_token_ids, seq.params, n, blocks
        )
        self.scheduler.abort(request_id)
        del self.seqs[request_id]
        return out

    def _swap_out_preempted(self, seq: Sequence) -> None:
        """Swap preemption: copy the KV ``seq`` has computed to host memory and hand it
        back as the KV it brings, so that it resumes without computing it again. Over
        ``swap_space_gb`` of swapped KV it is recomputed instead."""
        n = seq.num_computed_tokens if seq.block_table else 0
        blocks = cdiv(n, self.block_size)
        live = {s.seq_id for s in self.scheduler.waiting if s.kv_blocks}
        self._swapped_bytes = {k: v for k, v in self._swapped_bytes.items() if k in live}
        nbytes = blocks * self.block_nbytes
        budget = self.config.swap_space_gb * (1 << 30)
        if not blocks or sum(self._swapped_bytes.values()) + nbytes > budget:
            return
        seq.kv_blocks = self.kv_cache.export_blocks(seq.block_table[:blocks])
        seq.kv_num_tokens, seq.kv_first_block = n, 0
        self._swapped_bytes[seq.seq_id] = nbytes
        self.num_swapped_out += 1

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- the step ----
    def step(self) -> list[StepOutput]:
        """Schedule, run the model once, sample; report what happened to each request."""
        prof = self.runner.profiler
        with prof.section("schedule"):
            out = self.scheduler.schedule()
        if out.is_empty:
            if out.kv_imports:
                self.kv_cache.import_blocks(out.kv_imports)
            return []
        sampled = self.runner.execute(out)
        with prof.section("postprocess"):
            finished = self.scheduler.postprocess(out, sampled)
        self._steps += 1
        self._computed += out.num_batched_tokens
        self._generated += len(sampled)
        exports = self._export(out)
        done = {id(s) for s in finished}
        results: list[StepOutput] = []
        for s in out.scheduled:
            seq = s.seq
            token = sampled.get(seq.seq_id)
            full, tail = exports.get(seq.seq_id, ([], None))
            if token is None and not full and id(seq) not in done:
                continue
            results.append(
                StepOutput(
                    request_id=seq.request_id,
                    new_token_ids=[] if token is None else [token],
                    finished=id(seq) in done,
                    finish_reason=seq.finish_reason if id(seq) in done else None,
                    num_cached_tokens=seq.num_cached_tokens,
                    exported_blocks=full,
                    tail_block=tail,
                )
            )
        for seq in finished:
            self.scheduler.free(seq)
            del self.seqs[seq.request_id]
            self._finished += 1
        return results

    def _export(
        self, out: SchedulerOutput
    ) -> dict[int, tuple[list[ExportedBlock], ExportedBlock | None]]:
        """Copy out the blocks of export_kv requests that became full in this step
        (and the tail of finished ones), with one device->host copy for all. On CUDA
        the copy runs on behind the step; reading a payload waits for it."""
        bs = self.block_size
        wanted: list[tuple[Sequence, int, bytes | None, int]] = []
        for s in out.scheduled:
            seq = s.seq
            if not seq.export_kv:
                continue
            full = seq.num_computed_tokens // bs
            if full > seq.num_exported_blocks:
                hashes = self.block_manager.seq_hashes(seq, full)
                for i in range(seq.num_exported_blocks, full):
                    wanted.append((seq, i, hashes[i], bs))
                seq.num_exported_blocks = full
            rest = seq.num_computed_tokens % bs
            if seq.is_finished and rest:
                wanted.append((seq, full, None, rest))
        if not wanted:
            return {}
        payloads, wait = self.kv_cache.export_blocks_async(
            [seq.block_table[i] for seq, i, _, _ in wanted]
        )
        result: dict[int, tuple[list[ExportedBlock], ExportedBlock | None]] = {}
        for (seq, i, h, n), payload in zip(wanted, payloads, strict=True):
            full_list, tail = result.get(seq.seq_id, ([], None))
            block = ExportedBlock(i, h, payload, n, wait)
            if h is None:
                tail = block
            else:
                full_list.append(block)
            result[seq.seq_id] = (full_list, tail)
        return result

    # ---- prefix blocks from elsewhere ----
    def import_prefix_blocks(self, hashes: Seq[bytes], payloads: Seq[Any]) -> int:
        """Put full blocks (named by their chained hash) into the prefix cache as free
        cached blocks, for later requests to hit. Returns how many were copied in
        (blocks already cached, or no free block, are skipped)."""
        if len(hashes) != len(payloads):
            raise ValueError(f"{len(hashes)} hashes but {len(payloads)} payloads")
        for payload in payloads:
            self.kv_cache.check_payload(payload)
        items = []
        for h, payload in zip(hashes, payloads, strict=True):
            bid = self.block_manager.import_cached_block(h)
            if bid is not None:
                items.append((bid, payload))
        self.kv_cache.import_blocks(items)
        return len(items)

    # ---- numbers ----
    def stats(self) -> EngineStats:
        sch, bm = self.scheduler, self.block_manager
        return EngineStats(
            num_kv_blocks=bm.num_blocks,
            num_free_blocks=bm.num_free_blocks,
            num_cached_blocks=bm.num_cached_blocks,
            num_running=len(sch.running),
            num_waiting=len(sch.waiting),
            num_steps=self._steps,
            num_computed_tokens=self._computed,
            num_prefix_hit_tokens=sch.num_prefix_hit_tokens,
            num_imported_tokens=sch.num_imported_tokens,
            num_generated_tokens=self._generated,
            num_preemptions=sch.num_preemptions,
            num_swapped_out=self.num_swapped_out,
            num_finished=self._finished,
            num_aborted=self._aborted,
        )

    def check_invariants(self) -> None:
        """Block-manager books balance against the live requests (for tests)."""
        self.block_manager.check_invariants(s for s in self.seqs.values() if s.block_table)
