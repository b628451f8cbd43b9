"""Storage's channel-settings section on a real SQLite file: the channel and parent read in one query, the
/channel setters, a thread's parent remembered on first sight, and the bot's threads."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bot.storage import ChannelSettings, Storage
from tests.helpers.records import CHANNEL, GUILD, msg

THREAD = 77


@pytest.fixture
async def storage(tmp_path: Path) -> AsyncIterator[Storage]:
    async with Storage.open(tmp_path / "chatbot.db") as opened:
        yield opened


async def test_unknown_channels_read_as_defaults(storage: Storage) -> None:
    assert await storage.channel_and_parent_settings(5, None) == (ChannelSettings(5), None)
    assert await storage.channel_and_parent_settings(5, 6) == (ChannelSettings(5), ChannelSettings(6))


async def test_every_channel_setting_round_trips(storage: Storage) -> None:
    await storage.set_channel_persona(CHANNEL, GUILD, "A pirate.")
    await storage.set_channel_sampling(CHANNEL, GUILD, {"temperature": 0.3, "top_k": 5})
    await storage.set_channel_thread_mode(CHANNEL, GUILD, True)
    await storage.set_channel_wake_words(CHANNEL, GUILD, ["pineapple", "天気"])
    await storage.set_channel_wake_on_name(CHANNEL, GUILD, True)
    await storage.set_channel_reply_chance(CHANNEL, GUILD, 0.25, 45.0)
    with pytest.raises(ValueError):
        await storage.set_channel_sampling(CHANNEL, GUILD, {"temperature": math.nan})
    channel = await storage.channel_settings(CHANNEL)
    assert channel == ChannelSettings(
        CHANNEL,
        persona="A pirate.",
        sampling_overrides={"temperature": 0.3, "top_k": 5},
        thread_mode=True,
        wake_words=("pineapple", "天気"),
        wake_on_name=True,
        reply_chance=0.25,
        chance_cooldown_seconds=45.0,
    )
    await storage.reset_channel_config(CHANNEL, GUILD)
    reset = await storage.channel_settings(CHANNEL)
    assert (reset.persona, reset.sampling_overrides, reset.thread_mode) == (None, {}, True)  # only these two


async def test_the_database_refuses_a_chance_outside_zero_to_one(storage: Storage) -> None:
    with pytest.raises(Exception, match="CHECK"):
        await storage.set_channel_reply_chance(CHANNEL, GUILD, 1.5, 0.0)
    assert (await storage.channel_settings(CHANNEL)).reply_chance == 0.0


async def test_a_threads_parent_is_remembered_when_first_seen_and_read_with_it_in_one_query(
    storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    await storage.set_channel_persona(CHANNEL, GUILD, "Parent persona.")
    await storage.add_message(msg(1, channel_id=THREAD), parent_id=CHANNEL)
    await storage.add_message(msg(2, channel_id=THREAD))  # later messages need not repeat it
    queries: list[str] = []
    rows = storage._rows

    async def counted_rows(sql: str, params: Any = ()) -> Any:
        queries.append(sql)
        return await rows(sql, params)

    monkeypatch.setattr(storage, "_rows", counted_rows)
    thread, parent = await storage.channel_and_parent_settings(THREAD, CHANNEL)
    assert thread.parent_id == CHANNEL and not thread.is_bot_thread
    assert parent is not None and parent.persona == "Parent persona."
    assert len(queries) == 1  # one query for both rows


async def test_a_bot_thread_is_recorded_once_with_its_opening_message(storage: Storage) -> None:
    await storage.add_message(msg(5))
    await storage.add_bot_thread(THREAD, CHANNEL, GUILD, message_id=5, at=10.0)
    await storage.add_bot_thread(THREAD, CHANNEL, GUILD, message_id=5, at=11.0)  # a replay changes nothing
    thread = await storage.channel_settings(THREAD)
    assert thread.is_bot_thread and thread.opened_for_message_id == 5 and thread.parent_id == CHANNEL
    assert not (await storage.channel_settings(CHANNEL)).is_bot_thread
