"""Shared start-up pieces for every front end: logging, which model to serve, and the worker."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from bot.config import Settings

if TYPE_CHECKING:  # importing the worker loads torch: only create_worker needs it
    from bot.remote.generator import RemoteGenerator
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
    """What the bot serves: the registry's promoted `current` version, else BOT_MODEL.

    The one answer for the worker at start-up, /reload without a model, retraining's base and the served
    side of every comparison. A BOT_MODEL that names a registry version becomes that version's folder
    (training and evaluation load by path or hub id and know no registry); anything else is BOT_MODEL.
    """
    from model.training.registry import current_source

    promoted = current_source(settings.models_dir)
    if promoted is not None:
        log.info("serving the promoted model %s (BOT_MODEL=%s is the base)", promoted, settings.model)
        return promoted
    return _version_folder(settings.model, settings.models_dir) or settings.model


def _version_folder(name: str, models_dir: Path) -> str | None:
    """The folder of the registry version `name` names, by the loader's own rule; None if it names none."""
    from model.loading import STARTER_MODEL_NAME, ModelLoadError, resolve_model_source

    if name == STARTER_MODEL_NAME or Path(name).expanduser().is_dir():
        return None  # the starter, or a folder that is served as it is
    try:
        resolved = resolve_model_source(name, models_dir)
    except ModelLoadError:
        return None  # not a version either: loading the model will say what is wrong with it
    return resolved if resolved != name else None  # a hub id resolves to itself


def create_worker(settings: Settings) -> ModelWorker | RemoteGenerator:
    """The reply generator the settings pick (not started: use `async with`): the in-process model
    worker (seeds fixed first), or with BOT_BACKEND=openai the client of the model servers."""
    if settings.backend == "openai":
        from bot.remote.generator import RemoteGenerator, remote_config

        source = model_source(settings)  # the tokenizer's, unless BOT_OPENAI_TOKENIZER names another
        config = remote_config(settings, settings.openai_tokenizer or source, local_source=source)
        return RemoteGenerator(config)
    from model.loading import set_seed
    from model.serving.engines import EngineOptions
    from model.serving.readiness import default_smoke_request
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
        # Each load and reload builds this prompt with the bot's reply budget: a model whose context
        # cannot hold it is refused up front instead of failing every request.
        smoke_request=default_smoke_request(settings.sampling(), settings.persona, settings.bot_name),
    )
