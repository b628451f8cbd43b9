"""Chat: answer messages (guard → decide → history → await the model → send → store) and keep storage in
step with edits and deletions.

The decision is bot.policy's pure function, the text is bot.text's, and every storage call goes through the
conversation core (bot.conversation), which reads the message's guild and channel settings once; this module
only turns Discord objects into plain data and plain decisions into Discord calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from typing import TYPE_CHECKING

import discord
from discord.ext import commands

from bot.cogs.reply_threads import ThreadOpener, is_archived_thread
from bot.conversation import DraftReply, IncomingMessage, MessageContext
from bot.policy import (
    CHANCE_TRIGGER,
    Action,
    ChannelState,
    Cooldowns,
    Decision,
    MessageFacts,
    ReplyPolicy,
    decide,
    opens_thread,
    should_record,
)
from bot.storage import StorageError
from bot.text import (
    BUSY_REPLY,
    COOLDOWN_REPLY,
    ERROR_REPLY,
    SHUTDOWN_REPLY,
    UNAVAILABLE_REPLY,
    chunk_nonce,
    reply_chunks,
)
from model.api import GenerationFailed, ModelUnavailable, WorkerBusy, WorkerClosed

if TYPE_CHECKING:
    from bot.chatbot import ChatBot

log = logging.getLogger(__name__)

ANSWERED_TYPES = frozenset({discord.MessageType.default, discord.MessageType.reply})
RETRYABLE_STATUSES = frozenset({429, 500, 502, 503, 504})
NO_MENTIONS = discord.AllowedMentions.none()
Sendable = discord.abc.Messageable


def prompt_text(message: discord.Message) -> str:
    """The raw text (mentions stay `<@id>` markup) without a leading mention of the bot.

    Mentions are kept as ids, not names, so that an export can tell consenting users from the rest
    (bot.scrub); the conversation core turns them into names when it builds a prompt.
    """
    text = message.content.strip()
    me = message.guild.me if message.guild else getattr(message.channel, "me", None)
    if me is not None:
        for tag in (f"<@{me.id}>", f"<@!{me.id}>"):
            if text.startswith(tag):
                return text[len(tag) :].strip() or text  # a bare mention stays as it is
    return text


def mentioned_names(message: discord.Message) -> tuple[tuple[int, str], ...]:
    """(user id, display name) of every user the message mentions, for readable prompts."""
    return tuple((user.id, user.display_name) for user in message.mentions)


def incoming_of(message: discord.Message) -> IncomingMessage:
    """A Discord message as the conversation core's plain data."""
    return IncomingMessage(
        message_id=message.id,
        channel_id=message.channel.id,
        guild_id=message.guild.id if message.guild else None,
        author_id=message.author.id,
        author_name=message.author.display_name,
        is_bot=message.author.bot,
        content=prompt_text(message),
        created_at=message.created_at.timestamp(),
        reply_to_id=message.reference.message_id if message.reference else None,
        mentioned=mentioned_names(message),
        parent_channel_id=message.channel.parent_id if isinstance(message.channel, discord.Thread) else None,
    )


def mentions_bot(message: discord.Message, bot_user_id: int) -> bool:
    """Whether the bot's user, or its own managed role, is mentioned."""
    if any(user.id == bot_user_id for user in message.mentions):
        return True
    self_role = message.guild.self_role if message.guild else None
    return self_role is not None and self_role in message.role_mentions


def facts_of(message: discord.Message, bot_user_id: int, replied_author_id: int | None) -> MessageFacts:
    """What the reply policy needs to know about a message."""
    channel = message.channel
    other_mentioned = any(user.id != bot_user_id for user in message.mentions)
    replies_to_other = replied_author_id is not None and replied_author_id != bot_user_id
    return MessageFacts(
        author_id=message.author.id,
        author_is_bot=message.author.bot,
        channel_id=channel.id,
        guild_id=message.guild.id if message.guild else None,
        created_at=message.created_at.timestamp(),
        author_role_ids=frozenset(role.id for role in getattr(message.author, "roles", ())),
        parent_channel_id=channel.parent_id if isinstance(channel, discord.Thread) else None,
        mentions_bot=mentions_bot(message, bot_user_id),
        replies_to_bot=replied_author_id == bot_user_id,
        addressed_to_other=other_mentioned or replies_to_other,
        text=message.content,
        in_archived_thread=is_archived_thread(message),
    )


def send_permissions(channel: Sendable) -> tuple[bool, bool]:
    """(can send, can reply with a reference) for the bot in this channel; DMs allow both."""
    if not isinstance(channel, discord.abc.GuildChannel | discord.Thread):
        return True, True
    permissions = channel.permissions_for(channel.guild.me)
    can_send = permissions.send_messages_in_threads if isinstance(channel, discord.Thread) else True
    can_send = can_send and permissions.send_messages and permissions.view_channel
    return can_send, permissions.read_message_history


async def _post(
    channel: Sendable, text: str, reference: discord.MessageReference | None, nonce: int
) -> discord.Message:
    """One send of generated text: no mentions, no link embeds, the retry-safe nonce."""
    if reference is None:
        return await channel.send(text, nonce=nonce, allowed_mentions=NO_MENTIONS, suppress_embeds=True)
    return await channel.send(
        text, reference=reference, nonce=nonce, allowed_mentions=NO_MENTIONS, suppress_embeds=True
    )


class ChatCog(commands.Cog):
    """Answers messages the policy selects; mirrors edits and deletions into storage."""

    def __init__(self, bot: ChatBot, bot_user_id: int) -> None:
        self.bot = bot
        self.policy = ReplyPolicy.from_settings(bot.settings, bot_user_id)
        self.cooldowns = Cooldowns(bot.settings.cooldown_seconds)
        self.last_spoke: dict[int, float] = {}  # channel id → when this process last posted there
        self.skipped_sends = 0  # replies not attempted for lack of Send Messages
        self.random = random.Random()  # the reply chance's draws (tests put a seeded one here)
        self.last_chance_reply: dict[int, float] = {}  # channel id → when the bot last joined in unprompted
        self.threads = ThreadOpener()

    # -- messages -------------------------------------------------------------------------------------

    @commands.Cog.listener()
    async def on_message(self, message: discord.Message) -> None:
        """Store the message and answer it when the policy says so."""
        if not self.bot.is_accepting or message.type not in ANSWERED_TYPES or not message.content.strip():
            return
        # Tracked from before the first await: a shutdown that starts meanwhile waits for the message to be
        # stored and answered (or told the bot is restarting) before it closes the database.
        with self.bot.tracking_reply():
            await self.handle(message)

    async def handle(self, message: discord.Message) -> None:
        """Guard → store → decide → answer, for a message the bot accepted."""
        facts = facts_of(message, self.policy.bot_user_id, await self.replied_author_id(message))
        if not should_record(facts, self.policy):
            return
        incoming = incoming_of(message)
        context = await self.bot.conversation.context_for(incoming)
        if not await self.record(incoming, context):
            return  # a replayed event was answered the first time
        state = await self.channel_state(message, context)
        decision = decide(facts, state, self.policy, self.random.random())
        decision = self.cooldowns.check(facts.author_id, decision, facts.created_at)
        log.debug("message %d: %s (%s)", message.id, decision.action.value, decision.reason)
        if decision.action is Action.IGNORE:
            return
        if decision.action is Action.COOLDOWN_NOTICE:
            await self.send_chunks(message, [COOLDOWN_REPLY])
            return
        self.note_chance_reply(decision, context, facts.created_at)
        if opens_thread(decision, facts, state):
            await self.answer_in_new_thread(message, incoming, context)
        else:
            await self.answer(message, incoming, context)

    async def record(self, incoming: IncomingMessage, context: MessageContext) -> bool:
        """Store the message; False for a replay. A database that stays locked is logged, not fatal."""
        try:
            return await self.bot.conversation.record(incoming, context)
        except StorageError as exc:
            log.warning("message %d was not stored: %s", incoming.message_id, exc)
            return True  # still answer: the reply then sees only what storage still has

    async def replied_author_id(self, message: discord.Message) -> int | None:
        """Who wrote the message this one replies to (from the event, else from storage)."""
        reference = message.reference
        if reference is None or reference.message_id is None:
            return None
        if isinstance(reference.resolved, discord.Message):
            return reference.resolved.author.id
        return await self.bot.conversation.author_of(reference.message_id)

    async def channel_state(self, message: discord.Message, context: MessageContext) -> ChannelState:
        """The channel's /channel switches, wake words and reply chance, and when the bot last spoke there."""
        channel_id, home = context.channel.channel_id, context.home
        last = self.last_spoke.get(channel_id) or await self.bot.conversation.last_bot_message_at(channel_id)
        names = self.bot_names(message) if home.wake_on_name else ()
        return ChannelState(
            answer_all=context.channel.answer_all,
            last_bot_message_at=last,
            is_bot_thread=context.channel.is_bot_thread,
            thread_mode=home.thread_mode,
            wake_words=(*home.wake_words, *names),
            reply_chance=home.reply_chance,
            chance_cooldown_seconds=home.chance_cooldown_seconds,
            last_chance_reply_at=self.last_chance_reply.get(home.channel_id),
        )

    def bot_names(self, message: discord.Message) -> tuple[str, ...]:
        """The bot's names as wake words: BOT_NAME and its display name in this server."""
        me = message.guild.me if message.guild else None
        return tuple(dict.fromkeys(n for n in (self.bot.settings.bot_name, me and me.display_name) if n))

    def note_chance_reply(self, decision: Decision, context: MessageContext, at: float) -> None:
        """Start the channel's reply-chance cooldown when the bot joins in unprompted."""
        if decision.trigger is not None and decision.trigger.reason == CHANCE_TRIGGER:
            self.last_chance_reply[context.home.channel_id] = at

    async def answer_in_new_thread(
        self, message: discord.Message, incoming: IncomingMessage, context: MessageContext
    ) -> None:
        """Thread mode: open a thread from the message and answer inside it (in the channel if that fails)."""
        thread = await self.threads.open_from(message, incoming)
        if thread is None:
            await self.answer(message, incoming, context)
            return
        at = discord.utils.snowflake_time(thread.id).timestamp()
        try:
            incoming, context = await self.bot.conversation.open_thread(incoming, context, thread.id, at)
        except StorageError as exc:  # answered once; without the record its later messages need a mention
            log.warning("thread %d was opened but not stored: %s", thread.id, exc)
        await self.answer(message, incoming, context, thread)

    async def answer(
        self,
        message: discord.Message,
        incoming: IncomingMessage,
        context: MessageContext,
        channel: Sendable | None = None,
    ) -> None:
        """Generate (unless the bot may not post here), send the chunks, store the reply.

        `channel`: where to answer when not in the message's channel (thread mode's new thread)."""
        target = channel or message.channel
        if not self.may_send(target):
            return  # no point generating what cannot be sent
        outcome = await self.compose(message, incoming, context, target)
        if isinstance(outcome, str):
            await self.send_chunks(message, [outcome], target)
            return
        sent = await self.send_chunks(message, reply_chunks(outcome.text), target)
        await self.store_reply(incoming, context, outcome, sent)

    async def compose(
        self, message: discord.Message, incoming: IncomingMessage, context: MessageContext, target: Sendable
    ) -> DraftReply | str:
        """The generated draft (typing indicator meanwhile), or the one line saying why there is none."""
        try:
            async with contextlib.AsyncExitStack() as stack:
                with contextlib.suppress(discord.HTTPException):  # no typing indicator is no reason to fail
                    await stack.enter_async_context(target.typing())
                return await self.bot.conversation.compose_reply(incoming, context)
        except WorkerBusy:
            return BUSY_REPLY
        except WorkerClosed:
            return SHUTDOWN_REPLY
        except ModelUnavailable as exc:  # every model server is down: said at once, retried by itself
            log.warning("generation for message %d: %s", message.id, exc)
            return UNAVAILABLE_REPLY
        except GenerationFailed as exc:
            log.warning("generation for message %d failed: %s", message.id, exc)
            return ERROR_REPLY
        except Exception:
            log.exception("could not compose a reply to message %d", message.id)
            return ERROR_REPLY

    async def store_reply(
        self,
        incoming: IncomingMessage,
        context: MessageContext,
        draft: DraftReply,
        sent: list[tuple[int, str]],
    ) -> None:
        """Remember that the bot spoke and store what it sent (a storage failure only costs the record)."""
        if not sent:
            return
        # Discord's time of the last chunk (its id is a snowflake), not the host's: the follow-up window and
        # the history order compare it with the users' messages' Discord timestamps.
        sent_at = discord.utils.snowflake_time(sent[-1][0]).timestamp()
        self.last_spoke[incoming.channel_id] = sent_at
        try:
            await self.bot.conversation.record_reply(incoming, context, draft, sent, sent_at)
        except StorageError as exc:  # counted by Storage.failed_writes; one line, never the text
            log.warning("reply to message %d was sent but not stored: %s", incoming.message_id, exc)

    # -- sending --------------------------------------------------------------------------------------

    def may_send(self, channel: Sendable) -> bool:
        """Whether the bot has Send Messages here; a skip is counted and logged."""
        if send_permissions(channel)[0]:
            return True
        self.skipped_sends += 1
        log.info("no Send Messages permission in channel %s: reply skipped", getattr(channel, "id", "?"))
        return False

    async def send_chunks(
        self, message: discord.Message, chunks: list[str], channel: Sendable | None = None
    ) -> list[tuple[int, str]]:
        """Send chunks in order (the first replies to `message` when in its channel); stop at the first
        failed chunk."""
        target = channel or message.channel
        if not self.may_send(target):
            return []
        can_reference = send_permissions(target)[1] and target is message.channel
        sent: list[tuple[int, str]] = []
        for index, text in enumerate(chunks):
            is_first = index == 0 and can_reference
            reference = message.to_reference(fail_if_not_exists=False) if is_first else None
            posted = await self.send_with_retry(target, text, reference, chunk_nonce(message.id, index))
            if posted is None:
                break
            sent.append((posted.id, text))
        return sent

    async def send_with_retry(
        self, channel: Sendable, text: str, reference: discord.MessageReference | None, nonce: int
    ) -> discord.Message | None:
        """Send one chunk; retry rate limits and server errors with the SAME nonce, so Discord dedupes."""
        delays = self.bot.send_retry_delays_seconds
        for attempt in range(len(delays) + 1):
            try:
                return await _post(channel, text, reference, nonce)
            except discord.Forbidden as exc:
                log.warning("sending to channel %s refused: %s", getattr(channel, "id", "?"), exc.text)
                return None
            except discord.HTTPException as exc:
                if exc.status not in RETRYABLE_STATUSES or attempt == len(delays):
                    log.error(
                        "giving up sending a reply chunk (HTTP %d, attempt %d)", exc.status, attempt + 1
                    )
                    return None
                log.warning("send failed with HTTP %d; retrying in %.1fs", exc.status, delays[attempt])
                await asyncio.sleep(delays[attempt])
        return None

    # -- edits and deletions --------------------------------------------------------------------------

    @commands.Cog.listener()
    async def on_raw_message_edit(self, payload: discord.RawMessageUpdateEvent) -> None:
        """An edit replaces the stored text (embed-only updates carry no edit time and are skipped)."""
        edited = payload.message
        if edited.edited_at is None:
            return
        try:
            await self.bot.conversation.record_edit(
                payload.message_id, prompt_text(edited), edited.edited_at.timestamp(), payload.guild_id
            )
        except StorageError as exc:
            log.warning("edit of message %d was not stored: %s", payload.message_id, exc)

    @commands.Cog.listener()
    async def on_raw_message_delete(self, payload: discord.RawMessageDeleteEvent) -> None:
        """A deleted message is erased from storage (cached or not), so it never reaches a prompt again."""
        try:
            await self.bot.conversation.record_deletions([payload.message_id])
        except StorageError as exc:
            log.error("deletion of message %d was not stored: %s", payload.message_id, exc)

    @commands.Cog.listener()
    async def on_raw_bulk_message_delete(self, payload: discord.RawBulkMessageDeleteEvent) -> None:
        """A bulk deletion (moderation purge) erases every listed message."""
        try:
            count = await self.bot.conversation.record_deletions(payload.message_ids)
        except StorageError as exc:
            log.error("bulk delete in channel %d was not stored: %s", payload.channel_id, exc)
            return
        log.info("bulk delete in channel %d erased %d stored messages", payload.channel_id, count)


async def setup(bot: ChatBot) -> None:
    """Extension entry point (runs in setup_hook, after login, so the bot's user id is known)."""
    assert bot.user is not None
    await bot.add_cog(ChatCog(bot, bot.user.id))
