"""The worker's job records and the steps that make a model ready to serve (load → smoke).

Split out of model/worker.py to keep it readable (the prompt builders' pool is in model/prompt_builders.py).
`resolve_future` is only ever called on the event loop.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from model.api import ModelInfo, Reply, ReplyRequest
from model.encoding import Decoder, encodes_newline, thread_copy
from model.engine import DecodeEngine, EngineJob
from model.generation import HFGenerateEngine, is_repeat, resample_params, stop_token_ids
from model.prompt import (
    Prompt,
    sanitize_speaker,
)
from model.sampling import SamplingParams

if TYPE_CHECKING:
    from model.loading import LoadedModel

log = logging.getLogger(__name__)

SMOKE_PROMPT = "User: Hello!\nBot:"
SMOKE_PARAMS = SamplingParams(max_new_tokens=4, temperature=0.0)
SMOKE_TIME_LIMIT_SECONDS = 60.0


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


def release_memory() -> None:
    """Free dropped tensors now and hand cached GPU memory back."""
    gc.collect()  # dropped weights can hold GBs of GPU memory: release them now, not at some later GC
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class StepFailed(Exception):
    """Getting a model ready failed at `step` ("load", "smoke" or "swap")."""

    def __init__(self, step: str, error: BaseException) -> None:
        super().__init__(f"{step}: {error}")
        self.step = step
        self.error = error


def default_loader(
    device: str, dtype: str, allow_pickle: bool, models_dir: Path | None
) -> Callable[[str], LoadedModel]:
    """`model.loading.load_model` with the worker's device, dtype, pickle policy and models folder."""

    def load(source: str) -> LoadedModel:
        from model.loading import load_model

        return load_model(
            source, device=device, dtype=dtype, allow_pickle=allow_pickle, models_dir=models_dir
        )

    return load


CUDA_MAX_BATCH = 256  # sequences decoded together on a GPU (one CUDA graph per batch-size bucket)
CPU_MAX_BATCH = 8  # a CPU gains little from wide batches
KV_CACHE_MEMORY_FRACTION = 0.3  # of the GPU memory still free after loading the weights


def _batch_slots(loaded: LoadedModel) -> int:
    """How many sequences the preallocated KV cache holds: capped by what the GPU can spare."""
    if loaded.device.type != "cuda":
        return CPU_MAX_BATCH
    config = loaded.model.config
    element_bytes = torch.finfo(loaded.dtype).bits // 8
    slot_bytes = 2 * config.n_layer * loaded.n_positions * config.n_embd * element_bytes  # K and V
    free_bytes, _ = torch.cuda.mem_get_info(loaded.device)
    return max(1, min(CUDA_MAX_BATCH, int(free_bytes * KV_CACHE_MEMORY_FRACTION) // slot_bytes))


def default_engine_factory(
    loaded: LoadedModel,
    max_batch_size: int | None = None,
    sampling: SamplingParams | None = None,
) -> DecodeEngine:
    """BatchedGPT2Engine for GPT-2 architecture models, HFGenerateEngine for every other causal LM.

    The batched engine captures its CUDA graphs for `sampling` (the bot's settings; SamplingParams()
    when None) and for its repeat-guard retry before it serves, so no burst pays for a capture.
    """
    from model.fastgen import BatchedGPT2Engine

    # The batched engine ends turns by token id only; a tokenizer with no newline token (many Japanese
    # sentencepiece models) ends turns at speaker tags, which HFGenerateEngine checks on decoded text.
    if not BatchedGPT2Engine.supports(loaded.model) or not encodes_newline(loaded.tokenizer):
        return HFGenerateEngine(loaded.model, loaded.tokenizer)
    if max_batch_size is None:
        max_batch_size = _batch_slots(loaded)
    sampling = sampling or SamplingParams()
    warm_up = (sampling, resample_params(sampling))
    return BatchedGPT2Engine(loaded.model, loaded.tokenizer, max_batch_size=max_batch_size, warm_up=warm_up)


def model_info(loaded: LoadedModel) -> ModelInfo:
    """Describe a loaded model, with GPU memory figures when it lives on a GPU."""
    from model.loading import describe_device

    allocated = total = None
    if loaded.device.type == "cuda":
        allocated = torch.cuda.memory_allocated(loaded.device)
        total = torch.cuda.get_device_properties(loaded.device).total_memory
    return ModelInfo(
        name=loaded.name,
        version=loaded.version,
        device=describe_device(loaded.device),
        dtype=str(loaded.dtype).removeprefix("torch."),
        total_params=loaded.total_params,
        trainable_params=loaded.trainable_params,
        n_positions=loaded.n_positions,
        gpu_memory_allocated_bytes=allocated,
        gpu_memory_total_bytes=total,
    )


def is_fatal_device_error(exc: BaseException) -> bool:
    """A CUDA error other than out-of-memory leaves the context unusable: only a restart helps."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return False
    message = str(exc)
    return isinstance(exc, RuntimeError) and ("CUDA error" in message or "device-side assert" in message)


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


def prepare_serving(
    source: str,
    loader: Callable[[str], LoadedModel],
    engine_factory: Callable[[LoadedModel], DecodeEngine],
    tokenizer_copies: int = 0,
) -> Serving:
    """Load a model, prove it generates and copy its tokenizer for the prompt builders.

    StepFailed names the step ("load" or "smoke") that failed.
    """
    try:
        loaded = loader(source)
    except Exception as exc:
        raise StepFailed("load", exc) from exc
    try:
        serving = smoke_test(loaded, engine_factory)
        for _ in range(tokenizer_copies):
            serving.tokenizer_copies.put(thread_copy(loaded.tokenizer))
        return serving
    except Exception as exc:
        raise StepFailed("smoke", exc) from exc


def smoke_test(loaded: LoadedModel, engine_factory: Callable[[LoadedModel], DecodeEngine]) -> Serving:
    """Check the logits are finite, then generate a few tokens through a fresh engine."""
    prompt_ids = loaded.tokenizer.encode(SMOKE_PROMPT, add_special_tokens=False)
    _check_finite_logits(loaded, prompt_ids)
    serving = Serving(
        loaded, engine_factory(loaded), stop_token_ids(loaded.tokenizer), encodes_newline(loaded.tokenizer)
    )
    deadline = time.monotonic() + SMOKE_TIME_LIMIT_SECONDS
    serving.engine.admit(EngineJob(0, tuple(prompt_ids), SMOKE_PARAMS, deadline, serving.stop_ids))
    while serving.engine.has_work():
        serving.engine.step()
    return serving


@torch.inference_mode()
def _check_finite_logits(loaded: LoadedModel, prompt_ids: list[int]) -> None:
    # Greedy decoding of NaN logits "works" (argmax picks id 0), so a smoke generation alone would pass.
    input_ids = torch.tensor([prompt_ids], dtype=torch.long, device=loaded.device)  # (1, T)
    logits = loaded.model(input_ids=input_ids).logits  # (1, T, vocab)
    if not torch.isfinite(logits).all():
        raise ValueError("the model produces non-finite logits (NaN or inf weights?)")
