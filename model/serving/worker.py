"""ModelWorker: one thread owns the model; the event loop talks to it through a queue.

This module is the event-loop side: the async API, the count of jobs in (`queue_size` counts waiting +
running generate jobs: with queue_size 8, the 9th concurrent request is refused at once with
WorkerBusy), shutdown, and the futures, which are only ever touched on the loop. The thread's own loop
(prompt builders, engine steps, reloads) is model/serving/worker_thread.py; it hands results back with
`loop.call_soon_threadsafe`. The event loop never touches a tokenizer or the GPU.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from model.api import (
    ModelInfo,
    ReloadInProgress,
    Reply,
    ReplyRequest,
    WorkerBusy,
    WorkerClosed,
)
from model.engine import DecodeEngine
from model.sampling import SamplingParams
from model.serving.engines import EngineOptions, default_engine_factory
from model.serving.jobs import GenerateJob, ReloadJob, Serving, Stop, fit_to_context, resolve_future
from model.serving.readiness import default_loader, default_smoke_request
from model.serving.worker_thread import LoopCallbacks, ThreadSide, serving_info

if TYPE_CHECKING:
    from model.loading import LoadedModel

log = logging.getLogger(__name__)

FATAL_EXIT_CODE = 70  # EX_SOFTWARE: the supervisor restarts the process
THREAD_STOP_TIMEOUT_SECONDS = 30.0  # after the grace period, how long close() waits for the thread
# Prompt builders: each builds every job waiting together in one Rust call; two let one batch's Python
# (GIL held) overlap the other's tokenizing, and more are slower, because the hand-offs of the GIL around
# the Rust calls convoy (scripts/bench_prompt_builders.py measures it).
MAX_PROMPT_THREADS = 2
TOKENIZER_POOL_MIN_CORES = 8  # the tokenizers' thread pool is on from here (2 and 16 cores measured)


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
        engine_options: EngineOptions | None = None,
        smoke_request: ReplyRequest | None = None,
    ) -> None:
        self._queue_size = queue_size
        # The tokenizers' Rust thread pool spreads each batched build over the cores: on many cores it
        # wins, on few it fights the builders and the step loop for them. A burst of 256 distinct
        # 256-token prompts, 2 builders, 64 a call (scripts/bench_prompt_builders.py): on the 16-core
        # H100 host 22 ms with the pool and 51 ms without; on a 2-core machine 61 ms with, 37 without.
        # A setting of the user's own wins.
        is_many_cores = (os.cpu_count() or 1) >= TOKENIZER_POOL_MIN_CORES
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "true" if is_many_cores else "false")
        self._thread_side = ThreadSide(
            source,
            loader or default_loader(device, dtype, allow_pickle, models_dir),
            # The default engine gets ready for the bot's own sampling settings before it serves.
            engine_factory
            or functools.partial(default_engine_factory, sampling=sampling, options=engine_options),
            on_fatal or _exit_process,
            prompt_threads or min(MAX_PROMPT_THREADS, os.cpu_count() or 1),
            LoopCallbacks(self._settle, self._settle_replies, self._on_thread_exit),
            # Every load and reload must fit a real prompt with this budget, or it is refused.
            smoke_request or default_smoke_request(sampling),
        )
        # Loop-side state (touched on the event loop only).
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopped = asyncio.Event()
        self._outstanding: set[GenerateJob] = set()
        self._is_reloading = False
        self._is_closing = False

    # ---- the async API (event loop) ----

    async def start(self) -> ModelInfo:
        """Start the thread and load the model there (never on the loop); raise the load error if any."""
        assert self._thread is None, "start() is called once"
        self._loop = asyncio.get_running_loop()
        started: asyncio.Future[ModelInfo] = self._loop.create_future()
        self._thread = threading.Thread(
            target=self._thread_side.run, args=(self._loop, started), name="model-worker", daemon=True
        )
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
        self._thread_side.inbox.put(job)
        return await job.future

    async def reload(self, source: str) -> ModelInfo:
        """Queue a reload (load → smoke → swap); ReloadFailed(step) keeps the old model serving."""
        if self._loop is None or self._is_closing:
            raise WorkerClosed("the model worker is not running")
        if self._is_reloading:
            raise ReloadInProgress("a reload is already queued or running")
        job = ReloadJob(source, self._loop.create_future())
        self._is_reloading = True
        self._thread_side.inbox.put(job)
        return await job.future

    def info(self) -> ModelInfo:
        """What is serving now (the last model after close)."""
        return serving_info(self._serving())

    def _loaded(self) -> LoadedModel:
        """The model serving now; WorkerClosed before the first load."""
        return self._serving().loaded

    def _serving(self) -> Serving:
        serving = self._thread_side.serving
        if serving is None:
            raise WorkerClosed("no model is loaded")
        return serving

    def queue_depth(self) -> int:
        """Generate jobs waiting + running."""
        return len(self._outstanding)

    def is_alive(self) -> bool:
        """Whether the thread is up and serving (False before start, after close or a fatal error)."""
        thread = self._thread
        is_running = thread is not None and thread.is_alive()
        return is_running and not self._is_closing and not self._stopped.is_set()

    async def close(self, grace_seconds: float = 10.0) -> None:
        """Refuse new work, reject queued jobs, let in-flight ones finish within the grace period, stop."""
        if self._is_closing:  # closed already, or another close() is under way: wait for it
            if self._thread is not None:
                await self._wait_stopped(grace_seconds + THREAD_STOP_TIMEOUT_SECONDS)
            return
        self._is_closing = True
        if self._thread is None:
            return
        self._thread_side.closing.set()
        self._reject_queued()
        self._reject_unstarted()
        self._thread_side.inbox.put(Stop())
        if not await self._wait_stopped(grace_seconds):
            log.warning(
                "in-flight generations outlived the %.1f s grace period; aborting them", grace_seconds
            )
            self._thread_side.aborting.set()
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
                item = self._thread_side.inbox.get_nowait()
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
