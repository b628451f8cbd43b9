"""Thread mode's Discord side: open a public thread from the message the bot answers; tell archived threads.

The decision to open one is bot.policy.opens_thread; recording it is the conversation core's
(`ConversationService.open_thread`). This module only makes the Discord call and turns a refusal (no Create
Public Threads permission, an HTTP error) into None, logged once per channel, so the chat cog answers in
the channel as before.
"""

from __future__ import annotations

import logging

import discord

from bot.conversation import IncomingMessage
from bot.scrub import scrub_discord_markup
from bot.text import thread_name

log = logging.getLogger(__name__)


class ThreadOpener:
    """Opens reply threads; remembers the channels where that failed, so each is logged once."""

    def __init__(self) -> None:
        self.refused: set[int] = set()

    async def open_from(self, message: discord.Message, incoming: IncomingMessage) -> discord.Thread | None:
        """A public thread from the message, named after its text; None when the bot may not open one."""
        channel = message.channel
        if not isinstance(channel, discord.TextChannel):
            return None  # threads open from text channels only (not from DMs, threads or forums)
        if not channel.permissions_for(channel.guild.me).create_public_threads:
            self._refused_once(channel.id, "no Create Public Threads permission")
            return None
        try:
            return await message.create_thread(name=thread_name(_readable_text(incoming)))
        except discord.HTTPException as exc:
            self._refused_once(channel.id, f"HTTP {exc.status}: {exc.text}")
            return None

    def _refused_once(self, channel_id: int, why: str) -> None:
        if channel_id not in self.refused:
            self.refused.add(channel_id)
            log.warning("cannot open a thread in channel %d (%s): answering in the channel", channel_id, why)


def _readable_text(incoming: IncomingMessage) -> str:
    """The message's text (its leading mention of the bot already cut) with other mentions as @names."""
    return scrub_discord_markup(
        incoming.content, {user_id: f"@{name}" for user_id, name in incoming.mentioned}
    )


def is_archived_thread(message: discord.Message) -> bool:
    """Whether the message is in an archived thread. discord.py drops archived threads from its cache, so a
    server message whose channel it does not know (a PartialMessageable) is taken to be in one."""
    channel = message.channel
    if isinstance(channel, discord.Thread):
        return channel.archived
    return message.guild is not None and isinstance(channel, discord.PartialMessageable)
