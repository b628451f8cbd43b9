"""Feedback: 👍 / 👎 reactions on the bot's own replies are stored (raw events, so uncached messages count).

A user has one score per reply (the newest reaction wins); removing either reaction forgets their score.
Reactions on messages the bot did not write, or on replies it did not store (a guild with logging off),
are ignored.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import discord
from discord.ext import commands

if TYPE_CHECKING:
    from bot.chatbot import ChatBot

log = logging.getLogger(__name__)

SCORES = {"👍": 1, "👎": -1}


def feedback_score(emoji: discord.PartialEmoji) -> int | None:
    """+1 for 👍, -1 for 👎 (any skin tone), None for any other emoji."""
    if emoji.is_custom_emoji():
        return None
    # Skin-tone modifiers (U+1F3FB–U+1F3FF) follow the base emoji.
    base = "".join(char for char in emoji.name if not 0x1F3FB <= ord(char) <= 0x1F3FF)
    return SCORES.get(base)


class FeedbackCog(commands.Cog):
    """Stores thumbs up / down on the bot's replies."""

    def __init__(self, bot: ChatBot, bot_user_id: int) -> None:
        self.bot = bot
        self.bot_user_id = bot_user_id

    async def is_own_stored_reply(self, payload: discord.RawReactionActionEvent) -> bool:
        """Whether the reaction is on a message the bot wrote and stored."""
        if payload.message_author_id is not None and payload.message_author_id != self.bot_user_id:
            return False  # the event says who wrote it: no database read needed
        stored = await self.bot.storage.get_message(payload.message_id)
        return stored is not None and stored.author_id == self.bot_user_id

    @commands.Cog.listener()
    async def on_raw_reaction_add(self, payload: discord.RawReactionActionEvent) -> None:
        """Store a user's 👍 / 👎 on one of the bot's replies."""
        score = feedback_score(payload.emoji)
        if (
            score is None
            or payload.user_id == self.bot_user_id
            or not await self.is_own_stored_reply(payload)
        ):
            return
        await self.bot.storage.set_feedback(payload.message_id, payload.user_id, score, self.bot.clock())

    @commands.Cog.listener()
    async def on_raw_reaction_remove(self, payload: discord.RawReactionActionEvent) -> None:
        """Forget a user's score when they take their 👍 / 👎 back."""
        if feedback_score(payload.emoji) is None or not await self.is_own_stored_reply(payload):
            return
        await self.bot.storage.remove_feedback(payload.message_id, payload.user_id)


async def setup(bot: ChatBot) -> None:
    """Extension entry point."""
    assert bot.user is not None
    await bot.add_cog(FeedbackCog(bot, bot.user.id))
