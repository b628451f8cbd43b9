"""Triton kernels for the blocks' matrix products (products.py launches them).

Each program computes a block of outputs for every row of the batch from [out, in] weight tiles,
summing in float32 whatever the model dtype, and rounds as the module it replaces does. Both kernels
follow the programmatic-dependent-launch protocol of step_kernels.py (its docstring): they
let the next kernel launch first thing and read only weights before gdc_wait().
"""

from __future__ import annotations

import triton
import triton.language as tl

from model.fastgen.triton.step_kernels import gdc_launch_dependents, gdc_wait


@triton.jit
def small_linear_kernel(  # Triton kernel: untyped, many arguments
    x_ptr, x_stride, w_ptr, b_ptr, ln_w_ptr, ln_b_ptr, eps, out_ptr, out_stride,
    K: tl.constexpr, ROWS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr, NORM: tl.constexpr, GELU: tl.constexpr,
    ACCUMULATE: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """out[r, n] = x[r] · w[n] (+ b[n], then GELU's tanh form), or += with ACCUMULATE, for BLOCK_N
    outputs n and each of the first ROWS rows; with NORM, x[r] is first replaced by its layer norm
    (ln_w, ln_b, eps), which every program computes for itself from the whole row. w is [N, K] ([out,
    in]), every program reads whole rows of it. A decode step at a few rows is a chain of small,
    dependent kernels: with PDL each program lets the next kernel launch at once, and loads its weight
    tile before waiting for the kernel before it, so the read overlaps that kernel's end. Sums in
    float32; rounds the norm's output, the product and the residual add as HF's modules do, but applies
    GELU to the float32 sum, as cuBLAS's epilogue does (HF rounds before it)."""
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k = tl.arange(0, BLOCK_K)
    is_k = k < K
    dtype = out_ptr.dtype.element_ty
    if PDL:
        gdc_launch_dependents()
    w = tl.load(w_ptr + n[:, None] * K + k[None, :], mask=is_k[None, :], other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(b_ptr + n).to(tl.float32)
    if NORM:
        ln_w = tl.load(ln_w_ptr + k, mask=is_k, other=0.0).to(tl.float32)
        ln_b = tl.load(ln_b_ptr + k, mask=is_k, other=0.0).to(tl.float32)
    if PDL:
        gdc_wait()
    rows = tl.arange(0, BLOCK_R)
    is_x = (rows < ROWS)[:, None] & is_k[None, :]
    xs = tl.load(x_ptr + rows[:, None] * x_stride + k[None, :], mask=is_x, other=0.0).to(tl.float32)
    if NORM:  # as norm_kernel computes it, every row at once
        centred = tl.where(is_x, xs - (tl.sum(xs, 1) / K)[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, 1) / K + eps)
        xs = (centred * rstd[:, None] * ln_w[None, :] + ln_b[None, :]).to(dtype).to(tl.float32)
    for r in tl.static_range(ROWS):
        x = tl.sum(tl.where(rows[:, None] == r, xs, 0.0), 0)  # row r of the tile
        acc = tl.sum(w * x[None, :], 1)
        if HAS_BIAS:
            acc += bias
        if GELU:
            acc = _gelu_tanh(acc)
        if ACCUMULATE:  # a residual add: the product rounded, then added in the model dtype
            acc = acc.to(dtype).to(tl.float32) + tl.load(out_ptr + r * out_stride + n).to(tl.float32)
        tl.store(out_ptr + r * out_stride + n, acc.to(dtype))


@triton.jit
def _gelu_tanh(acc):  # Triton helper: untyped
    """GELU's tanh form of a float32 block: 0.5·a·(1 + tanh(u)), tanh(u) = 2·sigmoid(2u) − 1; |u| ≥ 20
    is ±1 in float32."""
    inner = 0.7978845608028654 * (acc + 0.044715 * acc * acc * acc)
    inner = tl.minimum(tl.maximum(inner, -20.0), 20.0)
    return 0.5 * acc * (2.0 / (1.0 + tl.exp(-2.0 * inner)))


@triton.jit
def skinny_linear_kernel(  # Triton kernel: untyped, many arguments
    x_ptr, x_stride, w_ptr, b_ptr, out_ptr, out_stride, rows,
    K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    STAGES: tl.constexpr, HAS_BIAS: tl.constexpr, GELU: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """small_linear_kernel's product on tensor cores, without its norm and residual add: out[r, n] =
    x[r] · w[n] (+ b[n], then GELU's tanh form) for BLOCK_N outputs n and every row r < rows, which one
    [BLOCK_M, K] tile holds (BLOCK_M a power of two of at least 16); w is [N, K] ([out, in]), read in
    [BLOCK_N, BLOCK_K] tiles. With PDL it lets the next kernel launch at once and loads its bias before
    waiting for the kernel before it. Sums in float32, rounded once at the end, as cuBLAS does."""
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.arange(0, BLOCK_M)
    k = tl.arange(0, BLOCK_K)
    is_row = (m < rows)[:, None]
    if PDL:
        gdc_launch_dependents()
    if HAS_BIAS:
        bias = tl.load(b_ptr + n).to(tl.float32)
    if PDL:
        gdc_wait()
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for start in tl.range(0, K, BLOCK_K, num_stages=STAGES):
        x = tl.load(x_ptr + m[:, None] * x_stride + (start + k)[None, :], mask=is_row, other=0.0)
        w = tl.load(w_ptr + n[:, None] * K + (start + k)[None, :])
        acc = tl.dot(x, tl.trans(w), acc)
    if HAS_BIAS:
        acc += bias[None, :]
    if GELU:
        acc = _gelu_tanh(acc)
    tl.store(out_ptr + m[:, None] * out_stride + n[None, :], acc.to(out_ptr.dtype.element_ty), mask=is_row)
