"""Shared simcord fixtures: the real ChatBot on a temporary database with a FakeGenerator, in simcord.

Use the `harness` fixture for the defaults (assign `harness = discord_harness.harness` and
`simcord_bot = discord_harness.simcord_bot` in the test module; it runs on simcord's own `simcord_env`
fixture), or `async with running_bot(tmp_path, ...)` inside a test for other settings (keywords override
Settings fields). Another cog (e.g. bot.cogs.retrain) is tested by passing
`cog_modules=(*TEST_COGS, "bot.cogs.retrain")`.

Inside the environment time is virtual: `discord.utils.utcnow()` (the bot's clock here) and message
timestamps only move with `await env.advance_time(seconds)`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import discord
import pytest
import simcord

from bot import sharding
from bot.chatbot import COG_MODULES, ChatBot
from bot.config import Settings
from bot.storage import Storage
from model.api import ReplyGenerator
from tests.helpers.fakes import FakeGenerator

# Every production cog but retraining (its tests add it: it starts child processes).
TEST_COGS = tuple(module for module in COG_MODULES if module != "bot.cogs.retrain")
MESSAGES_POST = "/channels/*/messages"


def virtual_clock() -> float:
    """Unix seconds from discord.utils.utcnow, which simcord drives (the bot's clock in these tests)."""
    return discord.utils.utcnow().timestamp()


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    """Test settings: a temporary data dir, no cooldown and no follow-up window unless a test asks."""
    base: dict[str, Any] = {
        "data_dir": tmp_path / "data",
        "cooldown_seconds": 0.0,
        "followup_window_seconds": 0.0,
        "bot_name": "Bot",
    }
    return dataclasses.replace(Settings(), **{**base, **overrides})


@dataclass
class Harness:
    """A running bot and a small world: one guild, #general, an admin and two ordinary members."""

    env: simcord.Env
    bot: ChatBot
    generator: Any  # the FakeGenerator, unless a test passed another ReplyGenerator
    storage: Storage
    guild: simcord.GuildHandle
    channel: simcord.ChannelHandle
    admin: simcord.MemberActor
    alice: simcord.MemberActor
    bob: simcord.MemberActor

    @property
    def bot_id(self) -> int:
        assert self.bot.user is not None
        return self.bot.user.id

    def bot_messages(self, channel: simcord.ChannelHandle | None = None) -> list[discord.Message]:
        """What the bot posted in a channel (default #general), oldest first; ephemeral answers excluded."""
        history = (channel or self.channel).history()
        return [m for m in history if m.author.id == self.bot_id and not m.flags.ephemeral]

    def message_posts(self) -> list[dict[str, Any]]:
        """JSON bodies of every message the bot tried to create (failed attempts included)."""
        return [
            entry.json
            for entry in self.env.http_requests
            if entry.method == "POST" and entry.path.endswith("/messages") and isinstance(entry.json, dict)
        ]

    def deferred(self) -> bool:
        """Whether the last interaction was acknowledged with a deferral (type 5) before its answer."""
        callbacks = [e.json for e in self.env.http_requests if e.path.endswith("/callback")]
        return bool(callbacks) and isinstance(callbacks[-1], dict) and callbacks[-1].get("type") == 5

    def open_command_to(self, name: str, member: simcord.MemberActor) -> None:
        """What a server admin can do in Integrations settings: show an admin command to `member` too."""
        command = self.env.backend.find_command(name, self.guild.id)
        assert command is not None, f"/{name} was not synced"
        self.guild.set_command_permissions(int(command["id"]), {member: True})

    def typing_posts(self) -> list[str]:
        """Paths of every typing indicator the bot triggered."""
        return [e.path for e in self.env.http_requests if e.method == "POST" and e.path.endswith("/typing")]


def build_bot(
    settings: Settings,
    storage: Storage,
    generator: ReplyGenerator,
    cogs: Iterable[str],
    clock: Callable[[], float] = virtual_clock,
) -> ChatBot:
    """ChatBot (ShardedChatBot with BOT_SHARDS) on the virtual clock (or a skewed one), instant retries."""
    bot = sharding.build_bot(settings, storage, generator, clock=clock, cog_modules=cogs)
    bot.send_retry_delays_seconds = (0.0, 0.0, 0.0)
    return bot


def populate(env: simcord.Env) -> Harness:
    """The small world every test starts from."""
    bot = env.bot
    assert isinstance(bot, ChatBot)
    guild = env.create_guild("Test Guild")
    admins = guild.create_role("Admins", permissions=discord.Permissions(manage_guild=True))
    return Harness(
        env=env,
        bot=bot,
        generator=bot.generator,
        storage=bot.storage,
        guild=guild,
        channel=guild.create_text_channel("general"),
        admin=guild.add_member(env.create_user("admin"), roles=[admins]),
        alice=guild.add_member(env.create_user("alice")),
        bob=guild.add_member(env.create_user("bob")),
    )


@asynccontextmanager
async def running_bot(
    tmp_path: Path,
    *,
    generator: ReplyGenerator | None = None,
    cog_modules: Iterable[str] = TEST_COGS,
    env_options: dict[str, Any] | None = None,
    clock: Callable[[], float] = virtual_clock,
    **settings_overrides: Any,
) -> AsyncIterator[Harness]:
    """Inside a test: start ChatBot (tmp Storage, FakeGenerator) in simcord with these settings.

    `clock` is the host's clock as the bot sees it (Discord's time stays simcord's virtual one)."""
    settings = make_settings(tmp_path, **settings_overrides)
    fake = generator if generator is not None else FakeGenerator()
    async with Storage.open(settings.db_path, settings.db_busy_timeout_seconds) as storage:
        bot = build_bot(settings, storage, fake, cog_modules, clock)
        async with simcord.run(bot, **(env_options or {})) as env:
            yield populate(env)


@pytest.fixture
async def simcord_bot(tmp_path: Path) -> AsyncIterator[ChatBot]:
    """The bot for simcord's own `simcord_env` fixture (default test settings); its database closes after."""
    settings = make_settings(tmp_path)
    async with Storage.open(settings.db_path, settings.db_busy_timeout_seconds) as storage:
        yield build_bot(settings, storage, FakeGenerator(), TEST_COGS)


@pytest.fixture
def harness(simcord_env: simcord.Env) -> Harness:
    """The running bot and its world (on simcord's `simcord_env`, which builds `simcord_bot`)."""
    return populate(simcord_env)


def response_text(result: simcord.InteractionResult) -> str:
    """The text the user saw for a slash command: the last follow-up, else the first response."""
    if result.followups:
        return result.followups[-1].content
    return result.response.content if result.response else ""
