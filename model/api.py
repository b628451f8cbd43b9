"""The backend-neutral interface between the bot and whatever generates replies.

The in-process GPT-2 worker implements it today; a vLLM (OpenAI-compatible) client would be another
implementation of the same protocol, and the bot's tests use a fake one with canned replies.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from model.prompt import Turn
from model.sampling import SamplingParams

# What a reply says when generation produced nothing usable (never an empty message).
FALLBACK_REPLY = "Sorry, I have nothing to say to that."


@dataclass(frozen=True)
class ReplyRequest:
    """Everything needed to produce one reply; history is oldest → newest, the newest turn is answered."""

    persona: str
    history: tuple[Turn, ...]
    bot_name: str = "Bot"
    params: SamplingParams = field(default_factory=SamplingParams)
    time_limit_seconds: float = 20.0
    # The bot's recent replies in this conversation: a reply equal to one of them is resampled once.
    recent_bot_replies: tuple[str, ...] = ()
    request_id: str = ""
    # The channel's remembered facts (/remember), oldest first: rendered after the persona line.
    facts: tuple[str, ...] = ()
    # The start of the bot's turn to continue ("" = a new reply). Then Reply.text is only what follows it,
    # joined exactly (its leading space, if any, kept; "" when nothing usable came).
    continue_text: str = ""


@dataclass(frozen=True)
class Reply:
    """A finished reply with its accounting."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    queue_seconds: float
    generation_seconds: float
    stop_reason: str  # "eos" | "turn_end" | "max_tokens" | "time_limit"
    model_name: str
    model_version: str
    history_turns_used: int


@dataclass(frozen=True)
class ModelInfo:
    """What is serving right now, for /stats and logs."""

    name: str
    version: str
    device: str
    dtype: str
    total_params: int
    trainable_params: int
    n_positions: int
    gpu_memory_allocated_bytes: int | None = None
    gpu_memory_total_bytes: int | None = None
    engine: str = ""  # which decode engine serves, e.g. "ctranslate2 int8 (2 CPU threads)"
    backend: str = "local"  # or "openai": model servers elsewhere (bot/remote/)
    details: tuple[str, ...] = ()  # extra /stats lines, e.g. each model server's health and latency


class GeneratorError(Exception):
    """Base class of the errors a reply generator reports to its callers."""


class WorkerBusy(GeneratorError):
    """The request queue is full; the caller should tell the user to try again."""


class WorkerClosed(GeneratorError):
    """The generator is shutting down or closed and accepts no more work."""


class GenerationFailed(GeneratorError):
    """This one request failed (e.g. CUDA out of memory); the generator keeps serving."""


class ModelUnavailable(GenerationFailed):
    """Every model server is down (the remote backend's circuit breaker is open); it retries by itself."""


class ReplyTooLongToContinue(GenerationFailed):
    """A continue request's reply leaves no room in the context window for the rest of the prompt."""


def too_long_error(request: ReplyRequest, error: Exception) -> GenerationFailed:
    """What a prompt that cannot fit (model.prompt.PromptTooLong) fails its request with: for a reply to
    continue, its own length is the cause, and the bot says so."""
    if request.continue_text:
        return ReplyTooLongToContinue(f"the reply is too long to continue: {error}")
    return GenerationFailed(f"prompt too long: {error}")


class ReloadInProgress(GeneratorError):
    """A reload was asked for while another reload is queued or running."""


class ReloadFailed(GeneratorError):
    """A reload failed at `step`; the previous model keeps serving."""

    def __init__(self, step: str, reason: str) -> None:
        super().__init__(f"reload failed at step '{step}': {reason}")
        self.step = step
        self.reason = reason


class ReplyGenerator(Protocol):
    """What the bot needs from a generation backend."""

    async def generate(self, request: ReplyRequest) -> Reply: ...

    async def reload(self, source: str) -> ModelInfo: ...

    def info(self) -> ModelInfo: ...

    def queue_depth(self) -> int: ...

    def is_alive(self) -> bool: ...  # can it still answer? (for health checks)

    async def close(self, grace_seconds: float = 10.0) -> None: ...
