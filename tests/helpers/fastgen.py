"""Driving BatchedGPT2Engine in tests: jobs, prompts, sampling settings, and running it until it drains."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch

from model.engine import EngineJob, EngineResult
from model.fastgen.engine import BatchedGPT2Engine
from model.sampling import SamplingParams

EOS_ID = 50256
FAR_DEADLINE = float("inf")
GREEDY = SamplingParams(max_new_tokens=16, temperature=0.0, repetition_penalty=1.0, no_repeat_ngram_size=0)


def random_prompt(length: int, seed: int) -> tuple[int, ...]:
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randint(0, EOS_ID, (length,), generator=generator).tolist())


def job(
    job_id: int,
    prompt: tuple[int, ...],
    params: SamplingParams = GREEDY,
    stop: frozenset[int] = frozenset(),
    deadline: float = FAR_DEADLINE,
) -> EngineJob:
    return EngineJob(job_id, prompt, params, deadline, stop)


def drain(
    engine: BatchedGPT2Engine, results: dict[int, EngineResult] | None = None
) -> dict[int, EngineResult]:
    results = {} if results is None else results
    for _ in range(10_000):
        if not engine.has_work():
            return results
        results.update((r.job_id, r) for r in engine.step())
    raise AssertionError("the engine never drained")


def make_engine(model: Any, **kwargs: Any) -> BatchedGPT2Engine:
    return BatchedGPT2Engine(model, SimpleNamespace(eos_token_id=EOS_ID), **kwargs)


def sampled(seed: int | None, **overrides: Any) -> SamplingParams:
    settings: dict[str, Any] = {"max_new_tokens": 12, "temperature": 1.0, "top_k": 50, "top_p": 0.95}
    return SamplingParams(seed=seed, **(settings | overrides))
