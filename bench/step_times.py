"""Every step's wall time of a ``bench offline`` workload, slowest first (not a test).

    python3 -m bench.step_times --device cuda --model dummy:qwen3-0.6b --num-seqs 256 ...

Takes ``bench offline``'s options. Prints, per step kind (pure decode, or with
prefill tokens), the count and total time, then the slowest steps with their
token counts: a step far slower than its neighbours of the same size is paying a
one-time cost (a kernel compile, an allocation) in the middle of serving.
"""

from __future__ import annotations

import argparse
import time

from bench.offline import _workload, add_arguments, engine_config
from services.engine.engine import LLMEngine
from services.engine.sequence import SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    parser.add_argument("--show", type=int, default=15, help="slowest steps to list")
    parser.add_argument("--log-compiles", action="store_true",
                        help="print each Triton kernel variant made ready (compiled or "
                             "loaded from Triton's cache), with its step (0: start-up)")
    args = parser.parse_args()
    config = engine_config(args)
    steps: list[tuple[float, int, int, int]] = []  # (seconds, index, tokens, running)
    if args.log_compiles:
        _log_compiles(steps)
    engine = LLMEngine(config, use_tqdm=False)
    for i, (prompt, n_out) in enumerate(_workload(args, engine.model_config.vocab_size)):
        engine.add_request(f"r{i}", prompt, SamplingParams(max_tokens=n_out, ignore_eos=True))
    while engine.has_unfinished():
        before = engine.stats().num_computed_tokens
        start = time.perf_counter()
        engine.step()
        sec = time.perf_counter() - start
        st = engine.stats()
        steps.append((sec, len(steps), st.num_computed_tokens - before, st.num_running))
    decode = [s for s in steps if s[2] == s[3]]
    mixed = [s for s in steps if s[2] != s[3]]
    for name, group in (("decode-only", decode), ("with prefill", mixed)):
        total = sum(s[0] for s in group)
        print(f"{name:>13}: {len(group)} steps, {total:.3f} s")
    print("slowest steps: ms, step, tokens, running")
    for sec, i, tokens, running in sorted(steps, reverse=True)[: args.show]:
        print(f"  {sec * 1e3:9.2f} {i:6d} {tokens:7d} {running:5d}")


def _log_compiles(steps: list) -> None:
    from triton import knobs

    def hook(*_: object, **kw: object) -> None:
        print(f"  kernel variant ready at step {len(steps)}: {kw.get('fn')} {kw.get('key')}")

    knobs.runtime.jit_post_compile_hook = hook


if __name__ == "__main__":
    main()
