"""Fused decode step for BatchedGPT2Engine on CUDA: Triton kernels, and cuBLAS for larger products.

The plain step (model/fastgen/ops.py) launches 22 kernels per layer plus ~60 for the logits
processors, the sampler and the append: at small batches kernel latency, not memory traffic, sets its
time. This one launches 7 per layer (5 up to SMALL_LINEAR_ROWS rows, below) and 4-13 after the LM
head (step_kernels.py has the Triton ones). `product` below is `linear`
(products.py): a Triton kernel up to SKINNY_LINEAR_ROWS (64) rows, except the in-place MLP
projection above SMALL_LINEAR_ROWS (4); cuBLAS otherwise:

    embed + ln_1 (resid = x)
    per layer:  qkv = product(·) + b  →  attention (+ this token's K/V into the cache; when the cache
                is split, the last split to finish merges)  →  a = product(·) + b_proj  →  ln_2 of
                x + a (resid = x + a + b_out)  →  f = GELU(product(·) + b_fc)  →  resid += f · W_out (in
                place, cuBLAS's beta = 1)  →  next ln_1 or ln_f
    LM head → penalty + n-gram ban → top-k (top_k_kernels.py) or chunked argmax →
    sample + append

A prompt's prefill (`prefill`) uses the same fusions as a step of more rows (_after_attention), and
the same products for its P·L rows; one kernel copies each layer's keys and values into the cache.

The residual adds ride inside the layer-norm kernels and the in-place product, and the biases in the
products' epilogues. Attention reads each row's own cache length from the device, so one graph serves
every window.

Up to SMALL_LINEAR_ROWS rows a block is five kernels (_small_blocks): each layer norm runs in the
prologue of the product it feeds (small_linear_kernel), and the projections add their bias and the
residual in their epilogues. From Hopper on, the Triton products, the norms and attention launch with
programmatic dependent launch, each while the kernel before it runs.

Numerics: layer norm, attention and sampling run in float32 whatever the model dtype. Rounding points
differ from Hugging Face's by a few ulps: GELU takes the float32 sum (HF rounds before it), and outside
_small_blocks (steps above SMALL_LINEAR_ROWS rows, prefills) the MLP's bias joins the residual before
its product does (cuBLAS's in-place product cannot add one). So greedy tokens agree with `generate`
except at exact near-ties (tests/model/fastgen/test_engine.py checks equality on the test models).

Imported only when Triton is installed.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
import triton

from model.fastgen.ops import (
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
    StepPlan,
    attend_prompt,
    split_prompt_qkv,
)
from model.fastgen.sampling import TOP_K_CAP, sample_top_k_top_p
from model.fastgen.triton.products import is_small, linear
from model.fastgen.triton.step_kernels import (
    attention_kernel,
    cache_prompt_kernel,
    norm_kernel,
    pdl_arguments,
    process_kernel,
    sample_append_kernel,
)
from model.fastgen.triton.top_k_kernels import (
    bound_kernel,
    chunk_max_kernel,
    segment_best_kernel,
    select_kernel,
    selected_top_k_kernel,
)
from model.fastgen.weights import FC, OUT, PROJ, QKV, GPT2Weights, LayerWeights

ATTENTION_BLOCK = 64  # cache positions per attention iteration
CACHE_PROMPT_BLOCK = 32  # prompt positions per cache_prompt_kernel program (64 measured alike, BENCHMARKS.md)
ATTENTION_PROGRAMS = 2048  # split until rows × heads × splits reaches this (BENCHMARKS.md sweeps)
ATTENTION_UNSPLIT_FROM = 1024  # rows × heads from which the cache is not split (128 rows of GPT-2)
CANDIDATE_CHUNK = 4096  # vocabulary entries per argmax program (13 chunks for GPT-2's 50,257)
MODE_GIVEN, MODE_ARGMAX, MODE_SAMPLE = range(3)  # how sample_append_kernel chooses the token
NUM_WARPS = 4
ATTENTION_WARPS_UNSPLIT = 2  # from ATTENTION_UNSPLIT_FROM: more programs per SM (BENCHMARKS.md sweep)
TOP_K_WARPS = 8  # bound_kernel's and selected_top_k_kernel's
SELECT_SEGMENT = 512  # vocabulary entries per segment_best_kernel program
# Keys per segment (at least). On the starter's logits 128-319 entries a row reach the bound, against
# 240-1,407 with 3 keys per 1,024 entries (BENCHMARKS.md).
SELECT_KEYS = 8
SELECT_CAP = 512  # entries at or above the bound that select_kernel keeps (more: the exact search)
SELECT_CHUNK = 2048  # vocabulary entries per select_kernel program (and per step of the exact search)


def can_run_on(device: torch.device) -> bool:
    """Compiled kernels need CUDA; on the CPU they run only in Triton's interpreter (TRITON_INTERPRET=1)."""
    knobs = getattr(triton, "knobs", None)  # Triton >= 3.4; older versions run on CUDA only here
    return device.type == "cuda" or bool(knobs is not None and knobs.runtime.interpret)


def decode_step(weights: GPT2Weights, state: DecodeState, plan: StepPlan, commit: bool = True) -> None:
    """model.fastgen.ops.decode_step, fused. With commit=False (warm-up before a CUDA-graph capture)
    the kernels run on copies of the bookkeeping buffers, so only this position's key/value is written."""
    if not commit:
        state = _scratch(state)
    logits = decode_logits(weights, state, plan.batch)
    if plan.use_penalty or plan.ngram_span:
        _process(logits, state, plan)
    if plan.sampling == "greedy":
        _sample_append(state, plan.batch, MODE_ARGMAX, _greedy_keys(logits))
    elif plan.sampling == "top_k":
        _sample_append(state, plan.batch, MODE_SAMPLE, *_top_k(logits))
    else:  # some row ranks the whole vocabulary: the plain sampler's full sort
        _sample_append(state, plan.batch, MODE_GIVEN, _full_sample(logits, state, plan.batch))


def _scratch(state: DecodeState) -> DecodeState:
    copies = {name: getattr(state, name).clone() for name in ("tokens", "rows", "done", "out")}
    return dataclasses.replace(state, **copies)


def decode_logits(weights: GPT2Weights, state: DecodeState, batch: int) -> torch.Tensor:
    """float32 logits [B, V] for each row's token at its own position, caching its key/value."""
    device, width = state.tokens.device, weights.width
    resid = torch.empty((batch, width), dtype=weights.wte.dtype, device=device)
    normed = torch.empty_like(resid)
    _norm(resid, weights.layers[0].ln_1, normed, weights.eps, store=True, embed_from=(state, weights))
    if is_small(resid, weights.layers[0]):  # its QKV normalises resid itself: `normed` is not read
        _small_blocks(weights, state, resid)
        _norm(resid, weights.ln_f, normed, weights.eps)
    else:
        for index, layer in enumerate(weights.layers):
            qkv = linear(normed, layer, QKV)  # [B, 3C]
            following = weights.layers[index + 1].ln_1 if index + 1 < len(weights.layers) else weights.ln_f
            attended = _attention(weights, state, index, qkv)
            _after_attention(weights, layer, attended, resid, normed, following)
    # HF upcasts the last logits before its processors; the kernels want rows V apart (the padded LM
    # head's logits are a view with longer rows).
    return weights.logits(normed).float().contiguous()


def _small_blocks(weights: GPT2Weights, state: DecodeState, resid: torch.Tensor) -> None:
    """The blocks at a few rows, resid updated in place: five kernels a block, the layer norms in the
    products' prologues, the biases and residual adds in their epilogues."""
    for index, layer in enumerate(weights.layers):
        qkv = linear(resid, layer, QKV, norm=layer.ln_1, eps=weights.eps)
        linear(_attention(weights, state, index, qkv), layer, PROJ, into=resid)
        hidden = _feed_forward(weights, layer, resid, norm=layer.ln_2)
        linear(hidden, layer, OUT, into=resid)


def prefill(weights: GPT2Weights, state: DecodeState, ids: torch.Tensor, slots: torch.Tensor) -> None:
    """model.fastgen.ops.prefill with the decode step's fusions: the residual adds ride in the norm
    kernel and the in-place product, GELU in the product's epilogue (module docstring: rounding)."""
    length = ids.shape[1]
    x = F.embedding(ids, weights.wte) + F.embedding(state.arange[:length], weights.wpe)  # [P, L, C]
    resid = x.view(-1, weights.width)
    normed = torch.empty_like(resid)
    _norm(resid, weights.layers[0].ln_1, normed, weights.eps)
    last = len(weights.layers) - 1
    for index, layer in enumerate(weights.layers):
        cache = state.kv[index, :, :, :, :length]  # [2, max_batch, H, L, D]
        qkv = linear(normed, layer, QKV)
        _cache_prompt(weights, cache, slots, qkv)
        if index == last:  # its output feeds nothing that is cached: only its keys and values are needed
            return
        attended = attend_prompt(weights, *split_prompt_qkv(weights, qkv, len(slots)))
        _after_attention(weights, layer, attended, resid, normed, weights.layers[index + 1].ln_1)


def _cache_prompt(weights: GPT2Weights, cache: torch.Tensor, slots: torch.Tensor, qkv: torch.Tensor) -> None:
    """model.fastgen.ops.cache_prompt's cache writes in one kernel: index_copy_ of the strided keys and
    values moved ~0.25 TB/s, 5.1 ms of a 256 × 256-token prefill's 25.7 on an H200 (BENCHMARKS.md)."""
    n_prompts, length, head_dim = len(slots), qkv.shape[0] // len(slots), weights.head_dim
    # The kernel's layout: qkv rows [3C] and each cache slot [H, L, D] with unit inner strides; the
    # engine's slots are below max_batch (the kernel does not check them, as index_copy_ did).
    assert qkv.stride(1) == 1 and cache.stride(3) == head_dim and cache.stride(4) == 1
    grid = (n_prompts, weights.n_head, triton.cdiv(length, CACHE_PROMPT_BLOCK))
    cache_prompt_kernel[grid](
        qkv, qkv.stride(0), slots, cache, length, weights.width, head_dim,
        cache.stride(0), cache.stride(1), cache.stride(2),
        BLOCK_L=CACHE_PROMPT_BLOCK, BLOCK_D=triton.next_power_of_2(head_dim), num_warps=NUM_WARPS,
    )  # fmt: skip


def _after_attention(
    weights: GPT2Weights,
    layer: LayerWeights,
    attended: torch.Tensor,
    resid: torch.Tensor,
    normed: torch.Tensor,
    following: tuple[torch.Tensor, torch.Tensor],
) -> None:
    """The rest of a block, in place: resid += projection of `attended` + MLP, and normed = the
    `following` norm of it. The biases ride in the products' epilogues; the projection's residual add in
    the norm kernel, the MLP's in the in-place product (resid holds x + b_out by then: cuBLAS's in-place
    product cannot add a bias)."""
    projected = linear(attended, layer, PROJ)
    _norm(resid, layer.ln_2, normed, weights.eps, delta=projected, store=True, bias=layer.out_b)
    linear(_feed_forward(weights, layer, normed), layer, OUT, into=resid, add_bias=False)
    _norm(resid, following, normed, weights.eps)


def _feed_forward(
    weights: GPT2Weights,
    layer: LayerWeights,
    x: torch.Tensor,
    norm: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The MLP's first product and its activation; GELU's tanh form rides in the product's epilogue."""
    if weights.is_tanh_gelu:
        return linear(x, layer, FC, gelu=True, norm=norm, eps=weights.eps)
    return weights.act(linear(x, layer, FC, norm=norm, eps=weights.eps))


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
        **pdl_arguments(resid.device),
    )  # fmt: skip


def _attention(weights: GPT2Weights, state: DecodeState, index: int, qkv: torch.Tensor) -> torch.Tensor:
    """Attention output [B, C] for every row's new token; its key/value goes into the cache."""
    batch, width, n_head, head_dim = qkv.shape[0], weights.width, weights.n_head, weights.head_dim
    block_d = triton.next_power_of_2(head_dim)
    splits = _attention_splits(batch * n_head, state.max_seq)
    chunk = triton.cdiv(state.max_seq, splits)
    cache = state.kv[index]  # [2, max_batch, H, S, D]
    y = torch.empty((batch, width), dtype=qkv.dtype, device=qkv.device)
    partial = torch.empty((batch, n_head, splits, block_d + 2), dtype=torch.float32, device=qkv.device)
    attention_kernel[(batch, n_head, splits)](
        qkv, cache, state.rows, state.rows.stride(0), y, partial, state.tickets, weights.attn_scale, width,
        head_dim,
        cache.stride(0), cache.stride(1), cache.stride(2),
        BLOCK_D=block_d, BLOCK_N=ATTENTION_BLOCK, SPLITS=splits, CHUNK=chunk, POS_COL=POS,
        num_warps=ATTENTION_WARPS_UNSPLIT if batch * n_head >= ATTENTION_UNSPLIT_FROM else NUM_WARPS,
        **pdl_arguments(qkv.device),
    )  # fmt: skip
    return y


def _attention_splits(programs: int, max_seq: int) -> int:
    """Cache splits per (row, head), a power of two: enough programs to fill the GPU at small batches
    (B × H alone is 12 programs at one row of GPT-2), none from ATTENTION_UNSPLIT_FROM programs on."""
    if programs >= ATTENTION_UNSPLIT_FROM:
        return 1
    wanted = triton.next_power_of_2(max(1, -(-ATTENTION_PROGRAMS // programs)))
    most = max(1, max_seq // ATTENTION_BLOCK)
    return min(wanted, 1 << (most.bit_length() - 1))  # the merge needs a power of two


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


def _top_k(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.topk(logits, TOP_K_CAP) (values, ids), best first, ties to the smaller id."""
    batch = logits.shape[0]
    values = torch.empty((batch, TOP_K_CAP), dtype=torch.float32, device=logits.device)
    ids = torch.empty((batch, TOP_K_CAP), dtype=torch.int64, device=logits.device)
    _top_k_from_bound(logits, values, ids)
    return values, ids


def _top_k_from_bound(logits: torch.Tensor, values: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Into values and ids, each row's TOP_K_CAP best, from the entries at or above a lower bound of its
    K-th best value (top_k_kernels.py). Returns how many qualified in each row ([B] int32;
    over SELECT_CAP, the row took the exact search instead)."""
    batch, vocab = logits.shape
    if vocab < TOP_K_CAP or not logits.is_contiguous():  # no K-th best; the kernels read rows V apart
        raise ValueError(f"top-k needs contiguous rows of a vocabulary of at least {TOP_K_CAP}, got {vocab}")
    segments = triton.cdiv(vocab, SELECT_SEGMENT)
    # At least K keys from whole segments (a short last one may hold fewer than its share): with fewer, the
    # bound would still be a lower bound, but too low to keep any row under SELECT_CAP.
    per_segment = max(SELECT_KEYS, triton.cdiv(TOP_K_CAP, max(1, vocab // SELECT_SEGMENT)))
    n_best = segments * per_segment
    best = torch.empty((batch, n_best), dtype=torch.int64, device=logits.device)
    segment_best_kernel[(batch, segments)](
        logits, vocab, best, SEGMENT=SELECT_SEGMENT, M=per_segment, num_warps=NUM_WARPS
    )  # fmt: skip
    bounds = torch.empty(batch, dtype=torch.int64, device=logits.device)
    counts = torch.empty(batch, dtype=torch.int32, device=logits.device)
    bound_kernel[(batch,)](
        best, n_best, bounds, counts, K=TOP_K_CAP, BLOCK_BEST=triton.next_power_of_2(n_best),
        num_warps=TOP_K_WARPS,
    )  # fmt: skip
    keys = torch.empty((batch, SELECT_CAP), dtype=torch.int64, device=logits.device)
    select_kernel[(batch, triton.cdiv(vocab, SELECT_CHUNK))](
        logits, vocab, bounds, keys, counts, CAP=SELECT_CAP, CHUNK=SELECT_CHUNK, num_warps=NUM_WARPS
    )  # fmt: skip
    selected_top_k_kernel[(batch,)](
        logits, vocab, keys, counts, values, ids, K=TOP_K_CAP, CAP=SELECT_CAP, CHUNK=SELECT_CHUNK,
        num_warps=TOP_K_WARPS,
    )  # fmt: skip
    return counts


def _full_sample(logits: torch.Tensor, state: DecodeState, batch: int) -> torch.Tensor:
    """The plain step's choice over the whole sorted vocabulary ([B] int64)."""
    temperature = state.floats[:batch, TEMPERATURE]
    uniform = state.uniforms[:batch].gather(1, state.rows[:batch, GEN : GEN + 1]).squeeze(1)
    sampled = sample_top_k_top_p(
        logits, temperature, state.rows[:batch, TOP_K], state.floats[:batch, TOP_P], uniform, logits.shape[1]
    )
    return torch.where(temperature > 0, sampled, logits.argmax(-1))


def _sample_append(
    state: DecodeState, batch: int, mode: int, choices: torch.Tensor, top_ids: torch.Tensor | None = None
) -> None:
    """Choose every row's token, append it and publish it. `choices` is what `mode` chooses from: the
    tokens [B] (MODE_GIVEN), the chunk keys [B, chunks] (MODE_ARGMAX) or the top values [B, K] with
    their `top_ids` (MODE_SAMPLE)."""
    n_keys = choices.shape[1] if mode == MODE_ARGMAX else 0
    sample_append_kernel[(batch,)](
        choices, choices, choices if top_ids is None else top_ids, n_keys, state.stop.shape[1] - 1,
        state.tokens, state.tokens.stride(0), state.rows, state.rows.stride(0),
        state.floats, state.floats.stride(0), state.uniforms, state.uniforms.stride(0),
        state.done, state.stop, state.stop.stride(0), state.out, batch, state.max_seq,
        MODE=mode, GIVEN=MODE_GIVEN, ARGMAX=MODE_ARGMAX, K=TOP_K_CAP,
        BLOCK_KEYS=triton.next_power_of_2(max(1, n_keys)), POS_COL=POS, GEN_COL=GEN, MAX_NEW_COL=MAX_NEW,
        TOP_K_COL=TOP_K, TEMPERATURE_COL=TEMPERATURE, TOP_P_COL=TOP_P, IDLE=REASON_IDLE,
        RUNNING=REASON_RUNNING, STOP=REASON_STOP_TOKEN, MAX_NEW_REASON=REASON_MAX_NEW,
        MAX_SEQ_REASON=REASON_MAX_SEQ, num_warps=4,
    )  # fmt: skip
