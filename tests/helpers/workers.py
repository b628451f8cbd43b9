"""Scripted decode engines, fixtures and probes shared by the worker tests (test_worker*.py).

The engines implement model.engine.DecodeEngine over the real tokenizer; job 0 is always the worker's
own smoke generation, which they let straight through. The fixtures reach the test modules through
`pytest_plugins`; those modules import this one first, so pytest cannot rewrite its asserts (each has
its own message instead): PYTEST_DONT_REWRITE.
"""

from __future__ import annotations

import asyncio
import copy
import statistics
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from model.api import ReplyRequest
from model.engine import EngineJob, EngineResult
from model.hf_engine import HFGenerateEngine
from model.loading import LoadedModel, load_model
from model.prompt import Turn
from model.serving.worker import ModelWorker
from tests.helpers.models import force_next_token as force_model_next_token

THE_ID = 262  # " the": never ends a turn
SMOKE_JOB_ID = 0  # the worker's own smoke generation: scripted engines pass it straight through
HOG_SEED = 666  # marks the request whose step fills the GPU (GpuHogEngine)


def request(text: str = "hi there", **overrides: Any) -> ReplyRequest:
    fields: dict[str, Any] = {"persona": "A friendly chat.", "history": (Turn("Alice", text),)}
    return ReplyRequest(**{**fields, **overrides})


# --- scripted engines ---------------------------------------------------------------------------------


class ScriptedEngine:
    """A DecodeEngine whose jobs finish after `steps_per_job` steps with scripted replies (the last repeats).

    `gate`: each step waits for it (holds jobs in flight); `burn_seconds`: each step burns CPU in pure
    Python (holds the GIL as hard as Python code can); `failures`: exceptions raised by the next steps.
    """

    def __init__(
        self,
        tokenizer: Any,
        replies: tuple[str, ...] = (" Hello there.",),
        capacity: int = 1,
        gate: threading.Event | None = None,
        burn_seconds: float = 0.0,
        failures: tuple[BaseException, ...] = (),
        steps_per_job: int = 1,
    ) -> None:
        self.replies = [tuple(tokenizer.encode(reply)) for reply in replies]
        self.capacity = capacity
        self.gate = gate
        self.burn_seconds = burn_seconds
        self.failures = list(failures)
        self.steps_per_job = steps_per_job
        self.steps_done: dict[int, int] = {}
        self.active: list[EngineJob] = []
        self.admitted: list[EngineJob] = []
        self.max_active = 0
        self.is_working = threading.Event()  # set once a caller's job is inside the engine

    def can_admit(self) -> bool:
        return len(self.active) < self.capacity

    def admit(self, job: EngineJob) -> None:
        self.active.append(job)
        self.max_active = max(self.max_active, len(self.active))
        if job.job_id != SMOKE_JOB_ID:
            self.admitted.append(job)
            self.is_working.set()

    def has_work(self) -> bool:
        return bool(self.active)

    def step(self) -> list[EngineResult]:
        if any(job.job_id != SMOKE_JOB_ID for job in self.active):
            self._work()
        for job in self.active:
            self.steps_done[job.job_id] = self.steps_done.get(job.job_id, 0) + 1
        finished = [
            job
            for job in self.active
            if job.job_id == SMOKE_JOB_ID or self.steps_done[job.job_id] >= self.steps_per_job
        ]
        self.active = [job for job in self.active if job not in finished]
        return [EngineResult(job.job_id, self._next_reply(job), "turn_end") for job in finished]

    def abort_all(self) -> list[int]:
        ids = [job.job_id for job in self.active]
        self.active = []
        return ids

    def _work(self) -> None:
        if self.gate is not None:
            assert self.gate.wait(timeout=30), "test gate never opened"
        if self.failures:
            raise self.failures.pop(0)
        deadline = time.perf_counter() + self.burn_seconds
        while time.perf_counter() < deadline:
            sum(i * i for i in range(1000))

    def _next_reply(self, job: EngineJob) -> tuple[int, ...]:
        if job.job_id == SMOKE_JOB_ID or len(self.replies) == 1:
            return self.replies[0]
        return self.replies.pop(0)


class EndlessEngine(ScriptedEngine):
    """A batched engine whose jobs never emit a stop token: a 10 ms step per token until the deadline."""

    def step(self) -> list[EngineResult]:
        if all(job.job_id == SMOKE_JOB_ID for job in self.active):
            return super().step()
        time.sleep(0.01)  # stands for one decode step of real work
        now = time.monotonic()
        finished = [job for job in self.active if now > job.deadline]
        self.active = [job for job in self.active if job not in finished]
        return [EngineResult(job.job_id, (THE_ID,), "time_limit") for job in finished]


# --- a tokenizer that records its threads ----------------------------------------------------------


class RecordingTokenizer:
    """Records which threads use a tokenizer; its copies record into `copies` and keep a list of clones."""

    def __init__(self, inner: Any, callers: set[str], copies: set[str], clones: list[Any]) -> None:
        for name, value in (
            ("_inner", inner),
            ("_callers", callers),
            ("_copies", copies),
            ("_clones", clones),
        ):
            object.__setattr__(self, name, value)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):  # copy/pickle protocol probes
            raise AttributeError(name)
        self._callers.add(threading.current_thread().name)
        return getattr(self._inner, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._inner, name, value)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self._callers.add(threading.current_thread().name)
        return self._inner(*args, **kwargs)

    def __len__(self) -> int:
        return len(self._inner)

    def __copy__(self) -> RecordingTokenizer:
        self._callers.add(threading.current_thread().name)
        self._clones.append(copy.copy(self._inner))
        return RecordingTokenizer(self._clones[-1], self._copies, self._copies, self._clones)

    def __deepcopy__(self, memo: dict[int, Any]) -> RecordingTokenizer:
        self._callers.add(threading.current_thread().name)
        self._clones.append(copy.deepcopy(self._inner, memo))
        return RecordingTokenizer(self._clones[-1], self._copies, self._copies, self._clones)


# --- fixtures -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def loaded(tiny_model_dir: Path) -> LoadedModel:
    """One tiny GPT-2 shared by the tests that only read it."""
    return load_model(str(tiny_model_dir), device="cpu")


@pytest.fixture
def gates() -> Any:
    """Gates opened at teardown, so a failing test never leaves the worker thread waiting."""
    made: list[threading.Event] = []

    def make() -> threading.Event:
        made.append(threading.Event())
        return made[-1]

    yield make
    for gate in made:
        gate.set()


@pytest.fixture
async def make_worker(loaded: LoadedModel) -> Any:
    """Start workers over the shared model (or whatever `loader` is given) and close them after the test."""
    workers: list[ModelWorker] = []

    async def make(
        engine: Callable[[LoadedModel], Any] | None = None, source: str = "tiny", **kwargs: Any
    ) -> ModelWorker:
        kwargs.setdefault("loader", lambda source: loaded)
        kwargs.setdefault("engine_factory", engine or (lambda m: HFGenerateEngine(m.model, m.tokenizer)))
        worker = ModelWorker(source, **kwargs)
        await worker.start()
        workers.append(worker)
        return worker

    yield make
    for worker in workers:
        await worker.close(grace_seconds=5)


def scripted(**kwargs: Any) -> tuple[Callable[[LoadedModel], ScriptedEngine], list[ScriptedEngine]]:
    """An engine factory and the list of engines it made (one per start or reload)."""
    made: list[ScriptedEngine] = []

    def factory(loaded: LoadedModel) -> ScriptedEngine:
        made.append(ScriptedEngine(loaded.tokenizer, **kwargs))
        return made[-1]

    return factory, made


@torch.no_grad()
def force_next_token(loaded: LoadedModel, token_id: int) -> LoadedModel:
    """Make a loaded GPT-2 predict `token_id` at every position (tests/model/test_hf_engine.py says how)."""
    force_model_next_token(loaded.model, token_id)
    return loaded


async def lag_probe(stop: asyncio.Event) -> list[float]:
    """How late each sleep(0.01) on the loop wakes up, until `stop` is set."""
    lags_seconds = []
    while not stop.is_set():
        before = time.perf_counter()
        await asyncio.sleep(0.01)
        lags_seconds.append(time.perf_counter() - before - 0.01)
    return lags_seconds


async def until(event: threading.Event) -> None:
    """Wait (off the loop) for the worker thread to reach a point the test needs."""
    assert await asyncio.to_thread(event.wait, 10), "the worker thread never got there"


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98]


# --- engines that run out of memory ------------------------------------------------------------------


class OomOnceEngine(ScriptedEngine):
    """The first caller's step allocates a tensor, then runs out of memory (as a real step would)."""

    hog: weakref.ref[torch.Tensor] | None = None

    def _work(self) -> None:
        if self.hog is None:
            hog = torch.empty(1 << 20)
            self.hog = weakref.ref(hog)
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")


class GpuHogEngine:
    """Wraps the default engine; the step of a job seeded HOG_SEED fills GPU memory until it runs out."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.is_hog_pending = False

    def can_admit(self) -> bool:
        return bool(self.inner.can_admit())

    def admit(self, job: EngineJob) -> None:
        self.is_hog_pending = self.is_hog_pending or job.params.seed == HOG_SEED
        self.inner.admit(job)

    def has_work(self) -> bool:
        return bool(self.inner.has_work())

    def step(self) -> list[EngineResult]:
        if self.is_hog_pending:
            self.is_hog_pending = False
            blocks = []
            while True:  # a real OutOfMemoryError, with the memory held by this frame
                blocks.append(torch.empty(1 << 30, dtype=torch.uint8, device="cuda"))
        return list(self.inner.step())

    def abort_all(self) -> list[int]:
        return list(self.inner.abort_all())
