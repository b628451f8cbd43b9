"""ChatBot, the discord.py Bot the cogs run in, and its command tree (a failed command → one line).

This module imports no cog: ChatBot loads them by name (`COG_MODULES`) in `setup_hook`, and the cogs import
this module, so imports flow one way (cogs → chatbot → conversation → storage). `bot.discord_app` builds a
ChatBot from opened resources and runs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, cast

import discord
from discord import app_commands
from discord.ext import commands

from bot.config import Settings
from bot.conversation import ConversationService
from bot.interactions import answer, command_name, refusal_text
from bot.storage import Storage, StorageError
from model.api import ReplyGenerator

log = logging.getLogger(__name__)

COG_MODULES: tuple[str, ...] = (
    "bot.cogs.chat",
    "bot.cogs.admin",
    "bot.cogs.channels",
    "bot.cogs.privacy",
    "bot.cogs.feedback",
    "bot.cogs.memory",
    "bot.cogs.regenerate",
    "bot.cogs.retrain",
)
SEND_RETRY_DELAYS_SECONDS: tuple[float, ...] = (1.0, 2.0, 4.0)
COMMAND_FAILED_REPLY = "Sorry, that command failed. The error was logged for the bot's operator."
DATABASE_FAILED_REPLY = "The database is busy or unavailable right now; nothing was changed. Try again soon."


def bot_intents() -> discord.Intents:
    """Default intents plus Message Content (privileged: enable it in the Developer Portal)."""
    intents = discord.Intents.default()
    intents.message_content = True
    return intents


class ChatCommandTree(app_commands.CommandTree):
    """Turns slash-command failures into one ephemeral line; refusals are audited."""

    async def on_error(self, interaction: discord.Interaction, error: app_commands.AppCommandError) -> None:
        """Check failures → refusal + audit row; storage errors → one line; anything else → logged."""
        if isinstance(error, app_commands.CheckFailure):
            await self._reply(interaction, refusal_text(error))
            await cast("ChatBot", interaction.client).audit(
                interaction, f"refused: {type(error).__name__}", allowed=False
            )
            return
        cause = error.original if isinstance(error, app_commands.CommandInvokeError) else error
        if isinstance(cause, StorageError):
            log.warning("/%s: %s", command_name(interaction), cause)
            await self._reply(interaction, DATABASE_FAILED_REPLY)
            return
        log.error("/%s failed", command_name(interaction), exc_info=error)
        await self._reply(interaction, COMMAND_FAILED_REPLY)

    async def _reply(self, interaction: discord.Interaction, text: str) -> None:
        try:
            await answer(interaction, text)
        except discord.HTTPException as exc:  # the interaction may have expired meanwhile
            log.warning("could not answer /%s: %s", command_name(interaction), exc)


class ChatBot(commands.Bot):
    """The Discord bot. Its dependencies come in through the constructor, so tests inject fakes."""

    def __init__(
        self,
        settings: Settings,
        storage: Storage,
        generator: ReplyGenerator,
        *,
        clock: Callable[[], float] = time.time,
        cog_modules: Iterable[str] = COG_MODULES,
        sync_commands: bool = True,
        **client_options: Any,  # shard_count / shard_ids for bot.sharding's ShardedChatBot
    ) -> None:
        super().__init__(
            command_prefix=commands.when_mentioned,  # unused: no prefix commands (see on_message)
            intents=bot_intents(),
            allowed_mentions=discord.AllowedMentions.none(),  # generated text must never ping anyone
            help_command=None,
            tree_cls=ChatCommandTree,
            **client_options,
        )
        self.settings = settings
        self.storage = storage
        self.generator = generator
        self.clock = clock
        self.cog_modules = tuple(cog_modules)
        self.sync_commands = sync_commands
        self.started_at = clock()  # reset at login (setup_hook); /stats shows uptime since then
        self.is_accepting = True  # False once shutdown begins: new messages are left alone
        self.send_retry_delays_seconds = SEND_RETRY_DELAYS_SECONDS
        self._replies: set[asyncio.Task[object]] = set()
        self._conversation: ConversationService | None = None
        self._shutdown: asyncio.Task[None] | None = None

    @property
    def conversation(self) -> ConversationService:
        """The conversation core; built in setup_hook, once the bot's own user id is known."""
        if self._conversation is None:
            raise RuntimeError("ChatBot.conversation exists only after setup_hook (login)")
        return self._conversation

    async def setup_hook(self) -> None:
        """One-time setup after login: the conversation core, the cogs, the slash commands."""
        assert self.user is not None  # login() sets the user before calling setup_hook
        self.started_at = self.clock()
        self._conversation = ConversationService(
            self.storage, self.generator, self.settings, self.user.id, self.clock
        )
        for module in self.cog_modules:
            await self.load_extension(module)
        if self.sync_commands:
            synced = await self.tree.sync()
            log.info("synced %d slash commands", len(synced))

    async def on_ready(self) -> None:
        """Log the connection (this fires again after reconnects: no setup here)."""
        assert self.user is not None
        log.info("connected as %s (id %d) to %d servers", self.user, self.user.id, len(self.guilds))

    async def on_message(self, message: discord.Message, /) -> None:
        """No prefix commands: the chat cog's listener handles every message."""

    async def audit(self, interaction: discord.Interaction, detail: str, *, allowed: bool) -> None:
        """Append an audit row for this admin command (refusals too); never fails the command."""
        try:
            await self.storage.add_audit(
                interaction.user.id,
                interaction.guild_id,
                command_name(interaction),
                detail,
                allowed,
                self.clock(),
            )
        except Exception:
            log.exception("could not write the audit row for /%s", command_name(interaction))

    @contextlib.contextmanager
    def tracking_reply(self) -> Iterator[None]:
        """Mark the current task as a message in flight: shutdown waits for it to be stored and answered."""
        task = asyncio.current_task()
        if task is not None:
            self._replies.add(task)
        try:
            yield
        finally:
            self._replies.discard(task)

    async def wait_for_replies(self, timeout_seconds: float) -> int:
        """Wait for replies in flight; return how many were still running at the timeout."""
        current = asyncio.current_task()
        pending = {task for task in self._replies if task is not current and not task.done()}
        if not pending:
            return 0
        _, still_running = await asyncio.wait(pending, timeout=timeout_seconds)
        return len(still_running)

    def request_shutdown(self, reason: str = "shutdown requested") -> asyncio.Task[None]:
        """Start the clean shutdown once (a second signal while it runs changes nothing)."""
        if self._shutdown is None:
            log.info("%s: finishing replies in flight, then closing", reason)
            self._shutdown = asyncio.get_running_loop().create_task(
                shutdown(self, self.settings.shutdown_grace_seconds)
            )
        return self._shutdown

    async def wait_shutdown(self) -> None:
        """Wait for a shutdown that a signal started, if any."""
        if self._shutdown is not None:
            await self._shutdown


async def shutdown(bot: ChatBot, grace_seconds: float) -> None:
    """Stop answering, drain the worker (queued users are told), let replies go out, close everything."""
    bot.is_accepting = False
    await bot.generator.close(grace_seconds)
    left = await bot.wait_for_replies(timeout_seconds=max(grace_seconds, 1.0))
    if left:
        log.warning("%d replies were still being sent when the grace period ended", left)
    await bot.close()
    await bot.storage.close()
    log.info("shut down cleanly")
