"""When the bot answers: a pure decision over plain data, plus the per-user cooldown.

Nothing here reads a clock or touches Discord: the chat cog gathers the facts, passes the time in and acts
on the decision, so every rule is tested with plain values.

Rules, in order (the first that matches decides):
1. Never the bot itself, never other bots.
2. Access lists: a blocked user, role or channel (a thread's parent counts) is ignored — block wins. A
   non-empty allow list is exclusive: users and roles are one "who" dimension (the author must be in
   `allowed_users` or hold one of `allowed_roles` when either list is set); channels are the "where"
   dimension and apply to guild channels only (DMs are governed by `answer_dms`).
3. An archived thread is left alone (answering would unarchive it).
4. Triggers. Explicit: a mention of the bot, a reply to one of the bot's messages, a DM (when `answer_dms`),
   a wake word of the channel (`/channel wake`; the bot's name when `/channel wake name` is on): a wake word
   is addressed to the bot, so it is explicit. Implicit: a thread the bot opened in thread mode (every
   message), a channel an admin enabled with `/channel enable` (every message), the follow-up window: for
   `followup_window_seconds` after the bot last spoke in a channel, messages from ANY of the channel's users
   are answered (a conversation with the bot is usually a group one), except messages that are visibly
   addressed to someone else (they mention another user or reply to another user's message); last the reply
   chance (`/channel chance`): a message not addressed to anyone else is answered when the caller's random
   `roll` (uniform in [0, 1)) is below the channel's chance and the channel's last chance reply is at least
   `chance_cooldown_seconds` old. The roll is passed in, never drawn here.
5. Cooldown per user (all channels): within `cooldown_seconds` of the last answer to that user, an explicit
   trigger gets ONE short notice per cooldown period, then silence; implicit triggers are silent (a notice
   for a message that was not addressed to the bot would be noise).
Wake words match case-insensitively: a word with CJK characters (Han, kana, Hangul: text written without
spaces) matches anywhere in the text; any other word matches whole words only (no letter, digit or
underscore right before or after it), so "bot" wakes on "hey bot!" but not on "robot".
Threads are their own conversations: they carry their own channel id.
"""

from __future__ import annotations

import enum
import re
from collections import OrderedDict
from dataclasses import dataclass

from bot.config import Settings

COOLDOWN_USERS_LIMIT = 10_000  # cooldown entries kept; the least recently active users are forgotten first
CHANCE_TRIGGER = "reply chance"
CHANCE_COOLDOWN_MAX_SECONDS = 86_400.0  # /channel chance accepts a cooldown of up to a day
# Scripts written without spaces between words: Han, Hiragana, Katakana (and its extensions), Hangul.
_CJK = re.compile(
    r"[\u3040-\u30ff\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af\uff66-\uff9f]"
)


class Action(enum.Enum):
    """What the chat cog does with a message."""

    REPLY = "reply"
    COOLDOWN_NOTICE = "cooldown_notice"
    IGNORE = "ignore"


@dataclass(frozen=True)
class MessageFacts:
    """What the policy needs to know about one incoming message."""

    author_id: int
    author_is_bot: bool
    channel_id: int
    guild_id: int | None  # None for a DM
    created_at: float  # unix seconds
    author_role_ids: frozenset[int] = frozenset()
    parent_channel_id: int | None = None  # a thread's parent channel
    mentions_bot: bool = False
    replies_to_bot: bool = False
    addressed_to_other: bool = False  # mentions another user or replies to another user's message
    text: str = ""  # what the wake words are matched against
    in_archived_thread: bool = False

    @property
    def is_dm(self) -> bool:
        """Whether the message is a direct message (no guild)."""
        return self.guild_id is None


@dataclass(frozen=True)
class ChannelState:
    """What the bot knows about the channel the message arrived in."""

    answer_all: bool = False  # enabled with /channel enable
    last_bot_message_at: float | None = None
    is_bot_thread: bool = False  # a thread the bot opened in thread mode
    thread_mode: bool = False  # /channel threads: an explicit trigger opens a thread
    wake_words: tuple[str, ...] = ()  # the bot's names included when /channel wake name is on
    reply_chance: float = 0.0
    chance_cooldown_seconds: float = 300.0
    last_chance_reply_at: float | None = None


@dataclass(frozen=True)
class ReplyPolicy:
    """The configured rules (from Settings) plus the bot's own user id."""

    bot_user_id: int
    answer_dms: bool = True
    followup_window_seconds: float = 120.0
    cooldown_seconds: float = 3.0
    allowed_users: frozenset[int] = frozenset()
    blocked_users: frozenset[int] = frozenset()
    allowed_roles: frozenset[int] = frozenset()
    blocked_roles: frozenset[int] = frozenset()
    allowed_channels: frozenset[int] = frozenset()
    blocked_channels: frozenset[int] = frozenset()

    @classmethod
    def from_settings(cls, settings: Settings, bot_user_id: int) -> ReplyPolicy:
        """The policy configured by BOT_ANSWER_DMS, BOT_FOLLOWUP_WINDOW_SECONDS, the allow/block lists, …"""
        return cls(
            bot_user_id=bot_user_id,
            answer_dms=settings.answer_dms,
            followup_window_seconds=settings.followup_window_seconds,
            cooldown_seconds=settings.cooldown_seconds,
            allowed_users=settings.allowed_users,
            blocked_users=settings.blocked_users,
            allowed_roles=settings.allowed_roles,
            blocked_roles=settings.blocked_roles,
            allowed_channels=settings.allowed_channels,
            blocked_channels=settings.blocked_channels,
        )


@dataclass(frozen=True)
class Trigger:
    """Why a message calls for an answer; `is_explicit` when it was addressed to the bot."""

    reason: str
    is_explicit: bool


def _channel_ids(facts: MessageFacts) -> set[int]:
    return {facts.channel_id} | ({facts.parent_channel_id} if facts.parent_channel_id else set())


def access_denied(facts: MessageFacts, policy: ReplyPolicy) -> str | None:
    """Why the allow/block lists exclude this message, or None when they let it through."""
    channels = _channel_ids(facts)
    if facts.author_id in policy.blocked_users or facts.author_role_ids & policy.blocked_roles:
        return "blocked user"
    if not facts.is_dm and channels & policy.blocked_channels:
        return "blocked channel"
    if policy.allowed_users or policy.allowed_roles:
        is_allowed = facts.author_id in policy.allowed_users or facts.author_role_ids & policy.allowed_roles
        if not is_allowed:
            return "user not in the allow list"
    if not facts.is_dm and policy.allowed_channels and not channels & policy.allowed_channels:
        return "channel not in the allow list"
    return None


def should_record(facts: MessageFacts, policy: ReplyPolicy) -> bool:
    """Whether the message belongs in the stored conversation (the guild's logging switch comes later)."""
    if facts.author_id == policy.bot_user_id:
        return False  # the bot's own messages are stored when it sends them
    if facts.is_dm and not policy.answer_dms:
        return False
    return access_denied(facts, policy) is None


def find_trigger(
    facts: MessageFacts, channel: ChannelState, policy: ReplyPolicy, roll: float = 1.0
) -> Trigger | None:
    """Why this message calls for an answer (ignoring cooldowns), or None; `roll` is the chance draw."""
    if facts.is_dm:
        return Trigger("dm", True) if policy.answer_dms else None
    if facts.mentions_bot:
        return Trigger("mention", True)
    if facts.replies_to_bot:
        return Trigger("reply to the bot", True)
    word = matched_wake_word(facts.text, channel.wake_words)
    if word is not None:
        return Trigger(f"wake word {word!r}", True)
    if channel.is_bot_thread:
        return Trigger("the bot's own thread", False)
    if channel.answer_all:
        return Trigger("channel answers every message", False)
    if _in_followup_window(facts, channel, policy):
        return Trigger("follow-up window", False)
    if _chance_reply(facts, channel, roll):
        return Trigger(CHANCE_TRIGGER, False)
    return None


def matched_wake_word(text: str, wake_words: tuple[str, ...]) -> str | None:
    """The first wake word the text contains (rules in the module docstring), or None."""
    folded = text.casefold()
    for word in wake_words:
        needle = word.casefold().strip()
        if not needle:
            continue
        if _CJK.search(needle):
            if needle in folded:
                return word
        elif re.search(rf"(?<!\w){re.escape(needle)}(?!\w)", folded):
            return word
    return None


def _chance_reply(facts: MessageFacts, channel: ChannelState, roll: float) -> bool:
    """Join in unprompted: the roll came up and the channel's last chance reply is a cooldown old."""
    if facts.addressed_to_other or not roll < channel.reply_chance:
        return False
    last = channel.last_chance_reply_at
    return last is None or facts.created_at - last >= channel.chance_cooldown_seconds


def opens_thread(decision: Decision, facts: MessageFacts, channel: ChannelState) -> bool:
    """Thread mode: an answer to an explicit trigger in a channel (not a thread) goes into a new thread."""
    trigger = decision.trigger
    is_explicit_reply = decision.action is Action.REPLY and trigger is not None and trigger.is_explicit
    return is_explicit_reply and channel.thread_mode and not facts.is_dm and facts.parent_channel_id is None


def _in_followup_window(facts: MessageFacts, channel: ChannelState, policy: ReplyPolicy) -> bool:
    if policy.followup_window_seconds <= 0 or channel.last_bot_message_at is None or facts.addressed_to_other:
        return False  # a zero window turns follow-ups off
    return 0 <= facts.created_at - channel.last_bot_message_at <= policy.followup_window_seconds


@dataclass(frozen=True)
class Decision:
    """The policy's answer: what to do and why (the reason goes to debug logs and tests)."""

    action: Action
    reason: str
    trigger: Trigger | None = None


def decide(facts: MessageFacts, channel: ChannelState, policy: ReplyPolicy, roll: float = 1.0) -> Decision:
    """Whether to answer, before cooldowns: self/bots ignored, access lists, archived threads, then triggers.

    `roll` is a uniform draw in [0, 1) from the caller's random source, for the reply chance (1.0: none).
    """
    if facts.author_id == policy.bot_user_id:
        return Decision(Action.IGNORE, "own message")
    if facts.author_is_bot:
        return Decision(Action.IGNORE, "author is a bot")
    denied = access_denied(facts, policy)
    if denied:
        return Decision(Action.IGNORE, denied)
    if facts.in_archived_thread:
        return Decision(Action.IGNORE, "archived thread")
    trigger = find_trigger(facts, channel, policy, roll)
    if trigger is None:
        return Decision(Action.IGNORE, "not addressed to the bot")
    return Decision(Action.REPLY, trigger.reason, trigger)


@dataclass(frozen=True)
class CooldownEntry:
    """One user's cooldown: when they were last answered and when they were last told to slow down."""

    answered_at: float
    noticed_at: float | None = None


def apply_cooldown(
    decision: Decision, entry: CooldownEntry | None, now: float, cooldown_seconds: float
) -> tuple[Decision, CooldownEntry | None]:
    """The decision after the user's cooldown, and the user's new cooldown entry."""
    if decision.action is not Action.REPLY or decision.trigger is None:
        return decision, entry
    if entry is None or now - entry.answered_at >= cooldown_seconds:
        return decision, CooldownEntry(answered_at=now)
    if decision.trigger.is_explicit and entry.noticed_at is None:
        return Decision(Action.COOLDOWN_NOTICE, "cooldown", decision.trigger), CooldownEntry(
            entry.answered_at, noticed_at=now
        )
    return Decision(Action.IGNORE, "cooldown (already noticed)", decision.trigger), entry


class Cooldowns:
    """Per-user cooldown entries for one bot (bounded; the state lives here, the rule in apply_cooldown)."""

    def __init__(self, cooldown_seconds: float, limit: int = COOLDOWN_USERS_LIMIT) -> None:
        self.cooldown_seconds = cooldown_seconds
        self._entries: OrderedDict[int, CooldownEntry] = OrderedDict()
        self._limit = limit

    def check(self, user_id: int, decision: Decision, now: float) -> Decision:
        """Apply the user's cooldown to a decision and remember the outcome."""
        final, entry = apply_cooldown(decision, self._entries.get(user_id), now, self.cooldown_seconds)
        if entry is not None:
            self._entries[user_id] = entry
            self._entries.move_to_end(user_id)
            if len(self._entries) > self._limit:
                self._entries.popitem(last=False)
        return final
