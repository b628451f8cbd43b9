"""Regenerate and Continue: message context-menu commands on the bot's own replies.

- "Regenerate reply" answers the same message again, from the history that reply was generated from (up to
  and including the message it answered; later messages are left out) with a new seed, and POSTS a new reply
  to that message instead of editing the old one: the old reply stays, so the person can compare, and can
  keep it with a 👍. A replaced reply that was not kept is left out of later prompts and of the training
  export (bot.storage's _DISCARDED_REPLIES; bot.export counts it as bot_replies_dropped_replaced).
- "Continue reply" extends the channel's latest reply: the same history, with the reply's text as the open
  bot turn, within the exact token budget. The continuation is appended by editing the reply's last message
  when the result fits Discord's 2000 characters, else it is posted as a follow-up; the stored text and the
  reply's token count are updated in one write.

Who may use them: the person the reply answered, server admins (Manage Server) and the bot's owners; in DMs
the person is the only other party. Anyone else gets one ephemeral line and an audit row. The orchestration
is the conversation core's (ConversationService.regenerate / continue_reply); this module is Discord I/O.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, cast

import discord
from discord import app_commands
from discord.ext import commands

from bot.cogs.chat import ChatCog, send_permissions
from bot.cogs.common import Answer, is_bot_owner, respond
from bot.conversation import RedoneReply
from bot.storage import StorageError, StoredReply
from bot.text import (
    BUSY_REPLY,
    ERROR_REPLY,
    SHUTDOWN_REPLY,
    UNAVAILABLE_REPLY,
    appended_reply,
    chunk_nonce,
    reply_chunks,
)
from model.api import GenerationFailed, ModelUnavailable, ReplyTooLongToContinue, WorkerBusy, WorkerClosed

if TYPE_CHECKING:
    from bot.chatbot import ChatBot

log = logging.getLogger(__name__)

REGENERATED = "Regenerated."
CONTINUED = "Continued."
NOT_A_REPLY = "That is not one of my stored replies."
NOT_ALLOWED = "Only the person this reply answered, or a server admin, can do that."
NOT_LATEST = "Only my latest reply in this channel can be continued."
ANSWERED_GONE = "The message this reply answered is gone."
TOO_LONG = "That reply is too long to continue."
NOTHING_ADDED = "I had nothing to add to that reply."
NOT_SENT = "I couldn't post in this channel."
NOT_EDITED = "I couldn't edit that reply."


def generator_error_line(exc: Exception) -> str:
    """The one line the chat cog would say for this generator failure (bot.text)."""
    if isinstance(exc, WorkerBusy):
        return BUSY_REPLY
    if isinstance(exc, WorkerClosed):
        return SHUTDOWN_REPLY
    if isinstance(exc, ModelUnavailable):
        return UNAVAILABLE_REPLY
    return ERROR_REPLY


def parent_id(channel: object) -> int | None:
    """A thread's parent channel (a thread inherits its settings)."""
    return channel.parent_id if isinstance(channel, discord.Thread) else None


async def may_redo(interaction: discord.Interaction, stored: StoredReply) -> bool:
    """The person the reply answered, anyone in a DM (only that person is there), admins and owners."""
    if interaction.guild is None or interaction.user.id == stored.answered_author_id:
        return True
    return interaction.permissions.manage_guild or await is_bot_owner(interaction)


class RegenerateCog(commands.Cog):
    """The "Regenerate reply" and "Continue reply" message commands."""

    def __init__(self, bot: ChatBot) -> None:
        self.bot = bot
        # Context menus cannot be cog methods with a decorator: they are built here and added to the tree.
        self.menus = (
            app_commands.ContextMenu(name="Regenerate reply", callback=self.regenerate),
            app_commands.ContextMenu(name="Continue reply", callback=self.continue_reply),
        )
        for menu in self.menus:
            bot.tree.add_command(menu)

    async def cog_unload(self) -> None:
        """Take the menus off the tree with the cog."""
        for menu in self.menus:
            self.bot.tree.remove_command(menu.name, type=menu.type)

    async def regenerate(self, interaction: discord.Interaction, message: discord.Message) -> None:
        """Answer the same message again with a new reply (the old one stays, to compare or keep)."""
        with self.bot.tracking_reply():
            await respond(interaction, lambda: self.regenerated(interaction, message))

    async def continue_reply(self, interaction: discord.Interaction, message: discord.Message) -> None:
        """Make the bot's latest reply longer."""
        with self.bot.tracking_reply():
            await respond(interaction, lambda: self.continued(interaction, message))

    async def target(
        self, interaction: discord.Interaction, message: discord.Message
    ) -> StoredReply | Answer:
        """The stored reply the command was used on, or the answer refusing it."""
        is_own = self.bot.user is not None and message.author.id == self.bot.user.id
        stored = await self.bot.conversation.find_reply(message.id) if is_own else None
        if stored is None or not stored.chunks:
            return Answer(NOT_A_REPLY)
        if not await may_redo(interaction, stored):
            return Answer(NOT_ALLOWED, f"refused: reply {stored.reply_message_id}", allowed=False)
        if not send_permissions(message.channel)[0]:
            return Answer(NOT_SENT)
        return stored

    async def regenerated(self, interaction: discord.Interaction, message: discord.Message) -> Answer:
        """Generate, post to the answered message, store with the link to the replaced reply."""
        stored = await self.target(interaction, message)
        if isinstance(stored, Answer):
            return stored
        try:
            redone = await self.bot.conversation.regenerate(
                stored, interaction.id, parent_id(message.channel)
            )
        except (WorkerBusy, WorkerClosed, GenerationFailed) as exc:
            log.warning("regenerating reply %d: %s", stored.reply_message_id, exc)
            return Answer(generator_error_line(exc))
        if redone is None:
            return Answer(ANSWERED_GONE)
        sent = await self.post(message.channel, reply_chunks(redone.draft.text), redone, interaction.id)
        if not sent:
            return Answer(NOT_SENT)
        try:
            sent_at = discord.utils.snowflake_time(sent[-1][0]).timestamp()
            await self.bot.conversation.record_regenerated(redone, sent, sent_at)
        except StorageError as exc:  # the new reply is out; only its record is lost
            log.warning("regenerated reply %d was sent but not stored: %s", sent[0][0], exc)
        return Answer(REGENERATED, f"reply {stored.reply_message_id} regenerated as {sent[0][0]}")

    async def continued(self, interaction: discord.Interaction, message: discord.Message) -> Answer:
        """Generate the continuation, edit it into the last message (or post it after), store both."""
        stored = await self.target(interaction, message)
        if isinstance(stored, Answer):
            return stored
        if not stored.is_latest:
            return Answer(NOT_LATEST)
        try:
            redone = await self.bot.conversation.continue_reply(stored, parent_id(message.channel))
        except ReplyTooLongToContinue:
            return Answer(TOO_LONG)
        except (WorkerBusy, WorkerClosed, GenerationFailed) as exc:
            log.warning("continuing reply %d: %s", stored.reply_message_id, exc)
            return Answer(generator_error_line(exc))
        if redone is None:
            return Answer(ANSWERED_GONE)
        if not redone.draft.text.strip():
            return Answer(NOTHING_ADDED)
        return await self.append(message.channel, redone, interaction.id)

    async def append(self, channel: discord.abc.Messageable, redone: RedoneReply, nonce_base: int) -> Answer:
        """Edit the continuation into the reply's last message when it fits, else post it; store it."""
        last_id, last_text = redone.stored.chunks[-1]
        edited_text, extra = appended_reply(last_text, redone.draft.text)
        edited_at = self.bot.clock()
        if edited_text is not None:
            try:
                partial = cast(discord.PartialMessageable, channel).get_partial_message(last_id)
                edited_message = await partial.edit(content=edited_text)
            except discord.HTTPException as exc:
                log.warning("could not edit reply %d: %s", last_id, exc)
                return Answer(NOT_EDITED)
            edited_at = (edited_message.edited_at or discord.utils.utcnow()).timestamp()
        sent = await self.post(channel, extra, None, nonce_base) if extra else []
        if extra and not sent:
            return Answer(NOT_SENT)
        at = discord.utils.snowflake_time(sent[-1][0]).timestamp() if sent else edited_at
        edited = (last_id, edited_text) if edited_text is not None else None
        try:
            await self.bot.conversation.record_continuation(redone, edited, sent, at)
        except StorageError as exc:
            log.warning(
                "continued reply %d was posted but not stored: %s", redone.stored.reply_message_id, exc
            )
        return Answer(CONTINUED, f"reply {redone.stored.reply_message_id} continued")

    async def post(
        self,
        channel: discord.abc.Messageable,
        chunks: list[str],
        redone: RedoneReply | None,
        nonce_base: int,
    ) -> list[tuple[int, str]]:
        """Send chunks through the chat cog's retrying send (the first replies to the answered message when
        `redone` is given); nonces from the interaction id, so a retried chunk cannot post twice."""
        chat = cast(ChatCog, self.bot.get_cog("ChatCog"))
        reference = None
        if redone is not None and send_permissions(channel)[1]:
            reference = discord.MessageReference(
                message_id=redone.answered.message_id,
                channel_id=redone.answered.channel_id,
                guild_id=redone.answered.guild_id,
                fail_if_not_exists=False,
            )
        sent: list[tuple[int, str]] = []
        for index, text in enumerate(chunks):
            posted = await chat.send_with_retry(channel, text, reference, chunk_nonce(nonce_base, index))
            if posted is None:
                break
            sent.append((posted.id, text))
            reference = None
        return sent


async def setup(bot: ChatBot) -> None:
    """Extension entry point."""
    await bot.add_cog(RegenerateCog(bot))
