"""Getting a model ready to serve: load it, prove it generates (the smoke test), describe it.

A reload runs the same steps as the start (worker_thread.ThreadSide._prepare); `StepFailed` names the
step that failed, so the admin is told which. After a failure or a swap `release_memory` hands the GPU
memory back; `is_fatal_device_error` tells an out-of-memory (that request fails) from a broken CUDA
context (the process exits).
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from model.api import ModelInfo, ReplyRequest
from model.encoding import encodes_newline, thread_copy
from model.engine import DecodeEngine, EngineJob
from model.prompt import PromptTooLong, Turn, build_prompt
from model.replies import stop_token_ids
from model.sampling import SamplingParams
from model.serving.jobs import Serving, fit_to_context

if TYPE_CHECKING:
    from model.loading import LoadedModel

log = logging.getLogger(__name__)

# The persona of the export format (and the bot's default); the bot passes its own (bot/runtime.py).
SMOKE_PERSONA = "A friendly chat between a helpful bot and the people of a Discord server."
SMOKE_HISTORY = (Turn("User", "Hello! How are you today?"),)
SMOKE_GENERATED_TOKENS = 4  # enough to prove the engine steps; the budget is checked by the prompt build
SMOKE_TIME_LIMIT_SECONDS = 60.0


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


def prepare_serving(
    source: str,
    loader: Callable[[str], LoadedModel],
    engine_factory: Callable[[LoadedModel], DecodeEngine],
    tokenizer_copies: int = 0,
    smoke_request: ReplyRequest | None = None,
) -> Serving:
    """Load a model, prove it generates and copy its tokenizer for the prompt builders.

    StepFailed names the step ("load" or "smoke") that failed.
    """
    try:
        loaded = loader(source)
    except Exception as exc:
        raise StepFailed("load", exc) from exc
    try:
        serving = smoke_test(loaded, engine_factory, smoke_request or default_smoke_request())
        for _ in range(tokenizer_copies):
            serving.tokenizer_copies.put(thread_copy(loaded.tokenizer))
        return serving
    except Exception as exc:
        raise StepFailed("smoke", exc) from exc


def default_smoke_request(
    sampling: SamplingParams | None = None, persona: str = SMOKE_PERSONA, bot_name: str = "Bot"
) -> ReplyRequest:
    """A short real request with the bot's persona and sampling (its max_new_tokens is the budget checked)."""
    return ReplyRequest(persona, SMOKE_HISTORY, bot_name, params=sampling or SamplingParams())


def smoke_prompt_ids(loaded: LoadedModel, request: ReplyRequest) -> list[int]:
    """The request's prompt as a request would get it: fitted to the context, built by the real builder.

    A model whose context cannot hold the persona, a short message and the reply budget would fail every
    request after loading fine: it is refused here instead, with what does not fit.
    """
    budget = fit_to_context(request, loaded.n_positions).params.max_new_tokens
    try:
        prompt = build_prompt(loaded.tokenizer, request.persona, request.history, request.bot_name, budget,
                              loaded.n_positions)  # fmt: skip
    except PromptTooLong as exc:
        raise ValueError(
            f"its context window ({loaded.n_positions} positions) cannot hold the persona, a short message"
            f" and a {budget}-token reply ({exc}): serve a model with a larger n_positions"
        ) from exc
    return list(prompt.input_ids)


def smoke_test(
    loaded: LoadedModel, engine_factory: Callable[[LoadedModel], DecodeEngine], request: ReplyRequest
) -> Serving:
    """Build a real prompt within the reply budget, check the logits are finite, generate a few tokens."""
    prompt_ids = smoke_prompt_ids(loaded, request)
    _check_finite_logits(loaded, prompt_ids)
    serving = Serving(
        loaded, engine_factory(loaded), stop_token_ids(loaded.tokenizer), encodes_newline(loaded.tokenizer)
    )
    deadline = time.monotonic() + SMOKE_TIME_LIMIT_SECONDS
    params = SamplingParams(max_new_tokens=SMOKE_GENERATED_TOKENS, temperature=0.0)
    serving.engine.admit(EngineJob(0, tuple(prompt_ids), params, deadline, serving.stop_ids))
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


def release_memory() -> None:
    """Free dropped tensors now and hand cached GPU memory back."""
    gc.collect()  # dropped weights can hold GBs of GPU memory: release them now, not at some later GC
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def is_fatal_device_error(exc: BaseException) -> bool:
    """A CUDA error other than out-of-memory leaves the context unusable: only a restart helps."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return False
    message = str(exc)
    return isinstance(exc, RuntimeError) and ("CUDA error" in message or "device-side assert" in message)
