"""Fused elementwise kernels for CUDA (Triton): residual add + RMSNorm, SiLU-and-
multiply, rotary embedding in place. Each replaces several eager launches and
passes over memory; each rounds where the eager torch code rounds, so a float32
run matches the reference and a bf16 run matches it to rounding.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rmsnorm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, stride_x, stride_res, stride_out, n, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_res + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(res_ptr + row * stride_res + offs, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / n + eps)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    y = (xf * rstd).to(x_ptr.dtype.element_ty).to(tl.float32) * w.to(tl.float32)
    tl.store(out_ptr + row * stride_out + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor:
    """``weight * norm(x)`` over the last dim of a 2-D ``x``; with ``residual``, first
    ``residual += x`` in place and normalise the sum."""
    rows, n = x.shape
    out = torch.empty_like(x)
    if rows == 0:
        return out
    res = residual if residual is not None else x
    _rmsnorm_kernel[(rows,)](
        x, res, weight, out, x.stride(0), res.stride(0), out.stride(0), n, eps,
        HAS_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(n),
        num_warps=8 if n >= 2048 else 4,
    )
    return out


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, stride_x, stride_out, n, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    gate = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + n + offs, mask=mask, other=0.0)
    act = (gate / (1.0 + tl.exp(-gate))).to(x_ptr.dtype.element_ty)
    y = act.to(tl.float32) * up.to(tl.float32)
    tl.store(out_ptr + row * stride_out + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` where ``x = [gate | up]`` along the last dim (2-D)."""
    rows, two_n = x.shape
    n = two_n // 2
    out = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    if rows == 0:
        return out
    block = 1024
    _silu_mul_kernel[(rows, triton.cdiv(n, block))](
        x, out, x.stride(0), out.stride(0), n, BLOCK=block, num_warps=4
    )
    return out


@triton.jit
def _rope_kernel(
    x_ptr, pos_ptr, cos_ptr, sin_ptr, stride_t, stride_h, stride_cos, num_heads,
    HALF: tl.constexpr, HEADS_PAD: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    offs_h = tl.arange(0, HEADS_PAD)
    offs = tl.arange(0, HALF)
    hmask = offs_h[:, None] < num_heads
    cos = tl.load(cos_ptr + pos * stride_cos + offs)[None, :]
    sin = tl.load(sin_ptr + pos * stride_cos + offs)[None, :]
    ptr = x_ptr + t * stride_t + offs_h[:, None] * stride_h + offs[None, :]
    x1 = tl.load(ptr, mask=hmask, other=0.0)
    x2 = tl.load(ptr + HALF, mask=hmask, other=0.0)
    dt = x_ptr.dtype.element_ty
    c, s = cos.to(dt), sin.to(dt)  # the reference casts the table to the activations' dtype
    y1 = (x1 * c).to(tl.float32) - (x2 * s).to(tl.float32)
    y2 = (x2 * c).to(tl.float32) + (x1 * s).to(tl.float32)
    tl.store(ptr, y1.to(dt), mask=hmask)
    tl.store(ptr + HALF, y2.to(dt), mask=hmask)


def rope_inplace(
    x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> None:
    """Rotate-half RoPE of ``x`` [T, heads, D] (contiguous heads) in place; ``cos``/``sin``
    are the [max_len, D] float32 tables (halves equal)."""
    t, heads, d = x.shape
    if t == 0:
        return
    assert x.stride(2) == 1
    _rope_kernel[(t,)](
        x, positions, cos, sin, x.stride(0), x.stride(1), cos.stride(0), heads,
        HALF=d // 2, HEADS_PAD=triton.next_power_of_2(heads), num_warps=4,
    )
