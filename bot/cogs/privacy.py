"""Privacy: the server's /privacy switches (admins) and every user's /optin, /optout and /forget-me.

Storing messages for conversation context is separate from using them for training: training export is
off by default, per server (an admin turns it on) AND per user (the user opts in).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

from bot.cogs.common import Answer, admin_check, admin_group, respond

if TYPE_CHECKING:
    from bot.chatbot import ChatBot

log = logging.getLogger(__name__)

TRAINING_USE = (
    "Training use means your messages in servers that also allow it may be included, with mentions, links "
    "and contact details removed, in the data this bot's model is retrained on."
)


def _on_off(value: bool) -> str:
    return "on" if value else "off"


class PrivacyCog(commands.Cog):
    """Server privacy switches and per-user consent and deletion."""

    privacy = admin_group("privacy", "This server's message logging and training export")

    def __init__(self, bot: ChatBot) -> None:
        self.bot = bot

    @privacy.command(name="show")
    @admin_check()
    async def privacy_show(self, interaction: discord.Interaction) -> None:
        """Show whether this server's messages are stored and whether they may be exported for training."""
        await respond(interaction, lambda: self._show(interaction))

    async def _show(self, interaction: discord.Interaction) -> Answer:
        assert interaction.guild_id is not None
        guild = await self.bot.storage.guild_settings(interaction.guild_id)
        return Answer(
            f"Message logging: {_on_off(guild.logging_enabled)}. "
            f"Training export: {_on_off(guild.training_export_enabled)} (off by default; "
            "only messages of users who ran /optin are ever exported).",
            "viewed",
        )

    @privacy.command(name="logging")
    @app_commands.describe(
        enabled="store this server's messages as conversation context",
        confirm="required to turn logging off: it deletes every stored message of this server",
    )
    @admin_check()
    async def privacy_logging(
        self, interaction: discord.Interaction, enabled: bool, confirm: bool = False
    ) -> None:
        """Turn message logging on or off (off deletes this server's stored messages)."""
        await respond(interaction, lambda: self._set_logging(interaction, enabled, confirm))

    async def _set_logging(self, interaction: discord.Interaction, enabled: bool, confirm: bool) -> Answer:
        assert interaction.guild_id is not None
        if enabled:
            await self.bot.storage.set_guild_logging(interaction.guild_id, True)
            return Answer(
                "Message logging is on: I keep recent messages as conversation context.", "logging on"
            )
        if not confirm:
            return Answer(
                "Turning logging off deletes every message I stored for this server. "
                "Run `/privacy logging enabled:False confirm:True` to go ahead; nothing was changed.",
                "logging off: not confirmed",
            )
        return await self._logging_off(interaction.guild_id)

    async def _logging_off(self, guild_id: int) -> Answer:
        await self.bot.storage.set_guild_logging(guild_id, False)
        purged = await self.bot.storage.purge_guild_messages(guild_id)
        return Answer(
            f"Message logging is off and {purged:,} stored messages were deleted. "
            "I still answer, seeing only the message I am answering.",
            f"logging off, purged {purged} messages",
        )

    @privacy.command(name="export")
    @app_commands.describe(enabled="allow exporting opted-in users' messages of this server for training")
    @admin_check()
    async def privacy_export(self, interaction: discord.Interaction, enabled: bool) -> None:
        """Allow or forbid training export of this server's messages (only of users who opted in)."""
        await respond(interaction, lambda: self._set_export(interaction, enabled))

    async def _set_export(self, interaction: discord.Interaction, enabled: bool) -> Answer:
        assert interaction.guild_id is not None
        await self.bot.storage.set_guild_training_export(interaction.guild_id, enabled)
        return Answer(
            f"Training export is {_on_off(enabled)} for this server.", f"training export {_on_off(enabled)}"
        )

    @app_commands.command(name="optin")
    async def optin(self, interaction: discord.Interaction) -> None:
        """Allow your messages to be used to train this bot's model."""
        await respond(interaction, lambda: self._set_opt_in(interaction, True))

    @app_commands.command(name="optout")
    async def optout(self, interaction: discord.Interaction) -> None:
        """Stop your messages from being used to train this bot's model."""
        await respond(interaction, lambda: self._set_opt_in(interaction, False))

    async def _set_opt_in(self, interaction: discord.Interaction, opted_in: bool) -> Answer:
        """Record the user's consent (not audited: it is the user's own choice, not an admin action)."""
        await self.bot.storage.set_training_opt_in(interaction.user.id, opted_in, self.bot.clock())
        if opted_in:
            return Answer(f"You opted in. {TRAINING_USE} Use /optout or /forget-me at any time.")
        return Answer(f"You opted out: none of your messages will be exported. {TRAINING_USE}")

    @app_commands.command(name="forget-me")
    async def forget_me(self, interaction: discord.Interaction) -> None:
        """Delete everything this bot stored about you."""
        await respond(interaction, lambda: self._forget(interaction))

    async def _forget(self, interaction: discord.Interaction) -> Answer:
        """Delete the user's data (their own request, not an admin action: not audited)."""
        deleted = await self.bot.storage.delete_user_data(interaction.user.id, self.bot.clock())
        log.info("forget-me: deleted %d rows", deleted)
        return Answer(
            f"Done: deleted {deleted:,} stored records about you (your messages, the replies to them, "
            "your reactions and the facts you had me remember), and you are excluded from training data."
        )


async def setup(bot: ChatBot) -> None:
    """Extension entry point."""
    await bot.add_cog(PrivacyCog(bot))
