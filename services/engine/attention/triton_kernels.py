"""Triton kernels of paged attention over the block-major KV cache (CUDA only).

The per-layer cache views are ``[num_blocks, block_size, kv_heads, head_dim]``
with the block stride of the whole block-major tensor; kernels address a token
``j`` of a sequence as ``table[j // block_size] * stride_block + (j % block_size)
* stride_token``, so K/V are read in place (no gather copy).

* ``store_kv``: the new K/V of a step into their slots, one launch for the batch.
* ``decode_attention``: one query token per sequence; one program per (sequence,
  KV head, context split) handles all query heads of that KV head (GQA), then a
  second kernel merges the splits (log-sum-exp weights).
* ``prefill_attention``: causal attention of many sequences' chunks in one
  launch, each over its cached prefix plus its own new tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    """Matrix product; float32 inputs in full precision (not tf32) when IEEE."""
    if IEEE:  # noqa: SIM108 (a constexpr branch, resolved at compile time)
        out = tl.dot(a, b, input_precision="ieee")
    else:
        out = tl.dot(a, b)
    return out


@triton.jit
def _store_kv_kernel(
    k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr,
    stride_kt, stride_vt,
    stride_cb, stride_ct,
    BLOCK_SIZE: tl.constexpr, ROW: tl.constexpr, ROW_PAD: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        offs = tl.arange(0, ROW_PAD)
        mask = offs < ROW
        dst = (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_ct + offs
        k = tl.load(k_ptr + t.to(tl.int64) * stride_kt + offs, mask=mask)
        v = tl.load(v_ptr + t.to(tl.int64) * stride_vt + offs, mask=mask)
        tl.store(kc_ptr + dst, k, mask=mask)
        tl.store(vc_ptr + dst, v, mask=mask)


def store_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """``k``/``v``: [T, KVH, D] with contiguous heads; ``slot_mapping``: [T] (-1: skip)."""
    t, kvh, d = k.shape
    if t == 0:
        return
    assert k.stride(2) == 1 and k.stride(1) == d and v.stride(1) == d
    row = kvh * d
    _store_kv_kernel[(t,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), v.stride(0),
        k_cache.stride(0), k_cache.stride(1),
        BLOCK_SIZE=k_cache.shape[1], ROW=row, ROW_PAD=triton.next_power_of_2(row),
    )


# Ints that change from step to step are not specialised on (Triton would otherwise
# compile a variant per "== 1" / "divisible by 16" pattern in the middle of serving).
@triton.jit(do_not_specialize=["split_len", "stride_table", "num_splits"])
def _decode_split_kernel(
    q_ptr, kc_ptr, vc_ptr, table_ptr, lens_ptr, part_o_ptr, part_ml_ptr,
    scale_log2, split_len,
    stride_qt, stride_qh,
    stride_cb, stride_ct, stride_ch,
    stride_table,
    num_splits,
    G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, H: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(lens_ptr + b)
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)
    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, D)
    heads = kvh * G + offs_g
    gmask = offs_g < G
    q = tl.load(
        q_ptr + b.to(tl.int64) * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
        mask=gmask[:, None], other=0.0,
    )
    m = tl.full([G_PAD], float("-inf"), tl.float32)
    s = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D], tl.float32)
    table = table_ptr + b.to(tl.int64) * stride_table
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        nmask = offs_n < end
        block = tl.load(table + offs_n // BLOCK_SIZE, mask=nmask, other=0).to(tl.int64)
        row = block * stride_cb + (offs_n % BLOCK_SIZE) * stride_ct + kvh * stride_ch
        k = tl.load(kc_ptr + row[:, None] + offs_d[None, :], mask=nmask[:, None], other=0.0)
        qk = _dot(q, tl.trans(k), IEEE)
        qk = tl.where(nmask[None, :], qk * scale_log2, float("-inf"))
        m_new = tl.maximum(m, tl.max(qk, 1))
        p = tl.exp2(qk - m_new[:, None])
        alpha = tl.exp2(m - m_new)
        v = tl.load(vc_ptr + row[:, None] + offs_d[None, :], mask=nmask[:, None], other=0.0)
        pv = _dot(p.to(v.dtype), v, IEEE)
        acc = acc * alpha[:, None] + pv
        s = s * alpha + tl.sum(p, 1)
        m = m_new
    # partials: [B, H, num_splits, D] and [B, H, num_splits, 2] (max, sum) in log2 units
    base = (b.to(tl.int64) * H + heads) * num_splits + split
    tl.store(part_o_ptr + base[:, None] * D + offs_d[None, :], acc, mask=gmask[:, None])
    tl.store(part_ml_ptr + base * 2, m, mask=gmask)
    tl.store(part_ml_ptr + base * 2 + 1, s, mask=gmask)


@triton.jit(do_not_specialize=["split_len", "num_splits"])
def _decode_merge_kernel(
    part_o_ptr, part_ml_ptr, lens_ptr, out_ptr,
    split_len, stride_ot, stride_oh, num_splits,
    D: tl.constexpr, H: tl.constexpr,
):
    """Online log-sum-exp merge of a row's used splits (a loop, so one compiled
    variant serves every number of splits)."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    seq_len = tl.load(lens_ptr + b)
    used = tl.minimum((seq_len + split_len - 1) // split_len, num_splits)
    offs_d = tl.arange(0, D)
    base = (b.to(tl.int64) * H + h) * num_splits
    m_all = tl.full([], float("-inf"), tl.float32)
    total = tl.zeros([], tl.float32)
    o = tl.zeros([D], tl.float32)
    for i in range(0, used):
        m_i = tl.load(part_ml_ptr + (base + i) * 2)
        s_i = tl.load(part_ml_ptr + (base + i) * 2 + 1)
        acc = tl.load(part_o_ptr + (base + i) * D + offs_d)
        m_new = tl.maximum(m_all, m_i)
        keep = tl.exp2(m_all - m_new)
        w = tl.exp2(m_i - m_new)
        o = o * keep + acc * w
        total = total * keep + s_i * w
        m_all = m_new
    o = o / tl.where(total > 0, total, 1.0)
    o = tl.where(seq_len > 0, o, 0.0)
    dst = out_ptr + b.to(tl.int64) * stride_ot + h * stride_oh + offs_d
    tl.store(dst, o.to(out_ptr.dtype.element_ty))


@dataclass(frozen=True)
class DecodeLaunch:
    """Tile and launch shape of the decode split kernel (``bench/decode_kernel.py``
    sweeps them on a GPU)."""

    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 3


DECODE_LAUNCH = DecodeLaunch()
DECODE_LAUNCH_F32 = DecodeLaunch(block_n=32, num_stages=2)

MAX_SPLITS = 64
MIN_SPLIT_LEN = 256


def decode_split(max_seq_len: int, batch: int, num_kv_heads: int, num_sms: int) -> tuple[int, int]:
    """(tokens per split, number of splits): enough programs to fill the GPU twice
    for short batches, never more than MAX_SPLITS (which bounds the partials' memory)."""
    want = max(1, -(-2 * num_sms // max(1, batch * num_kv_heads)))
    longest = max(1, max_seq_len)
    splits = max(1, min(want, MAX_SPLITS, -(-longest // MIN_SPLIT_LEN)))
    split_len = -(-longest // splits)
    split_len = max(MIN_SPLIT_LEN, -(-split_len // 64) * 64)
    return split_len, -(-longest // split_len)


def decode_attention(
    q: torch.Tensor,  # [B, H, D]
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, W] int32
    seq_lens: torch.Tensor,  # [B] int32
    scale: float,
    split: tuple[int, int],
    out: torch.Tensor,  # [B, H, D]
    launch: DecodeLaunch | None = None,
) -> None:
    batch, num_heads, d = q.shape
    kvh = k_cache.shape[2]
    group = num_heads // kvh
    split_len, num_splits = split
    part_o = torch.empty((batch, num_heads, num_splits, d), dtype=torch.float32, device=q.device)
    part_ml = torch.empty((batch, num_heads, num_splits, 2), dtype=torch.float32, device=q.device)
    ieee = q.dtype == torch.float32
    launch = launch or (DECODE_LAUNCH_F32 if ieee else DECODE_LAUNCH)
    _decode_split_kernel[(batch, kvh, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, part_o, part_ml,
        scale * LOG2E, split_len,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), num_splits,
        G=group, G_PAD=max(16, triton.next_power_of_2(group)), D=d,
        H=num_heads, BLOCK_SIZE=k_cache.shape[1], BLOCK_N=launch.block_n, IEEE=ieee,
        num_warps=launch.num_warps, num_stages=launch.num_stages,
    )
    _decode_merge_kernel[(batch, num_heads)](
        part_o, part_ml, seq_lens, out, split_len, out.stride(0), out.stride(1), num_splits,
        D=d, H=num_heads, num_warps=4,
    )


@triton.jit
def _prefill_tile(
    acc, m, s, q, kc_ptr, vc_ptr, table, n0, q_pos, ctx, kvh, scale_log2,
    stride_cb, stride_ct, stride_ch,
    D: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr, IEEE: tl.constexpr,
):
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    if MASKED:
        nmask = offs_n < ctx
        block = tl.load(table + offs_n // BLOCK_SIZE, mask=nmask, other=0).to(tl.int64)
    else:
        block = tl.load(table + offs_n // BLOCK_SIZE).to(tl.int64)
    row = block * stride_cb + (offs_n % BLOCK_SIZE) * stride_ct + kvh * stride_ch
    if MASKED:
        k = tl.load(kc_ptr + row[:, None] + offs_d[None, :], mask=nmask[:, None], other=0.0)
    else:
        k = tl.load(kc_ptr + row[:, None] + offs_d[None, :])
    qk = _dot(q, tl.trans(k), IEEE)
    qk = qk * scale_log2
    if MASKED:
        keep = (offs_n[None, :] <= q_pos[:, None]) & nmask[None, :]
        qk = tl.where(keep, qk, float("-inf"))
    m_new = tl.maximum(m, tl.max(qk, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that see nothing yet
    p = tl.exp2(qk - m_safe[:, None])
    alpha = tl.exp2(m - m_safe)
    if MASKED:
        v = tl.load(vc_ptr + row[:, None] + offs_d[None, :], mask=nmask[:, None], other=0.0)
    else:
        v = tl.load(vc_ptr + row[:, None] + offs_d[None, :])
    pv = _dot(p.to(v.dtype), v, IEEE)
    acc = acc * alpha[:, None] + pv
    s = s * alpha + tl.sum(p, 1)
    return acc, m_new, s


@triton.jit(do_not_specialize=["stride_table"])
def _prefill_kernel(
    q_ptr, kc_ptr, vc_ptr, o_ptr, table_ptr, qstart_ptr, lens_ptr,
    scale_log2,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_cb, stride_ct, stride_ch, stride_table,
    G: tl.constexpr, D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
):
    tile = tl.program_id(0)
    seq = tl.program_id(1)
    h = tl.program_id(2)
    q0 = tl.load(qstart_ptr + seq)
    q_len = tl.load(qstart_ptr + seq + 1) - q0
    if tile * BLOCK_M < q_len:
        ctx = tl.load(lens_ptr + seq)
        prefix = ctx - q_len
        offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, D)
        mmask = offs_m < q_len
        rows = (q0 + offs_m).to(tl.int64)
        q = tl.load(
            q_ptr + rows[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
            mask=mmask[:, None], other=0.0,
        )
        q_pos = prefix + offs_m
        kvh = h // G
        table = table_ptr + seq.to(tl.int64) * stride_table
        m = tl.full([BLOCK_M], float("-inf"), tl.float32)
        s = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        # keys every query row of the tile sees, then the causal edge
        full_end = ((prefix + tile * BLOCK_M + 1) // BLOCK_N) * BLOCK_N
        for n0 in range(0, full_end, BLOCK_N):
            acc, m, s = _prefill_tile(
                acc, m, s, q, kc_ptr, vc_ptr, table, n0, q_pos, ctx, kvh, scale_log2,
                stride_cb, stride_ct, stride_ch, D, BLOCK_SIZE, BLOCK_N, False, IEEE,
            )
        end = tl.minimum(ctx, prefix + (tile + 1) * BLOCK_M)
        for n0 in range(full_end, end, BLOCK_N):
            acc, m, s = _prefill_tile(
                acc, m, s, q, kc_ptr, vc_ptr, table, n0, q_pos, ctx, kvh, scale_log2,
                stride_cb, stride_ct, stride_ch, D, BLOCK_SIZE, BLOCK_N, True, IEEE,
            )
        o = acc / tl.where(s > 0, s, 1.0)[:, None]
        tl.store(
            o_ptr + rows[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
            o.to(o_ptr.dtype.element_ty), mask=mmask[:, None],
        )


def prefill_attention(
    q: torch.Tensor,  # [Tp, H, D]
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [P, W] int32
    query_start: torch.Tensor,  # [P + 1] int32
    seq_lens: torch.Tensor,  # [P] int32
    max_query_len: int,
    scale: float,
    out: torch.Tensor,  # [Tp, H, D]
) -> None:
    num_seqs = seq_lens.shape[0]
    num_heads, d = q.shape[1], q.shape[2]
    group = num_heads // k_cache.shape[2]
    ieee = q.dtype == torch.float32
    block_m, block_n = (64, 32) if ieee else (128, 64)
    warps, stages = (4, 2) if ieee else (8, 3)
    if d > 128 and not ieee:
        block_m, stages = 64, 2
    grid = (triton.cdiv(max_query_len, block_m), num_seqs, num_heads)
    _prefill_kernel[grid](
        q, k_cache, v_cache, out, block_tables, query_start, seq_lens,
        scale * LOG2E,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        G=group, D=d, BLOCK_SIZE=k_cache.shape[1], BLOCK_M=block_m, BLOCK_N=block_n,
        IEEE=ieee, num_warps=warps, num_stages=stages,
    )
