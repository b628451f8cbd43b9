"""The host side of a prefill: the CPU tensors that ops.install_rows copies into new jobs' slots.

Built from plain Python values in a few bulk calls, never one small tensor a job: the worker thread builds
them while the GPU waits (BENCHMARKS.md, Generation). Shapes: P = jobs, T = padded prompt length,
K = the most stop ids of any job, U = random draws a job.
"""

from __future__ import annotations

import array
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from model.engine import EngineJob


@dataclass(frozen=True)
class PrefillInputs:
    """One prefill's jobs, in the order given: what install_rows writes into their slots."""

    ids: torch.Tensor  # [P, T] int64: each prompt right-padded with its own last id
    rows: torch.Tensor  # [P, 5] int64: ops' row columns (POS, GEN, MAX_NEW, TOP_K, NGRAM)
    floats: torch.Tensor  # [P, 3] float32: TEMPERATURE, TOP_P, PENALTY
    stop_index: torch.Tensor  # [P, K] int64: each job's stop ids inside the vocabulary, padded with V
    uniforms: torch.Tensor  # [P, U] float32: one random number per generated token


def prefill_inputs(jobs: Sequence[EngineJob], width: int, draws: int, vocab: int) -> PrefillInputs:
    """The inputs for `jobs`, their prompts padded to `width` ids, with `draws` random numbers each."""
    settings = [_row_settings(job) for job in jobs]
    stops = [sorted(i for i in job.stop_token_ids if 0 <= i < vocab) for job in jobs]
    stop_width = max(1, *(len(s) for s in stops))
    return PrefillInputs(
        ids=right_padded([job.prompt_ids for job in jobs], width),
        rows=torch.tensor([ints for ints, _ in settings], dtype=torch.long),
        floats=torch.tensor([floats for _, floats in settings], dtype=torch.float32),
        stop_index=torch.tensor([s + [vocab] * (stop_width - len(s)) for s in stops], dtype=torch.long),
        uniforms=uniforms(jobs, draws),
    )


def right_padded(sequences: Sequence[Sequence[int]], width: int) -> torch.Tensor:
    """[len(sequences), width] int64; each row padded with its own last id (0 for an empty row)."""
    # A flat buffer: torch.tensor of 256 nested lists of 256 ids took ~5 ms (BENCHMARKS.md, Generation).
    # Each row goes in as an array made from the tuple: half the time of extending by the tuple itself.
    flat = array.array("q")
    for sequence in sequences:
        flat.extend(array.array("q", sequence))
        flat.extend(array.array("q", (sequence[-1] if sequence else 0,)) * (width - len(sequence)))
    if not flat:
        return torch.zeros((len(sequences), width), dtype=torch.long)
    return torch.frombuffer(flat, dtype=torch.long).view(len(sequences), width)


def uniforms(jobs: Sequence[EngineJob], count: int) -> torch.Tensor:
    """[len(jobs), count]: each job's random numbers, one per generated token. Seeded jobs draw from
    their own generator, so they repeat; the others share one draw from torch's RNG (one call, not one
    a job); greedy jobs use none (zeros)."""
    params = [job.params for job in jobs]
    is_shared = any(not p.is_greedy and p.seed is None for p in params)
    drawn = torch.rand(len(jobs), count) if is_shared else torch.zeros(len(jobs), count)
    greedy_rows = [row for row, p in enumerate(params) if p.is_greedy]
    if is_shared and greedy_rows:
        drawn[greedy_rows] = 0.0
    for row, p in enumerate(params):
        if not p.is_greedy and p.seed is not None:
            drawn[row] = torch.rand(count, generator=torch.Generator().manual_seed(p.seed))
    return drawn


def _row_settings(job: EngineJob) -> tuple[list[int], list[float]]:
    p = job.params
    ints = [len(job.prompt_ids) - 1, 0, p.max_new_tokens, p.top_k, p.no_repeat_ngram_size]
    return ints, [p.temperature, p.top_p, p.repetition_penalty]
