"""Discord sharding: BOT_SHARDS=auto|N (and BOT_SHARD_IDS) run the bot as discord.py's AutoShardedBot.

One process holds every shard it is given (all by default); its event loop, database and generator are
shared by them. Direct messages always arrive on shard 0, so the process that runs shard 0 answers DMs.
Discord requires sharding past 2,500 servers; `auto` asks Discord for its recommended count.
"""

from __future__ import annotations

from typing import Any

import discord
from discord.ext import commands

from bot.chatbot import ChatBot
from bot.config import Settings
from bot.storage import Storage
from model.api import ReplyGenerator


class ShardedChatBot(ChatBot, commands.AutoShardedBot):
    """ChatBot on several gateway connections (discord.py's AutoShardedClient does the sharding)."""


def shard_options(settings: Settings) -> dict[str, Any]:
    """discord.py's shard_count / shard_ids for the settings; {} for an unsharded bot."""
    if settings.shards is None:
        return {}
    options: dict[str, Any] = {"shard_count": None if settings.shards == "auto" else int(settings.shards)}
    if settings.shard_ids:
        options["shard_ids"] = sorted(settings.shard_ids)
    return options


def build_bot(settings: Settings, storage: Storage, generator: ReplyGenerator, **kwargs: Any) -> ChatBot:
    """ChatBot, or ShardedChatBot when BOT_SHARDS is set."""
    options = shard_options(settings)
    if not options:
        return ChatBot(settings, storage, generator, **kwargs)
    return ShardedChatBot(settings, storage, generator, **kwargs, **options)


def shard_lines(bot: discord.Client) -> list[str]:
    """/stats lines: each shard's gateway latency (nothing for an unsharded bot)."""
    if not isinstance(bot, discord.AutoShardedClient):
        return []
    return [f"Shard {shard_id}: latency {_ms(latency)}" for shard_id, latency in sorted(bot.latencies)]


def _ms(seconds: float) -> str:
    return "n/a" if seconds != seconds or seconds == float("inf") else f"{seconds * 1000:.0f} ms"
