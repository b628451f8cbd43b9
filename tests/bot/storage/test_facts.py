"""Storage's remembered facts on a real SQLite file: the limit, a thread's inheritance, forget, /forget-me."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bot.storage import Storage
from tests.helpers.records import CHANNEL, GUILD, USER, msg

THREAD, OTHER_CHANNEL, OTHER_USER = 11, 12, 200


@pytest.fixture
async def storage(tmp_path: Path) -> AsyncIterator[Storage]:
    async with Storage.open(tmp_path / "data" / "chatbot.db") as opened:
        yield opened


async def texts(storage: Storage, *channel_ids: int) -> list[str]:
    return [fact.text for fact in await storage.channel_facts(channel_ids)]


async def test_add_list_and_forget_by_number(storage: Storage) -> None:
    for i in range(3):
        assert await storage.add_fact(CHANNEL, GUILD, USER, f"fact {i}", float(i), limit=10) is not None
    assert await texts(storage, CHANNEL) == ["fact 0", "fact 1", "fact 2"]
    removed = await storage.forget_fact(CHANNEL, 2)
    assert removed is not None and removed.text == "fact 1"
    assert await texts(storage, CHANNEL) == ["fact 0", "fact 2"]
    assert await storage.forget_fact(CHANNEL, 3) is None  # no third fact any more
    assert await storage.forget_fact(CHANNEL, 0) is None
    assert await storage.forget_fact(OTHER_CHANNEL, 1) is None  # another channel's numbers are its own
    assert await texts(storage, CHANNEL) == ["fact 0", "fact 2"]


async def test_the_limit_holds_even_for_racing_adds(storage: Storage) -> None:
    results = await asyncio.gather(
        *(storage.add_fact(CHANNEL, GUILD, USER, f"fact {i}", float(i), limit=4) for i in range(10))
    )
    assert sum(result is not None for result in results) == 4
    assert len(await texts(storage, CHANNEL)) == 4
    assert await storage.add_fact(OTHER_CHANNEL, GUILD, USER, "elsewhere", 0.0, limit=4) is not None


async def test_a_thread_sees_its_parents_facts_then_its_own_in_one_read(storage: Storage) -> None:
    await storage.add_fact(THREAD, GUILD, USER, "thread fact", 1.0, limit=10)
    await storage.add_fact(CHANNEL, GUILD, USER, "parent fact", 2.0, limit=10)
    await storage.add_fact(OTHER_CHANNEL, GUILD, USER, "unrelated", 3.0, limit=10)
    assert await texts(storage, CHANNEL, THREAD) == ["parent fact", "thread fact"]
    assert await texts(storage, CHANNEL) == ["parent fact"]
    assert await storage.channel_facts([]) == []


async def test_forget_me_deletes_the_users_facts_and_counts_them(storage: Storage) -> None:
    await storage.add_message(msg(1))
    await storage.add_fact(CHANNEL, GUILD, USER, "mine", 1.0, limit=10)
    await storage.add_fact(THREAD, GUILD, USER, "mine too", 1.0, limit=10)
    await storage.add_fact(CHANNEL, GUILD, OTHER_USER, "theirs", 2.0, limit=10)
    deleted = await storage.delete_user_data(USER, 5.0)
    assert deleted == 3  # one message, two facts
    assert await texts(storage, CHANNEL, THREAD) == ["theirs"]


async def test_purging_a_guilds_messages_keeps_its_facts(storage: Storage) -> None:
    await storage.add_message(msg(1))
    await storage.add_fact(CHANNEL, GUILD, USER, "kept", 1.0, limit=10)
    assert await storage.purge_guild_messages(GUILD) == 1
    assert await texts(storage, CHANNEL) == ["kept"]
