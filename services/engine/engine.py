"""LLMEngine: requests in, tokens (and KV blocks) out, one step at a time.

Not thread-safe: call it from one thread (a worker runs its step loop on one).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.engine.block_hash import HashContext, block_hashes
from services.engine.block_manager import BlockManager, cdiv
from services.engine.config import EngineConfig, ModelConfig
from services.engine.model_runner import ModelRunner
from services.engine.outputs import EngineStats, ExportedBlock, StepOutput, SwappedOut
from services.engine.sampled import SampledIds
from services.engine.scheduler import Scheduler, SchedulerOutput
from services.engine.sequence import SamplingParams, Sequence, SequenceStatus
from services.engine.step_results import export_blocks, step_outputs

log = logging.getLogger(__name__)


@dataclass
class _Launched:
    out: SchedulerOutput
    sampled: SampledIds


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
        self._discarded = 0  # tokens of launched steps dropped (their request had ended)
        self._inflight: _Launched | None = None  # launched, not yet processed
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
        kv_held_blocks: int | None = None,
        block_hashes: Seq[bytes] | None = None,
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
        ``kv_held_blocks``: the store already holds the first this many full blocks for
        the request, so ``export_kv`` reports only the blocks after them (None: the
        blocks of ``kv_blocks`` and the cached ones before them).
        ``block_hashes``: the caller's chained hashes of the prompt's leading full blocks
        (:func:`block_hash.block_hashes` with this engine's hash context and
        ``cache_salt``), so that they are not computed twice.
        """
        params = params or SamplingParams()
        cfg = self.config
        if request_id in self.seqs:
            raise ValueError(f"request {request_id!r} is already running")
        if not prompt_token_ids:
            raise ValueError(f"request {request_id!r}: empty prompt")
        tokens = list(prompt_token_ids) + list(output_token_ids)
        vocab = self.model_config.vocab_size
        if min(tokens) < 0 or max(tokens) >= vocab:  # builtins: C speed on long prompts
            bad = next(t for t in tokens if not 0 <= t < vocab)
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
        if kv_held_blocks is not None and not 0 <= kv_held_blocks <= len(tokens) // cfg.block_size:
            raise ValueError(f"kv_held_blocks={kv_held_blocks} for {len(tokens)} tokens")
        if block_hashes is not None and len(block_hashes) > len(tokens) // cfg.block_size:
            raise ValueError(f"{len(block_hashes)} block hashes for {len(tokens)} tokens")
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
            kv_held_blocks=kv_held_blocks,
        )
        if block_hashes:
            seq.block_hashes.extend(block_hashes)
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

    def forget_store(self) -> None:
        """The store lost KV this engine sent it: export held blocks again (another
        thread may call this; see ``BlockManager.forget_store``)."""
        self.block_manager.forget_store()

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
        """Requests to run, or a launched step with tokens to report (one whose
        requests have all ended reports nothing: it is processed by a later step)."""
        launched = self._inflight
        return self.scheduler.has_unfinished() or (
            launched is not None
            and any(s.seq.status == SequenceStatus.RUNNING for s in launched.out.scheduled)
        )

    # ---- the step ----
    def step(self) -> list[StepOutput]:
        """Schedule, run the model once, sample; report what happened to each request.

        With ``async_scheduling`` a call launches a step and reports the one the call
        before launched: the next step is scheduled, prepared and queued on the
        device before the host waits for the last one's tokens, so the host's work
        hides behind the device's. A step that would preempt is scheduled only
        after the last one is processed (preemption sees committed state), and so is
        one that waiting requests would join once the last one's prefix blocks are
        cached."""
        prev, self._inflight = self._inflight, None
        results: list[StepOutput] = []
        if prev is not None and (self.scheduler.would_preempt()
                                 or self.scheduler.waits_on_step(prev.out)):
            results, prev = self._complete(prev), None
        launched = self._launch()
        if prev is not None:
            results = self._complete(prev)
        if launched is not None and not self.config.async_scheduling:
            return self._complete(launched)
        self._inflight = launched
        return results

    def _launch(self) -> _Launched | None:
        with self.runner.profiler.section("schedule"):
            out = self.scheduler.schedule()
        if out.is_empty:
            if out.kv_imports:
                self.kv_cache.import_blocks(out.kv_imports)
            return None
        return _Launched(out, self.runner.launch(out))

    def _complete(self, launched: _Launched) -> list[StepOutput]:
        """Wait for a launched step's tokens and process it. Its sequences that
        stopped running meanwhile (finished by the step before, aborted) are
        dropped: their token of this step is never reported."""
        prof, out = self.runner.profiler, launched.out
        with prof.section("wait"):
            sampled = self.runner.collect(launched.sampled)
        with prof.section("postprocess"):
            live = [s for s in out.scheduled if s.seq.status == SequenceStatus.RUNNING]
            finished = self.scheduler.postprocess(out, sampled)
        computed = sum(s.num_new_tokens for s in live)
        self._steps += 1
        self._computed += computed
        self._discarded += out.num_batched_tokens - computed
        self._generated += sum(1 for s in live if s.samples)
        exports = export_blocks(live, self.block_manager, self.kv_cache, launched.sampled.end)
        results = step_outputs(live, sampled, finished, exports)
        # a request finished here may be in the step launched after this one: its
        # blocks can go at once, as the device runs steps in order and that step
        # writes only a slot past the request's valid tokens, in a block never named
        for seq in finished:
            self.scheduler.free(seq)
            del self.seqs[seq.request_id]
            self._finished += 1
        return results

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
            num_discarded_tokens=self._discarded,
            num_preemptions=sch.num_preemptions,
            num_swapped_out=self.num_swapped_out,
            num_finished=self._finished,
            num_aborted=self._aborted,
        )

    def check_invariants(self) -> None:
        """Block-manager books balance against the live requests (for tests)."""
        self.block_manager.check_invariants(s for s in self.seqs.values() if s.block_table)
