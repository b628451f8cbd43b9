"""What the cogs share: the admin check, the audit row, ephemeral answers and `respond`, which defers an
admin command, answers it and audits it in that order.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import discord
from discord import app_commands

from bot.chatbot import ChatBot
from bot.interactions import REFUSED_GENERIC, REFUSED_IN_DMS, REFUSED_NOT_ADMIN, answer, defer

__all__ = [
    "REFUSED_GENERIC",
    "REFUSED_IN_DMS",
    "REFUSED_NOT_ADMIN",
    "Answer",
    "admin_check",
    "admin_group",
    "admin_only",
    "answer",
    "audit",
    "chat_bot",
    "defer",
    "is_bot_owner",
    "is_guild_admin",
    "respond",
]

T = TypeVar("T")


@dataclass(frozen=True)
class Answer:
    """What a command tells the user, and the audit row it leaves (None: the command is not audited)."""

    text: str
    audit: str | None = None
    allowed: bool = True


def chat_bot(interaction: discord.Interaction) -> ChatBot:
    """The ChatBot that received this interaction."""
    return cast(ChatBot, interaction.client)


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


async def audit(interaction: discord.Interaction, detail: str, *, allowed: bool) -> None:
    """Append an audit row for this admin command (refusals too); never fails the command."""
    await chat_bot(interaction).audit(interaction, detail, allowed=allowed)


async def respond(interaction: discord.Interaction, work: Callable[[], Awaitable[Answer]]) -> None:
    """Defer (Discord's 3-second deadline), run the command's work, answer ephemerally, then audit.

    An exception from `work` propagates to the command tree's error handler, which answers it in one line.
    """
    await defer(interaction)
    outcome = await work()
    await answer(interaction, outcome.text)
    if outcome.audit is not None:
        await audit(interaction, outcome.audit, allowed=outcome.allowed)
