"""The blocks' matrix products in the fused decode step and prefill (fused_step.py).

`linear` picks one of three by the number of rows:
- up to SMALL_LINEAR_ROWS: small_linear_kernel. It takes the layer norm in its prologue and the residual add
  in its epilogue, so at a few rows a block is five kernels.
- up to SKINNY_LINEAR_ROWS: skinny_linear_kernel, on tensor cores, for the products in
  SKINNY_LINEAR_PRODUCTS.
- otherwise: cuBLAS, with the bias and GELU in its epilogue.
The two Triton kernels (product_kernels.py) read [out, in] copies of the weights
(LayerWeights.out_in): the blocks' matrices once more in memory, 170 MB for GPT-2 124M. From Hopper on
they launch with programmatic dependent launch (step_kernels.pdl_arguments), as the norms and attention do.
At one row on an H100 that took a step from 0.46 to 0.27 ms; at 8 / 64 rows on an H200, the
tensor-core products took it from 0.468 / 0.770 to 0.420 / 0.696 ms (BENCHMARKS.md).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton

from model.fastgen.triton.product_kernels import skinny_linear_kernel, small_linear_kernel
from model.fastgen.triton.step_kernels import pdl_arguments
from model.fastgen.weights import FC, PROJ, QKV, LayerWeights

SMALL_LINEAR_ROWS = 4  # batches up to this take small_linear_kernel (BENCHMARKS.md)
SMALL_LINEAR_BLOCK_N = 4  # outputs per small_linear_kernel program (H100 sweep: 4 best at 1-4 rows)
SKINNY_LINEAR_ROWS = 64  # batches above SMALL_LINEAR_ROWS up to this take skinny_linear_kernel
# The MLP projection (K = 3072) stays on cuBLAS, whose split-K spreads it over more programs than its 768
# outputs make tiles: on this kernel too (adding the residual in its epilogue), a step at 8 / 64 rows took
# 0.471 / 0.710 ms against 0.420 / 0.696 (H200 sweep, BENCHMARKS.md). It is the one in-place product.
SKINNY_LINEAR_PRODUCTS = (QKV, PROJ, FC)
SKINNY_LINEAR_BLOCK_N = 16  # outputs per skinny_linear_kernel program (at most: _skinny_tiles)
SKINNY_LINEAR_BLOCK_K = 128  # inputs per step of its loop (at most)
SKINNY_LINEAR_STAGES = 4  # tiles in flight in that loop
SKINNY_LINEAR_WARPS = 4  # the H200 sweep's best with the above, from 8 to 64 rows


def linear(
    x: torch.Tensor,
    layer: LayerWeights,
    which: int,
    *,
    gelu: bool = False,
    into: torch.Tensor | None = None,
    add_bias: bool = True,
    norm: tuple[torch.Tensor, torch.Tensor] | None = None,
    eps: float = 0.0,
) -> torch.Tensor:
    """x · W (+ b unless not `add_bias`) for the block's matrix `which` (QKV, PROJ, FC or OUT), with
    `gelu` GELU's tanh form of it; with `into`, into += that. Only small_linear_kernel takes the layer
    norm `norm` (weight, bias; `eps`) of x first, and only it adds a bias in place: cuBLAS's in-place
    product cannot."""
    bias = layer.biases()[which] if add_bias else None
    if is_small(x, layer):
        assert layer.out_in is not None
        return _small_linear(x, layer.out_in[which], bias, gelu=gelu, into=into, norm=norm, eps=eps)
    assert norm is None, "only small_linear_kernel normalises its input"
    if _is_skinny(x, layer, which):
        assert layer.out_in is not None and into is None, "skinny_linear_kernel's products are not in place"
        return _skinny_linear(x, layer.out_in[which], bias, gelu=gelu)
    weight = layer.matrices()[which]  # cuBLAS reads the [in, out] matrices
    if into is not None:
        assert bias is None, "cuBLAS's in-place product cannot add a bias: add it beforehand"
        return into.addmm_(x, weight)
    assert bias is not None
    if not gelu:
        return torch.addmm(bias, x, weight)
    if x.is_cuda:  # cuBLAS's epilogue is the tanh form; the CPU's _addmm_activation is not
        return torch._addmm_activation(bias, x, weight, use_gelu=True)
    return F.gelu(torch.addmm(bias, x, weight), approximate="tanh")


def is_small(x: torch.Tensor, layer: LayerWeights) -> bool:
    """Whether small_linear_kernel takes this product: a few rows, the copies made, and the width (so
    every output count, C, 3C and 4C) in whole blocks."""
    is_whole = layer.proj_b.shape[0] % SMALL_LINEAR_BLOCK_N == 0
    return layer.out_in is not None and x.shape[0] <= SMALL_LINEAR_ROWS and is_whole


def _is_skinny(x: torch.Tensor, layer: LayerWeights, which: int) -> bool:
    """Whether skinny_linear_kernel takes this product: one of SKINNY_LINEAR_PRODUCTS, more rows than
    small_linear_kernel takes and up to SKINNY_LINEAR_ROWS, the copies made, whole tiles, and not float32
    on the GPU."""
    if layer.out_in is None or not SMALL_LINEAR_ROWS < x.shape[0] <= SKINNY_LINEAR_ROWS:
        return False
    rounds_to_tf32 = x.is_cuda and x.dtype == torch.float32  # what tensor cores do to float32 inputs
    has_tiles = _skinny_tiles(*layer.out_in[which].shape) is not None
    return which in SKINNY_LINEAR_PRODUCTS and has_tiles and not rounds_to_tf32


def _skinny_tiles(outputs: int, width: int) -> tuple[int, int] | None:
    """skinny_linear_kernel's (BLOCK_N, BLOCK_K): the largest powers of two up to the settings that
    divide N and K; None below 16 (tensor cores' smallest tile), e.g. for widths like the test model's 72."""
    block_n = math.gcd(outputs, SKINNY_LINEAR_BLOCK_N)
    block_k = math.gcd(width, SKINNY_LINEAR_BLOCK_K)
    return (block_n, block_k) if min(block_n, block_k) >= 16 else None


def _skinny_linear(
    x: torch.Tensor, out_in: torch.Tensor, bias: torch.Tensor | None, *, gelu: bool
) -> torch.Tensor:
    """skinny_linear_kernel: x [B, K] (rows may be strided) times out_in [N, K] ([out, in]), plus bias;
    with `gelu`, GELU's tanh form of that."""
    (rows, width), outputs = x.shape, out_in.shape[0]
    tiles = _skinny_tiles(outputs, width)
    assert tiles is not None, f"no whole tiles for [{outputs}, {width}]"
    assert x.stride(1) == 1 and out_in.is_contiguous()
    out = torch.empty((rows, outputs), dtype=x.dtype, device=x.device)
    block_n, block_k = tiles
    skinny_linear_kernel[(outputs // block_n,)](
        x, x.stride(0), out_in, out if bias is None else bias, out, out.stride(0), rows,
        K=width, BLOCK_M=max(16, triton.next_power_of_2(rows)), BLOCK_N=block_n, BLOCK_K=block_k,
        STAGES=SKINNY_LINEAR_STAGES, HAS_BIAS=bias is not None, GELU=gelu, num_warps=SKINNY_LINEAR_WARPS,
        **pdl_arguments(x.device),
    )  # fmt: skip
    return out


def _small_linear(
    x: torch.Tensor,
    out_in: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    gelu: bool,
    into: torch.Tensor | None,
    norm: tuple[torch.Tensor, torch.Tensor] | None,
    eps: float,
) -> torch.Tensor:
    """small_linear_kernel: x [B, K] (rows may be strided), or its layer norm `norm`, times out_in
    [N, K] ([out, in]), plus bias; with `into`, added to it."""
    (rows, width), outputs = x.shape, out_in.shape[0]
    assert outputs % SMALL_LINEAR_BLOCK_N == 0 and x.stride(1) == 1 and out_in.is_contiguous()
    assert into is None or into.stride(1) == 1
    out = torch.empty((rows, outputs), dtype=x.dtype, device=x.device) if into is None else into
    ln_w, ln_b = (out_in, out_in) if norm is None else norm  # placeholders when not normalising
    block_k = triton.next_power_of_2(width)
    block_n = SMALL_LINEAR_BLOCK_N
    if not x.is_cuda:  # Triton's interpreter runs each program in Python: fewer, wider ones, same sums
        block_n = math.gcd(outputs, 64)
    small_linear_kernel[(outputs // block_n,)](
        x, x.stride(0), out_in, out if bias is None else bias, ln_w, ln_b, eps, out, out.stride(0),
        K=width, ROWS=rows, BLOCK_R=triton.next_power_of_2(rows), BLOCK_N=block_n, BLOCK_K=block_k,
        HAS_BIAS=bias is not None, NORM=norm is not None, GELU=gelu, ACCUMULATE=into is not None,
        **pdl_arguments(x.device),
        num_warps=2 if block_k <= 1024 else 4 if block_k <= 4096 else 8,  # 64-128 weights a thread
    )  # fmt: skip
    return out
