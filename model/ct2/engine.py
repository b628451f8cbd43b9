"""CT2Engine: a DecodeEngine on `ctranslate2.Generator`, the CPU engine.

How replies are scheduled: each `step()` makes one `generate_batch` call for the oldest admitted job and
every other admitted job it can share a call with (the same sampling settings, stop ids and prompt length,
at most `max_batch_size` of them), and returns them all finished. Jobs with other settings or other prompt
lengths wait in the engine for later steps, oldest first, so no reply waits behind more than the calls
admitted before it; each call is bounded by its max_new_tokens and by every job's own time limit, which
the per-token callback checks (returning True ends that row alone). Prompts of different lengths never
share a call: CTranslate2 feeds a batch's longer prompts' extra tokens through its decoding loop, which
(measured with ctranslate2 4.8.5) both costs a step per token and gave tokens unlike Hugging Face's.

Every reply setting is honoured: temperature, top-k, top-p, repetition penalty and no-repeat n-grams are
CTranslate2's own options (greedy tokens equal Hugging Face `generate`'s in float32, see the tests); the
turn-ending stop ids are its end tokens; a "Name:" speaker tag (tokenizers without a newline) is caught
by the callback on the decoded text. A job with a fixed seed runs through HFGenerateEngine on the same
weights: CTranslate2's random generators live in its own threads, and reseeding them between calls did
not reproduce a sample (measured), so only the reference engine can honour a seed.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any

from model.ct2.convert import MODEL_FILE, converted_model
from model.engine import EngineJob, EngineResult
from model.hf_engine import HFGenerateEngine
from model.loading import ModelLoadError
from model.replies import cut_at_speaker_tag
from model.sampling import SamplingParams

if TYPE_CHECKING:
    from model.loading import LoadedModel

log = logging.getLogger(__name__)

CT2_MAX_BATCH = 32  # rows of one generate_batch call: wide enough for a burst, short enough to wait behind


def _group_key(job: EngineJob) -> tuple[Any, ...]:
    """Jobs with equal keys can share one generate_batch call."""
    return (job.params, len(job.prompt_ids), job.stop_token_ids, job.stop_speakers)


def sampling_options(params: SamplingParams) -> dict[str, Any]:
    """generate_batch's options for these settings (greedy: the top-1 token, as HF's do_sample=False)."""
    options: dict[str, Any] = {
        "max_length": params.max_new_tokens,  # new tokens only: the prompt is not in the result
        "repetition_penalty": params.repetition_penalty,
        "no_repeat_ngram_size": params.no_repeat_ngram_size,
    }
    if params.is_greedy:
        return options | {"sampling_topk": 1, "sampling_temperature": 1.0, "sampling_topp": 1.0}
    return options | {
        "sampling_topk": params.top_k,  # 0 samples from the whole vocabulary, as top_k=0 does in HF
        "sampling_topp": params.top_p,
        "sampling_temperature": params.temperature,
    }


class _RowWatch:
    """The per-token callback of one call: ends a row at its job's deadline or at a leaked speaker tag."""

    def __init__(self, jobs: list[EngineJob], tokenizer: Any) -> None:
        self.jobs = jobs
        self.tokenizer = tokenizer
        self.tokens: list[list[int]] = [[] for _ in jobs]
        self.is_past_deadline = [False] * len(jobs)
        self.has_tag = [False] * len(jobs)

    def __call__(self, step: Any) -> bool:
        row, job = step.batch_id, self.jobs[step.batch_id]
        self.tokens[row].append(step.token_id)
        if time.monotonic() > job.deadline:
            self.is_past_deadline[row] = True
            return True
        if job.stop_speakers:
            # Decoding the whole continuation each token is quadratic, but replies are tens of tokens long.
            text = self.tokenizer.decode(self.tokens[row], skip_special_tokens=True)
            self.has_tag[row] = cut_at_speaker_tag(text, job.stop_speakers) != text
        return self.has_tag[row]


class CT2Engine:
    """A DecodeEngine that runs one generate_batch call per step over the oldest job's group."""

    def __init__(
        self,
        generator: Any,
        vocabulary: list[str],
        loaded: LoadedModel,
        description: str,
        max_batch_size: int = CT2_MAX_BATCH,
    ) -> None:
        self._generator = generator
        self._vocabulary = vocabulary  # CTranslate2 takes token strings: id i is vocabulary[i]
        self._tokenizer = loaded.tokenizer
        self._eos_id: int | None = loaded.tokenizer.eos_token_id
        self._seeded = HFGenerateEngine(loaded.model, loaded.tokenizer)
        self.description = description
        self.max_batch_size = max_batch_size
        self._jobs: deque[EngineJob] = deque()

    def can_admit(self) -> bool:
        """Room for one more job in the engine (the rest wait in the worker's queue)."""
        return len(self._jobs) < self.max_batch_size

    def admit(self, job: EngineJob) -> None:
        """Add a job; it runs in a later step, with the jobs it can share a call with."""
        assert job.prompt_ids, "an empty prompt has nothing to condition on"
        self._jobs.append(job)

    def has_work(self) -> bool:
        """Whether a job is waiting to run."""
        return bool(self._jobs)

    def step(self) -> list[EngineResult]:
        """Run the oldest job's group to its end; if this raises, the jobs stay admitted for abort_all()."""
        oldest = self._jobs[0]
        if oldest.params.seed is not None:
            results = self._run_seeded(oldest)
            group = [oldest]
        else:
            key = _group_key(oldest)
            group = [job for job in self._jobs if _group_key(job) == key][: self.max_batch_size]
            results = self._generate(group)
        finished = {job.job_id for job in group}
        self._jobs = deque(job for job in self._jobs if job.job_id not in finished)
        return results

    def abort_all(self) -> list[int]:
        """Drop every admitted job and return their ids."""
        ids = [job.job_id for job in self._jobs]
        self._jobs.clear()
        self._seeded.abort_all()
        return ids

    def _run_seeded(self, job: EngineJob) -> list[EngineResult]:
        self._seeded.admit(job)
        try:
            return self._seeded.step()
        finally:
            self._seeded.abort_all()  # after a failure the job is still in self._jobs

    def _generate(self, group: list[EngineJob]) -> list[EngineResult]:
        first = group[0]
        watch = _RowWatch(group, self._tokenizer)
        outputs = self._generator.generate_batch(
            [[self._vocabulary[i] for i in job.prompt_ids] for job in group],
            include_prompt_in_result=False,
            end_token=sorted(first.stop_token_ids),  # [] stops at nothing: max_new_tokens ends the reply
            return_end_token=True,  # to tell end-of-text from a turn end, as the other engines do
            callback=watch,
            **sampling_options(first.params),
        )
        return [
            self._result(job, list(output.sequences_ids[0]), watch.is_past_deadline[row], watch.has_tag[row])
            for row, (job, output) in enumerate(zip(group, outputs, strict=True))
        ]

    def _result(
        self, job: EngineJob, new_ids: list[int], is_past_deadline: bool, has_tag: bool
    ) -> EngineResult:
        if new_ids and new_ids[-1] in job.stop_token_ids:
            reason = "eos" if new_ids[-1] == self._eos_id else "turn_end"
            return EngineResult(job.job_id, tuple(new_ids[:-1]), reason)
        if has_tag:  # the tag stays in the tokens; clean_reply cuts the text there
            return EngineResult(job.job_id, tuple(new_ids), "turn_end")
        if is_past_deadline and len(new_ids) < job.params.max_new_tokens:
            return EngineResult(job.job_id, tuple(new_ids), "time_limit")
        return EngineResult(job.job_id, tuple(new_ids), "max_tokens")


def build_ct2_engine(
    loaded: LoadedModel, cache_dir: Path, compute_type: str, threads: int, max_batch_size: int = CT2_MAX_BATCH
) -> CT2Engine:
    """Convert `loaded` (or take its cached conversion) and start a Generator on `threads` CPU threads."""
    path = converted_model(loaded.model, loaded.tokenizer, cache_dir, compute_type)
    try:
        generator = _generator(path, compute_type, threads)
    except RuntimeError as exc:  # a cached conversion that cannot be read (a disk fault): convert again
        log.warning("the cached CTranslate2 conversion %s cannot be loaded (%s): converting again", path, exc)
        shutil.rmtree(path, ignore_errors=True)
        path = converted_model(loaded.model, loaded.tokenizer, cache_dir, compute_type)
        try:
            generator = _generator(path, compute_type, threads)
        except RuntimeError as again:
            message = f"CTranslate2 cannot load the converted model ({again}); set BOT_ENGINE=hf to serve it"
            raise ModelLoadError(message, step="convert") from again
    vocabulary = json.loads((path / "vocabulary.json").read_text(encoding="utf-8"))
    description = f"ctranslate2 {compute_type} ({threads} CPU thread{'s' if threads != 1 else ''})"
    return CT2Engine(generator, vocabulary, loaded, description, max_batch_size)


def _generator(path: Path, compute_type: str, threads: int) -> Any:
    import ctranslate2

    assert (path / MODEL_FILE).is_file(), path
    # One call at a time (inter_threads=1) on `threads` cores: the engine decides what runs together.
    return ctranslate2.Generator(
        str(path), device="cpu", compute_type=compute_type, inter_threads=1, intra_threads=threads
    )
