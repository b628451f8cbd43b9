"""Triton kernels that rank a batch's logits: the argmax's chunk maxima and the top K (fused_step.py
launches them; step_kernels.py's sample_append_kernel takes their output).

Loops over a row are while loops: Triton's interpreter (the tests) takes no argument as a range() bound.
Entries are compared as int64 keys (`_pack`): the float32 value in the high half, in value order, and the
id, reversed, in the low half, so a larger key is a larger value or, on a tie, a smaller id (argmax's and a
stable sort's tie-break). Each kernel works on one row, or one row × vocabulary segment or chunk, in
float32.

The top K of a row (best first, as torch.topk gives them) take four kernels: segment_best_kernel takes each
segment's best few keys; bound_kernel takes the K-th best of those, which bounds the row's K-th best value
from below; select_kernel, a program per chunk of the row, keeps every entry at or above the bound (a few
hundred); selected_top_k_kernel sorts those and gives the K best. A trained model's best entries crowd into
few segments (frequent tokens have small ids), so each segment gives several keys. Many ties at the bound, or
the best crowded into a very few segments, can still qualify more than it keeps: then the row's exact K-th
best value comes from a radix select over the whole row (_exact_kth_rank).
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
def segment_best_kernel(  # Triton kernel: untyped, many arguments
    logits_ptr, vocab, best_ptr, SEGMENT: tl.constexpr, M: tl.constexpr
):
    """Row r, segment s: the keys of the M best entries of logits[r, s·SEGMENT:(s+1)·SEGMENT], best
    first (the lowest key for missing entries past the vocabulary)."""
    row, segment = tl.program_id(0).to(tl.int64), tl.program_id(1)
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
def bound_kernel(  # Triton kernel: untyped, many arguments
    best_ptr, n_best, bounds_ptr, counts_ptr, K: tl.constexpr, BLOCK_BEST: tl.constexpr
):
    """Row r: bounds[r] = the value rank of the K-th best of its segments' best keys (n_best of them),
    which is at most the row's K-th best value: the keys are distinct entries of the row, or padding that
    ranks lowest. counts[r] = 0, for select_kernel."""
    row = tl.program_id(0).to(tl.int64)
    slots = tl.arange(0, BLOCK_BEST)
    best = tl.load(best_ptr + row * n_best + slots, mask=slots < n_best, other=LOWEST_KEY)
    tl.store(bounds_ptr + row, _kth_largest(_value_rank(best), K))
    tl.store(counts_ptr + row, 0)


@triton.jit
def select_kernel(  # Triton kernel: untyped, many arguments
    logits_ptr, vocab, bounds_ptr, keys_ptr, counts_ptr, CAP: tl.constexpr, CHUNK: tl.constexpr
):
    """Row r, chunk c: append to keys[r, :CAP] (in no particular order) the keys of the chunk's entries
    whose value rank reaches bounds[r]; counts[r] counts every entry that qualified, also those past CAP,
    which are not stored."""
    row, chunk = tl.program_id(0).to(tl.int64), tl.program_id(1)
    is_id, keys, u = _row_chunk(logits_ptr + row * vocab, chunk * CHUNK, vocab, CHUNK)
    is_kept = is_id & (u >= tl.load(bounds_ptr + row))
    first = tl.atomic_add(counts_ptr + row, tl.sum(is_kept.to(tl.int32), 0))  # this chunk's places
    place = first + tl.cumsum(is_kept.to(tl.int32), 0) - 1
    tl.store(keys_ptr + row * CAP + place, keys, mask=is_kept & (place < CAP))


@triton.jit
def selected_top_k_kernel(  # Triton kernel: untyped, many arguments
    logits_ptr, vocab, keys_ptr, counts_ptr, values_ptr, ids_ptr,
    K: tl.constexpr, CAP: tl.constexpr, CHUNK: tl.constexpr,
):  # fmt: skip
    """Row r: its K best (value, id), best first (ties: smaller id), from the keys select_kernel kept;
    when more than CAP qualified there, from exactly the row's K best (_keep_exact_k) instead."""
    row = tl.program_id(0).to(tl.int64)
    logits, keys = logits_ptr + row * vocab, keys_ptr + row * CAP
    count = tl.load(counts_ptr + row)
    if count > CAP:  # many ties at the bound, or the best crowded into a few segments
        count = _keep_exact_k(logits, vocab, keys, K, CHUNK)
        tl.debug_barrier()  # every thread has stored its keys before any loads them
    slots = tl.arange(0, CAP)
    ordered = tl.sort(tl.load(keys + slots, mask=slots < count, other=LOWEST_KEY), descending=True)
    tl.debug_barrier()  # every thread has loaded the keys before any overwrites them
    tl.store(keys + slots, ordered)
    tl.debug_barrier()  # the sorted keys, stored by many threads, are all there before the best K are read
    rank = tl.arange(0, K)
    ids = vocab - 1 - (tl.load(keys + rank) & 0xFFFFFFFF)
    tl.store(values_ptr + row * K + rank, tl.load(logits + ids))
    tl.store(ids_ptr + row * K + rank, ids)


@triton.jit
def _keep_exact_k(logits, vocab, out, K: tl.constexpr, CHUNK: tl.constexpr):  # Triton helper: untyped
    """Store at `out`, in id order, the keys of exactly the K best entries of the row at `logits` (ties to
    the smaller id); return K. Every entry above the K-th best value goes in, then the first ties."""
    threshold, above = _exact_kth_rank(logits, vocab, K, CHUNK)
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
def _exact_kth_rank(logits, vocab, K: tl.constexpr, CHUNK: tl.constexpr):  # Triton helper: untyped
    """(the value rank of the K-th best entry of the row at `logits`, how many entries rank above it): a
    radix select from the top, 8 bits of the rank a pass over the whole row (4 passes, not 32 of a bitwise
    search). Each pass counts, among the entries that share the digits found so far, each next digit."""
    digits = tl.arange(0, 256)
    prefix = tl.full([], 0, tl.int64)
    above = tl.full([], 0, tl.int32)
    for shift in tl.static_range(24, -8, -8):
        counts = _digit_counts(logits, vocab, prefix, shift, CHUNK)
        reaching = above + tl.cumsum(counts, 0, reverse=True)  # entries ranking at or above each digit
        digit = tl.max(tl.where(reaching >= K, digits, 0), 0)
        above += tl.sum(tl.where(digits > digit, counts, 0), 0)
        prefix = (prefix << 8) | digit
    return prefix, above


@triton.jit
def _digit_counts(logits, vocab, prefix, shift: tl.constexpr, CHUNK: tl.constexpr):  # Triton helper: untyped
    """[256]: how many entries of the row at `logits` whose value rank's bits above `shift + 8` are `prefix`
    have each 8-bit digit at `shift`."""
    counts = tl.zeros([256], dtype=tl.int32)
    start = 0
    while start < vocab:
        is_id, _, u = _row_chunk(logits, start, vocab, CHUNK)
        is_match = is_id & ((u >> (shift + 8)) == prefix)
        counts += tl.histogram(((u >> shift) & 255).to(tl.int32), 256, mask=is_match)
        start += CHUNK
    return counts


@triton.jit
def _row_chunk(logits, start, vocab, CHUNK: tl.constexpr):  # Triton helper: untyped
    """Entries [start, start + CHUNK) of the row at `logits`: (whether each is an id, its key, its key's
    value rank)."""
    ids = start + tl.arange(0, CHUNK)
    is_id = ids < vocab
    keys = _pack(tl.load(logits + ids, mask=is_id, other=0.0), ids, vocab)
    return is_id, keys, _value_rank(keys)
