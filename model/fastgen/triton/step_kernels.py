"""Triton kernels of the fused decode step and prefill, and their launch arguments for programmatic dependent
launch (fused_step.py launches them; the blocks' matrix products have their own, in
product_kernels.py, and so does the ranking of the logits, in top_k_kernels.py).

Each kernel works on one row (or one row × head × cache split) of the batch, in float32 whatever the model
dtype (the prefill's cache copy: one prompt × head × block of positions, in the model dtype); the step's
kernels read each row's position from DecodeState.rows on the device, so one CUDA graph serves every row
length (the prefill's norms get plain rows). Kernels are compiled on first use; with TRITON_INTERPRET=1 they
run in Triton's interpreter on CPU tensors (the tests).

With PDL (programmatic dependent launch, Hopper on) a kernel launches while the kernel before it still
runs: it calls gdc_launch_dependents() first, so the next one can launch too, may read only weights
before gdc_wait(), and reads or writes anything else only after it. The wait returns once the kernel
before has finished, which had itself waited for the one before it, so every earlier write is visible.
"""

from __future__ import annotations

import functools
import types

import torch
import triton
import triton.language as tl

from model.fastgen.triton.top_k_kernels import LOWEST_KEY

try:  # Triton >= 3.4; before it the kernels run without programmatic dependent launch (HAS_PDL)
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    HAS_PDL = True
except ImportError:
    HAS_PDL = False

    @triton.jit
    def gdc_launch_dependents():  # Triton helper: never called without PDL
        pass

    @triton.jit
    def gdc_wait():  # Triton helper: never called without PDL
        pass


@functools.cache
def pdl_arguments(device: torch.device) -> types.MappingProxyType[str, bool]:
    """Launch arguments for programmatic dependent launch, on from Hopper (sm_90): a kernel launches
    while the one before it runs and waits inside for its results (this module's docstring). The
    products, norms and attention use it; at one row it took a layer's four products from 14.5 to 8.6
    µs on an H100 (BENCHMARKS.md)."""
    is_nvidia = device.type == "cuda" and torch.version.cuda is not None  # not ROCm
    if HAS_PDL and is_nvidia and torch.cuda.get_device_capability(device) >= (9, 0):
        return types.MappingProxyType({"PDL": True, "launch_pdl": True})
    return types.MappingProxyType({"PDL": False})  # no launch_pdl: Triton before 3.4 does not take it


@triton.jit
def norm_kernel(  # Triton kernel: untyped, many arguments
    resid_ptr, delta_ptr, w_ptr, b_ptr, bias_ptr, out_ptr, eps, width,
    tokens_ptr, tokens_stride, rows_ptr, rows_stride, wte_ptr, wpe_ptr,
    BLOCK_C: tl.constexpr, EMBED: tl.constexpr, HAS_DELTA: tl.constexpr, STORE: tl.constexpr,
    HAS_BIAS: tl.constexpr, POS_COL: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """Row r: x = resid (+ delta), or with EMBED the embedding of the row's token at its position
    (wte[token] + wpe[pos]); out = ln(x); with STORE, resid = x (+ bias, the next projection's).
    With PDL (the module docstring) it reads the norm's weights before it waits for the kernel before it."""
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    is_col = cols < width
    dtype = resid_ptr.dtype.element_ty
    if PDL:
        gdc_launch_dependents()
    w = tl.load(w_ptr + cols, mask=is_col, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=is_col, other=0.0).to(tl.float32)
    if PDL:
        gdc_wait()
    if EMBED:
        pos = tl.load(rows_ptr + row * rows_stride + POS_COL)
        token = tl.load(tokens_ptr + row * tokens_stride + pos)
        x = tl.load(wte_ptr + token * width + cols, mask=is_col, other=0.0).to(tl.float32)
        x += tl.load(wpe_ptr + pos * width + cols, mask=is_col, other=0.0).to(tl.float32)
    else:
        x = tl.load(resid_ptr + row * width + cols, mask=is_col, other=0.0).to(tl.float32)
    if HAS_DELTA:
        x += tl.load(delta_ptr + row * width + cols, mask=is_col, other=0.0).to(tl.float32)
    x = x.to(dtype).to(tl.float32)  # HF adds in the model dtype: the residual stream is rounded there
    mean = tl.sum(x, 0) / width
    centred = tl.where(is_col, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, 0) / width + eps)
    tl.store(out_ptr + row * width + cols, (centred * rstd * w + b).to(out_ptr.dtype.element_ty), mask=is_col)
    if STORE:
        if HAS_BIAS:
            x += tl.load(bias_ptr + cols, mask=is_col, other=0.0).to(tl.float32)
        tl.store(resid_ptr + row * width + cols, x.to(dtype), mask=is_col)


@triton.jit
def attention_kernel(  # Triton kernel: untyped, many arguments
    qkv_ptr, cache_ptr, rows_ptr, rows_stride, y_ptr, partial_ptr, tickets_ptr, scale, width, head_dim,
    kv_stride, row_stride, head_stride,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, SPLITS: tl.constexpr, CHUNK: tl.constexpr,
    POS_COL: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """Row r, head h, split s: attend over cache positions [s·CHUNK, (s+1)·CHUNK) ∩ [0, pos); split 0
    also writes this token's key/value at pos and counts it. One split writes y; several write their
    running (max, sum, weighted values) to `partial`, and the last to finish merges them (flash-decoding)."""
    row, head, split = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)  # 64-bit offsets
    if PDL:  # everything it reads may have been written by the kernels just before it
        gdc_launch_dependents()
        gdc_wait()
    pos = tl.load(rows_ptr + row * rows_stride + POS_COL)
    dims = tl.arange(0, BLOCK_D)
    is_dim = dims < head_dim
    here = qkv_ptr + row * 3 * width + head * head_dim + dims
    q = tl.load(here, mask=is_dim, other=0.0).to(tl.float32)
    k_new = tl.load(here + width, mask=is_dim, other=0.0)
    v_new = tl.load(here + 2 * width, mask=is_dim, other=0.0)
    keys = cache_ptr + row * row_stride + head * head_stride
    values = keys + kv_stride
    is_first = split == 0
    is_written = is_dim & (dims * 0 + split == 0)  # a block mask: Triton 3.9's interpreter wants one
    tl.store(keys + pos * head_dim + dims, k_new, mask=is_written)
    tl.store(values + pos * head_dim + dims, v_new, mask=is_written)
    # The new position comes from registers (nothing here reads what this kernel wrote); the online
    # softmax starts from it in split 0 and folds in cached positions block by block.
    score_new = tl.sum(q * k_new.to(tl.float32), 0) * scale
    best = tl.where(is_first, score_new, float("-inf"))
    total = tl.where(is_first, 1.0, 0.0)
    acc = tl.where(is_first, v_new.to(tl.float32), 0.0)
    start = split * CHUNK + pos * 0
    end = tl.minimum(start + CHUNK, pos)
    while start < end:  # a while loop: Triton's interpreter cannot take a loaded value as range() bound
        positions = start + tl.arange(0, BLOCK_N)
        is_seen = positions < end
        offsets = positions[:, None] * head_dim + dims[None, :]
        both = is_seen[:, None] & is_dim[None, :]
        k = tl.load(keys + offsets, mask=both, other=0.0).to(tl.float32)
        v = tl.load(values + offsets, mask=both, other=0.0).to(tl.float32)
        scores = tl.where(is_seen, tl.sum(k * q[None, :], 1) * scale, float("-inf"))
        new_best = tl.maximum(best, tl.max(scores, 0))
        rescale = tl.exp(best - new_best)
        weights = tl.exp(scores - new_best)
        acc = acc * rescale + tl.sum(weights[:, None] * v, 0)
        total = total * rescale + tl.sum(weights, 0)
        best = new_best
        start += BLOCK_N
    y = y_ptr + row * width + head * head_dim
    if SPLITS == 1:
        tl.store(y + dims, (acc / total).to(y_ptr.dtype.element_ty), mask=is_dim)
    else:
        pair = row * tl.num_programs(1) + head
        slots = partial_ptr + pair * SPLITS * (BLOCK_D + 2)
        slot = slots + split * (BLOCK_D + 2)
        tl.store(slot + dims, acc)
        tl.store(slot + BLOCK_D, best)
        tl.store(slot + BLOCK_D + 1, total)
        # The last split of this (row, head) to finish merges them all: a ticket count, which it resets.
        # A separate merge kernel cost one more launch a layer, more than the merge itself at small batches.
        # The barrier: every thread of this program has stored its part before one thread takes the ticket
        # (the atomic's acq_rel publishes them to the merging program).
        tl.debug_barrier()
        ticket = tickets_ptr + pair
        if tl.atomic_add(ticket, 1, sem="acq_rel") == SPLITS - 1:
            _merge_splits(slots, y, head_dim, BLOCK_D, SPLITS)
            tl.store(ticket, 0)


@triton.jit
def cache_prompt_kernel(  # Triton kernel: untyped, many arguments
    qkv_ptr, qkv_stride, slots_ptr, cache_ptr, length, width, head_dim, kv_stride, row_stride, head_stride,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Prompt p, head h, position block b: copy the prompt's keys and values at those positions from
    its rows of qkv [P·L, 3C] into cache slot slots[p], where they are one contiguous run per head."""
    prompt, head, block = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
    slot = tl.load(slots_ptr + prompt).to(tl.int64)  # 64-bit offsets
    positions = block * BLOCK_L + tl.arange(0, BLOCK_L)
    dims = tl.arange(0, BLOCK_D)
    is_copied = (positions < length)[:, None] & (dims < head_dim)[None, :]
    keys = qkv_ptr + (prompt * length + positions[:, None]) * qkv_stride + width + head * head_dim
    cached = cache_ptr + slot * row_stride + head * head_stride + positions[:, None] * head_dim
    tl.store(cached + dims[None, :], tl.load(keys + dims[None, :], mask=is_copied), mask=is_copied)
    values, cached_values = keys + width, cached + kv_stride
    tl.store(cached_values + dims[None, :], tl.load(values + dims[None, :], mask=is_copied), mask=is_copied)


@triton.jit
def _merge_splits(slots, y, head_dim, BLOCK_D: tl.constexpr, SPLITS: tl.constexpr):  # Triton helper
    """Merge the splits' softmax states (splits past the row's end hold -inf) into y. The loads bypass
    L1 (.cg): other SMs wrote the partials."""
    offsets = tl.arange(0, SPLITS) * (BLOCK_D + 2)
    dims = tl.arange(0, BLOCK_D)
    best = tl.load(slots + offsets + BLOCK_D, cache_modifier=".cg")
    total = tl.load(slots + offsets + BLOCK_D + 1, cache_modifier=".cg")
    acc = tl.load(slots + offsets[:, None] + dims[None, :], cache_modifier=".cg")
    scale = tl.exp(best - tl.max(best, 0))  # split 0 always holds the new token: the max is finite
    out = tl.sum(acc * scale[:, None], 0) / tl.sum(total * scale, 0)
    tl.store(y + dims, out.to(y.dtype.element_ty), mask=dims < head_dim)


@triton.jit
def process_kernel(  # Triton kernel: untyped, many arguments
    logits_ptr, vocab, tokens_ptr, tokens_stride, rows_ptr, rows_stride, floats_ptr, floats_stride,
    BLOCK_S: tl.constexpr, USE_PENALTY: tl.constexpr, SPAN: tl.constexpr,
    POS_COL: tl.constexpr, NGRAM_COL: tl.constexpr, PENALTY_COL: tl.constexpr,
):  # fmt: skip
    """HF's repetition penalty, then its n-gram ban, on row r's logits in place (fastgen/sampling.py)."""
    row = tl.program_id(0)
    pos = tl.load(rows_ptr + row * rows_stride + POS_COL)
    ends = tl.arange(0, BLOCK_S)
    is_seen = ends <= pos
    history = tokens_ptr + row * tokens_stride
    ids = tl.load(history + ends, mask=is_seen, other=0)
    logits = logits_ptr + row * vocab
    if USE_PENALTY:
        # An id seen twice is penalised once, as in HF: all gathers, a barrier, then the stores.
        penalty = tl.load(floats_ptr + row * floats_stride + PENALTY_COL)
        scores = tl.load(logits + ids, mask=is_seen, other=0.0)
        tl.debug_barrier()  # every thread has gathered before any scatters: HF's gather → scatter
        tl.store(logits + ids, tl.where(scores < 0, scores * penalty, scores / penalty), mask=is_seen)
        tl.debug_barrier()  # the ban below may hit the same ids from other threads
    if SPAN > 0:
        # End position e bans ids[e] when the n-1 tokens before it equal the row's last n-1 tokens.
        # Row scalars broadcast over the block: Triton 3.9's interpreter refuses masks that mix a
        # scalar condition into a block one.
        n = ends * 0 + tl.load(rows_ptr + row * rows_stride + NGRAM_COL)
        is_banned = is_seen & (ends >= n - 1) & (n > 0)
        for back in tl.static_range(1, SPAN):
            before = tl.load(history + ends - back, mask=is_seen & (ends >= back), other=-1)
            at = ends * 0 + pos + 1 - back  # the row's token `back` before its end
            suffix = tl.load(history + at, mask=at >= 0, other=-2)
            is_banned &= (before == suffix) | (n - 1 < back)
        tl.store(logits + ids, tl.full([BLOCK_S], float("-inf"), tl.float32), mask=is_banned)


@triton.jit
def sample_append_kernel(  # Triton kernel: untyped, many arguments
    given_ptr, top_values_ptr, top_ids_ptr, n_keys, vocab, tokens_ptr, tokens_stride, rows_ptr,
    rows_stride, floats_ptr, floats_stride, uniforms_ptr, uniforms_stride, done_ptr, stop_ptr,
    stop_stride, out_ptr, batch, max_seq,
    MODE: tl.constexpr, GIVEN: tl.constexpr, ARGMAX: tl.constexpr, K: tl.constexpr,
    BLOCK_KEYS: tl.constexpr, POS_COL: tl.constexpr,
    GEN_COL: tl.constexpr, MAX_NEW_COL: tl.constexpr, TOP_K_COL: tl.constexpr,
    TEMPERATURE_COL: tl.constexpr, TOP_P_COL: tl.constexpr, IDLE: tl.constexpr, RUNNING: tl.constexpr,
    STOP: tl.constexpr, MAX_NEW_REASON: tl.constexpr, MAX_SEQ_REASON: tl.constexpr,
):  # fmt: skip
    """Row r: choose the next token, append it, decide whether the row finished and publish token and
    reason in out (see append_tokens). MODE GIVEN: the token is given[r]; ARGMAX: the best of the
    row's chunk keys in given; otherwise from the row's top-K (values, ids), best first: greedy for
    temperature 0, else temperature → top-k → top-p → inverse CDF with its next uniform. One kernel,
    not three, because each launch costs more than this whole kernel's work at small batches."""
    row = tl.program_id(0)
    settings = rows_ptr + row * rows_stride
    pos, gen = tl.load(settings + POS_COL), tl.load(settings + GEN_COL)
    if MODE == GIVEN:
        token = tl.load(given_ptr + row)
    elif MODE == ARGMAX:
        slots = tl.arange(0, BLOCK_KEYS)
        keys = tl.load(given_ptr + row * n_keys + slots, mask=slots < n_keys, other=LOWEST_KEY)
        best = tl.max(keys, 0)
        token = vocab - 1 - (best - ((best >> 32) << 32))  # the low half: vocab - 1 - id
    else:
        rank = tl.arange(0, K)
        values = tl.load(top_values_ptr + row * K + rank)
        ids = tl.load(top_ids_ptr + row * K + rank)
        # argmax's tie-break: the smallest id among the best values (_top_k gives ties in id order already)
        greedy = tl.min(tl.where(values == tl.max(values, 0), ids, vocab), 0)
        temperature = tl.load(floats_ptr + row * floats_stride + TEMPERATURE_COL)
        top_p = tl.load(floats_ptr + row * floats_stride + TOP_P_COL)
        top_k = tl.load(settings + TOP_K_COL)
        values = values / tl.where(temperature > 0, temperature, 1.0)
        limit = tl.where((top_k > 0) & (top_k < K), top_k, K)
        values = tl.where(rank < limit, values, float("-inf"))
        probs = tl.exp(values - tl.max(values, 0))
        probs = probs / tl.sum(probs, 0)
        cumulative = tl.cumsum(probs, 0)
        probs = tl.where(cumulative - probs >= top_p, 0.0, probs)
        cumulative = tl.cumsum(probs, 0)
        target = tl.load(uniforms_ptr + row * uniforms_stride + gen) * tl.sum(probs, 0)
        choice = tl.minimum(tl.sum((cumulative < target).to(tl.int32), 0), K - 1)
        sampled = tl.sum(tl.where(rank == choice, ids, 0), 0)
        token = tl.where(temperature > 0, sampled, greedy)
    is_active = tl.load(done_ptr + row) == 0
    new_pos = pos + 1
    tl.store(tokens_ptr + row * tokens_stride + new_pos, token)  # frozen rows too: branch-free, own slot
    gen += is_active.to(tl.int64)
    reason = tl.where(
        tl.load(stop_ptr + row * stop_stride + token) != 0,
        STOP,
        tl.where(gen >= tl.load(settings + MAX_NEW_COL), MAX_NEW_REASON,
                 tl.where(new_pos >= max_seq - 1, MAX_SEQ_REASON, RUNNING)),
    )  # fmt: skip
    reason = tl.where(is_active, reason, IDLE)
    is_finished = reason > RUNNING
    tl.store(settings + GEN_COL, gen)
    tl.store(settings + POS_COL, pos + (is_active & ~is_finished).to(tl.int64))
    tl.store(done_ptr + row, ((~is_active) | is_finished).to(tl.int1))
    tl.store(out_ptr + row, token)
    tl.store(out_ptr + batch + row, reason.to(tl.int64))
