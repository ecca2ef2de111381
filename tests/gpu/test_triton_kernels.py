"""The Triton kernels against the torch reference on random inputs (CUDA only)."""

from __future__ import annotations

import random

import pytest
import torch

from services.engine.attention.metadata import AttentionMetadata, PrefillChunk
from services.engine.attention.torch_backend import TorchAttention
from services.engine.block_manager import cdiv
from services.engine.models.layers import RMSNorm, RotaryEmbedding, silu_and_mul


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-12))


def _batch(decode_lens: list[int], chunks: list[tuple[int, int]], block_size: int,
           num_blocks: int, rng: random.Random, device: str = "cuda",
           ) -> tuple[AttentionMetadata, int]:
    """Metadata of decodes (context lengths) then prefill chunks ((new tokens, context)),
    each sequence on random distinct blocks; returns (meta, tokens)."""
    free = list(range(num_blocks))
    rng.shuffle(free)
    lens = decode_lens + [ctx for _, ctx in chunks]
    width = max(cdiv(n, block_size) for n in lens)
    tables = torch.zeros(len(lens), width, dtype=torch.int32)
    for i, n in enumerate(lens):
        for j in range(cdiv(n, block_size)):
            tables[i, j] = free.pop()
    slots = []
    for i, n in enumerate(decode_lens):
        slots.append(int(tables[i, (n - 1) // block_size]) * block_size + (n - 1) % block_size)
    prefills, start = [], len(decode_lens)
    for k, (new, ctx) in enumerate(chunks):
        row = len(decode_lens) + k
        for p in range(ctx - new, ctx):
            slots.append(int(tables[row, p // block_size]) * block_size + p % block_size)
        prefills.append(PrefillChunk(k, start, new, ctx))
        start += new
    nd = len(decode_lens)
    qstart = [0]
    for new, _ in chunks:
        qstart.append(qstart[-1] + new)

    def dev(x: object) -> torch.Tensor:
        return torch.as_tensor(x, dtype=torch.int32).to(device)

    meta = AttentionMetadata(
        slot_mapping=dev(slots),
        num_decodes=nd,
        decode_block_tables=tables[:nd].to(device) if nd else None,
        decode_seq_lens=dev(decode_lens) if nd else None,
        decode_max_seq_len=max(decode_lens, default=0),
        prefills=prefills,
        prefill_query_start=dev(qstart) if chunks else None,
        prefill_seq_lens=dev([c for _, c in chunks]) if chunks else None,
        prefill_block_tables=tables[nd:].to(device) if chunks else None,
        prefill_max_query_len=max((n for n, _ in chunks), default=0),
    )
    return meta, start


def _cache(num_blocks: int, block_size: int, kvh: int, d: int, dtype: torch.dtype,
           layers: int = 2) -> torch.Tensor:
    shape = (num_blocks, layers, 2, block_size, kvh, d)
    return torch.randn(shape, dtype=torch.float32, device="cuda").to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 4, 8])
def test_attention_matches_torch(dtype: torch.dtype, block_size: int, head_dim: int,
                                 group: int) -> None:
    from services.engine.attention.triton_backend import TritonAttention

    rng = random.Random(block_size * 1000 + head_dim * 10 + group)
    kvh = 2
    heads = kvh * group
    decode_lens = [1, 7, block_size, block_size + 1, 300, 1000 + rng.randrange(100), 2049]
    chunks = [(1 + rng.randrange(40), 0), (block_size * 3 + 5, 0), (37, 200), (130, 131),
              (300, 1111)]
    chunks = [(n, max(n, ctx)) for n, ctx in chunks]
    num_blocks = sum(cdiv(n, block_size) for n in decode_lens + [c for _, c in chunks]) + 8
    meta, tokens = _batch(decode_lens, chunks, block_size, num_blocks, rng)
    cache = _cache(num_blocks, block_size, kvh, head_dim, dtype)
    q = torch.randn(tokens, heads, head_dim, device="cuda").to(dtype)
    k = torch.randn(tokens, kvh, head_dim, device="cuda").to(dtype)
    v = torch.randn(tokens, kvh, head_dim, device="cuda").to(dtype)
    scale = head_dim**-0.5
    ref_cache = cache.clone()
    want = TorchAttention(heads, kvh, head_dim, scale).forward(
        q, k, v, ref_cache[:, 1, 0], ref_cache[:, 1, 1], meta)
    got = TritonAttention(heads, kvh, head_dim, scale).forward(
        q, k, v, cache[:, 1, 0], cache[:, 1, 1], meta)
    assert torch.equal(cache, ref_cache), "the KV write differs"
    assert torch.isfinite(got).all()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert _rel(got, want) < tol
    for c in meta.prefills:  # every chunk (not just the whole batch) is right
        s = slice(c.token_start, c.token_start + c.num_tokens)
        assert _rel(got[s], want[s]) < tol, c


def test_decode_split_and_padding_rows() -> None:
    """Fixed splits (as CUDA graphs use them), padding rows of length 0 give zeros."""
    from services.engine.attention import triton_kernels as tk

    rng = random.Random(3)
    bs, kvh, heads, d = 16, 8, 32, 128
    lens = [5, 700, 0, 0]
    meta, _ = _batch([5, 700], [], bs, 64, rng)
    cache = _cache(64, bs, kvh, d, torch.bfloat16)
    q = torch.randn(4, heads, d, device="cuda").to(torch.bfloat16)
    tables = torch.zeros(4, 60, dtype=torch.int32, device="cuda")
    tables[:2, : meta.decode_block_tables.shape[1]] = meta.decode_block_tables
    lens_t = torch.tensor(lens, dtype=torch.int32, device="cuda")
    ref = TorchAttention(heads, kvh, d, d**-0.5)
    meta.decode_block_tables = tables[:2]
    want = ref._decode(q[:2], cache[:, 0, 0], cache[:, 0, 1], meta)
    for split in [(256, 4), (64, 15), (960, 1)]:
        out = torch.full_like(q, float("nan"))
        tk.decode_attention(q, cache[:, 0, 0], cache[:, 0, 1], tables, lens_t, d**-0.5, split,
                            out)
        assert _rel(out[:2], want) < 2e-2, split
        assert torch.equal(out[2:], torch.zeros_like(out[2:]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_norm_activation_rope_match_torch(dtype: torch.dtype) -> None:
    from services.engine.config import load_model_config
    from services.engine.models import triton_ops

    torch.manual_seed(0)
    t, hidden = 37, 4096
    norm = RMSNorm(hidden, 1e-6).cuda()
    norm.weight.data = torch.randn(hidden, device="cuda").to(dtype)
    x = torch.randn(t, hidden, device="cuda").to(dtype)
    res = torch.randn(t, hidden, device="cuda").to(dtype)
    want_res = x + res
    want = norm._norm(want_res)
    got_res = res.clone()
    got = triton_ops.rms_norm(x, norm.weight, 1e-6, got_res)
    assert torch.equal(got_res, want_res)
    exact = dtype == torch.float32
    assert _rel(got, want) < (1e-6 if exact else 1e-2)
    gu = torch.randn(t, 2 * 1000, device="cuda").to(dtype)
    gate, up = gu.chunk(2, dim=-1)
    assert _rel(silu_and_mul(gu), torch.nn.functional.silu(gate) * up) < (1e-6 if exact else 1e-2)
    mc = load_model_config("dummy:llama-3.1-8b")
    rope = RotaryEmbedding(mc, 4096, torch.device("cuda"))
    pos = torch.randint(0, 4096, (t,), device="cuda", dtype=torch.int32)
    q = torch.randn(t, 32, 128, device="cuda").to(dtype)
    k = torch.randn(t, 8, 128, device="cuda").to(dtype)
    cos = rope.cos[pos.long()].unsqueeze(1).to(dtype)
    sin = rope.sin[pos.long()].unsqueeze(1).to(dtype)

    def rot(z: torch.Tensor) -> torch.Tensor:
        return torch.cat((-z[..., 64:], z[..., :64]), dim=-1)

    want_q, want_k = q * cos + rot(q) * sin, k * cos + rot(k) * sin
    rope.fused = True  # the model sets it with the triton backend: rotate in place
    got_q, got_k = rope(pos, q, k)
    assert got_q.data_ptr() == q.data_ptr() and got_k.data_ptr() == k.data_ptr()
    assert _rel(q, want_q) < (1e-6 if exact else 1e-2)
    assert _rel(k, want_k) < (1e-6 if exact else 1e-2)
