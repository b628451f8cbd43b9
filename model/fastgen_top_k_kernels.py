"""Triton kernels that rank a batch's logits: the argmax's chunk maxima and the top-k candidates
(model/fastgen_triton.py launches them; model/fastgen_kernels.py's sample_append_kernel takes their output).

Loops over a row are while loops: Triton's interpreter (the tests) takes no argument as a range() bound.
Entries are compared as int64 keys (`_pack`): the float32 value in the high half, in value order, and the
id, reversed, in the low half, so a larger key is a larger value or, on a tie, a smaller id (argmax's and a
stable sort's tie-break). Each kernel works on one row, or one row × vocabulary segment, in float32.

The top K of a row come from one of two pairs of kernels, each followed by top_k_kernel:
- top_candidates_kernel: every segment's exact top K, by a bitwise search for its K-th largest value. Its
  work is the same at every batch size; it is the faster at a few rows.
- segment_best_kernel, then select_kernel: each segment's best few keys, whose K-th best bounds the row's
  K-th best value from below; one pass over the row then keeps every entry at or above the bound (a few
  hundred at most, unless many entries tie or the best crowd into a few segments: then a bitwise search
  over the whole row). Faster from a few dozen rows, where torch.topk took ~16 % of a decode step.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOWEST_KEY: tl.constexpr = tl.constexpr(-(2**63))  # below every key _pack makes


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
def _value_rank(keys):  # Triton helper: untyped
    """A key's value part (its high half) as an int64 in [0, 2^32), in value order."""
    return (keys >> 32) + 2147483648


@triton.jit
def _kth_largest(u, K: tl.constexpr):  # Triton helper: untyped
    """The K-th largest of u (int64 values in [0, 2^32)), bit by bit from the top: 32 block counts."""
    result = tl.full([], 0, tl.int64)
    for bit in tl.static_range(31, -1, -1):
        candidate = result | (1 << bit)
        result = tl.where(tl.sum((u >= candidate).to(tl.int32), 0) >= K, candidate, result)
    return result


@triton.jit
def _first_k(u, K: tl.constexpr):  # Triton helper: untyped
    """Mask of exactly the K largest of u, ties to the earlier position, and each one's place 0..K-1
    in block order."""
    threshold = _kth_largest(u, K)
    above = u > threshold
    is_tie = u == threshold
    tie_rank = tl.cumsum(is_tie.to(tl.int32), 0) - 1
    chosen = above | (is_tie & (tie_rank < K - tl.sum(above.to(tl.int32), 0)))
    return chosen, tl.cumsum(chosen.to(tl.int32), 0) - 1


@triton.jit
def top_candidates_kernel(  # Triton kernel: untyped, many arguments
    logits_ptr, vocab, keys_ptr, K: tl.constexpr, SEGMENT: tl.constexpr
):
    """Row r, segment s: the keys (_pack order) of the K best entries of logits[r, s·SEGMENT:(s+1)·SEGMENT],
    in id order; entries past the vocabulary fill up with the lowest key. The row's top K are among
    its segments' (top_k_kernel picks them)."""
    row, segment = tl.program_id(0), tl.program_id(1)
    ids = segment * SEGMENT + tl.arange(0, SEGMENT)
    is_id = ids < vocab
    values = tl.load(logits_ptr + row * vocab + ids, mask=is_id, other=0.0)
    keys = tl.where(is_id, _pack(values, ids, vocab), LOWEST_KEY)
    chosen, place = _first_k(_value_rank(keys), K)  # by value; ties to the smaller id, as _pack
    tl.store(keys_ptr + (row * tl.num_programs(1) + segment) * K + place, keys, mask=chosen)


@triton.jit
def top_k_kernel(  # Triton kernel: untyped, many arguments
    keys_ptr, n_keys, logits_ptr, vocab, values_ptr, ids_ptr, K: tl.constexpr, BLOCK: tl.constexpr
):
    """Row r: its K best (value, id) from its segments' candidate keys, best first (ties: smaller id),
    as torch.topk(K) gives them up to the order of ties. ids_ptr doubles as scratch for the sort."""
    row = tl.program_id(0)
    slots = tl.arange(0, BLOCK)
    keys = tl.load(keys_ptr + row * n_keys + slots, mask=slots < n_keys, other=LOWEST_KEY)
    # Candidates lie in id order, so "ties to the earlier position" keeps the larger keys.
    chosen, place = _first_k(_value_rank(keys), K)
    tl.store(ids_ptr + row * K + place, keys, mask=chosen)
    tl.debug_barrier()  # the chosen keys, stored by many threads, are all in the scratch before it is read
    rank = tl.arange(0, K)
    best = tl.sort(tl.load(ids_ptr + row * K + rank), descending=True)
    ids = vocab - 1 - (best & 0xFFFFFFFF)
    values = tl.load(logits_ptr + row * vocab + ids)
    tl.debug_barrier()  # every thread has read the scratch before any overwrites it
    tl.store(values_ptr + row * K + rank, values)
    tl.store(ids_ptr + row * K + rank, ids)


@triton.jit
def segment_best_kernel(  # Triton kernel: untyped, many arguments
    logits_ptr, vocab, best_ptr, SEGMENT: tl.constexpr, M: tl.constexpr
):
    """Row r, segment s: the keys of the M best entries of logits[r, s·SEGMENT:(s+1)·SEGMENT], best
    first; the lowest key for missing entries past the vocabulary."""
    row, segment = tl.program_id(0), tl.program_id(1)
    ids = segment * SEGMENT + tl.arange(0, SEGMENT)
    is_id = ids < vocab
    values = tl.load(logits_ptr + row * vocab + ids, mask=is_id, other=0.0)
    keys = tl.where(is_id, _pack(values, ids, vocab), LOWEST_KEY)
    best = best_ptr + (row * tl.num_programs(1) + segment) * M
    for place in tl.static_range(M):
        top = tl.max(keys, 0)
        tl.store(best + place, top)
        keys = tl.where(keys == top, LOWEST_KEY, keys)  # keys are unique: this drops exactly one


@triton.jit
def select_kernel(  # Triton kernel: untyped, many arguments
    logits_ptr, vocab, best_ptr, n_best, keys_ptr, counts_ptr,
    K: tl.constexpr, CAP: tl.constexpr, BLOCK_BEST: tl.constexpr, CHUNK: tl.constexpr,
):  # fmt: skip
    """Row r: into keys[r, :CAP], in id order, the keys of its entries whose value is at least the K-th
    best of its segments' best keys (n_best of them, at least K: K distinct entries of the row, so their
    K-th best value is at most the row's); the lowest key after them. counts[r] = how many qualified.
    When more than CAP qualify, keys[r] gets exactly the row's K best instead (_keep_exact_k)."""
    row = tl.program_id(0).to(tl.int64)
    slots = tl.arange(0, BLOCK_BEST)
    best = tl.load(best_ptr + row * n_best + slots, mask=slots < n_best, other=LOWEST_KEY)
    bound = _kth_largest(_value_rank(best), K)
    logits, out = logits_ptr + row * vocab, keys_ptr + row * CAP
    count = tl.full([], 0, tl.int32)
    start = 0
    while start < vocab:
        is_id, keys, u = _row_chunk(logits, start, vocab, CHUNK)
        is_kept = is_id & (u >= bound)
        place = count + tl.cumsum(is_kept.to(tl.int32), 0) - 1
        tl.store(out + place, keys, mask=is_kept & (place < CAP))
        count += tl.sum(is_kept.to(tl.int32), 0)
        start += CHUNK
    kept = count
    if count > CAP:
        kept = _keep_exact_k(logits, vocab, out, K, CHUNK)
    rank = tl.arange(0, CAP)
    tl.store(out + rank, tl.full([CAP], LOWEST_KEY, tl.int64), mask=rank >= kept)
    tl.store(counts_ptr + row, count)


@triton.jit
def _keep_exact_k(logits, vocab, out, K: tl.constexpr, CHUNK: tl.constexpr):  # Triton helper: untyped
    """Store at `out`, in id order, the keys of exactly the K best entries of the row at `logits` (ties to
    the smaller id), found by _kth_largest's bitwise search over the whole row, chunk by chunk; return K."""
    threshold = tl.full([], 0, tl.int64)
    for bit in tl.static_range(31, -1, -1):
        candidate = threshold | (1 << bit)
        at_least = tl.full([], 0, tl.int32)
        start = 0
        while start < vocab:
            is_id, _, u = _row_chunk(logits, start, vocab, CHUNK)
            at_least += tl.sum((is_id & (u >= candidate)).to(tl.int32), 0)
            start += CHUNK
        threshold = tl.where(at_least >= K, candidate, threshold)
    above = tl.full([], 0, tl.int32)
    start = 0
    while start < vocab:
        is_id, _, u = _row_chunk(logits, start, vocab, CHUNK)
        above += tl.sum((is_id & (u > threshold)).to(tl.int32), 0)
        start += CHUNK
    kept = tl.full([], 0, tl.int32)
    ties = tl.full([], 0, tl.int32)
    start = 0
    while start < vocab:
        is_id, keys, u = _row_chunk(logits, start, vocab, CHUNK)
        is_tie = is_id & (u == threshold)
        tie_rank = ties + tl.cumsum(is_tie.to(tl.int32), 0) - 1
        is_kept = (is_id & (u > threshold)) | (is_tie & (tie_rank < K - above))
        tl.store(out + kept + tl.cumsum(is_kept.to(tl.int32), 0) - 1, keys, mask=is_kept)
        kept += tl.sum(is_kept.to(tl.int32), 0)
        ties += tl.sum(is_tie.to(tl.int32), 0)
        start += CHUNK
    return kept


@triton.jit
def _row_chunk(logits, start, vocab, CHUNK: tl.constexpr):  # Triton helper: untyped
    """Entries [start, start + CHUNK) of the row at `logits`: (whether each is an id, its key, its key's
    value rank)."""
    ids = start + tl.arange(0, CHUNK)
    is_id = ids < vocab
    keys = _pack(tl.load(logits + ids, mask=is_id, other=0.0), ids, vocab)
    return is_id, keys, _value_rank(keys)
