"""The bot's cogs (one per feature) and what they share: the admin check, audit rows and ephemeral answers.

`COG_MODULES` is the one list of extensions ChatBot loads in `setup_hook`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar, cast

import discord
from discord import app_commands

if TYPE_CHECKING:
    from bot.discord_app import ChatBot

log = logging.getLogger(__name__)

T = TypeVar("T")

COG_MODULES: tuple[str, ...] = (
    "bot.cogs.chat",
    "bot.cogs.admin",
    "bot.cogs.privacy",
    "bot.cogs.feedback",
    "bot.cogs.retrain",
)

REFUSED_IN_DMS = "This command only works in a server."
REFUSED_NOT_ADMIN = "Only server admins (Manage Server permission) and the bot's owners can use this command."
REFUSED_GENERIC = "You can't use this command here."


def chat_bot(interaction: discord.Interaction) -> ChatBot:
    """The ChatBot that received this interaction."""
    return cast("ChatBot", interaction.client)


async def is_bot_owner(interaction: discord.Interaction) -> bool:
    """Whether the user is one of BOT_OWNER_IDS or owns the application (team owners included)."""
    bot = chat_bot(interaction)
    return interaction.user.id in bot.settings.owner_ids or await bot.is_owner(interaction.user)


async def is_guild_admin(interaction: discord.Interaction) -> bool:
    """The real permission check behind admin commands: Manage Server in this guild, or a bot owner.

    `default_permissions` only hides a command in the client and server admins can change it, so every
    admin command also runs this check on the server side. DMs are refused even for owners.
    """
    if interaction.guild is None:
        raise app_commands.NoPrivateMessage()
    if interaction.permissions.manage_guild or await is_bot_owner(interaction):
        return True
    raise app_commands.MissingPermissions(["manage_guild"])


def admin_check() -> Callable[[T], T]:
    """The server-side admin check alone (for subcommands: their group carries guild_only and the UI hint)."""
    return app_commands.check(is_guild_admin)


def admin_only() -> Callable[[T], T]:
    """For top-level admin commands: guild-only, hidden from non-admins, enforced by is_guild_admin."""

    def decorate(func: T) -> T:
        func = admin_check()(func)
        func = app_commands.guild_only()(func)
        return cast(T, app_commands.default_permissions(manage_guild=True)(cast(Any, func)))

    return decorate


def admin_group(name: str, description: str) -> app_commands.Group:
    """An admin command group: guild-only, hidden from non-admins (each subcommand adds admin_check)."""
    return app_commands.Group(
        name=name,
        description=description,
        guild_only=True,
        default_permissions=discord.Permissions(manage_guild=True),
    )


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


async def audit(interaction: discord.Interaction, detail: str, *, allowed: bool) -> None:
    """Append an audit row for this admin command (refusals too); never fails the command."""
    bot = chat_bot(interaction)
    try:
        await bot.storage.add_audit(
            interaction.user.id, interaction.guild_id, command_name(interaction), detail, allowed, bot.clock()
        )
    except Exception:
        log.exception("could not write the audit row for /%s", command_name(interaction))


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
