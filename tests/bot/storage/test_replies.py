"""bot.storage's regenerate/continue methods on a real SQLite file: a reply found from any of its messages,
the history it came from, a replaced reply left out unless kept, a continued reply in one write."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bot.storage import BotReplyRecord, Storage, StoredMessage
from tests.helpers.records import CHANNEL, GUILD, USER, msg

BOT = 999
OTHER = 200


def record(reply_id: int, answers_id: int, replaces: int | None = None) -> BotReplyRecord:
    return BotReplyRecord(
        reply_id, answers_id, CHANNEL, "tiny", "v1", {}, 0.1, 10, 4, float(reply_id), replaces
    )


def bot_msg(message_id: int, text: str, answers: int) -> StoredMessage:
    return msg(message_id, text, author_id=BOT, author_name="Bot", is_bot=True, reply_to_id=answers)


@pytest.fixture
async def storage(tmp_path: Path) -> AsyncIterator[Storage]:
    async with Storage.open(tmp_path / "chatbot.db") as opened:
        await opened.add_message(msg(1, "first question"))
        await opened.add_reply(
            [bot_msg(2, "answer one", 1), bot_msg(3, "answer one, part two", 1)], record(2, 1)
        )
        await opened.add_message(msg(4, "second question"))
        await opened.add_reply([bot_msg(5, "old answer", 4)], record(5, 4))
        await opened.add_message(msg(6, "unrelated", author_id=OTHER, author_name="bob"))
        yield opened


def texts(history: list[StoredMessage]) -> list[str]:
    return [m.content for m in history]


async def test_a_reply_is_found_from_any_of_its_messages(storage: Storage) -> None:
    for message_id in (2, 3):
        found = await storage.reply_for_message(message_id)
        assert found is not None and found.reply_message_id == 2 and found.answers_message_id == 1
        assert found.chunks == ((2, "answer one"), (3, "answer one, part two"))
        assert (found.answered_author_id, found.guild_id, found.is_latest) == (USER, GUILD, False)
    latest = await storage.reply_for_message(5)
    assert latest is not None and latest.is_latest and latest.text == "old answer"
    assert await storage.reply_for_message(1) is None and await storage.reply_for_message(77) is None


async def test_history_until_ends_at_the_answered_message(storage: Storage) -> None:
    assert texts(await storage.history_until(CHANNEL, 4, 10)) == [
        "first question", "answer one", "answer one, part two", "second question",
    ]  # fmt: skip
    assert texts(await storage.history_until(CHANNEL, 4, 2)) == ["answer one, part two", "second question"]
    assert await storage.history_until(CHANNEL, 12345, 10) == []


async def test_a_replaced_reply_leaves_history_and_export_unless_its_person_kept_it(storage: Storage) -> None:
    await storage.add_reply([bot_msg(7, "new answer", 4)], record(7, 4, replaces=5))
    found = await storage.reply_for_message(7)
    assert found is not None and found.chunks == ((7, "new answer"),) and found.is_latest
    assert "old answer" not in texts(await storage.recent_history(CHANNEL, 10))
    assert "new answer" in texts(await storage.recent_history(CHANNEL, 10))
    await storage.set_guild_training_export(GUILD, True)
    flags = {row.message.message_id: (row.reply_id, row.replaced) async for row in storage.export_rows()}
    assert (
        flags[5] == (5, True)
        and flags[7] == (7, False)
        and flags[3] == (2, False)
        and flags[4] == (None, False)
    )
    # Someone else's 👍 does not keep it; the answered person's does.
    await storage.set_feedback(5, OTHER, 1, 10.0)
    assert "old answer" not in texts(await storage.recent_history(CHANNEL, 10))
    await storage.set_feedback(5, USER, 1, 11.0)
    assert "old answer" in texts(await storage.recent_history(CHANNEL, 10))
    replaced = {row.message.message_id: row.replaced async for row in storage.export_rows()}
    assert not replaced[5]


async def test_a_continued_reply_is_one_write(storage: Storage) -> None:
    assert await storage.extend_reply(
        5, (5, "old answer and more"), [bot_msg(8, "a second part", 4)], 6, 20.0
    )
    found = await storage.reply_for_message(8)
    assert found is not None and found.reply_message_id == 5
    assert (
        found.chunks == ((5, "old answer and more"), (8, "a second part")) and found.completion_tokens == 10
    )
    await storage.set_guild_logging(GUILD, False)
    assert not await storage.extend_reply(5, (5, "lost"), [], 1, 21.0)
    assert (await storage.get_message(5)).content == "old answer and more"  # type: ignore[union-attr]
