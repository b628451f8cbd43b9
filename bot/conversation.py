"""The conversation core: store a message, build the request from history, await the model, store the reply.

Long because: every path to a generated reply (answer, regenerate, continue) shares one request builder here.

No Discord types here: the Discord cogs and the terminal chat both drive this with plain data. It owns
every storage call of a message's path: the guild and channel settings are read once per message
(`context_for` → MessageContext, passed down), the incoming message is one write, the sent reply another.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bot.config import Settings
from bot.scrub import USER_MENTION, scrub_discord_markup
from bot.storage import (
    BotReplyRecord,
    ChannelFact,
    ChannelSettings,
    GuildSettings,
    Storage,
    StoredMessage,
    StoredReply,
)
from model.api import Reply, ReplyGenerator, ReplyRequest
from model.prompt import Turn
from model.sampling import SamplingParams

log = logging.getLogger(__name__)

RECENT_BOT_REPLIES = 5  # how many of the bot's last replies the repeat guard compares against
SEEN_IDS_LIMIT = 10_000  # replay detection for guilds that store nothing
SAMPLING_KEYS = frozenset(f.name for f in dataclasses.fields(SamplingParams)) - {"seed"}
# The levels a setting can come from, as /config show names them.
THIS_CHANNEL, PARENT_CHANNEL, SERVER, DEFAULT = "this channel", "parent channel", "server", "default"
SEED_RANGE = 2**31  # a regeneration's seed: the command's interaction id (a snowflake) modulo this


# The fields an incoming message shares with its storage row.
_ROW_FIELDS = ("message_id", "channel_id", "guild_id", "author_id", "author_name", "is_bot", "content",
               "created_at", "reply_to_id")  # fmt: skip


@dataclass(frozen=True)
class IncomingMessage:
    """A message as plain data, whatever front end it came from."""

    message_id: int
    channel_id: int
    guild_id: int | None
    author_id: int
    author_name: str
    is_bot: bool
    content: str
    created_at: float
    reply_to_id: int | None = None
    # (user id, display name) of the users the text mentions as `<@id>` markup.
    mentioned: tuple[tuple[int, str], ...] = ()
    parent_channel_id: int | None = None  # a thread's parent channel (a thread inherits its settings)

    def stored(self) -> StoredMessage:
        """The storage row for this message."""
        return StoredMessage(**{name: getattr(self, name) for name in _ROW_FIELDS})

    @classmethod
    def from_stored(cls, row: StoredMessage, parent_channel_id: int | None = None) -> IncomingMessage:
        """A stored message as it came in (its mentions' names are not stored: prompts read them)."""
        return cls(**{name: getattr(row, name) for name in _ROW_FIELDS}, parent_channel_id=parent_channel_id)


@dataclass(frozen=True)
class MessageContext:
    """A message's guild and channel settings, read once per message and passed down its path.

    The one owner of "what are this channel's settings?": persona and sampling resolve per value from the
    channel, then (in a thread) its parent channel, then the guild, then the global Settings; thread mode,
    wake words and the reply chance belong to the parent channel in a thread (`home`).
    """

    guild: GuildSettings | None  # None in DMs
    channel: ChannelSettings
    parent: ChannelSettings | None = None  # a thread's parent channel

    @property
    def is_logged(self) -> bool:
        """Whether messages here are stored (DMs always are)."""
        return self.guild is None or self.guild.logging_enabled

    @property
    def home(self) -> ChannelSettings:
        """Where thread mode, wake words and the reply chance are set: a thread's parent, else the channel."""
        return self.parent or self.channel

    def levels(self) -> list[tuple[str, str | None, Mapping[str, float]]]:
        """(level, persona, sampling overrides) from the most specific level to the guild's."""
        found = [(THIS_CHANNEL, self.channel.persona, self.channel.sampling_overrides)]
        if self.parent is not None:
            found.append((PARENT_CHANNEL, self.parent.persona, self.parent.sampling_overrides))
        if self.guild is not None:
            found.append((SERVER, self.guild.persona, self.guild.sampling_overrides))
        return found

    def persona_source(self) -> tuple[str | None, str]:
        """The overriding persona and the level it comes from; (None, "default") when none overrides it."""
        return next(((persona, level) for level, persona, _ in self.levels() if persona), (None, DEFAULT))

    def sampling_sources(self) -> dict[str, tuple[float, str]]:
        """Each overridden sampling setting: (value, the most specific level that sets it)."""
        found: dict[str, tuple[float, str]] = {}
        for level, _, overrides in reversed(self.levels()):
            found.update((key, (value, level)) for key, value in overrides.items())
        return found

    def sampling_overrides(self) -> dict[str, float]:
        """The sampling overrides in effect (each from its most specific level)."""
        return {key: value for key, (value, _) in self.sampling_sources().items()}


@dataclass(frozen=True)
class DraftReply:
    """A generated reply that has not been sent yet."""

    text: str
    reply: Reply
    params: SamplingParams
    received_at: float


@dataclass(frozen=True)
class RedoneReply:
    """A stored reply regenerated or continued: what answers whom, generated but not yet posted.

    For a continuation `draft.text` is only the text that follows the reply's, joined exactly (its leading
    space, if any, included; "" when the model added nothing usable).
    """

    stored: StoredReply
    answered: IncomingMessage  # the message the reply answers, as stored
    context: MessageContext
    draft: DraftReply


def regeneration_params(params: SamplingParams, seed: int) -> SamplingParams:
    """A new seed, and sampling even where the settings are greedy (which would only say the same again)."""
    temperature = params.temperature if not params.is_greedy else SamplingParams().temperature
    return dataclasses.replace(params, seed=seed % SEED_RANGE, temperature=temperature)


def apply_overrides(base: SamplingParams, overrides: Mapping[str, float]) -> SamplingParams:
    """Sampling settings with a guild's /config overrides on top (unknown keys are ignored)."""
    ints = {"max_new_tokens", "top_k", "no_repeat_ngram_size"}
    typed: dict[str, Any] = {
        key: int(value) if key in ints else float(value)
        for key, value in overrides.items()
        if key in SAMPLING_KEYS
    }
    return dataclasses.replace(base, **typed)


def history_to_turns(
    history: Sequence[StoredMessage], bot_user_id: int, names: Mapping[int, str]
) -> tuple[Turn, ...]:
    """Stored messages → dialogue turns with readable mentions; only the bot's own messages are bot turns."""
    return tuple(
        Turn(m.author_name, scrub_discord_markup(m.content, names), is_bot=m.author_id == bot_user_id)
        for m in history
        if m.content.strip()
    )


def mentioned_user_ids(history: Sequence[StoredMessage], facts: Sequence[ChannelFact] = ()) -> set[int]:
    """Ids of the users mentioned anywhere in the history (and in the channel's remembered facts)."""
    texts = [m.content for m in history] + [fact.text for fact in facts]
    return {int(match.group(1)) for text in texts for match in USER_MENTION.finditer(text)}


def fact_channel_ids(message: IncomingMessage) -> tuple[int, ...]:
    """Whose facts a message's prompt gets: a thread's parent channel's, then the thread's (or channel's)."""
    parent = message.parent_channel_id
    return (message.channel_id,) if parent is None else (parent, message.channel_id)


def with_newest(history: Sequence[StoredMessage], message: StoredMessage) -> list[StoredMessage]:
    """History ending with the message being answered (it is missing when the guild stores nothing)."""
    rest = [m for m in history if m.message_id != message.message_id]
    return [*rest, message]


class _SeenIds:
    """A bounded set of message ids, oldest forgotten first."""

    def __init__(self, limit: int) -> None:
        self._ids: OrderedDict[int, None] = OrderedDict()
        self._limit = limit

    def add(self, message_id: int) -> bool:
        """Remember the id; False when it was already there."""
        if message_id in self._ids:
            return False
        self._ids[message_id] = None
        if len(self._ids) > self._limit:
            self._ids.popitem(last=False)
        return True


class ConversationService:
    """Turns incoming messages into stored history and generated replies."""

    def __init__(
        self,
        storage: Storage,
        generator: ReplyGenerator,
        settings: Settings,
        bot_user_id: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.storage = storage
        self.generator = generator
        self.settings = settings
        self.bot_user_id = bot_user_id
        self.clock = clock
        self._seen = _SeenIds(SEEN_IDS_LIMIT)

    async def context_for(self, message: IncomingMessage) -> MessageContext:
        """The message's guild and channel settings: the one read of each for this message."""
        return await self.settings_for(message.channel_id, message.guild_id, message.parent_channel_id)

    async def settings_for(
        self, channel_id: int, guild_id: int | None, parent_id: int | None = None
    ) -> MessageContext:
        """A channel's settings (and a thread's parent's, in the same read) and its guild's."""
        guild = await self.storage.guild_settings(guild_id) if guild_id else None
        channel, parent = await self.storage.channel_and_parent_settings(channel_id, parent_id)
        return MessageContext(guild, channel, parent)

    async def record(self, message: IncomingMessage, context: MessageContext) -> bool:
        """Store the message (unless its guild turned logging off); False when it was seen before.

        One write: the message, its author and the names of the users it mentions (for later prompts).
        """
        is_new = self._seen.add(message.message_id)
        if not context.is_logged:
            return is_new
        stored = await self.storage.add_message(
            message.stored(), message.mentioned, message.parent_channel_id
        )
        return stored and is_new

    async def compose_reply(self, message: IncomingMessage, context: MessageContext) -> DraftReply:
        """Build the request from the channel's history and await the generator (its errors propagate)."""
        received_at = self.clock()
        request = await self._request_for(message, context)
        reply = await self.generator.generate(request)
        return DraftReply(reply.text, reply, request.params, received_at)

    async def _request_for(self, message: IncomingMessage, context: MessageContext) -> ReplyRequest:
        stored = await self.storage.recent_history(
            message.channel_id, self.settings.history_messages, since=context.channel.reset_at
        )
        start = await self._thread_start(context, stored)
        messages = with_newest([*start, *stored], await self._as_stored(message))
        return await self._request_from(messages, message, context)

    async def _request_from(
        self, messages: Sequence[StoredMessage], message: IncomingMessage, context: MessageContext
    ) -> ReplyRequest:
        """The request answering `message`, the newest of `messages` (its history, oldest first)."""
        facts = await self.storage.channel_facts(fact_channel_ids(message))  # one read: parent + thread
        names = await self.storage.display_names(mentioned_user_ids(messages, facts))
        names = {user_id: f"@{name}" for user_id, name in {**names, **dict(message.mentioned)}.items()}
        history = history_to_turns(messages, self.bot_user_id, names)
        recent = tuple(t.text for t in history if t.is_bot)[-RECENT_BOT_REPLIES:]
        params = apply_overrides(self.settings.sampling(), context.sampling_overrides())
        return ReplyRequest(
            persona=context.persona_source()[0] or self.settings.persona,
            history=history,
            bot_name=self.settings.bot_name,
            params=params,
            time_limit_seconds=self.settings.generation_timeout_seconds,
            recent_bot_replies=recent,
            request_id=str(message.message_id),
            # Scrubbed like any turn; model.prompt folds them onto their own lines.
            facts=tuple(scrub_discord_markup(fact.text, names) for fact in facts),
        )

    async def _thread_start(
        self, context: MessageContext, stored: Sequence[StoredMessage]
    ) -> list[StoredMessage]:
        """A bot thread's history starts with the message that opened it, which is stored in the parent
        channel: [it] while the history window still reaches back to the thread's start, else []."""
        opened = context.channel.opened_for_message_id
        if opened is None or len(stored) >= self.settings.history_messages:
            return []
        if any(m.message_id == opened for m in stored):
            return []
        first = await self.storage.get_message(opened)
        reset_at = context.channel.reset_at
        if first is None or first.deleted or (reset_at is not None and first.created_at < reset_at):
            return []
        return [first]

    async def open_thread(
        self, message: IncomingMessage, context: MessageContext, thread_id: int, at: float
    ) -> tuple[IncomingMessage, MessageContext]:
        """Record a thread the bot opened from `message`; the message and context as seen from inside it.

        The new thread's settings are the defaults (nothing is set on a thread yet), so no read is needed.
        """
        await self.storage.add_bot_thread(
            thread_id, message.channel_id, message.guild_id, message.message_id, at
        )
        thread = ChannelSettings(
            thread_id, parent_id=message.channel_id, opened_for_message_id=message.message_id
        )
        in_thread = dataclasses.replace(message, channel_id=thread_id, parent_channel_id=message.channel_id)
        return in_thread, MessageContext(context.guild, thread, parent=context.channel)

    async def _as_stored(self, message: IncomingMessage) -> StoredMessage:
        """The message as storage has it now: an edit or a deletion may have arrived meanwhile (a deleted
        message keeps no text, so it leaves the prompt); as received when its guild stores nothing."""
        return await self.storage.get_message(message.message_id) or message.stored()

    async def record_reply(
        self,
        message: IncomingMessage,
        context: MessageContext,
        draft: DraftReply,
        sent: Sequence[tuple[int, str]],
        sent_at: float,
        replaces: int | None = None,
    ) -> None:
        """Store the sent chunks (message id, text) and the reply's accounting, in one write.

        Storage checks the guild's logging switch again inside that write: it may have been turned off
        (and the guild purged) while the reply was being generated. `replaces`: the first message id of
        the reply this one regenerated.
        """
        if not sent or not context.is_logged:
            return
        chunks = [self._bot_message(message, message_id, text, sent_at) for message_id, text in sent]
        record = dataclasses.replace(
            self._reply_record(message, draft, sent[0][0], sent_at), replaces_reply_id=replaces
        )
        await self.storage.add_reply(chunks, record)

    def _bot_message(
        self, message: IncomingMessage, message_id: int, text: str, sent_at: float
    ) -> StoredMessage:
        """One sent chunk of the bot's reply to `message`, as stored."""
        return StoredMessage(
            message_id,
            message.channel_id,
            message.guild_id,
            self.bot_user_id,
            self.settings.bot_name,
            True,
            text,
            sent_at,
            reply_to_id=message.message_id,
        )

    async def author_of(self, message_id: int) -> int | None:
        """Who wrote a stored message (None when it is not stored)."""
        stored = await self.storage.get_message(message_id)
        return stored.author_id if stored else None

    async def last_bot_message_at(self, channel_id: int) -> float | None:
        """When this bot last posted in a channel, as stored (None when never)."""
        return await self.storage.last_bot_message_at(channel_id, self.bot_user_id)

    async def record_edit(
        self, message_id: int, content: str, edited_at: float, guild_id: int | None = None
    ) -> bool:
        """Replace a stored message's text after an edit; False when it is not stored (its guild's
        logging switch decides whether the text may wait for a message still being stored)."""
        return await self.storage.mark_edited(message_id, content, edited_at, guild_id)

    async def record_deletions(self, message_ids: Iterable[int]) -> int:
        """Erase deleted messages from storage, so they never reach a prompt again; return how many."""
        return await self.storage.mark_deleted(message_ids)

    def _reply_record(
        self, message: IncomingMessage, draft: DraftReply, first_id: int, sent_at: float
    ) -> BotReplyRecord:
        return BotReplyRecord(
            reply_message_id=first_id,
            answers_message_id=message.message_id,
            channel_id=message.channel_id,
            model_name=draft.reply.model_name,
            model_version=draft.reply.model_version,
            params=dataclasses.asdict(draft.params),
            latency_seconds=sent_at - draft.received_at,
            prompt_tokens=draft.reply.prompt_tokens,
            completion_tokens=draft.reply.completion_tokens,
            created_at=sent_at,
        )

    # -- regenerate and continue (bot/cogs/regenerate.py) ---------------------------------------------

    async def find_reply(self, message_id: int) -> StoredReply | None:
        """This bot's stored reply that a message is part of (None for any other message)."""
        return await self.storage.reply_for_message(message_id)

    async def regenerate(
        self, stored: StoredReply, seed: int, parent_channel_id: int | None = None
    ) -> RedoneReply | None:
        """A new reply to the message `stored` answered, from the history that reply was generated from (up
        to and including that message), with a new seed; the old reply's text counts as a repeat, so an
        equal reply is resampled once. None when the answered message is gone. Generator errors propagate."""
        answered = await self._answered(stored, parent_channel_id)
        if answered is None:
            return None
        context = await self.context_for(answered)
        request = await self._request_until(answered, context)
        request = dataclasses.replace(
            request,
            params=regeneration_params(request.params, seed),
            recent_bot_replies=(*request.recent_bot_replies, stored.text),
        )
        return RedoneReply(stored, answered, context, await self._draft(request))

    async def continue_reply(
        self, stored: StoredReply, parent_channel_id: int | None = None
    ) -> RedoneReply | None:
        """The text that continues `stored` (its text is the open bot turn of the same history); None when
        the answered message is gone. Generator errors propagate (ReplyTooLongToContinue among them)."""
        answered = await self._answered(stored, parent_channel_id)
        if answered is None:
            return None
        context = await self.context_for(answered)
        request = await self._request_until(answered, context)
        request = dataclasses.replace(request, continue_text=stored.text, recent_bot_replies=())
        return RedoneReply(stored, answered, context, await self._draft(request))

    async def record_regenerated(
        self, redone: RedoneReply, sent: Sequence[tuple[int, str]], sent_at: float
    ) -> None:
        """Store the regenerated reply's chunks with its link to the reply it replaced, in one write."""
        replaces = redone.stored.reply_message_id
        await self.record_reply(redone.answered, redone.context, redone.draft, sent, sent_at, replaces)

    async def record_continuation(
        self,
        redone: RedoneReply,
        edited: tuple[int, str] | None,
        added: Sequence[tuple[int, str]],
        sent_at: float,
    ) -> None:
        """Store a continued reply in one write: the edited message's whole new text, the chunks sent after
        it, and the completion tokens the continuation cost."""
        if not redone.context.is_logged:
            return
        chunks = [self._bot_message(redone.answered, message_id, text, sent_at) for message_id, text in added]
        tokens = redone.draft.reply.completion_tokens
        await self.storage.extend_reply(redone.stored.reply_message_id, edited, chunks, tokens, sent_at)

    async def _answered(self, stored: StoredReply, parent_channel_id: int | None) -> IncomingMessage | None:
        """The message a stored reply answers, as plain data (None when it is gone)."""
        message = await self.storage.get_message(stored.answers_message_id)
        if message is None or message.deleted:
            return None
        return IncomingMessage.from_stored(message, parent_channel_id)

    async def _request_until(self, answered: IncomingMessage, context: MessageContext) -> ReplyRequest:
        """The request answering `answered` again: the history as it stood then, later messages left out."""
        messages = await self.storage.history_until(
            answered.channel_id, answered.message_id, self.settings.history_messages, context.channel.reset_at
        )
        start = await self._thread_start(context, messages)
        return await self._request_from([*start, *messages], answered, context)

    async def _draft(self, request: ReplyRequest) -> DraftReply:
        received_at = self.clock()
        reply = await self.generator.generate(request)
        return DraftReply(reply.text, reply, request.params, received_at)
