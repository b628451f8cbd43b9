"""The worker's job records and the steps that make a model ready to serve (load → smoke).

Split out of model/worker.py to keep it readable: nothing here touches threads or the event loop
except `resolve_future`, which the worker only ever calls on the loop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from model.api import ModelInfo, Reply, ReplyRequest
from model.engine import DecodeEngine, EngineJob
from model.generation import HFGenerateEngine, is_repeat, stop_token_ids
from model.prompt import Prompt, encodes_newline, sanitize_speaker
from model.sampling import SamplingParams

if TYPE_CHECKING:
    from model.loading import LoadedModel

SMOKE_PROMPT = "User: Hello!\nBot:"
SMOKE_PARAMS = SamplingParams(max_new_tokens=4, temperature=0.0)
SMOKE_TIME_LIMIT_SECONDS = 60.0


@dataclass(frozen=True, eq=False)
class GenerateJob:
    """A caller's request as queued; `future` is only ever touched on the event loop."""

    request: ReplyRequest
    future: asyncio.Future[Reply]
    submitted_at: float  # time.monotonic()


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
        is_time_left = time.monotonic() < self.deadline
        return self.attempts == 1 and is_time_left and is_repeat(text, self.job.request.recent_bot_replies)

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


def default_engine_factory(loaded: LoadedModel, max_batch_size: int | None = None) -> DecodeEngine:
    """BatchedGPT2Engine for GPT-2 architecture models, HFGenerateEngine for every other causal LM."""
    from model.fastgen import BatchedGPT2Engine

    if not BatchedGPT2Engine.supports(loaded.model):
        return HFGenerateEngine(loaded.model, loaded.tokenizer)
    if max_batch_size is None:
        max_batch_size = _batch_slots(loaded)
    return BatchedGPT2Engine(loaded.model, loaded.tokenizer, max_batch_size=max_batch_size)


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
) -> Serving:
    """Load a model and prove it generates; StepFailed names the step ("load" or "smoke") that failed."""
    try:
        loaded = loader(source)
    except Exception as exc:
        raise StepFailed("load", exc) from exc
    try:
        return smoke_test(loaded, engine_factory)
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
