"""CT2Engine: a DecodeEngine on `ctranslate2.Generator`, the CPU engine.

How replies are scheduled: jobs that can share a `generate_batch` call are a group (the same sampling
settings, stop ids and prompt length, at most `max_batch_size` of them). Each `step()` runs the oldest
admitted job's group, and the next groups in age order, as parallel calls, one per CTranslate2 worker
(`parallel_calls`); a worker left idle takes half of the largest call, so two cores decode a burst of one
group as two calls. The step returns them all finished. Later groups wait in the engine, oldest first, so
no reply waits behind more than the calls admitted before it; each call is bounded by its max_new_tokens
and by every job's own time limit, which the per-token callback checks (returning True ends that row
alone). Prompts of different lengths never share a call: CTranslate2 feeds a batch's longer prompts'
extra tokens through its decoding loop, which (measured with ctranslate2 4.8.5) both costs a step per
token and gave tokens unlike Hugging Face's.

Threads: a small model (the starter, 8×256) runs faster on one thread per call than on two (the
per-step matrices are too small to split: 169 against 249–276 ms for one starter reply on the 2-core
box), so its cores become parallel calls; a wide model (GPT-2 124M) splits each call over every core.

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
# Models narrower than this decode fastest on one thread per call (BENCHMARKS.md, "CTranslate2").
ONE_THREAD_PER_CALL_BELOW_WIDTH = 512


def thread_layout(threads: int, width: int) -> tuple[int, int]:
    """(parallel calls, threads per call) for `threads` cores and a model of hidden size `width`."""
    return (threads, 1) if width < ONE_THREAD_PER_CALL_BELOW_WIDTH else (1, threads)


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
        parallel_calls: int = 1,
    ) -> None:
        self._generator = generator
        self._vocabulary = vocabulary  # CTranslate2 takes token strings: id i is vocabulary[i]
        self._tokenizer = loaded.tokenizer
        self._eos_id: int | None = loaded.tokenizer.eos_token_id
        self._seeded = HFGenerateEngine(loaded.model, loaded.tokenizer)
        self.description = description
        self.max_batch_size = max_batch_size
        self.parallel_calls = parallel_calls  # the Generator's inter_threads: calls that run at once
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
        """Run the next calls to their end; if this raises, the jobs stay admitted for abort_all()."""
        oldest = self._jobs[0]
        if oldest.params.seed is not None:
            calls = [[oldest]]
            results = self._run_seeded(oldest)
        else:
            calls = self._plan()
            results = self._generate(calls)
        finished = {job.job_id for call in calls for job in call}
        self._jobs = deque(job for job in self._jobs if job.job_id not in finished)
        return results

    def _plan(self) -> list[list[EngineJob]]:
        """The calls of one step: groups in the age order of their oldest job, one per parallel call, then
        halves of the largest call while a worker would be idle. Seeded jobs wait to be the oldest."""
        calls: list[list[EngineJob]] = []
        planned: set[int] = set()
        for job in self._jobs:
            if len(calls) == self.parallel_calls:
                break
            if job.job_id in planned or job.params.seed is not None:
                continue
            key = _group_key(job)
            group = [j for j in self._jobs if j.job_id not in planned and _group_key(j) == key]
            calls.append(group[: self.max_batch_size])
            planned.update(j.job_id for j in calls[-1])
        while len(calls) < self.parallel_calls and max(map(len, calls)) > 1:
            largest = max(calls, key=len)
            calls.remove(largest)
            middle = (len(largest) + 1) // 2
            calls += [largest[:middle], largest[middle:]]
        return calls

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

    def _generate(self, calls: list[list[EngineJob]]) -> list[EngineResult]:
        """Start every call (each on its own CTranslate2 worker), then wait for them all."""
        started = [(group, *self._start(group)) for group in calls]
        results = []
        for group, watch, outputs in started:
            for row, (job, output) in enumerate(zip(group, outputs, strict=True)):
                new_ids = list(output.result().sequences_ids[0])
                results.append(self._result(job, new_ids, watch.is_past_deadline[row], watch.has_tag[row]))
        return results

    def _start(self, group: list[EngineJob]) -> tuple[_RowWatch, list[Any]]:
        """One asynchronous generate_batch call: its row watch and its rows' pending results."""
        first = group[0]
        watch = _RowWatch(group, self._tokenizer)
        outputs = self._generator.generate_batch(
            [[self._vocabulary[i] for i in job.prompt_ids] for job in group],
            asynchronous=True,
            include_prompt_in_result=False,
            end_token=sorted(first.stop_token_ids),  # [] stops at nothing: max_new_tokens ends the reply
            return_end_token=True,  # to tell end-of-text from a turn end, as the other engines do
            callback=watch,
            **sampling_options(first.params),
        )
        return watch, outputs

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
    calls, threads_per_call = thread_layout(threads, loaded.model.config.n_embd)
    try:
        generator = _generator(path, compute_type, calls, threads_per_call)
    except RuntimeError as exc:  # a cached conversion that cannot be read (a disk fault): convert again
        log.warning("the cached CTranslate2 conversion %s cannot be loaded (%s): converting again", path, exc)
        shutil.rmtree(path, ignore_errors=True)
        path = converted_model(loaded.model, loaded.tokenizer, cache_dir, compute_type)
        try:
            generator = _generator(path, compute_type, calls, threads_per_call)
        except RuntimeError as again:
            message = f"CTranslate2 cannot load the converted model ({again}); set BOT_ENGINE=hf to serve it"
            raise ModelLoadError(message, step="convert") from again
    vocabulary = json.loads((path / "vocabulary.json").read_text(encoding="utf-8"))
    description = f"ctranslate2 {compute_type} ({describe_threads(calls, threads_per_call)})"
    return CT2Engine(generator, vocabulary, loaded, description, max_batch_size, parallel_calls=calls)


def describe_threads(calls: int, threads_per_call: int) -> str:
    """ "2 CPU threads", or "2 parallel calls × 1 CPU thread" where the cores run calls side by side."""
    plural = "s" if threads_per_call != 1 else ""
    if calls == 1:
        return f"{threads_per_call} CPU thread{plural}"
    return f"{calls} parallel calls × {threads_per_call} CPU thread{plural}"


def _generator(path: Path, compute_type: str, calls: int, threads_per_call: int) -> Any:
    import ctranslate2

    assert (path / MODEL_FILE).is_file(), path
    # `calls` workers (inter_threads) of `threads_per_call` cores each: the engine decides what runs where.
    return ctranslate2.Generator(
        str(path),
        device="cpu",
        compute_type=compute_type,
        inter_threads=calls,
        intra_threads=threads_per_call,
    )
