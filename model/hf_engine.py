"""HFGenerateEngine: the reference DecodeEngine on Hugging Face `generate`, one request at a time.

It works for any causal LM on any device, runs one whole `generate` per step, and stops at end-of-text, at a
newline (the model starting the next speaker's turn, see docs/ARCHITECTURE.md), at a leaked "Name:" tag for
tokenizers with no newline, at max_new_tokens, or at the job's deadline (checked every token).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import deque
from collections.abc import Iterator
from typing import Any, cast

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from model.engine import EngineJob, EngineResult
from model.replies import cut_at_speaker_tag
from model.sampling import SamplingParams

log = logging.getLogger(__name__)


class _DeadlineCriteria(StoppingCriteria):
    """Stops generation at the first step that ends after `deadline` (a time.monotonic() value)."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.has_fired = False

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        self.has_fired = self.has_fired or time.monotonic() > self.deadline
        is_done = torch.full((input_ids.shape[0],), self.has_fired, dtype=torch.bool, device=input_ids.device)
        return cast(torch.BoolTensor, is_done)


class _SpeakerTagCriteria(StoppingCriteria):
    """Stops once the new text starts another speaker's turn ("… Name:"), for tokenizers with no newline."""

    def __init__(self, tokenizer: Any, prompt_length: int, speakers: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        self.prompt_length = prompt_length
        self.speakers = speakers
        self.has_fired = False

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        # Decoding the whole continuation each step is quadratic, but replies are tens of tokens long.
        text = self.tokenizer.decode(input_ids[0, self.prompt_length :], skip_special_tokens=True)
        self.has_fired = self.has_fired or cut_at_speaker_tag(text, self.speakers) != text
        is_done = torch.full((input_ids.shape[0],), self.has_fired, dtype=torch.bool, device=input_ids.device)
        return cast(torch.BoolTensor, is_done)


def generation_config(params: SamplingParams, stop_ids: frozenset[int], pad_id: int) -> GenerationConfig:
    """A GenerationConfig built only from SamplingParams (every knob explicit, no logits processors)."""
    # Greedy leaves top_k unset: HF warns about any explicit top_k when do_sample is off.
    sampling: dict[str, Any] = {"do_sample": False, "temperature": 1.0, "top_p": 1.0}
    if not params.is_greedy:
        sampling = {"do_sample": True, "temperature": params.temperature, "top_p": params.top_p}
        sampling["top_k"] = params.top_k  # 0 disables top-k filtering
    return GenerationConfig(
        max_new_tokens=params.max_new_tokens,
        repetition_penalty=params.repetition_penalty,
        no_repeat_ngram_size=params.no_repeat_ngram_size,
        eos_token_id=sorted(stop_ids) or None,
        pad_token_id=pad_id,
        **sampling,
    )


@contextlib.contextmanager
def _seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """Seed the RNGs for one job without disturbing the global random state of other jobs."""
    if seed is None:
        yield
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


class HFGenerateEngine:
    """A DecodeEngine of batch size 1: each step runs one whole `model.generate` for the oldest job."""

    def __init__(self, model: Any, tokenizer: Any) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.eos_id: int | None = tokenizer.eos_token_id
        # GPT-2 has no pad token; generate wants one for rows that finish early. With batch size 1 no
        # row is ever padded, so end-of-text serves (the usual GPT-2 convention).
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        self.pad_id: int = pad if pad is not None else 0
        self._jobs: deque[EngineJob] = deque()

    def can_admit(self) -> bool:
        """One job at a time: the rest wait in the worker's queue, where they count as queued."""
        return not self._jobs

    def admit(self, job: EngineJob) -> None:
        """Add a job; it runs at the next step."""
        assert job.prompt_ids, "an empty prompt has nothing to condition on"
        self._jobs.append(job)

    def has_work(self) -> bool:
        """Whether a job is waiting to run."""
        return bool(self._jobs)

    def step(self) -> list[EngineResult]:
        """Generate the oldest job to its end; if this raises, the job stays admitted for abort_all()."""
        result = self._generate(self._jobs[0])
        self._jobs.popleft()
        return [result]

    def abort_all(self) -> list[int]:
        """Drop every admitted job and return their ids."""
        ids = [job.job_id for job in self._jobs]
        self._jobs.clear()
        return ids

    @torch.inference_mode()
    def _generate(self, job: EngineJob) -> EngineResult:
        device = self.model.device
        input_ids = torch.tensor([job.prompt_ids], dtype=torch.long, device=device)  # (1, T)
        deadline = _DeadlineCriteria(job.deadline)
        speaker_tag = _SpeakerTagCriteria(self.tokenizer, input_ids.shape[1], job.stop_speakers)
        criteria = [deadline, speaker_tag] if job.stop_speakers else [deadline]
        with _seeded(job.params.seed, device):
            output = self.model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                generation_config=generation_config(job.params, job.stop_token_ids, self.pad_id),
                stopping_criteria=StoppingCriteriaList(criteria),
            )
        new_ids = output[0, input_ids.shape[1] :].tolist()  # (T_new,)
        return self._result(job, new_ids, deadline.has_fired, speaker_tag.has_fired)

    def _result(
        self, job: EngineJob, new_ids: list[int], is_past_deadline: bool, has_tag: bool = False
    ) -> EngineResult:
        if new_ids and new_ids[-1] in job.stop_token_ids:
            reason = "eos" if new_ids[-1] == self.eos_id else "turn_end"
            return EngineResult(job.job_id, tuple(new_ids[:-1]), reason)
        if has_tag:  # the tag stays in the tokens; clean_reply cuts the text there
            return EngineResult(job.job_id, tuple(new_ids), "turn_end")
        if is_past_deadline and len(new_ids) < job.params.max_new_tokens:
            return EngineResult(job.job_id, tuple(new_ids), "time_limit")
        return EngineResult(job.job_id, tuple(new_ids), "max_tokens")
