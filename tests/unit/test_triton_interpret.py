"""The Triton kernels, run by Triton's CPU interpreter, against the torch reference.

The GPU tests (tests/gpu) run them compiled; these check their indexing and maths
on every CI run. Skipped where Triton is not installed.
"""

from __future__ import annotations

import os
import random

import pytest
import torch

triton = pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1":  # set by conftest.py where there is no GPU
    pytest.skip("runs under Triton's interpreter; tests/gpu runs the kernels compiled",
                allow_module_level=True)

from services.engine import LLM, SamplingParams  # noqa: E402
from services.engine.attention.torch_backend import TorchAttention  # noqa: E402
from services.engine.block_manager import cdiv  # noqa: E402
from services.engine.models.layers import RMSNorm, RotaryEmbedding  # noqa: E402
from tests.gpu.test_triton_kernels import _batch, _rel  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def interpreter_scalar_loop_bounds() -> None:
    """The interpreter holds scalars as 1-element arrays, which ``range()`` bounds
    loaded from memory cannot convert; compiled Triton has no such limit."""
    import triton.runtime.interpreter as interp

    original = getattr(interp, "_patch_lang_tensor", None)
    if original is None:  # another Triton: nothing to patch
        yield
        return

    def patched(tensor: object, scope: object) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interp._patch_lang_tensor = patched
    yield
    interp._patch_lang_tensor = original


@pytest.mark.parametrize(("block_size", "head_dim", "group"), [(16, 64, 4), (32, 16, 1)])
def test_attention_kernels_match_torch(block_size: int, head_dim: int, group: int) -> None:
    from services.engine.attention.triton_backend import TritonAttention

    rng = random.Random(block_size + head_dim + group)
    kvh, heads = 2, 2 * group
    decode_lens = [1, block_size, block_size + 1, 300]
    chunks = [(5, 5), (block_size * 2 + 3, block_size * 2 + 3), (37, 200), (30, 31)]
    lens = decode_lens + [c for _, c in chunks]
    num_blocks = sum(cdiv(n, block_size) for n in lens) + 4
    meta, tokens = _batch(decode_lens, chunks, block_size, num_blocks, rng, device="cpu")
    cache = torch.randn(num_blocks, 2, 2, block_size, kvh, head_dim)
    q, k, v = (torch.randn(tokens, h, head_dim) for h in (heads, kvh, kvh))
    ref_cache = cache.clone()
    scale = head_dim**-0.5
    want = TorchAttention(heads, kvh, head_dim, scale).forward(
        q, k, v, ref_cache[:, 1, 0], ref_cache[:, 1, 1], meta)
    got = TritonAttention(heads, kvh, head_dim, scale).forward(
        q, k, v, cache[:, 1, 0], cache[:, 1, 1], meta)
    assert torch.equal(cache, ref_cache)
    for c in meta.prefills:
        s = slice(c.token_start, c.token_start + c.num_tokens)
        assert _rel(got[s], want[s]) < 1e-5, c
    assert _rel(got[: len(decode_lens)], want[: len(decode_lens)]) < 1e-5


def test_fused_ops_match_torch() -> None:
    from services.engine.config import load_model_config
    from services.engine.models import triton_ops

    torch.manual_seed(0)
    norm = RMSNorm(96, 1e-6)
    norm.weight.data = torch.randn(96)
    x, res = torch.randn(7, 96), torch.randn(7, 96)
    got_res = res.clone()
    got = triton_ops.rms_norm(x, norm.weight, 1e-6, got_res)
    assert torch.equal(got_res, x + res)
    assert _rel(got, norm._norm(x + res)) < 1e-6
    gu = torch.randn(5, 2 * 40)
    gate, up = gu.chunk(2, dim=-1)
    assert _rel(triton_ops.silu_and_mul(gu), torch.nn.functional.silu(gate) * up) < 1e-6
    rope = RotaryEmbedding(load_model_config("dummy:tiny-llama"), 64, torch.device("cpu"))
    pos = torch.tensor([0, 3, 63, 17], dtype=torch.int32)
    q, k = torch.randn(4, 4, 16), torch.randn(4, 2, 16)
    want_q, want_k = rope(pos, q.clone(), k.clone())
    rope.fused = True
    got_q, got_k = rope(pos, q, k)
    assert _rel(got_q, want_q) < 1e-6 and _rel(got_k, want_k) < 1e-6


def test_engine_with_triton_backend_equals_torch_backend(tiny_llama_dir: object) -> None:
    """Chunked prefill over cached prefixes mixed with decodes: the same greedy tokens
    through the Triton path (kernels, fused ops, whole-batch inputs) as the reference."""
    rng = random.Random(5)
    shared = [rng.randrange(3, 500) for _ in range(40)]
    prompts = [shared + [rng.randrange(3, 500) for _ in range(rng.randint(1, 30))]
               for _ in range(5)]
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    cfg = dict(model=str(tiny_llama_dir), num_kv_blocks=64, max_num_batched_tokens=48,
               use_tqdm=False)
    want = LLM(attention_backend="torch", **cfg).generate(prompts, params, use_tqdm=False)
    got = LLM(attention_backend="triton", **cfg).generate(prompts, params, use_tqdm=False)
    assert [g["token_ids"] for g in got] == [w["token_ids"] for w in want]


def test_decode_graph_layout_equals_general_layout(tiny_llama_dir: object) -> None:
    """What a CUDA graph replays: the fixed decode layout, padded to a bucket, with the
    split fixed from max_model_len, gives the hidden states of the general path."""
    from services.engine import EngineConfig, LLMEngine

    engine = LLMEngine(EngineConfig(model=str(tiny_llama_dir), num_kv_blocks=64,
                                    attention_backend="triton", max_num_seqs=8),
                       use_tqdm=False)
    for i, n in enumerate((5, 23, 40)):
        engine.add_request(f"r{i}", list(range(3 + 100 * i, 3 + 100 * i + n)),
                           SamplingParams(max_tokens=4, ignore_eos=True))
    engine.step()  # the three prefills
    out = engine.scheduler.schedule()
    assert [s.num_new_tokens for s in out.scheduled] == [1, 1, 1]
    runner = engine.runner
    with torch.inference_mode():
        batch = runner.inputs.fill_general(out.scheduled)
        want = runner.model(batch.input_ids, batch.positions, runner.kv_cache, batch.meta)
        views = runner.inputs.decode_views(4)
        views.meta.decode_split = runner.attention_backend.decode_split(
            engine.config.max_model_len, 4, runner.device)
        runner.inputs.fill_decode(out.scheduled, 4)
        got = runner.model(views.input_ids, views.positions, runner.kv_cache, views.meta)
    assert _rel(got[:3], want) < 1e-5
    for i in range(3):
        engine.abort(f"r{i}")
    engine.check_invariants()


def test_chunk_graph_layout_equals_general_layout(tiny_llama_dir: object) -> None:
    """What a chunk graph replays: decodes and a prefill chunk, every sequence a chunk
    of the prefill kernel, padded to a token bucket and to the graph's sequence count,
    gives the hidden states of the general path at the sampling rows."""
    from services.engine import EngineConfig, LLMEngine
    from services.engine.step_inputs import StepInputs

    engine = LLMEngine(EngineConfig(model=str(tiny_llama_dir), num_kv_blocks=64,
                                    attention_backend="triton", max_num_seqs=8),
                       use_tqdm=False)
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    for i, n in enumerate((5, 23, 18)):
        engine.add_request(f"r{i}", list(range(3 + 100 * i, 3 + 100 * i + n)), params)
    engine.step()  # the three prefills
    engine.add_request("r3", list(range(400, 407)), params)
    out = engine.scheduler.schedule()
    assert [s.num_new_tokens for s in out.scheduled] == [1, 1, 1, 7]
    runner = engine.runner
    chunks = StepInputs(max_tokens=64, max_seqs=8, max_blocks=runner.inputs.max_blocks,
                        block_size=runner.block_size, device=runner.device,
                        chunk_tokens=32, chunk_seqs=5)
    with torch.inference_mode():
        batch = runner.inputs.fill_general(out.scheduled)
        want = runner.model(batch.input_ids, batch.positions, runner.kv_cache, batch.meta)
        want = want[batch.sample_rows]
        rows = chunks.fill_chunks(out.scheduled, 16)
        views = chunks.chunk_views(16)
        got = runner.model(views.input_ids, views.positions, runner.kv_cache, views.meta)
    assert rows.tolist() == [0, 1, 2, 9]
    assert _rel(got[rows], want) < 1e-5
    for i in range(4):
        engine.abort(f"r{i}")
    engine.check_invariants()
