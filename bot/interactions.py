"""Slash-command plumbing that needs no ChatBot: ephemeral answers, the deferral, the refusal lines.

Both the command tree (bot/chatbot.py) and the cogs (bot/cogs/common.py) use these, so they live below both.
"""

from __future__ import annotations

import discord
from discord import app_commands

REFUSED_IN_DMS = "This command only works in a server."
REFUSED_NOT_ADMIN = "Only server admins (Manage Server permission) and the bot's owners can use this command."
REFUSED_GENERIC = "You can't use this command here."


def refusal_text(error: app_commands.CheckFailure) -> str:
    """The one line a refused user sees."""
    if isinstance(error, app_commands.NoPrivateMessage):
        return REFUSED_IN_DMS
    if isinstance(error, app_commands.MissingPermissions):
        return REFUSED_NOT_ADMIN
    return REFUSED_GENERIC


def command_name(interaction: discord.Interaction) -> str:
    """The full name of the invoked slash command, e.g. "channel enable"."""
    command = interaction.command
    return command.qualified_name if command is not None else "unknown"


async def answer(interaction: discord.Interaction, text: str) -> None:
    """Answer ephemerally: the first response, or a follow-up once the interaction was deferred."""
    if interaction.response.is_done():
        await interaction.followup.send(text, ephemeral=True, allowed_mentions=discord.AllowedMentions.none())
    else:
        await interaction.response.send_message(
            text, ephemeral=True, allowed_mentions=discord.AllowedMentions.none()
        )


async def defer(interaction: discord.Interaction) -> None:
    """Acknowledge within Discord's 3-second deadline; the answer follows with `answer`."""
    await interaction.response.defer(ephemeral=True, thinking=True)
