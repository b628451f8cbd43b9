"""The model worker's own thread: it owns the model, the engine and the prompt builders.

Long because: it is all that one thread owns (model, engine, inbox loop, reloads), kept in one place.

Its loop: take what is on the inbox now (hand new jobs to the prompt builders) → admit jobs whose prompt
is ready while the engine has room → engine.step() → hand finished replies back → repeat, blocking on
the inbox only when there is nothing to step. Prompts are built by a small pool of threads, each with
its own copy of the tokenizer (model.serving.prompt_builders), so this thread never tokenizes. A reload is
a queued job that runs once every job queued before it has finished, so it never lands in the middle
of a generation; jobs queued after it wait for it. Answers go back through `loop.call_soon_threadsafe`
to the callbacks the event-loop side (model.serving.worker.ModelWorker) gave: futures are never touched here.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import queue
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch

from model.api import (
    FALLBACK_REPLY,
    GenerationFailed,
    ModelInfo,
    ReloadFailed,
    Reply,
    ReplyRequest,
    WorkerClosed,
)
from model.engine import DecodeEngine, EngineJob, EngineResult
from model.replies import clean_continuation, clean_reply, continuation_of, resample_params
from model.sampling import SamplingParams
from model.serving.engines import describe_engine
from model.serving.jobs import (
    ActiveJob,
    BuiltPrompt,
    GenerateJob,
    ReloadJob,
    Serving,
    Stop,
    Wake,
    resolve_future,
)
from model.serving.prompt_builders import PromptBuilders
from model.serving.readiness import (
    StepFailed,
    is_fatal_device_error,
    model_info,
    prepare_serving,
    release_memory,
)

if TYPE_CHECKING:
    from model.loading import LoadedModel

log = logging.getLogger(__name__)

ADMIT_WAVE_SECONDS = 0.05  # the longest a built prompt waits for the others of its burst

InboxItem = GenerateJob | ReloadJob | Stop | Wake


def serving_info(serving: Serving) -> ModelInfo:
    """What serves: the model (model_info) and the engine that decodes it."""
    engine = describe_engine(serving.engine, serving.loaded.device)
    return replace(model_info(serving.loaded), engine=engine)


class _ThreadStop(Exception):
    """Raised inside the thread loop after a fatal device error: serve no more."""


@dataclass(frozen=True)
class LoopCallbacks:
    """The event-loop side's answers; the thread runs each on the loop (call_soon_threadsafe)."""

    settle: Callable[[GenerateJob | ReloadJob, Any, BaseException | None], None]
    settle_replies: Callable[[list[tuple[GenerateJob, Reply]]], None]
    thread_exited: Callable[[], None]


class ThreadSide:
    """The worker's thread side: everything its one thread owns, and that thread's loop (`run`).

    Shared with the event loop: `serving` (read there: what serves now), `inbox` (the loop puts jobs on
    it, and drains it at shutdown), `closing` (refuse reloads) and `aborting` (drop what is in flight),
    set there, and each job's `claim` (model.serving.jobs.Claim), which decides once whether the thread starts
    it or close() rejects it. The prompt builders' threads hand their results over through `_built`.
    """

    def __init__(
        self,
        source: str,
        loader: Callable[[str], LoadedModel],
        engine_factory: Callable[[LoadedModel], DecodeEngine],
        on_fatal: Callable[[BaseException], None],
        prompt_threads: int,
        callbacks: LoopCallbacks,
        smoke_request: ReplyRequest,
    ) -> None:
        self._source = source
        self._smoke_request = smoke_request
        self._loader = loader
        self._engine_factory = engine_factory
        self._on_fatal = on_fatal
        self._callbacks = callbacks
        self._loop: asyncio.AbstractEventLoop | None = None  # given to run()
        self.inbox: queue.Queue[InboxItem] = queue.Queue()  # bounded by the worker's queue_size
        self.serving: Serving | None = None  # written by this thread only; read anywhere
        self.closing = threading.Event()
        self.aborting = threading.Event()
        self._built: deque[BuiltPrompt] = deque()  # appended by the prompt builders, read by the thread
        self._prompt_threads = prompt_threads
        self._builders = PromptBuilders(prompt_threads, self._deliver_prompts)
        self._active: dict[int, ActiveJob] = {}
        self._retries: deque[ActiveJob] = deque()
        self._ready: deque[BuiltPrompt] = deque()  # prompts built, waiting for room in the engine
        self._deferred: deque[InboxItem] = deque()  # taken from the inbox while a control job waits
        self._to_build: list[GenerateJob] = []  # dispatched, not yet handed to the builders
        self._building = 0  # prompts dispatched (in _to_build or with the builders) and not yet collected
        self._generation = 0  # bumped by every swap: a prompt built for an older one is built again
        self._job_ids = itertools.count(1)

    def _post(self, callback: Callable[..., None], *args: Any) -> None:
        """Run `callback(*args)` on the event loop: futures are never touched from this thread."""
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the loop is closed: nobody is left to answer
            log.warning("event loop closed; dropping a result")

    def _answer(self, job: GenerateJob | ReloadJob, value: Any, error: BaseException | None) -> None:
        """Answer a job's caller: the loop side's `settle`, run on the event loop."""
        self._post(self._callbacks.settle, job, value, error)

    def run(self, loop: asyncio.AbstractEventLoop, started: asyncio.Future[ModelInfo]) -> None:
        """The thread's body: load the model (answering `started` on `loop`), then serve until Stop."""
        self._loop = loop
        try:
            self.serving = self._prepare(self._source)
            self._post(resolve_future, started, serving_info(self.serving), None)
            self._serve()
        except StepFailed as failed:
            log.error("loading %r failed at step %s: %s", self._source, failed.step, failed.error)
            self._post(resolve_future, started, None, failed.error)
        except _ThreadStop:
            pass
        except BaseException:
            log.exception("the model worker thread crashed")
        finally:
            self._builders.shutdown()
            self._fail_active(WorkerClosed("the model worker stopped"))
            self._post(resolve_future, started, None, WorkerClosed("the model worker stopped"))
            self._post(self._callbacks.thread_exited)

    def _serve(self) -> None:
        control: ReloadJob | Stop | None = None  # runs once everything queued before it has finished
        while True:
            control = self._take_inbox(control, self._wait_seconds(control))
            self._admit_retries()  # even while a control job waits: retries are in-flight work
            self._admit_ready()
            if self._engine().has_work():
                self._step()
            elif control is not None and self._is_drained(control):
                if isinstance(control, Stop):
                    return
                self._run_reload(control)
                control = self._replay_deferred()

    def _engine(self) -> DecodeEngine:
        assert self.serving is not None
        return self.serving.engine

    def _is_drained(self, control: ReloadJob | Stop) -> bool:
        if isinstance(control, Stop):  # close() has answered every job not yet in the engine
            return not self._retries
        return not (self._retries or self._ready or self._building)

    def _wait_seconds(self, control: ReloadJob | Stop | None) -> float | None:
        """How long the inbox may block: 0 when there is work, None (no limit) when there is nothing to do."""
        if self._built or self._retries or self._engine().has_work():
            return 0.0
        if self._ready:  # held for the rest of their wave (_is_admissible), but not for ever
            return (
                0.0
                if self._is_admissible()
                else max(0.0, self._ready[0].built_at + ADMIT_WAVE_SECONDS - time.monotonic())
            )
        return 0.0 if control is not None and self._is_drained(control) else None

    def _take_inbox(
        self, control: ReloadJob | Stop | None, wait_seconds: float | None
    ) -> ReloadJob | Stop | None:
        """Take what is on the inbox now (no more: the engine must keep stepping), then collect prompts."""
        with contextlib.suppress(queue.Empty):  # the wait ran out, or close() took the items first
            if wait_seconds is None or wait_seconds > 0:
                control = self._accept(self.inbox.get(timeout=wait_seconds), control)
            for _ in range(self.inbox.qsize()):
                control = self._accept(self.inbox.get_nowait(), control)
        self._collect_built()
        self._send_to_builders()
        return control

    def _accept(self, item: InboxItem, control: ReloadJob | Stop | None) -> ReloadJob | Stop | None:
        """Dispatch one inbox item; return the control job that waits now, if any."""
        if isinstance(item, Wake):
            return control
        if control is not None:  # queued after the control job: it runs after it, on the model then serving
            self._deferred.append(item)
            return control
        if isinstance(item, GenerateJob):
            self._dispatch(item)
            return None
        return item

    def _replay_deferred(self) -> ReloadJob | Stop | None:
        control: ReloadJob | Stop | None = None
        while self._deferred and control is None:
            control = self._accept(self._deferred.popleft(), None)
        self._send_to_builders()
        return control

    def _dispatch(self, job: GenerateJob) -> None:
        """Count the job as building; _send_to_builders hands the jobs dispatched together over at once."""
        if job.future.cancelled():  # a racy read is harmless: at worst a cancelled job runs
            self._answer(job, None, None)
            return
        self._building += 1
        self._to_build.append(job)

    def _send_to_builders(self) -> None:
        if self._to_build:
            assert self.serving is not None
            self._builders.submit(self._to_build, self.serving, self._generation)
            self._to_build = []

    def _deliver_prompts(self, built: list[BuiltPrompt]) -> None:
        """Called on a builder thread: hand the prompts over and wake the GPU thread if it is waiting."""
        self._built.extend(built)
        self.inbox.put(Wake())

    def _collect_built(self) -> None:
        while self._built:
            built = self._built.popleft()
            self._building -= 1
            if built.error is not None:
                self._answer(built.job, None, built.error)
            elif built.generation != self._generation:  # a reload swapped the tokenizer meanwhile
                self._dispatch(built.job)
            else:
                self._ready.append(built)

    def _admit_retries(self) -> None:
        while self._retries and self._engine().can_admit():
            active = self._retries.popleft()
            self._submit(active, resample_params(active.job.request.params))

    def _is_admissible(self) -> bool:
        """Ready prompts join the engine as a wave: once the prompts being built are done, or after a while.

        Jobs that join together share one prefill and step in lockstep, so they finish together. Nor do
        decode steps overlap the building: the step loop then waits for the GIL behind the builders' Python.
        Admitting each builder batch of 64 as it came was measured on the H100 (a 256-burst through
        scripts/bench_generation.py): 166 to 267 ms from run to run, against 183 to 217 ms waiting.
        """
        return not self._building or time.monotonic() - self._ready[0].built_at >= ADMIT_WAVE_SECONDS

    def _admit_ready(self) -> None:
        if self._ready and self._is_admissible():
            while self._ready and self._engine().can_admit():
                self._start(self._ready.popleft())

    def _start(self, built: BuiltPrompt) -> None:
        """Admit a job whose prompt is built; its time limit starts now."""
        job, request = built.job, built.job.request
        if job.future.cancelled() or not job.claim.take("worker"):  # cancelled, or close() answered it
            self._answer(job, None, None)
            return
        assert built.prompt is not None
        now = time.monotonic()
        active = ActiveJob(job, built.prompt, built.speaker_names, now, now + request.time_limit_seconds)
        self._submit(active, request.params)

    def _submit(self, active: ActiveJob, params: SamplingParams) -> None:
        serving = self.serving
        assert serving is not None
        prompt_ids = active.prompt.input_ids
        if len(prompt_ids) + params.max_new_tokens > serving.loaded.n_positions:
            # build_prompt guarantees this; checked again (not with assert, which -O strips) because an
            # over-long input on a GPU is a device-side assert that poisons every later call.
            self._answer(active.job, None, GenerationFailed("prompt exceeds the context window"))
            return
        job_id = next(self._job_ids)
        self._active[job_id] = active
        try:
            speakers = () if serving.has_newline else active.speaker_names
            job = EngineJob(job_id, prompt_ids, params, active.deadline, serving.stop_ids, speakers)
            serving.engine.admit(job)
        except Exception as exc:
            self._on_engine_error(exc, [job_id])

    def _step(self) -> None:
        try:
            results = self._engine().step()
        except Exception as exc:
            self._on_engine_error(exc, self._abort_engine())
            return
        replies: list[tuple[GenerateJob, Reply]] = []
        try:
            texts = self._decode([result.token_ids for result in results]) if results else []
            for result, raw in zip(results, texts, strict=True):
                answer = self._finish(result, raw)
                if answer is not None:
                    replies.append(answer)
        finally:  # the replies finished before a failure still go out
            if replies:  # one hand-over per step: each wakes the event loop, which then wants the GIL
                self._post(self._callbacks.settle_replies, replies)
        if self.aborting.is_set():  # close() gave up waiting: drop what is still running
            self._fail(self._abort_engine(), WorkerClosed("the model worker is shutting down"))
            self._fail_active(WorkerClosed("the model worker is shutting down"))

    def _abort_engine(self) -> list[int]:
        try:
            return self._engine().abort_all()
        except Exception:
            log.exception("engine.abort_all failed; failing every active job")
            return list(self._active)

    def _decode(self, sequences: list[tuple[int, ...]]) -> list[str]:
        """The text of each reply's ids, in one call (a 256-reply burst decoded one by one through
        transformers cost ~10 ms of GIL-held Python on the GPU thread)."""
        assert self.serving is not None
        return self.serving.decoder.decode_many([list(ids) for ids in sequences])

    def _finish(self, result: EngineResult, raw: str) -> tuple[GenerateJob, Reply] | None:
        """The finished job's reply from its decoded text `raw`, or None when it goes back for a retry."""
        active = self._active.pop(result.job_id)
        active.completion_tokens += len(result.token_ids)
        assert self.serving is not None
        has_ended_turn = result.stop_reason in ("eos", "turn_end")
        if active.context_ids:  # a continued reply: only what follows it, joined exactly, maybe ""
            raw = self._continuation(active.context_ids, result.token_ids, raw)
            text = clean_continuation(raw, active.speaker_names, has_ended_turn=has_ended_turn)
            return active.job, active.reply(text, result.stop_reason, self.serving.loaded)
        text = clean_reply(raw, active.speaker_names, has_ended_turn=has_ended_turn)
        if active.should_resample(text):
            active.attempts += 1
            self._retries.append(active)
            return None
        return active.job, active.reply(text or FALLBACK_REPLY, result.stop_reason, self.serving.loaded)

    def _continuation(self, context_ids: tuple[int, ...], new_ids: tuple[int, ...], alone: str) -> str:
        """The text `new_ids` add after the prompt's `context_ids` (model.replies.continuation_of)."""
        assert self.serving is not None
        before, after = self.serving.decoder.decode_many([list(context_ids), [*context_ids, *new_ids]])
        return continuation_of(before, after, alone)

    def _on_engine_error(self, exc: BaseException, job_ids: list[int]) -> None:
        """OOM fails only these jobs; another CUDA error is fatal; anything else fails these jobs.

        A failed step takes every job in it (a batched step shares its memory and its fate); a failed
        admit takes only the job being admitted.
        """
        if is_fatal_device_error(exc):
            log.critical("fatal device error; the process must restart", exc_info=exc)
            self._on_fatal(exc)  # by default the process exits here
            self._fail(job_ids, GenerationFailed("the GPU failed; the bot is restarting"))
            raise _ThreadStop from exc
        if isinstance(exc, torch.cuda.OutOfMemoryError):
            log.warning("CUDA out of memory; failing %d request(s) and freeing cached memory", len(job_ids))
            # The traceback's frames still hold the failed step's tensors: clear them, or nothing frees.
            traceback.clear_frames(exc.__traceback__)
            release_memory()  # before answering, so a retry finds the memory free
            self._fail(job_ids, GenerationFailed("out of GPU memory; try again with a shorter conversation"))
            return
        log.exception("generation failed", exc_info=exc)
        self._fail(job_ids, GenerationFailed(f"generation failed: {type(exc).__name__}"))

    def _fail(self, job_ids: list[int], error: BaseException) -> None:
        for job_id in job_ids:
            active = self._active.pop(job_id, None)
            if active is not None:
                self._answer(active.job, None, error)

    def _fail_active(self, error: BaseException) -> None:
        """Fail every job the thread holds: those in the engine and those waiting for a retry."""
        for active in self._retries:
            self._answer(active.job, None, error)
        self._retries.clear()
        self._fail(list(self._active), error)

    # ---- reload ----

    def _run_reload(self, job: ReloadJob) -> None:
        if self.closing.is_set():
            self._answer(job, None, WorkerClosed("the model worker is shutting down"))
            return
        try:
            new = self._prepare(job.source)
            info = self._swap(new)
        except StepFailed as failed:
            log.error("reload of %r failed at step %s: %s", job.source, failed.step, failed.error)
            self._answer(job, None, ReloadFailed(failed.step, str(failed.error)))
            release_memory()  # whatever the failed load left behind
            if is_fatal_device_error(failed.error):
                self._on_engine_error(failed.error, [])
            return
        log.info("now serving %s %s", info.name, info.version)
        self._answer(job, info, None)

    def _prepare(self, source: str) -> Serving:
        return prepare_serving(
            source, self._loader, self._engine_factory, self._prompt_threads, self._smoke_request
        )

    def _swap(self, new: Serving) -> ModelInfo:
        """Make `new` serve (one reference assignment), then free the old model."""
        try:
            info = serving_info(new)
            old, self.serving = self.serving, new
            self._generation += 1
        except Exception as exc:
            raise StepFailed("swap", exc) from exc
        del old
        release_memory()
        return info
