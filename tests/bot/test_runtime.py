"""Start-up pieces shared by the front ends: logging (no message text in any logger's records, even with
the root logger at DEBUG), and the one answer to "what does the bot serve?" (the promoted version, else
BOT_MODEL, a version by its folder) that the worker at start-up, retraining and `chatbot promote` all ask."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import bot.retrain.pipeline
import bot.retrain.versions
from bot.config import Settings
from bot.conversation import ConversationService, IncomingMessage
from bot.runtime import QUIET_LOGGERS, create_worker, model_source, setup_logging
from bot.storage import Storage
from model.training.registry import Registry
from tests.helpers.fakes import FakeGenerator
from tests.helpers.models import fake_model_dir

CANARY = "LOG-CANARY-b6f0 my password is swordfish"


@pytest.fixture
def every_record(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[logging.LogRecord]]:
    """Every record any logger emits (its own handlers, propagate or not); logger levels restored after."""
    names = [None, *QUIET_LOGGERS, *logging.root.manager.loggerDict]
    levels = {name: logging.getLogger(name).level for name in names}
    records: list[logging.LogRecord] = []
    real_handle = logging.Logger.handle

    def handle(self: logging.Logger, record: logging.LogRecord) -> None:
        records.append(record)
        real_handle(self, record)

    monkeypatch.setattr(logging.Logger, "handle", handle)
    yield records
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


async def drive_the_canary(tmp_path: Path) -> None:
    """A message holding the canary through the conversation core and storage: stored, prompted, replied
    to, edited, deleted, exported."""
    settings = Settings.from_env({"BOT_DATA_DIR": str(tmp_path / "data")})
    async with Storage.open(settings.db_path) as storage:
        service = ConversationService(storage, FakeGenerator([f"you said {CANARY}"]), settings, bot_user_id=2)
        message = IncomingMessage(10, 20, 30, 40, "ann", False, CANARY, 1.0)
        context = await service.context_for(message)
        await service.record(message, context)
        draft = await service.compose_reply(message, context)
        await service.record_reply(message, context, draft, [(11, draft.text)], 2.0)
        await storage.set_guild_training_export(30, True)
        assert any([CANARY in row.message.content async for row in storage.export_rows()])
        await storage.mark_edited(10, f"edited {CANARY}", 3.0)
        await storage.mark_deleted([10, 11])
        await storage.wait_scrubbed()


def texts(records: list[logging.LogRecord]) -> str:
    return "\n".join(f"{r.name}: {r.getMessage()} {r.args!r} {r.exc_text or ''}" for r in records)


async def test_no_logger_carries_message_text_at_debug(tmp_path: Path, every_record: list) -> None:
    logging.getLogger().setLevel(logging.DEBUG)  # as basicConfig does (pytest's handlers make it a no-op)
    setup_logging("DEBUG")
    await drive_the_canary(tmp_path)
    assert every_record and logging.getLogger("bot.storage").isEnabledFor(logging.DEBUG)
    assert CANARY not in texts(every_record)
    assert logging.getLogger("aiosqlite").getEffectiveLevel() == logging.INFO


async def test_the_flag_lets_message_text_through_for_debugging(tmp_path: Path, every_record: list) -> None:
    """BOT_LOG_MESSAGE_TEXT=true: aiosqlite logs its SQL parameters (so the test above can fail)."""
    assert Settings.from_env({"BOT_LOG_MESSAGE_TEXT": "true"}).log_message_text
    assert not Settings().log_message_text
    logging.getLogger().setLevel(logging.DEBUG)
    setup_logging("DEBUG", log_message_text=True)
    logging.getLogger("aiosqlite").setLevel(logging.NOTSET)  # follow the root, as a fresh process would
    await drive_the_canary(tmp_path)
    assert CANARY in texts([r for r in every_record if r.name.startswith("aiosqlite")])


# --- what the bot serves -------------------------------------------------------------------------------


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data", model="gpt2", device="cpu")


def test_bot_model_is_served_before_any_promotion(settings: Settings, tmp_path: Path) -> None:
    assert model_source(settings) == "gpt2"  # a hub id, as it is
    assert model_source(dataclasses.replace(settings, model="starter")) == "starter"
    folder = fake_model_dir(tmp_path / "my-model")
    assert model_source(dataclasses.replace(settings, model=str(folder))) == str(folder)


def test_a_bot_model_naming_a_registry_version_is_served_by_its_folder(settings: Settings,
                                                                       tmp_path: Path) -> None:  # fmt: skip
    version = Registry(settings.models_dir).add(fake_model_dir(tmp_path / "run1"))
    # The worker's loader would resolve "v1" to this folder; training and evaluation need the folder itself.
    assert model_source(dataclasses.replace(settings, model="v1")) == str(version.path.resolve())
    assert model_source(dataclasses.replace(settings, model="v9")) == "v9"  # no such version: as it is


def test_the_promoted_version_wins_over_bot_model(settings: Settings, tmp_path: Path) -> None:
    registry = Registry(settings.models_dir)
    registry.add(fake_model_dir(tmp_path / "run1"))
    second = registry.add(fake_model_dir(tmp_path / "run2"))
    registry.promote("v2", val_ppl=None, current_ppl=None, margin=0.02)
    assert model_source(settings) == str(second.path)
    assert model_source(dataclasses.replace(settings, model="v1")) == str(second.path)


def test_the_worker_and_retraining_ask_the_same_function(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    version = Registry(settings.models_dir).add(fake_model_dir(tmp_path / "run1"))
    settings = dataclasses.replace(settings, model="v1")
    started: list[str] = []

    def fake_worker(source: str, **kwargs: Any) -> None:
        started.append(source)

    monkeypatch.setattr("model.serving.worker.ModelWorker", fake_worker)
    create_worker(settings)
    assert started == [str(version.path.resolve())]  # the folder, as retraining trains from
    assert bot.retrain.pipeline.model_source is model_source
    assert bot.retrain.versions.model_source is model_source
