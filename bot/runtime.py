"""Shared start-up pieces for every front end: logging, which model to serve, and the worker."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from bot.config import Settings

if TYPE_CHECKING:  # importing the worker loads torch: only create_worker needs it
    from model.serving.worker import ModelWorker

log = logging.getLogger(__name__)

LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
# discord.gateway/http at DEBUG log raw events (message text) and request bodies, aiosqlite at DEBUG every
# SQL statement with its parameters (message text): never below INFO unless BOT_LOG_MESSAGE_TEXT=true.
MESSAGE_TEXT_LOGGERS = ("discord", "aiosqlite")
QUIET_LOGGERS = (*MESSAGE_TEXT_LOGGERS, "transformers", "httpx", "urllib3", "filelock", "huggingface_hub")


def setup_logging(level: str, log_message_text: bool = False) -> None:
    """Configure logging once for the process; the quiet loggers stay at INFO or above.

    With `log_message_text` the loggers whose debug output holds message text follow `level`.
    """
    logging.basicConfig(level=level, format=LOG_FORMAT)
    for name in QUIET_LOGGERS:
        if log_message_text and name in MESSAGE_TEXT_LOGGERS:
            continue
        logging.getLogger(name).setLevel(max(logging.INFO, logging.getLogger().level))


def model_source(settings: Settings) -> str:
    """The model to serve: the registry's promoted `current` version when there is one, else BOT_MODEL."""
    from model.training.registry import current_source

    promoted = current_source(settings.models_dir)
    if promoted is not None:
        log.info("serving the promoted model %s (BOT_MODEL=%s is the base)", promoted, settings.model)
        return promoted
    return settings.model


def create_worker(settings: Settings) -> ModelWorker:
    """A model worker configured from the settings (not started: use `async with`); seeds fixed first."""
    from model.loading import set_seed
    from model.serving.engines import EngineOptions
    from model.serving.worker import ModelWorker

    set_seed(settings.seed)
    return ModelWorker(
        model_source(settings),
        queue_size=settings.queue_size,
        device=settings.device,
        dtype=settings.dtype,
        allow_pickle=settings.allow_pickle,
        models_dir=settings.models_dir,
        sampling=settings.sampling(),
        engine_options=EngineOptions(
            settings.engine, settings.cpu_compute, settings.cpu_threads, settings.ct2_dir
        ),
    )
