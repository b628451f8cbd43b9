"""Fused decode step for BatchedGPT2Engine on CUDA: Triton kernels between cuBLAS matrix products.

The plain step (model/fastgen_ops.py) launches 22 kernels per layer plus ~60 for the logits
processors, the sampler and the append: at small batches kernel latency, not memory traffic, sets its
time. This one launches 7 per layer and 5 after the LM head:

    embed + ln_1 ─┐
    per layer:    addmm(qkv) → attention (+ this token's K/V into the cache) → resid += y·W_proj
                  → ln_2 (+ resid += b_fc_proj) → addmm+GELU epilogue → resid += f·W_out
                  → next ln_1 (+ resid += next b_proj) or ln_f
    LM head → penalty + n-gram ban → argmax → top-k (cuBLAS/torch) → sample + append

Two tricks keep the residual adds out of separate kernels: each layer-norm kernel also adds the next
projection's bias into the residual stream, and the projection then accumulates into it in place
(`addmm_` with beta = 1). Attention reads each row's own cache length from the device, so one graph
serves every window, and the cache position of the new token is written by the same kernel.

Numerics: layer norm, attention and sampling run in float32 whatever the model dtype; rounding points
differ from Hugging Face's by a few ulps (bias-then-residual order), so greedy tokens agree with
`generate` except at exact near-ties (tests/test_fastgen.py checks equality on the test models).

Imported only when Triton is installed. Kernels are compiled on first use; on a CPU tensor (tests)
they run in Triton's interpreter instead.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl
from triton import knobs

from model.fastgen_ops import (
    GEN,
    MAX_NEW,
    NGRAM,
    PENALTY,
    POS,
    REASON_IDLE,
    REASON_MAX_NEW,
    REASON_MAX_SEQ,
    REASON_RUNNING,
    REASON_STOP_TOKEN,
    TEMPERATURE,
    TOP_K,
    TOP_P,
    DecodeState,
    GPT2Weights,
    LayerWeights,
    StepPlan,
)
from model.fastgen_sampling import TOP_K_CAP, sample_top_k_top_p

ATTENTION_BLOCK = 64  # cache positions per attention iteration
CANDIDATE_CHUNK = 4096  # vocabulary entries per argmax program (13 chunks for GPT-2's 50,257)
MODE_GIVEN, MODE_ARGMAX, MODE_SAMPLE = range(3)  # how sample_append_kernel chooses the token
ATTENTION_PROGRAMS = 256  # split the cache until (rows × heads × splits) reaches this (2 waves on an H100)
NUM_WARPS = 4


# ----------------------------------------------------------------------------------------------------
# kernels


@triton.jit
def norm_kernel(  # Triton kernel: untyped, many arguments
    resid_ptr, delta_ptr, w_ptr, b_ptr, bias_ptr, out_ptr, eps, width,
    tokens_ptr, tokens_stride, rows_ptr, rows_stride, wte_ptr, wpe_ptr,
    BLOCK_C: tl.constexpr, EMBED: tl.constexpr, HAS_DELTA: tl.constexpr, STORE: tl.constexpr,
    HAS_BIAS: tl.constexpr, POS_COL: tl.constexpr,
):  # fmt: skip
    """Row r: x = resid (+ delta), or with EMBED the embedding of the row's token at its position
    (wte[token] + wpe[pos]); out = ln(x); with STORE, resid = x (+ bias, the next projection's)."""
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    is_col = cols < width
    dtype = resid_ptr.dtype.element_ty
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
    w = tl.load(w_ptr + cols, mask=is_col, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=is_col, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * width + cols, (centred * rstd * w + b).to(out_ptr.dtype.element_ty), mask=is_col)
    if STORE:
        if HAS_BIAS:
            x += tl.load(bias_ptr + cols, mask=is_col, other=0.0).to(tl.float32)
        tl.store(resid_ptr + row * width + cols, x.to(dtype), mask=is_col)


@triton.jit
def attention_kernel(  # Triton kernel: untyped, many arguments
    qkv_ptr, cache_ptr, rows_ptr, rows_stride, y_ptr, partial_ptr, scale, width, head_dim,
    kv_stride, row_stride, head_stride,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, SPLITS: tl.constexpr, CHUNK: tl.constexpr,
    POS_COL: tl.constexpr,
):  # fmt: skip
    """Row r, head h, split s: attend over cache positions [s·CHUNK, (s+1)·CHUNK) ∩ [0, pos); split 0
    also writes this token's key/value at pos and counts it. One split writes y; several write their
    running (max, sum, weighted values) to `partial` for combine_kernel (flash-decoding)."""
    row, head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
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
    tl.store(keys + pos * head_dim + dims, k_new, mask=is_dim & is_first)
    tl.store(values + pos * head_dim + dims, v_new, mask=is_dim & is_first)
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
    if SPLITS == 1:
        out = (acc / total).to(y_ptr.dtype.element_ty)
        tl.store(y_ptr + row * width + head * head_dim + dims, out, mask=is_dim)
    else:
        slot = partial_ptr + ((row * tl.num_programs(1) + head) * SPLITS + split) * (BLOCK_D + 2)
        tl.store(slot + dims, acc)
        tl.store(slot + BLOCK_D, best)
        tl.store(slot + BLOCK_D + 1, total)


@triton.jit
def combine_kernel(  # Triton kernel: untyped, many arguments
    partial_ptr, y_ptr, width, head_dim, BLOCK_D: tl.constexpr, SPLITS: tl.constexpr
):
    """Row r, head h: merge the splits' softmax states into y (splits past the row's end hold -inf)."""
    row, head = tl.program_id(0), tl.program_id(1)
    splits = tl.arange(0, SPLITS)
    dims = tl.arange(0, BLOCK_D)
    slots = partial_ptr + ((row * tl.num_programs(1) + head) * SPLITS + splits) * (BLOCK_D + 2)
    best = tl.load(slots + BLOCK_D)
    total = tl.load(slots + BLOCK_D + 1)
    acc = tl.load(slots[:, None] + dims[None, :])
    scale = tl.exp(best - tl.max(best, 0))  # split 0 always holds the new token: the max is finite
    out = tl.sum(acc * scale[:, None], 0) / tl.sum(total * scale, 0)
    tl.store(
        y_ptr + row * width + head * head_dim + dims, out.to(y_ptr.dtype.element_ty), mask=dims < head_dim
    )


@triton.jit
def process_kernel(  # Triton kernel: untyped, many arguments
    logits_ptr, vocab, tokens_ptr, tokens_stride, rows_ptr, rows_stride, floats_ptr, floats_stride,
    BLOCK_S: tl.constexpr, USE_PENALTY: tl.constexpr, SPAN: tl.constexpr,
    POS_COL: tl.constexpr, NGRAM_COL: tl.constexpr, PENALTY_COL: tl.constexpr,
):  # fmt: skip
    """HF's repetition penalty, then its n-gram ban, on row r's logits in place (see fastgen_sampling)."""
    row = tl.program_id(0)
    pos = tl.load(rows_ptr + row * rows_stride + POS_COL)
    ends = tl.arange(0, BLOCK_S)
    is_seen = ends <= pos
    history = tokens_ptr + row * tokens_stride
    ids = tl.load(history + ends, mask=is_seen, other=0)
    logits = logits_ptr + row * vocab
    if USE_PENALTY:
        # All gathers happen before any store, so an id seen twice is penalised once, as in HF.
        penalty = tl.load(floats_ptr + row * floats_stride + PENALTY_COL)
        scores = tl.load(logits + ids, mask=is_seen, other=0.0)
        tl.store(logits + ids, tl.where(scores < 0, scores * penalty, scores / penalty), mask=is_seen)
        tl.debug_barrier()  # the ban below may hit the same ids from other threads
    if SPAN > 0:
        # End position e bans ids[e] when the n-1 tokens before it equal the row's last n-1 tokens.
        n = tl.load(rows_ptr + row * rows_stride + NGRAM_COL)
        is_banned = is_seen & (ends >= n - 1) & (n > 0)
        for back in tl.static_range(1, SPAN):
            before = tl.load(history + ends - back, mask=is_seen & (ends >= back), other=-1)
            suffix = tl.load(history + pos + 1 - back, mask=pos + 1 >= back, other=-2)
            is_banned &= (before == suffix) | (back > n - 1)
        tl.store(logits + ids, tl.full([BLOCK_S], float("-inf"), tl.float32), mask=is_banned)


@triton.jit
def _pack(values, ids, vocab):  # Triton helper: untyped
    """(float32 value, id) → int64 keys that sort by value, then by smaller id (argmax's tie-break)."""
    bits = tl.where(values == 0, 0.0, values).to(tl.int32, bitcast=True)  # -0.0 ties with 0.0
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # negative floats count down: now signed order = value order
    return (ordered.to(tl.int64) << 32) | tl.where(ids < vocab, vocab - 1 - ids, 0).to(tl.int64)


@triton.jit
def chunk_max_kernel(  # Triton kernel: untyped, many arguments
    logits_ptr, vocab, keys_ptr, CHUNK: tl.constexpr
):
    """Row r, chunk c: the best (value, id) key of logits[r, c·CHUNK:(c+1)·CHUNK]."""
    row, chunk = tl.program_id(0), tl.program_id(1)
    ids = chunk * CHUNK + tl.arange(0, CHUNK)
    values = tl.load(logits_ptr + row * vocab + ids, mask=ids < vocab, other=float("-inf"))
    tl.store(keys_ptr + row * tl.num_programs(1) + chunk, tl.max(_pack(values, ids, vocab), 0))


@triton.jit
def sample_append_kernel(  # Triton kernel: untyped, many arguments
    given_ptr, top_values_ptr, top_ids_ptr, n_keys, vocab, tokens_ptr, tokens_stride, rows_ptr,
    rows_stride, floats_ptr, floats_stride, uniforms_ptr, uniforms_stride, done_ptr, stop_ptr,
    stop_stride, out_ptr, batch, max_seq,
    MODE: tl.constexpr, K: tl.constexpr, BLOCK_KEYS: tl.constexpr, POS_COL: tl.constexpr,
    GEN_COL: tl.constexpr, MAX_NEW_COL: tl.constexpr, TOP_K_COL: tl.constexpr,
    TEMPERATURE_COL: tl.constexpr, TOP_P_COL: tl.constexpr, IDLE: tl.constexpr, RUNNING: tl.constexpr,
    STOP: tl.constexpr, MAX_NEW_REASON: tl.constexpr, MAX_SEQ_REASON: tl.constexpr,
):  # fmt: skip
    """Row r: choose the next token, append it, decide whether the row finished and publish token and
    reason in out (see append_tokens). MODE_GIVEN: the token is given[r]; MODE_ARGMAX: the best of
    the row's chunk keys in given; MODE_SAMPLE: from the row's top-K (values, ids), best first:
    greedy for temperature 0, else temperature → top-k → top-p → inverse CDF with its next uniform."""
    row = tl.program_id(0)
    settings = rows_ptr + row * rows_stride
    pos, gen = tl.load(settings + POS_COL), tl.load(settings + GEN_COL)
    if MODE == 0:  # MODE_GIVEN
        token = tl.load(given_ptr + row)
    elif MODE == 1:  # MODE_ARGMAX
        slots = tl.arange(0, BLOCK_KEYS)
        lowest = tl.full([BLOCK_KEYS], -2147483648, tl.int32).to(tl.int64) << 32  # below every key
        keys = tl.load(given_ptr + row * n_keys + slots, mask=slots < n_keys, other=lowest)
        best = tl.max(keys, 0)
        token = vocab - 1 - (best - ((best >> 32) << 32))  # the low half: vocab - 1 - id
    else:
        rank = tl.arange(0, K)
        values = tl.load(top_values_ptr + row * K + rank)
        ids = tl.load(top_ids_ptr + row * K + rank)
        # argmax's tie-break: the smallest id among the best values (topk orders ties arbitrarily)
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


def can_run_on(device: torch.device) -> bool:
    """Compiled kernels need CUDA; on the CPU they run only in Triton's interpreter (TRITON_INTERPRET=1)."""
    return device.type == "cuda" or bool(knobs.runtime.interpret)


# ----------------------------------------------------------------------------------------------------
# the step


def decode_step(weights: GPT2Weights, state: DecodeState, plan: StepPlan, commit: bool = True) -> None:
    """model.fastgen_ops.decode_step, fused. With commit=False (warm-up before a CUDA-graph capture)
    the kernels run on copies of the bookkeeping buffers, so only this position's key/value is written."""
    if not commit:
        state = _scratch(state)
    logits = decode_logits(weights, state, plan.batch)
    if plan.use_penalty or plan.ngram_span:
        _process(logits, state, plan)
    if plan.sampling == "greedy":
        _sample_append(state, plan.batch, MODE_ARGMAX, _greedy_keys(logits))
    elif plan.sampling == "top_k":
        # torch.topk beat a Triton bitonic top-k (tl.topk per 4096-entry chunk, then a merge) on an
        # H100: 45 µs against 71 at 1 row, and ~0.2 ms against 1.5 ms at 256 rows.
        top = logits.topk(TOP_K_CAP, -1)  # sorted, largest first
        _sample_append(state, plan.batch, MODE_SAMPLE, top.values, top.indices)
    else:  # some row ranks the whole vocabulary: the plain sampler's full sort
        _sample_append(state, plan.batch, MODE_GIVEN, _full_sample(logits, state, plan.batch))


def _scratch(state: DecodeState) -> DecodeState:
    copies = {name: getattr(state, name).clone() for name in ("tokens", "rows", "done", "out")}
    return dataclasses.replace(state, **copies)


def decode_logits(weights: GPT2Weights, state: DecodeState, batch: int) -> torch.Tensor:
    """float32 logits [B, V] for each row's token at its own position, caching its key/value."""
    normed = _hidden(weights, state, batch)
    # HF upcasts the last logits before its processors; the kernels want rows V apart (the padded LM
    # head's logits are a view with longer rows).
    return weights.logits(normed).float().contiguous()


def _hidden(weights: GPT2Weights, state: DecodeState, batch: int) -> torch.Tensor:
    """ln_f of the last block's output [B, C]."""
    device, width = state.tokens.device, weights.width
    resid = torch.empty((batch, width), dtype=weights.wte.dtype, device=device)
    normed = torch.empty_like(resid)
    _norm(resid, weights.layers[0].ln_1, normed, weights.eps, store=True, embed_from=(state, weights))
    for index, layer in enumerate(weights.layers):
        qkv = torch.addmm(layer.attn_b, normed, layer.attn_w)  # [B, 3C]
        # A bias-epilogue product, added to the residual by the norm kernel: on an H100 at one row the
        # in-place `resid.addmm_` took a split-K kernel plus a reduction (6.5 µs against 3.6).
        attended = torch.addmm(layer.proj_b, _attention(weights, state, index, qkv), layer.proj_w)
        _norm(resid, layer.ln_2, normed, weights.eps, delta=attended, store=True, bias=layer.out_b)
        hidden = _feed_forward(weights, layer, normed)  # [B, 4C]
        resid.addmm_(hidden, layer.out_w)  # resid held x + b_out: one "beta = 1" product, 3.6 µs
        following = weights.layers[index + 1].ln_1 if index + 1 < len(weights.layers) else weights.ln_f
        _norm(resid, following, normed, weights.eps)
    return normed


def _feed_forward(weights: GPT2Weights, layer: LayerWeights, normed: torch.Tensor) -> torch.Tensor:
    if weights.is_tanh_gelu and normed.is_cuda:  # GELU in cuBLAS's epilogue (tanh there; erf on the CPU)
        return torch._addmm_activation(layer.fc_b, normed, layer.fc_w, use_gelu=True)
    return weights.act(torch.addmm(layer.fc_b, normed, layer.fc_w))


def _norm(
    resid: torch.Tensor,
    ln: tuple[torch.Tensor, torch.Tensor],
    out: torch.Tensor,
    eps: float,
    *,
    delta: torch.Tensor | None = None,
    store: bool = False,
    bias: torch.Tensor | None = None,
    embed_from: tuple[DecodeState, GPT2Weights] | None = None,
) -> None:
    """norm_kernel: out = ln(x) with x = resid + delta (or the rows' token embeddings); with `store`,
    resid = x + bias."""
    batch, width = resid.shape
    tokens, rows, wte, wpe = (resid, resid, resid, resid)  # placeholders when not embedding
    if embed_from is not None:
        state, weights = embed_from
        tokens, rows, wte, wpe = state.tokens, state.rows, weights.wte, weights.wpe
    norm_kernel[(batch,)](
        resid, resid if delta is None else delta, *ln, resid if bias is None else bias, out, eps, width,
        tokens, tokens.stride(0), rows, rows.stride(0), wte, wpe,
        BLOCK_C=triton.next_power_of_2(width), EMBED=embed_from is not None, HAS_DELTA=delta is not None,
        STORE=store, HAS_BIAS=bias is not None, POS_COL=POS, num_warps=NUM_WARPS,
    )  # fmt: skip


def _attention(weights: GPT2Weights, state: DecodeState, index: int, qkv: torch.Tensor) -> torch.Tensor:
    """Attention output [B, C] for every row's new token; its key/value goes into the cache."""
    batch, width, n_head = qkv.shape[0], weights.width, weights.n_head
    head_dim = width // n_head
    block_d = triton.next_power_of_2(head_dim)
    splits = _attention_splits(batch * n_head, state.max_seq)
    chunk = triton.cdiv(state.max_seq, splits)
    cache = state.kv[index]  # [2, max_batch, H, S, D]
    y = torch.empty((batch, width), dtype=qkv.dtype, device=qkv.device)
    partial = torch.empty((batch, n_head, splits, block_d + 2), dtype=torch.float32, device=qkv.device)
    attention_kernel[(batch, n_head, splits)](
        qkv, cache, state.rows, state.rows.stride(0), y, partial, weights.attn_scale, width, head_dim,
        cache.stride(0), cache.stride(1), cache.stride(2),
        BLOCK_D=block_d, BLOCK_N=ATTENTION_BLOCK, SPLITS=splits, CHUNK=chunk, POS_COL=POS,
        num_warps=NUM_WARPS,
    )  # fmt: skip
    if splits > 1:
        combine_kernel[(batch, n_head)](
            partial, y, width, head_dim, BLOCK_D=block_d, SPLITS=splits, num_warps=1
        )  # fmt: skip
    return y


def _attention_splits(programs: int, max_seq: int) -> int:
    """Cache splits per (row, head), a power of two: enough programs to fill the GPU at small batches
    (B × H alone is 12 programs at one row of GPT-2), none when B × H already does."""
    wanted = triton.next_power_of_2(max(1, -(-ATTENTION_PROGRAMS // programs)))
    return max(1, min(wanted, max_seq // ATTENTION_BLOCK))


def _process(logits: torch.Tensor, state: DecodeState, plan: StepPlan) -> None:
    """The repetition penalty and the n-gram ban, in place on logits [B, V]."""
    process_kernel[(plan.batch,)](
        logits, logits.shape[1], state.tokens, state.tokens.stride(0), state.rows, state.rows.stride(0),
        state.floats, state.floats.stride(0), BLOCK_S=triton.next_power_of_2(state.max_seq),
        USE_PENALTY=plan.use_penalty, SPAN=plan.ngram_span, POS_COL=POS, NGRAM_COL=NGRAM,
        PENALTY_COL=PENALTY, num_warps=NUM_WARPS,
    )  # fmt: skip


def _greedy_keys(logits: torch.Tensor) -> torch.Tensor:
    """[B, chunks] int64 keys: each vocabulary chunk's best (value, id), for the argmax."""
    batch, vocab = logits.shape
    chunks = triton.cdiv(vocab, CANDIDATE_CHUNK)
    keys = torch.empty((batch, chunks), dtype=torch.int64, device=logits.device)
    chunk_max_kernel[(batch, chunks)](logits, vocab, keys, CHUNK=CANDIDATE_CHUNK, num_warps=8)
    return keys


def argmax_keys(logits: torch.Tensor) -> torch.Tensor:
    """Each row's largest key [B] with torch ops: the reference for chunk_max_kernel + the merge."""
    bits = torch.where(logits == 0, 0.0, logits.float()).view(torch.int32)  # -0.0 ties with 0.0
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    ids = torch.arange(logits.shape[1], device=logits.device)
    return ((ordered.long() << 32) | (logits.shape[1] - 1 - ids)).max(-1).values


def _full_sample(logits: torch.Tensor, state: DecodeState, batch: int) -> torch.Tensor:
    """The plain step's choice over the whole sorted vocabulary ([B] int64)."""
    temperature = state.floats[:batch, TEMPERATURE]
    uniform = state.uniforms[:batch].gather(1, state.rows[:batch, GEN : GEN + 1]).squeeze(1)
    sampled = sample_top_k_top_p(
        logits, temperature, state.rows[:batch, TOP_K], state.floats[:batch, TOP_P], uniform, logits.shape[1]
    )
    return torch.where(temperature > 0, sampled, logits.argmax(-1))


def _sample_append(
    state: DecodeState, batch: int, mode: int, first: torch.Tensor, ids: torch.Tensor | None = None
) -> None:
    """Choose every row's token (mode and inputs as in sample_append_kernel), append it and publish it.
    `first` is the given tokens [B] (MODE_GIVEN), the chunk keys [B, chunks] (MODE_ARGMAX) or the top
    values [B, K] with their `ids` (MODE_SAMPLE)."""
    n_keys = first.shape[1] if mode == MODE_ARGMAX else 0
    sample_append_kernel[(batch,)](
        first, first, first if ids is None else ids, n_keys, state.stop.shape[1] - 1,
        state.tokens, state.tokens.stride(0), state.rows, state.rows.stride(0),
        state.floats, state.floats.stride(0), state.uniforms, state.uniforms.stride(0),
        state.done, state.stop, state.stop.stride(0), state.out, batch, state.max_seq,
        MODE=mode, K=TOP_K_CAP, BLOCK_KEYS=triton.next_power_of_2(max(1, n_keys)), POS_COL=POS,
        GEN_COL=GEN, MAX_NEW_COL=MAX_NEW, TOP_K_COL=TOP_K, TEMPERATURE_COL=TEMPERATURE, TOP_P_COL=TOP_P,
        IDLE=REASON_IDLE, RUNNING=REASON_RUNNING, STOP=REASON_STOP_TOKEN, MAX_NEW_REASON=REASON_MAX_NEW,
        MAX_SEQ_REASON=REASON_MAX_SEQ, num_warps=4,
    )  # fmt: skip
