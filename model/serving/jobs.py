"""The worker's job records: what the event loop queues, what the thread builds, admits and answers.

`GenerateJob` and `ReloadJob` come from the loop; `BuiltPrompt` from a prompt builder; `ActiveJob` lives
in the engine; `Serving` is the model, engine and stop ids that serve right now. `resolve_future` is only ever
called on the event loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from model.api import ModelInfo, Reply, ReplyRequest
from model.encoding import Decoder, thread_copy
from model.engine import DecodeEngine
from model.prompt import Prompt, sanitize_speaker
from model.replies import is_repeat

if TYPE_CHECKING:
    from model.loading import LoadedModel

log = logging.getLogger(__name__)


class Claim:
    """Decides once, across threads, whether a job starts (worker thread) or is rejected (close())."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._owner: str | None = None

    def take(self, owner: str) -> bool:
        """True for the first caller only."""
        with self._lock:
            if self._owner is None:
                self._owner = owner
            return self._owner == owner


@dataclass(frozen=True, eq=False)
class GenerateJob:
    """A caller's request as queued; `future` is only ever touched on the event loop."""

    request: ReplyRequest
    future: asyncio.Future[Reply]
    submitted_at: float  # time.monotonic()
    claim: Claim = field(default_factory=Claim)


@dataclass(frozen=True, eq=False)
class BuiltPrompt:
    """A generate job with its prompt built for one serving generation, or the error that stopped it."""

    job: GenerateJob
    generation: int  # which model's tokenizer built it: a reload in between means build it again
    prompt: Prompt | None
    speaker_names: tuple[str, ...] = ()
    error: BaseException | None = None
    built_at: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class Wake:
    """Put on the worker's inbox after a built prompt is delivered, so a thread blocked on it wakes up."""


@dataclass(frozen=True, eq=False)
class ReloadJob:
    """A queued reload of `source`."""

    source: str
    future: asyncio.Future[ModelInfo]


@dataclass(frozen=True)
class Stop:
    """The sentinel that ends the worker thread once the engine has drained."""


@dataclass(frozen=True)
class Serving:
    """What serves right now; the worker swaps it as one reference, so a reload is all-or-nothing."""

    loaded: LoadedModel
    engine: DecodeEngine
    stop_ids: frozenset[int]
    # False for tokenizers that fold "\n" into a space: then speaker tags are the turn boundary.
    has_newline: bool = True
    # One tokenizer copy per prompt builder, made with the model: a builder making its own on first use
    # would stall the event loop for ~100 ms on a busy 2-core machine.
    tokenizer_copies: queue.SimpleQueue[Any] = field(default_factory=queue.SimpleQueue, compare=False)

    @functools.cached_property
    def decoder(self) -> Decoder:
        """Turns replies' ids into text (worker thread only); made on first use."""
        return Decoder.of(self.loaded.tokenizer)

    def tokenizer_copy(self) -> Any:
        """A tokenizer copy that no other thread uses (made now if the prepared ones are taken)."""
        try:
            return self.tokenizer_copies.get_nowait()
        except queue.Empty:
            return thread_copy(self.loaded.tokenizer)


# Enough of a continued reply's end to decode its last word whole (a word is rarely over 4 GPT-2 tokens).
CONTINUE_CONTEXT_TOKENS = 8


@dataclass(eq=False)
class ActiveJob:
    """A generate job inside the engine (worker thread only); a repeat-guard retry reuses it."""

    job: GenerateJob
    prompt: Prompt
    speaker_names: tuple[str, ...]
    started_at: float
    deadline: float
    attempts: int = 1
    completion_tokens: int = 0  # summed over attempts

    @property
    def context_ids(self) -> tuple[int, ...]:
        """A continued reply's last prompt ids, decoded with the new ids so that the join is exact."""
        if not self.job.request.continue_text:
            return ()
        return self.prompt.input_ids[-CONTINUE_CONTEXT_TOKENS:]

    def should_resample(self, text: str) -> bool:
        """Once per request, when the reply repeats one of the bot's recent replies and time is left."""
        recent = self.job.request.recent_bot_replies
        if self.attempts > 1 or not recent or time.monotonic() >= self.deadline:
            return False
        return is_repeat(text, recent)

    def reply(self, text: str, stop_reason: str, loaded: LoadedModel) -> Reply:
        """The finished Reply with its accounting."""
        return Reply(
            text=text,
            prompt_tokens=len(self.prompt.input_ids),
            completion_tokens=self.completion_tokens,  # every attempt's tokens: what the time paid for
            queue_seconds=self.started_at - self.job.submitted_at,
            generation_seconds=time.monotonic() - self.started_at,
            stop_reason=stop_reason,
            model_name=loaded.name,
            model_version=loaded.version,
            history_turns_used=self.prompt.turns_used,
        )


def resolve_future(future: asyncio.Future[Any], value: Any, error: BaseException | None) -> None:
    """Answer a future unless it is done already (its caller was cancelled, or close() answered it)."""
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)


def speaker_names(request: ReplyRequest) -> tuple[str, ...]:
    """The speaker tags as the model saw them in the prompt, for cutting leaked tags from replies."""
    humans = {sanitize_speaker(turn.speaker, request.bot_name) for turn in request.history if not turn.is_bot}
    return (request.bot_name, *sorted(humans))


def fit_to_context(request: ReplyRequest, n_positions: int) -> ReplyRequest:
    """Cap max_new_tokens at half the context window, so a setting made for GPT-2's 1024 positions
    cannot leave a smaller model (the starter has 256) no room for the prompt at all."""
    limit = max(1, n_positions // 2)
    if request.params.max_new_tokens <= limit:
        return request
    log.debug("max_new_tokens %d capped at %d", request.params.max_new_tokens, limit)
    return dataclasses.replace(request, params=dataclasses.replace(request.params, max_new_tokens=limit))
