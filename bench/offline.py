"""``splitserve bench offline``: engine throughput without any serving around it.

N prompts of random token ids with random input and output lengths (eos
ignored) go through one ``LLMEngine`` at once. Reports prefill+decode and
output tokens/s, and the time of pure-decode steps (batch-1 decode speed with
``--num-seqs 1 --min-input 128 --max-input 128``).

    python -c "import argparse, bench.offline as b; p = argparse.ArgumentParser();
               b.add_arguments(p); b.run(p.parse_args([]))"
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from typing import Any

from tqdm.auto import tqdm


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("offline benchmark")
    g.add_argument(
        "--model",
        default="dummy:tiny-llama",
        help="local HF directory or dummy:<shape> (e.g. dummy:llama-3.1-8b)",
    )
    g.add_argument("--num-seqs", type=int, default=64, help="number of requests")
    g.add_argument("--min-input", type=int, default=64, help="shortest prompt (tokens)")
    g.add_argument("--max-input", type=int, default=512, help="longest prompt (tokens)")
    g.add_argument("--min-output", type=int, default=32, help="fewest output tokens")
    g.add_argument("--max-output", type=int, default=256, help="most output tokens")
    g.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "float16", "bfloat16"],
        help="default: bfloat16 on cuda, float32 on cpu",
    )
    g.add_argument("--device", default="cpu", help="cpu or cuda")
    g.add_argument("--seed", type=int, default=0, help="seed of the workload and dummy weights")
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--num-kv-blocks", type=int, default=None, help="KV cache size in blocks")
    g.add_argument("--kv-cache-gb", type=float, default=None, help="KV cache size in GiB")
    g.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=0.9,
        help="share of GPU memory for weights + KV cache when no size is given",
    )
    g.add_argument("--max-num-seqs", type=int, default=64, help="running sequences at most")
    g.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=2048,
        help="token budget per step (chunked prefill)",
    )
    g.add_argument(
        "--max-model-len", type=int, default=None, help="default: max-input + max-output"
    )
    g.add_argument("--no-prefix-caching", action="store_true")
    g.add_argument("--attention-backend", default="auto", choices=["auto", "torch", "triton"])
    g.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    g.add_argument(
        "--async-scheduling", default="auto", choices=["auto", "on", "off"],
        help="schedule step N+1 while step N runs (auto: on for CUDA)",
    )
    g.add_argument(
        "--profile", action="store_true",
        help="print where each step's time goes (synchronous steps: syncs the GPU per "
             "section; async: host sections, and device busy/idle from CUDA events)",
    )
    g.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    g.add_argument("--warmup", type=int, default=1, help="warm-up requests before timing")
    g.add_argument("--json", dest="json_out", default=None, help="also write the result here")
    g.add_argument("--no-tqdm", action="store_true", help="no progress bar")


def _workload(args: argparse.Namespace, vocab: int) -> list[tuple[list[int], int]]:
    rng = random.Random(args.seed)
    reqs = []
    for _ in range(args.num_seqs):
        n_in = rng.randint(args.min_input, args.max_input)
        n_out = rng.randint(args.min_output, args.max_output)
        reqs.append(([rng.randrange(vocab) for _ in range(n_in)], n_out))
    return reqs


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _check(args: argparse.Namespace) -> None:
    if args.num_seqs < 1:
        raise ValueError("--num-seqs must be >= 1")
    if not 1 <= args.min_input <= args.max_input:
        raise ValueError("need 1 <= --min-input <= --max-input")
    if not 1 <= args.min_output <= args.max_output:
        raise ValueError("need 1 <= --min-output <= --max-output")


def engine_config(args: argparse.Namespace) -> Any:
    """The ``EngineConfig`` of this benchmark's options."""
    from services.engine.config import EngineConfig

    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    return EngineConfig(
        model=args.model,
        dtype=dtype,
        device=args.device,
        block_size=args.block_size,
        num_kv_blocks=args.num_kv_blocks,
        kv_cache_memory_gb=args.kv_cache_gb,
        gpu_memory_utilization=args.gpu_memory_utilization,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len or args.max_input + args.max_output,
        enable_prefix_caching=not args.no_prefix_caching,
        attention_backend=args.attention_backend,
        enforce_eager=args.enforce_eager,
        async_scheduling={"auto": None, "on": True, "off": False}[args.async_scheduling],
        seed=args.seed,
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark; print a summary and return the numbers."""
    from services.engine.engine import LLMEngine
    from services.engine.sequence import SamplingParams

    _check(args)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    config = engine_config(args)
    dtype = config.dtype
    t0 = time.perf_counter()
    engine = LLMEngine(config, use_tqdm=not args.no_tqdm)
    load_s = time.perf_counter() - t0
    vocab = engine.model_config.vocab_size
    reqs = _workload(args, vocab)

    for i in range(args.warmup):  # first-call costs (allocator, kernels) out of the timing
        engine.add_request(
            f"warmup-{i}",
            [1] * min(16, args.max_input),
            SamplingParams(max_tokens=2, ignore_eos=True),
        )
    while engine.has_unfinished():
        engine.step()
    base = engine.stats()
    engine.runner.profiler.enabled = args.profile

    for i, (prompt, n_out) in enumerate(reqs):
        engine.add_request(f"req-{i}", prompt, SamplingParams(max_tokens=n_out, ignore_eos=True))
    decode_s = prefill_s = 0.0
    decode_steps = decode_tokens = 0
    decode_step_times: list[float] = []
    first_token_at: dict[str, float] = {}
    bar = tqdm(total=len(reqs), desc="bench offline", unit="seq", disable=args.no_tqdm)
    start = time.perf_counter()
    while engine.has_unfinished():
        waiting_before = engine.stats().num_waiting
        computed_before = engine.stats().num_computed_tokens
        t = time.perf_counter()
        outs = engine.step()
        now = time.perf_counter()
        dt = now - t
        st = engine.stats()
        batched = st.num_computed_tokens - computed_before
        n_new = sum(len(o.new_token_ids) for o in outs)
        if batched == n_new and waiting_before == st.num_waiting and batched:
            decode_s += dt  # every sequence fed exactly one token: a pure decode step
            decode_steps += 1
            decode_step_times.append(dt)
            decode_tokens += n_new
        else:
            prefill_s += dt
        for o in outs:
            if o.new_token_ids and o.request_id not in first_token_at:
                first_token_at[o.request_id] = now - start
            if o.finished:
                bar.update(1)
    elapsed = time.perf_counter() - start
    bar.close()
    st = engine.stats()
    input_tokens = sum(len(p) for p, _ in reqs)
    output_tokens = sum(n for _, n in reqs)
    ttfts = sorted(first_token_at.values())
    result = {
        "model": args.model,
        "device": args.device,
        "dtype": dtype,
        "num_seqs": len(reqs),
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "total_tokens": input_tokens + output_tokens,
        "elapsed_s": elapsed,
        "load_s": load_s,
        "tokens_per_s": (input_tokens + output_tokens) / elapsed,
        "output_tokens_per_s": output_tokens / elapsed,
        "computed_tokens": st.num_computed_tokens - base.num_computed_tokens,
        "prefix_hit_tokens": st.num_prefix_hit_tokens - base.num_prefix_hit_tokens,
        "steps": st.num_steps - base.num_steps,
        "prefill_step_s": prefill_s,
        "decode_steps": decode_steps,
        "decode_step_s": decode_s,
        "decode_tokens_per_s": decode_tokens / decode_s if decode_s else 0.0,
        "mean_decode_step_ms": 1000 * decode_s / decode_steps if decode_steps else 0.0,
        "median_decode_step_ms": (
            1000 * statistics.median(decode_step_times) if decode_step_times else 0.0),
        "median_ttft_s": ttfts[len(ttfts) // 2] if ttfts else 0.0,
        "preemptions": st.num_preemptions - base.num_preemptions,
        "async_scheduling": config.async_scheduling,
        "discarded_tokens": st.num_discarded_tokens - base.num_discarded_tokens,
        "threads": _threads(),
        "num_kv_blocks": engine.num_kv_blocks,
        "block_nbytes": engine.block_nbytes,
    }
    print(
        f"{result['num_seqs']} seqs, {input_tokens} input + {output_tokens} output = "
        f"{result['total_tokens']} tokens in {elapsed:.2f} s: "
        f"{result['tokens_per_s']:.1f} tok/s (prefill+decode), "
        f"{result['output_tokens_per_s']:.1f} output tok/s; "
        f"decode steps {decode_steps} at {result['mean_decode_step_ms']:.2f} ms "
        f"(median {result['median_decode_step_ms']:.2f}) "
        f"({result['decode_tokens_per_s']:.1f} tok/s); preemptions {result['preemptions']}"
    )
    result.update(_hardware_rates(engine, result))
    for key, label in (("decode_weight_gb_per_s", "decode reads weights at {:.1f} GB/s"),
                       ("prefill_tflop_per_s", "prefill at {:.2f} TFLOP/s")):
        if key in result:
            print(label.format(result[key]))
    if args.profile:
        prof = engine.runner.profiler
        result["profile_s"] = {**prof.seconds, **prof.device_seconds}
        print(prof.table(result["steps"]))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=2)
    return result


def _hardware_rates(engine: Any, result: dict[str, Any]) -> dict[str, float]:
    """What the hardware did: weight bytes read per second of a decode step (all
    parameters, as one batch-1 step reads them), and the FLOP rate of a one-prompt
    prefill (matmuls 2 * params * tokens, causal attention 2 * T^2 * head_dim per
    head and layer; the embedding lookup does no matmul)."""
    model = engine.runner.model
    mc = engine.model_config
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    rates: dict[str, float] = {"weight_bytes": weight_bytes}
    if result["mean_decode_step_ms"]:
        rates["decode_weight_gb_per_s"] = weight_bytes / result["mean_decode_step_ms"] / 1e6
    if result["num_seqs"] == 1 and result["decode_steps"] == 0 and result["prefill_step_s"]:
        t = result["input_tokens"]
        matmul_params = sum(p.numel() for p in model.parameters())
        if mc.tie_word_embeddings:  # one matrix, used by the lm_head only for the last token
            matmul_params -= mc.vocab_size * mc.hidden_size
        else:
            matmul_params -= 2 * mc.vocab_size * mc.hidden_size
        flops = 2 * matmul_params * t + 2 * mc.num_layers * mc.num_heads * mc.head_dim * t * t
        rates["prefill_tflop_per_s"] = flops / result["prefill_step_s"] / 1e12
    return rates


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
