"""Tensor math of the batched GPT-2 decoder: state buffers, prefill and one decode step.

Nothing in `decode_step` reads a tensor back to the host or allocates outside the step, so it can be
captured in a CUDA graph and replayed. Shapes in comments: B = rows in the step (a batch bucket),
W = cache positions attended (a window bucket), S = max_seq, V = vocabulary, C = width, H = heads,
D = C // H, P = jobs in one prefill, L = prefill length.

The math follows Hugging Face's GPT2LMHeadModel operation by operation (Conv1D is `addmm(bias, x, w)`,
residual adds in the same order, logits upcast to float32 before the logits processors), so greedy
decoding on CPU in float32 gives the same tokens as `generate`. The weights it reads are in
weights.py; logits processors and the sampler in sampling.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from model.fastgen.sampling import (
    TOP_K_CAP,
    apply_repetition_penalty,
    ban_repeated_ngrams,
    sample_top_k_top_p,
)
from model.fastgen.weights import GPT2Weights, LayerWeights

# Columns of DecodeState.rows (int64) and DecodeState.floats (float32).
POS, GEN, MAX_NEW, TOP_K, NGRAM = range(5)
TEMPERATURE, TOP_P, PENALTY = range(3)

# attend_prompt's SDPA backends, in PyTorch's order of preference: every one but cuDNN's
PROMPT_ATTENTION_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

# Per-row outcome of a step, written to DecodeState.out for the host.
REASON_IDLE = -1  # the row was already finished or empty: its token means nothing
REASON_RUNNING = 0
REASON_STOP_TOKEN = 1
REASON_MAX_NEW = 2
REASON_MAX_SEQ = 3


@dataclass(frozen=True)
class StepPlan:
    """The static shape and features of one decode step; one CUDA graph is captured per distinct plan."""

    batch: int  # rows [0, batch) take part
    window: int  # cache positions [0, window) are attended
    sampling: str  # "greedy" (every row), "top_k" (sampled rows have 1 <= top_k <= TOP_K_CAP) or "full"
    use_penalty: bool  # some row has repetition_penalty != 1
    ngram_span: int  # 0: no row bans n-grams; else >= every row's no_repeat_ngram_size


@dataclass(frozen=True)
class DecodeState:
    """Preallocated buffers; row i holds the sequence in slot i. Only ever mutated in place."""

    kv: torch.Tensor  # [n_layer, 2, max_batch, H, S, D] keys and values, model dtype
    tokens: torch.Tensor  # [max_batch, S] int64: prompt then generated ids
    rows: torch.Tensor  # [max_batch, 5] int64: POS (current input position), GEN, MAX_NEW, TOP_K, NGRAM
    floats: torch.Tensor  # [max_batch, 3] float32: TEMPERATURE, TOP_P, PENALTY
    done: torch.Tensor  # [max_batch] bool: finished or empty rows are frozen and their outputs ignored
    stop: torch.Tensor  # [max_batch, V + 1] bool: stop tokens; column V absorbs padding of empty sets
    uniforms: torch.Tensor  # [max_batch, S + 1] float32: one random number per generated token
    out: torch.Tensor  # [2 * max_batch] int64: the last step's tokens [0, B) then reasons [B, 2B)
    arange: torch.Tensor  # [max(S, max_batch)] int64: 0, 1, 2, ... (masks, row and position indices)
    tickets: torch.Tensor  # [max_batch, H] int32, zero between steps: the fused attention's split count

    @property
    def max_seq(self) -> int:
        return int(self.tokens.shape[1])


def allocate_state(weights: GPT2Weights, max_batch: int, max_seq: int) -> DecodeState:
    """Every buffer the engine needs, allocated once on the weights' device (empty rows start frozen)."""
    device, dtype = weights.wte.device, weights.wte.dtype
    n_layer, n_head = len(weights.layers), weights.n_head
    vocab = weights.vocab_size
    kv_shape = (n_layer, 2, max_batch, n_head, max_seq, weights.head_dim)
    return DecodeState(
        kv=torch.zeros(kv_shape, dtype=dtype, device=device),
        tokens=torch.zeros((max_batch, max_seq), dtype=torch.long, device=device),
        rows=torch.zeros((max_batch, 5), dtype=torch.long, device=device),
        floats=torch.ones((max_batch, 3), dtype=torch.float32, device=device),
        done=torch.ones(max_batch, dtype=torch.bool, device=device),
        stop=torch.zeros((max_batch, vocab + 1), dtype=torch.bool, device=device),
        uniforms=torch.zeros((max_batch, max_seq + 1), dtype=torch.float32, device=device),
        out=torch.zeros(2 * max_batch, dtype=torch.long, device=device),
        arange=torch.arange(max(max_seq, max_batch), device=device),
        tickets=torch.zeros((max_batch, n_head), dtype=torch.int32, device=device),
    )


# ----------------------------------------------------------------------------------------------------
# prefill: fill a new job's cache slots (eager; shapes vary with prompt length)


def prefill(weights: GPT2Weights, state: DecodeState, ids: torch.Tensor, slots: torch.Tensor) -> None:
    """Write keys/values of ids [P, L] (right-padded prompts) into the cache slots listed in `slots` [P]
    (a device tensor, so a CUDA graph of this serves any slot). A prompt's last token and the padding after
    it are written too; causal attention never lets the prompt see them, and the decode steps overwrite
    those cache positions (the first one feeds the last token) before any mask exposes them."""
    length = ids.shape[1]
    x = F.embedding(ids, weights.wte) + F.embedding(state.arange[:length], weights.wpe)  # [P, L, C]
    last = len(weights.layers) - 1
    for index, layer in enumerate(weights.layers):
        cache = state.kv[index, :, :, :, :length]  # [2, max_batch, H, L, D]
        # The last block's output feeds nothing that is cached: only its keys and values are needed.
        x = _prefill_block(weights, layer, cache, slots, x, need_output=index < last)


def _prefill_block(
    weights: GPT2Weights,
    layer: LayerWeights,
    cache: torch.Tensor,
    slots: torch.Tensor,
    x: torch.Tensor,
    need_output: bool,
) -> torch.Tensor:
    width = x.shape[-1]
    h = F.layer_norm(x, (width,), *layer.ln_1, weights.eps)
    qkv = torch.addmm(layer.attn_b, h.view(-1, width), layer.attn_w)
    cache_prompt(weights, cache, slots, qkv)
    if not need_output:
        return x
    y = attend_prompt(weights, *split_prompt_qkv(weights, qkv, len(slots)))
    x = torch.addmm(layer.proj_b, y, layer.proj_w).view_as(x) + x
    h = F.layer_norm(x, (width,), *layer.ln_2, weights.eps)
    h = weights.act(torch.addmm(layer.fc_b, h.view(-1, width), layer.fc_w))
    return x + torch.addmm(layer.out_b, h, layer.out_w).view_as(x)


def cache_prompt(weights: GPT2Weights, cache: torch.Tensor, slots: torch.Tensor, qkv: torch.Tensor) -> None:
    """Write the keys and values of one layer's qkv [P·L, 3C] of P prompts into the cache slots listed in
    `slots` [P]."""
    _, k, v = split_prompt_qkv(weights, qkv, slots.shape[0])
    cache[0].index_copy_(0, slots, k.transpose(1, 2))
    cache[1].index_copy_(0, slots, v.transpose(1, 2))


def split_prompt_qkv(
    weights: GPT2Weights, qkv: torch.Tensor, n_prompts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Views q, k, v [P, L, H, D] of one layer's qkv [P·L, 3C] for P = n_prompts prompts."""
    q, k, v = qkv.view(n_prompts, -1, 3, weights.n_head, weights.head_dim).unbind(2)
    return q, k, v


def attend_prompt(weights: GPT2Weights, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal self-attention within each prompt: [P, L, H, D] each → [P·L, C]. Not cuDNN's, which PyTorch
    picks on Hopper: it builds a plan for every new shape, ~70 ms on an H200 (flash: none; BENCHMARKS.md),
    and prompts come in many shapes."""
    with sdpa_kernel(PROMPT_ATTENTION_BACKENDS):
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=weights.attn_scale
        )  # [P, H, L, D]
    return y.transpose(1, 2).reshape(-1, weights.width)


# ----------------------------------------------------------------------------------------------------
# one decode step over rows [0, B): forward → logits processors → choose → append (graph-capturable)


def decode_step(weights: GPT2Weights, state: DecodeState, plan: StepPlan, commit: bool = True) -> None:
    """Advance every unfinished row by one token and write tokens + reasons to state.out.

    With commit=False only the forward pass and the choice run (CUDA-graph warm-up): the one side
    effect, writing this position's key/value, is the same write the real step makes."""
    logits = decode_logits(weights, state, plan.batch, plan.window)
    next_ids = choose_tokens(logits, state, plan)
    if commit:
        append_tokens(state, plan.batch, next_ids)


def decode_logits(weights: GPT2Weights, state: DecodeState, batch: int, window: int) -> torch.Tensor:
    """float32 logits [B, V] for each row's token at its current position, caching its key/value."""
    pos = state.rows[:batch, POS]
    ids = state.tokens[:batch].gather(1, pos[:, None]).squeeze(1)
    x = F.embedding(ids, weights.wte) + F.embedding(pos, weights.wpe)  # [B, C]
    # Additive mask over cache positions: a row sees its own history only (slots hold different lengths).
    visible = state.arange[:window] <= pos[:, None]  # [B, W]
    mask = torch.full((batch, 1, 1, window), float("-inf"), dtype=x.dtype, device=x.device)
    mask.masked_fill_(visible[:, None, None, :], 0.0)
    rows = state.arange[:batch]
    for index, layer in enumerate(weights.layers):
        x = _decode_block(weights, layer, state.kv[index], x, rows, pos, mask)
    h = F.layer_norm(x, (weights.width,), *weights.ln_f, weights.eps)
    return weights.logits(h).float()  # HF upcasts the last logits before its processors


def _decode_block(
    weights: GPT2Weights,
    layer: LayerWeights,
    kv: torch.Tensor,
    x: torch.Tensor,
    rows: torch.Tensor,
    pos: torch.Tensor,
    mask: torch.Tensor,
) -> torch.Tensor:
    batch, width = x.shape
    n_head, head_dim, window = weights.n_head, weights.head_dim, mask.shape[-1]
    h = F.layer_norm(x, (width,), *layer.ln_1, weights.eps)
    qkv = torch.addmm(layer.attn_b, h, layer.attn_w)  # [B, 3C]
    kv[:, rows, :, pos] = qkv[:, width:].view(batch, 2, n_head, head_dim)  # this token's key and value
    q = qkv[:, :width].view(batch, n_head, 1, head_dim)
    keys, values = kv[0, :batch, :, :window], kv[1, :batch, :, :window]  # [B, H, W, D] views
    y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=weights.attn_scale)
    x = torch.addmm(layer.proj_b, y.transpose(1, 2).reshape(batch, width), layer.proj_w) + x
    h = F.layer_norm(x, (width,), *layer.ln_2, weights.eps)
    h = weights.act(torch.addmm(layer.fc_b, h, layer.fc_w))
    return x + torch.addmm(layer.out_b, h, layer.out_w)


def choose_tokens(logits: torch.Tensor, state: DecodeState, plan: StepPlan) -> torch.Tensor:
    """Apply each row's repetition penalty and n-gram ban, then argmax (temperature 0) or sample: [B]."""
    batch, window = plan.batch, plan.window
    tokens, rows = state.tokens[:batch], state.rows[:batch]
    # Both processors work on each row's history ([B, W]), not the vocabulary ([B, V]), and edit in place.
    if plan.use_penalty:
        apply_repetition_penalty(logits, tokens, rows[:, POS], state.floats[:batch, PENALTY], window)
    if plan.ngram_span:
        ban_repeated_ngrams(logits, tokens, rows[:, POS], rows[:, NGRAM], window, plan.ngram_span)
    greedy = logits.argmax(-1)
    if plan.sampling == "greedy":
        return greedy
    temperature = state.floats[:batch, TEMPERATURE]
    uniform = state.uniforms[:batch].gather(1, state.rows[:batch, GEN : GEN + 1]).squeeze(1)
    cap = TOP_K_CAP if plan.sampling == "top_k" else logits.shape[-1]
    sampled = sample_top_k_top_p(
        logits, temperature, state.rows[:batch, TOP_K], state.floats[:batch, TOP_P], uniform, cap
    )
    return torch.where(temperature > 0, sampled, greedy)


def append_tokens(state: DecodeState, batch: int, next_ids: torch.Tensor) -> None:
    """Append next_ids to unfinished rows, decide which rows finish, and publish both in state.out."""
    rows = state.rows[:batch]
    pos, gen = rows[:, POS], rows[:, GEN]
    is_active = ~state.done[:batch]
    new_pos = pos + 1  # <= S - 1: rows stop advancing once new_pos reaches S - 1
    # Frozen rows write too (harmlessly, into their own slot): branch-free keeps the graph simple.
    state.tokens[:batch].scatter_(1, new_pos[:, None], next_ids[:, None])
    gen.add_(is_active)
    is_stop = state.stop[:batch].gather(1, next_ids[:, None]).squeeze(1)
    reason = torch.where(
        is_stop,
        REASON_STOP_TOKEN,
        torch.where(
            gen >= rows[:, MAX_NEW],
            REASON_MAX_NEW,
            torch.where(new_pos >= state.max_seq - 1, REASON_MAX_SEQ, REASON_RUNNING),
        ),
    )
    reason = torch.where(is_active, reason, REASON_IDLE)
    is_finished = reason > REASON_RUNNING
    pos.add_(is_active & ~is_finished)
    state.done[:batch] |= is_finished
    state.out[:batch] = next_ids
    state.out[batch : 2 * batch] = reason


# ----------------------------------------------------------------------------------------------------
# slot bookkeeping on the device (between steps; all copies are queued, none waits for the GPU)


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    # non_blocking: a pageable source is staged at once, so this never waits for queued steps.
    return tensor.to(device, non_blocking=True)


def install_rows(
    state: DecodeState,
    first_slot: int,
    tokens: torch.Tensor,
    rows: torch.Tensor,
    floats: torch.Tensor,
    stop_index: torch.Tensor,
    uniforms: torch.Tensor,
) -> None:
    """Start new sequences in slots [first_slot, first_slot + P) from CPU tensors: tokens [P, T]
    (right-padded prompts), rows [P, 5], floats [P, 3], stop_index [P, K] (padded with V), uniforms [P, U]."""
    device, slots = state.tokens.device, slice(first_slot, first_slot + tokens.shape[0])
    tokens_on_device = _to_device(tokens, device)
    state.tokens[slots, : tokens.shape[1]] = tokens_on_device
    state.rows[slots] = _to_device(rows, device)
    state.floats[slots] = _to_device(floats, device)
    state.done[slots] = False
    stop = state.stop[slots]
    stop.zero_()
    stop.scatter_(1, _to_device(stop_index, device), True)
    state.uniforms[slots, : uniforms.shape[1]] = _to_device(uniforms, device)


def move_rows(state: DecodeState, sources: list[int], targets: list[int], kv_length: int) -> None:
    """Copy the sequences in slots `sources` into slots `targets` (compaction when jobs leave)."""
    device = state.tokens.device
    source_index = _to_device(torch.tensor(sources), device)
    target_index = _to_device(torch.tensor(targets), device)
    buffers = (state.tokens, state.rows, state.floats, state.done, state.stop, state.uniforms)
    for buffer in buffers:
        buffer.index_copy_(0, target_index, buffer.index_select(0, source_index))
    for source, target in zip(sources, targets, strict=True):
        # Only the positions in use: a whole slot of GPT-2 124M is 38 MB of cache.
        state.kv[:, :, target, :, :kv_length].copy_(state.kv[:, :, source, :, :kv_length])
