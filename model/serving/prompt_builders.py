"""The worker's prompt builders: a small thread pool that builds jobs' prompts off the GPU thread.

Each builder thread has its own tokenizer copy (fast tokenizers are not thread-safe) and builds every job
waiting together in one Rust call; the results go back to the worker thread as BuiltPrompt records.
"""

from __future__ import annotations

import contextlib
import logging
import math
import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from model.api import GenerationFailed, ReplyRequest, too_long_error
from model.prompt import Prompt, PromptRequest, PromptTooLong, build_prompt, build_prompts
from model.serving.jobs import BuiltPrompt, GenerateJob, Serving, speaker_names

log = logging.getLogger(__name__)

# The most prompts one builder thread builds together: a 256-prompt burst then splits into a few
# batches, so both builder threads keep working (one's Python beside the other's Rust call). On 2 cores
# (scripts/bench_prompt_builders.py, 2 threads): 38–40 ms with batches of ≤ 64, 41–68 ms with ≤ 256.
MAX_PROMPT_BATCH = 64


class PromptBuilders:
    """A small thread pool that builds prompts off the GPU thread, each thread with its own tokenizer copy.

    Jobs wait in one queue; a thread takes every job waiting there (up to `max_batch`) and builds them
    together (model.prompt.build_prompts: one Rust call for the lot), so a burst costs a few calls,
    not one a job. A lone job is built at once, alone.

    Fast tokenizers must not be shared across threads ("Already borrowed"), so each thread deep-copies the
    serving tokenizer the first time it builds for a serving generation; after a reload the new one is used.
    """

    def __init__(
        self, threads: int, deliver: Callable[[list[BuiltPrompt]], None], max_batch: int = MAX_PROMPT_BATCH
    ) -> None:
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="prompt-builder")
        self._threads = threads
        self._stopping = threading.Event()
        self._waiting: queue.SimpleQueue[tuple[GenerateJob, Serving, int]] = queue.SimpleQueue()
        self._local = threading.local()
        self._deliver = deliver
        self._max_batch = max_batch

    def submit(self, jobs: Sequence[GenerateJob], serving: Serving, generation: int) -> None:
        """Build the jobs' prompts with `serving`'s tokenizer on pool threads; `deliver` gets the results."""
        for job in jobs:
            self._waiting.put((job, serving, generation))
        # A pool task per batch, up to one per thread; each builds batches until it finds the queue
        # empty, so every job put before a submit() is taken by that call's tasks or an earlier one's.
        for _ in range(min(self._threads, math.ceil(len(jobs) / self._max_batch))):
            self._executor.submit(self._build_waiting)

    def shutdown(self) -> None:
        """Drop prompts not yet started; the batches being built finish and are delivered to nobody."""
        self._stopping.set()
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _build_waiting(self) -> None:
        try:
            while not self._stopping.is_set() and (batch := self._take_waiting()):
                groups: dict[int, tuple[Serving, list[GenerateJob]]] = {}  # one unless a reload came between
                for job, serving, generation in batch:
                    groups.setdefault(generation, (serving, []))[1].append(job)
                for generation, (serving, jobs) in groups.items():
                    self._build_batch(jobs, serving, generation)
        except Exception:  # the pool would swallow it: say so (_build_batch answers every job it took)
            log.exception("a prompt builder failed")

    def _take_waiting(self) -> list[tuple[GenerateJob, Serving, int]]:
        batch: list[tuple[GenerateJob, Serving, int]] = []
        with contextlib.suppress(queue.Empty):
            while len(batch) < self._max_batch:
                batch.append(self._waiting.get_nowait())
        return batch

    def _build_batch(self, jobs: list[GenerateJob], serving: Serving, generation: int) -> None:
        try:
            tokenizer = self._tokenizer(serving, generation)
            requests = [prompt_request(job.request, serving.loaded.n_positions) for job in jobs]
            outcomes = build_prompts(tokenizer, requests)
            built = [
                built_prompt(job, generation, outcome) for job, outcome in zip(jobs, outcomes, strict=True)
            ]
        except Exception:  # a bug, not a long prompt: build them one by one, so it fails only its own job
            log.exception("building %d prompts together failed", len(jobs))
            built = [self._build_one(job, serving, generation) for job in jobs]
        self._deliver(built)

    def _build_one(self, job: GenerateJob, serving: Serving, generation: int) -> BuiltPrompt:
        # build_prompt, not build_prompts: the fallback must not go through the path that just failed.
        request = job.request
        try:
            tokenizer = self._tokenizer(serving, generation)
            prompt = build_prompt(
                tokenizer, request.persona, request.history, request.bot_name,
                request.params.max_new_tokens, serving.loaded.n_positions, facts=request.facts,
                continue_text=request.continue_text,
            )  # fmt: skip
            return built_prompt(job, generation, prompt)
        except PromptTooLong as exc:
            return built_prompt(job, generation, exc)
        except Exception as exc:
            log.exception("building a prompt failed")
            error = GenerationFailed(f"prompt building failed: {type(exc).__name__}")
            return BuiltPrompt(job, generation, None, error=error)

    def _tokenizer(self, serving: Serving, generation: int) -> Any:
        cached = getattr(self._local, "tokenizer", None)
        if cached is None or cached[0] != generation:
            self._local.tokenizer = (generation, serving.tokenizer_copy())
        return self._local.tokenizer[1]


def prompt_request(request: ReplyRequest, n_positions: int) -> PromptRequest:
    """What build_prompts needs of a reply request."""
    return PromptRequest(
        request.persona, request.history, request.bot_name, request.params.max_new_tokens, n_positions,
        facts=request.facts, continue_text=request.continue_text,
    )  # fmt: skip


def built_prompt(job: GenerateJob, generation: int, outcome: Prompt | PromptTooLong) -> BuiltPrompt:
    """The BuiltPrompt for a build's outcome: a too-long prompt fails its job with GenerationFailed."""
    if isinstance(outcome, PromptTooLong):
        return BuiltPrompt(job, generation, None, error=too_long_error(job.request, outcome))
    return BuiltPrompt(job, generation, outcome, speaker_names(job.request))
