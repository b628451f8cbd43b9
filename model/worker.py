"""ModelWorker: one thread owns the model; the event loop talks to it through a queue.

The GPU thread loop: take what is on the inbox now (hand new jobs to the prompt builders) → admit jobs
whose prompt is ready while the engine has room → engine.step() → hand finished replies back → repeat,
blocking on the inbox only when there is nothing to step. Prompts are built by a small pool of threads,
each with its own copy of the tokenizer (model.jobs.PromptBuilders), so the GPU thread never tokenizes and
the event loop never touches a tokenizer. A reload is a queued job that runs once every job queued before
it has finished, so it never lands in the middle of a generation; jobs queued after it wait for it.
Futures are only ever touched on the event loop: the thread hands results over with
`loop.call_soon_threadsafe`.

`queue_size` counts waiting + running generate jobs: with queue_size 8, the 9th concurrent request is
refused at once with WorkerBusy.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import itertools
import logging
import os
import queue
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from model.api import (
    FALLBACK_REPLY,
    GenerationFailed,
    ModelInfo,
    ReloadFailed,
    ReloadInProgress,
    Reply,
    ReplyRequest,
    WorkerBusy,
    WorkerClosed,
)
from model.engine import DecodeEngine, EngineJob, EngineResult
from model.generation import clean_reply, resample_params
from model.jobs import (
    ActiveJob,
    BuiltPrompt,
    GenerateJob,
    PromptBuilders,
    ReloadJob,
    Serving,
    StepFailed,
    Stop,
    Wake,
    default_engine_factory,
    default_loader,
    is_fatal_device_error,
    model_info,
    prepare_serving,
    release_memory,
    resolve_future,
)
from model.sampling import SamplingParams

if TYPE_CHECKING:
    from model.loading import LoadedModel

log = logging.getLogger(__name__)

FATAL_EXIT_CODE = 70  # EX_SOFTWARE: the supervisor restarts the process
THREAD_STOP_TIMEOUT_SECONDS = 30.0  # after the grace period, how long close() waits for the thread
# Prompt builders. More threads are slower: each build hands the GIL back and forth around its Rust
# tokenizer calls, and the hand-offs convoy. A burst of 256 distinct 256-token prompts on a 16-core H100
# host (scripts/bench_prompt_builders.py), built one job a call: 1 thread 196 ms, 2 threads 92 ms,
# 4 threads 214 ms, 8 threads 774 ms (without the tokenizers' Rust thread pool; with it 132 ms at 2
# threads). Now a thread builds every job waiting together, in one Rust call (model.jobs.PromptBuilders):
# two threads let one batch's Python (GIL held) overlap the other's tokenizing. Batched, 2 threads, the
# same burst: 21.8 ms with the Rust pool on that host, 51.0 ms without (BENCHMARKS.md, Generation).
MAX_PROMPT_THREADS = 2
TOKENIZER_POOL_MIN_CORES = 8  # the tokenizers' thread pool is on from here (2 and 16 cores measured)
ADMIT_WAVE_SECONDS = 0.05  # the longest a built prompt waits for the others of its burst

InboxItem = GenerateJob | ReloadJob | Stop | Wake


def fit_to_context(request: ReplyRequest, n_positions: int) -> ReplyRequest:
    """Cap max_new_tokens at half the context window, so a setting made for GPT-2's 1024 positions
    cannot leave a smaller model (the starter has 256) no room for the prompt at all."""
    limit = max(1, n_positions // 2)
    if request.params.max_new_tokens <= limit:
        return request
    log.debug("max_new_tokens %d capped at %d", request.params.max_new_tokens, limit)
    return dataclasses.replace(request, params=dataclasses.replace(request.params, max_new_tokens=limit))


class _ThreadStop(Exception):
    """Raised inside the thread loop after a fatal device error: serve no more."""


def _exit_process(exc: BaseException) -> None:
    logging.shutdown()  # flush the critical log line: os._exit skips every exit handler
    os._exit(FATAL_EXIT_CODE)


# ----------------------------------------------------------------------------------------------------
# the worker


class ModelWorker:
    """Implements model.api.ReplyGenerator with one thread that owns the model, tokenizer and engine."""

    def __init__(
        self,
        source: str,
        *,
        queue_size: int = 32,
        device: str = "auto",
        dtype: str = "auto",
        allow_pickle: bool = False,
        models_dir: Path | None = None,
        loader: Callable[[str], LoadedModel] | None = None,
        engine_factory: Callable[[LoadedModel], DecodeEngine] | None = None,
        on_fatal: Callable[[BaseException], None] | None = None,
        prompt_threads: int | None = None,
        sampling: SamplingParams | None = None,
    ) -> None:
        self._source = source
        self._queue_size = queue_size
        self._loader = loader or default_loader(device, dtype, allow_pickle, models_dir)
        # The default engine gets ready for the bot's own sampling settings (`sampling`) before it serves.
        self._engine_factory = engine_factory or functools.partial(default_engine_factory, sampling=sampling)
        self._on_fatal = on_fatal or _exit_process
        self._inbox: queue.Queue[InboxItem] = queue.Queue()  # bounded by _outstanding
        self._built: deque[BuiltPrompt] = deque()  # appended by the prompt builders, read by the thread
        self._prompt_threads = prompt_threads or min(MAX_PROMPT_THREADS, os.cpu_count() or 1)
        self._builders = PromptBuilders(self._prompt_threads, self._deliver_prompts)
        # The tokenizers' Rust thread pool spreads each batched build over the cores: on many cores it
        # wins, on few it fights the builders and the step loop for them. A burst of 256 distinct
        # 256-token prompts, 2 builders, 64 a call (scripts/bench_prompt_builders.py): on the 16-core
        # H100 host 22 ms with the pool and 51 ms without; on a 2-core machine 61 ms with, 37 without.
        # A setting of the user's own wins.
        is_many_cores = (os.cpu_count() or 1) >= TOKENIZER_POOL_MIN_CORES
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "true" if is_many_cores else "false")
        self._serving: Serving | None = None  # written by the thread only; read anywhere
        self._closing_flag = threading.Event()
        self._abort_flag = threading.Event()
        # Loop-side state (touched on the event loop only).
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopped = asyncio.Event()
        self._outstanding: set[GenerateJob] = set()
        self._is_reloading = False
        self._is_closing = False
        # Thread-side state (touched on the worker thread only).
        self._active: dict[int, ActiveJob] = {}
        self._retries: deque[ActiveJob] = deque()
        self._ready: deque[BuiltPrompt] = deque()  # prompts built, waiting for room in the engine
        self._deferred: deque[InboxItem] = deque()  # taken from the inbox while a control job waits
        self._to_build: list[GenerateJob] = []  # dispatched, not yet handed to the builders
        self._building = 0  # prompts dispatched (in _to_build or with the builders) and not yet collected
        self._generation = 0  # bumped by every swap: a prompt built for an older one is built again
        self._job_ids = itertools.count(1)

    # ---- the async API (event loop) ----

    async def start(self) -> ModelInfo:
        """Start the thread and load the model there (never on the loop); raise the load error if any."""
        assert self._thread is None, "start() is called once"
        self._loop = asyncio.get_running_loop()
        started: asyncio.Future[ModelInfo] = self._loop.create_future()
        self._thread = threading.Thread(target=self._run, args=(started,), name="model-worker", daemon=True)
        self._thread.start()
        return await started

    async def generate(self, request: ReplyRequest) -> Reply:
        """Queue a request and wait for its reply; WorkerBusy at once when queue_size jobs are in."""
        if self._loop is None or self._is_closing:
            raise WorkerClosed("the model worker is not running")
        if len(self._outstanding) >= self._queue_size:
            raise WorkerBusy(f"{len(self._outstanding)} requests are already queued or running")
        request = fit_to_context(request, self._loaded().n_positions)
        job = GenerateJob(request, self._loop.create_future(), time.monotonic())
        self._outstanding.add(job)
        self._inbox.put(job)
        return await job.future

    async def reload(self, source: str) -> ModelInfo:
        """Queue a reload (load → smoke → swap); ReloadFailed(step) keeps the old model serving."""
        if self._loop is None or self._is_closing:
            raise WorkerClosed("the model worker is not running")
        if self._is_reloading:
            raise ReloadInProgress("a reload is already queued or running")
        job = ReloadJob(source, self._loop.create_future())
        self._is_reloading = True
        self._inbox.put(job)
        return await job.future

    def info(self) -> ModelInfo:
        """What is serving now (the last model after close)."""
        return model_info(self._loaded())

    def _loaded(self) -> LoadedModel:
        """The model serving now; WorkerClosed before the first load."""
        if self._serving is None:
            raise WorkerClosed("no model is loaded")
        return self._serving.loaded

    def queue_depth(self) -> int:
        """Generate jobs waiting + running."""
        return len(self._outstanding)

    async def close(self, grace_seconds: float = 10.0) -> None:
        """Refuse new work, reject queued jobs, let in-flight ones finish within the grace period, stop."""
        if self._is_closing:  # closed already, or another close() is under way: wait for it
            if self._thread is not None:
                await self._wait_stopped(grace_seconds + THREAD_STOP_TIMEOUT_SECONDS)
            return
        self._is_closing = True
        if self._thread is None:
            return
        self._closing_flag.set()
        self._reject_queued()
        self._reject_unstarted()
        self._inbox.put(Stop())
        if not await self._wait_stopped(grace_seconds):
            log.warning(
                "in-flight generations outlived the %.1f s grace period; aborting them", grace_seconds
            )
            self._abort_flag.set()
            self._reject_outstanding()
            if not await self._wait_stopped(THREAD_STOP_TIMEOUT_SECONDS):
                log.error("the model worker thread did not stop; leaving it to die with the process")
                return
        self._thread.join()  # the thread has signalled its last step: this returns at once

    async def __aenter__(self) -> ModelWorker:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _wait_stopped(self, timeout_seconds: float) -> bool:
        try:
            await asyncio.wait_for(self._stopped.wait(), timeout_seconds)
        except TimeoutError:
            return False
        return True

    def _reject_queued(self) -> None:
        """Answer every job still waiting in the inbox with WorkerClosed (loop side)."""
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, ReloadJob):
                self._settle(item, None, WorkerClosed("the model worker is shutting down"))

    def _reject_unstarted(self) -> None:
        """Answer every generate job that has not reached the engine (queued, or its prompt being built)."""
        for job in list(self._outstanding):
            if job.claim.take("close"):  # the thread will not start it now
                self._settle(job, None, WorkerClosed("the model worker is shutting down"))

    def _reject_outstanding(self) -> None:
        for job in list(self._outstanding):
            self._settle(job, None, WorkerClosed("the model worker is shutting down"))

    def _settle(self, job: GenerateJob | ReloadJob, value: Any, error: BaseException | None) -> None:
        """Finish a job's accounting and answer its caller (event loop only)."""
        if isinstance(job, GenerateJob):
            self._outstanding.discard(job)
        else:
            self._is_reloading = False
        resolve_future(job.future, value, error)

    def _settle_replies(self, replies: list[tuple[GenerateJob, Reply]]) -> None:
        for job, reply in replies:
            self._settle(job, reply, None)

    def _on_thread_exit(self) -> None:
        self._is_closing = True
        self._reject_queued()
        self._reject_outstanding()
        self._stopped.set()

    # ---- the worker thread ----

    def _post(self, callback: Callable[..., None], *args: Any) -> None:
        """Run `callback(*args)` on the event loop: futures are never touched from this thread."""
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the loop is closed: nobody is left to answer
            log.warning("event loop closed; dropping a result")

    def _run(self, started: asyncio.Future[ModelInfo]) -> None:
        try:
            self._serving = self._prepare(self._source)
            self._post(resolve_future, started, model_info(self._serving.loaded), None)
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
            self._post(self._on_thread_exit)

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
        assert self._serving is not None
        return self._serving.engine

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
                control = self._accept(self._inbox.get(timeout=wait_seconds), control)
            for _ in range(self._inbox.qsize()):
                control = self._accept(self._inbox.get_nowait(), control)
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
            self._post(self._settle, job, None, None)
            return
        self._building += 1
        self._to_build.append(job)

    def _send_to_builders(self) -> None:
        if self._to_build:
            assert self._serving is not None
            self._builders.submit(self._to_build, self._serving, self._generation)
            self._to_build = []

    def _deliver_prompts(self, built: list[BuiltPrompt]) -> None:
        """Called on a builder thread: hand the prompts over and wake the GPU thread if it is waiting."""
        self._built.extend(built)
        self._inbox.put(Wake())

    def _collect_built(self) -> None:
        while self._built:
            built = self._built.popleft()
            self._building -= 1
            if built.error is not None:
                self._post(self._settle, built.job, None, built.error)
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
            self._post(self._settle, job, None, None)
            return
        assert built.prompt is not None
        now = time.monotonic()
        active = ActiveJob(job, built.prompt, built.speaker_names, now, now + request.time_limit_seconds)
        self._submit(active, request.params)

    def _submit(self, active: ActiveJob, params: SamplingParams) -> None:
        serving = self._serving
        assert serving is not None
        prompt_ids = active.prompt.input_ids
        if len(prompt_ids) + params.max_new_tokens > serving.loaded.n_positions:
            # build_prompt guarantees this; checked again (not with assert, which -O strips) because an
            # over-long input on a GPU is a device-side assert that poisons every later call.
            self._post(self._settle, active.job, None, GenerationFailed("prompt exceeds the context window"))
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
                self._post(self._settle_replies, replies)
        if self._abort_flag.is_set():  # close() gave up waiting: drop what is still running
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
        assert self._serving is not None
        return self._serving.decoder.decode_many([list(ids) for ids in sequences])

    def _finish(self, result: EngineResult, raw: str) -> tuple[GenerateJob, Reply] | None:
        """The finished job's reply from its decoded text `raw`, or None when it goes back for a retry."""
        active = self._active.pop(result.job_id)
        active.completion_tokens += len(result.token_ids)
        assert self._serving is not None
        has_ended_turn = result.stop_reason in ("eos", "turn_end")
        text = clean_reply(raw, active.speaker_names, has_ended_turn=has_ended_turn)
        if active.should_resample(text):
            active.attempts += 1
            self._retries.append(active)
            return None
        return active.job, active.reply(text or FALLBACK_REPLY, result.stop_reason, self._serving.loaded)

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
                self._post(self._settle, active.job, None, error)

    def _fail_active(self, error: BaseException) -> None:
        """Fail every job the thread holds: those in the engine and those waiting for a retry."""
        for active in self._retries:
            self._post(self._settle, active.job, None, error)
        self._retries.clear()
        self._fail(list(self._active), error)

    # ---- reload (worker thread) ----

    def _run_reload(self, job: ReloadJob) -> None:
        if self._closing_flag.is_set():
            self._post(self._settle, job, None, WorkerClosed("the model worker is shutting down"))
            return
        try:
            new = self._prepare(job.source)
            info = self._swap(new)
        except StepFailed as failed:
            log.error("reload of %r failed at step %s: %s", job.source, failed.step, failed.error)
            self._post(self._settle, job, None, ReloadFailed(failed.step, str(failed.error)))
            release_memory()  # whatever the failed load left behind
            if is_fatal_device_error(failed.error):
                self._on_engine_error(failed.error, [])
            return
        log.info("now serving %s %s", info.name, info.version)
        self._post(self._settle, job, info, None)

    def _prepare(self, source: str) -> Serving:
        return prepare_serving(source, self._loader, self._engine_factory, self._prompt_threads)

    def _swap(self, new: Serving) -> ModelInfo:
        """Make `new` serve (one reference assignment), then free the old model."""
        try:
            info = model_info(new.loaded)
            old, self._serving = self._serving, new
            self._generation += 1
        except Exception as exc:
            raise StepFailed("swap", exc) from exc
        del old
        release_memory()
        return info
