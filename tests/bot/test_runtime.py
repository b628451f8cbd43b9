"""Logging set-up: no message text in any logger's records, even with the root logger at DEBUG."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from bot.config import Settings
from bot.conversation import ConversationService, IncomingMessage
from bot.runtime import QUIET_LOGGERS, setup_logging
from bot.storage import Storage
from tests.helpers.fakes import FakeGenerator

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
