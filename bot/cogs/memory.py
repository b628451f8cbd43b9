"""Remembered facts: /remember add|list|forget, a short list of facts per channel that every prompt there
carries after the persona line (model.prompt fits them into the token budget; the newest turn comes first).

Server admins (or the bot's owners) manage a server channel's facts; anyone manages those of their own DM
with the bot. A thread has its own facts and sees its parent channel's too. Every command runs through
bot.cogs.common.respond (deferred, answered ephemerally, audited without the fact's text); refusals are
audited by the command tree. The facts a user wrote go with /forget-me.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

from bot.cogs.common import Answer, is_guild_admin, respond
from bot.storage import ChannelFact

if TYPE_CHECKING:
    from bot.chatbot import ChatBot

# Small on purpose: GPT-2's context is 1,024 tokens, and /remember list must fit one 2,000-character message
# (10 × 150 characters with their numbers is ~1,600).
MAX_FACTS_PER_CHANNEL = 10
MAX_FACT_CHARS = 150


async def can_remember(interaction: discord.Interaction) -> bool:
    """/remember: anyone in their own DM with the bot; a server admin or a bot owner in a server."""
    return interaction.guild is None or await is_guild_admin(interaction)


def format_facts(facts: list[ChannelFact], inherited: int) -> str:
    """The /remember list text: this channel's facts numbered 1, 2, … (what /remember forget takes)."""
    lines = [f"{number}. {fact.text}" for number, fact in enumerate(facts, start=1)]
    if not lines:
        lines = ["No facts remembered here yet: add one with /remember add."]
    if inherited:
        lines.append(f"(This thread also sees its parent channel's {inherited} facts; list them there.)")
    return "\n".join(lines)


def _parent_id(interaction: discord.Interaction) -> int | None:
    channel = interaction.channel
    return channel.parent_id if isinstance(channel, discord.Thread) else None


class MemoryCog(commands.Cog):
    """The /remember commands."""

    remember = app_commands.Group(
        name="remember", description="Short facts I keep in mind in this channel (admins; anyone in DMs)"
    )

    def __init__(self, bot: ChatBot) -> None:
        self.bot = bot

    @remember.command(name="add")
    @app_commands.describe(fact=f"one short fact, at most {MAX_FACT_CHARS} characters")
    @app_commands.check(can_remember)
    async def remember_add(self, interaction: discord.Interaction, fact: str) -> None:
        """Remember a fact in this channel: every reply here sees it."""
        await respond(interaction, lambda: self._add(interaction, fact.strip()))

    async def _add(self, interaction: discord.Interaction, text: str) -> Answer:
        assert interaction.channel_id is not None
        if not text:
            return Answer("Give the fact to remember; nothing was changed.", "rejected: empty")
        if len(text) > MAX_FACT_CHARS:
            return Answer(
                f"A fact must be at most {MAX_FACT_CHARS} characters (this one is {len(text)}); "
                "nothing was changed.",
                "rejected: too long",
            )
        fact = await self.bot.storage.add_fact(
            interaction.channel_id,
            interaction.guild_id,
            interaction.user.id,
            text,
            self.bot.clock(),
            limit=MAX_FACTS_PER_CHANNEL,
        )
        if fact is None:
            return Answer(
                f"This channel already has {MAX_FACTS_PER_CHANNEL} facts, the most I keep: remove one with "
                "/remember forget first; nothing was changed.",
                "rejected: limit reached",
            )
        return Answer("Remembered.", f"channel {interaction.channel_id}: fact added ({len(text)} chars)")

    @remember.command(name="list")
    @app_commands.check(can_remember)
    async def remember_list(self, interaction: discord.Interaction) -> None:
        """Show this channel's remembered facts, numbered."""
        await respond(interaction, lambda: self._list(interaction))

    async def _list(self, interaction: discord.Interaction) -> Answer:
        assert interaction.channel_id is not None
        parent_id = _parent_id(interaction)
        ids = (interaction.channel_id,) if parent_id is None else (parent_id, interaction.channel_id)
        facts = await self.bot.storage.channel_facts(ids)
        own = [fact for fact in facts if fact.channel_id == interaction.channel_id]
        return Answer(format_facts(own, len(facts) - len(own)), "viewed")

    @remember.command(name="forget")
    @app_commands.describe(number="the fact's number in /remember list")
    @app_commands.check(can_remember)
    async def remember_forget(self, interaction: discord.Interaction, number: int) -> None:
        """Forget one of this channel's facts, by its number in /remember list."""
        await respond(interaction, lambda: self._forget(interaction, number))

    async def _forget(self, interaction: discord.Interaction, number: int) -> Answer:
        assert interaction.channel_id is not None
        forgotten = await self.bot.storage.forget_fact(interaction.channel_id, number)
        if forgotten is None:
            return Answer(
                f"There is no fact number {number} here (see /remember list); nothing was changed.",
                f"rejected: no fact {number}",
            )
        return Answer(
            f"Forgot fact {number}: {forgotten.text}",
            f"channel {interaction.channel_id}: fact {number} forgotten",
        )


async def setup(bot: ChatBot) -> None:
    """Extension entry point."""
    await bot.add_cog(MemoryCog(bot))
