"""The decode-engine protocol: what the worker thread drives to turn prompt ids into new token ids.

The worker owns queueing, prompt building, reply cleanup, reloads and error policy; an engine only
runs token generation. Two engines implement this protocol:
- `model.hf_engine.HFGenerateEngine`: one request at a time through Hugging Face `generate` (any
  causal LM, any device; the reference for correctness);
- `model.fastgen.engine.BatchedGPT2Engine`: continuous batching with a preallocated KV cache (GPT-2
  architecture), CUDA graphs on the GPU.
Every method is called from the worker thread only, so engines need no locks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from model.sampling import SamplingParams


@dataclass(frozen=True)
class EngineJob:
    """One sequence to generate. `deadline` is a time.monotonic() value checked at every step."""

    job_id: int
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    deadline: float
    stop_token_ids: frozenset[int]  # the end-of-text id plus every token that ends a turn (newlines)
    # Speaker names whose "Name:" tag in the decoded text ends the turn. Set only for tokenizers that
    # cannot encode a newline (some sentencepiece models), where the tag is the only turn boundary.
    stop_speakers: tuple[str, ...] = ()


@dataclass(frozen=True)
class EngineResult:
    """A finished job: its new token ids (stop token excluded) and why it stopped."""

    job_id: int
    token_ids: tuple[int, ...]
    stop_reason: str  # "eos" | "turn_end" | "max_tokens" | "time_limit"


class DecodeEngine(Protocol):
    """Generates tokens for admitted jobs, one unit of work per `step()`."""

    def can_admit(self) -> bool:
        """Whether another job may join now (a batched engine has a slot free)."""
        ...

    def admit(self, job: EngineJob) -> None:
        """Add a job; it starts at the next step boundary. May raise (e.g. CUDA OOM in prefill)."""
        ...

    def has_work(self) -> bool:
        """Whether any admitted job is unfinished."""
        ...

    def step(self) -> list[EngineResult]:
        """Advance all admitted jobs by one unit (a decode step, or a whole generation); return finished."""
        ...

    def abort_all(self) -> list[int]:
        """Drop every admitted job (after an error); return their ids."""
        ...
