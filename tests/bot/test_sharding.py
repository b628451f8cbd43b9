"""BOT_SHARDS: the settings, discord.py's AutoShardedBot in simcord with 2 shards, /stats per shard."""

from __future__ import annotations

from pathlib import Path

import discord
import pytest

from bot.config import ConfigError, Settings
from bot.sharding import ShardedChatBot, shard_lines, shard_options
from tests.helpers.discord_harness import response_text, running_bot


def test_shard_settings_are_validated() -> None:
    assert shard_options(Settings.from_env({})) == {}
    assert shard_options(Settings.from_env({"BOT_SHARDS": "auto"})) == {"shard_count": None}
    both = Settings.from_env({"BOT_SHARDS": "4", "BOT_SHARD_IDS": "3,1"})
    assert shard_options(both) == {"shard_count": 4, "shard_ids": [1, 3]}
    for env, message in [
        ({"BOT_SHARDS": "two"}, "BOT_SHARDS must be auto or a shard count"),
        ({"BOT_SHARD_IDS": "1"}, "BOT_SHARD_IDS needs BOT_SHARDS"),
        ({"BOT_SHARDS": "auto", "BOT_SHARD_IDS": "0"}, "set to a number"),
        ({"BOT_SHARDS": "2", "BOT_SHARD_IDS": "0,2"}, "must be below BOT_SHARDS=2"),
    ]:
        with pytest.raises(ConfigError, match=message):
            Settings.from_env(env)


async def test_two_shards_answer_guilds_and_dms_and_stats_shows_each_shard(tmp_path: Path) -> None:
    async with running_bot(tmp_path, shards="2") as h:
        assert isinstance(h.bot, ShardedChatBot) and isinstance(h.bot, discord.AutoShardedClient)
        assert sorted(h.bot.shards) == [0, 1]
        other = h.env.create_guild("Second Guild")
        room = other.create_text_channel("room")
        member = other.add_member(h.env.create_user("carol"))
        guilds = {g.shard_id for g in h.bot.guilds}
        h.generator.replies.extend(["one", "two", "three"])
        assert h.bot.user is not None
        await h.alice.send(h.channel, f"{h.bot.user.mention} hi")
        await member.send(room, f"{h.bot.user.mention} hi")
        await h.bob.user.send_dm("hello in private")
        assert [m.content for m in h.bot_messages()] == ["one"]
        assert [m.content for m in room.history() if m.author.id == h.bot_id] == ["two"]
        assert [m.content for m in h.bob.user.dm_channel.history() if m.author.id == h.bot_id] == ["three"]
        lines = shard_lines(h.bot)
        result = await h.admin.slash(h.channel, "stats")
        text = response_text(result)
    assert guilds <= {0, 1}
    assert [line.split(":")[0] for line in lines] == ["Shard 0", "Shard 1"]
    assert "Shard 0: latency" in text and "Shard 1: latency" in text
