"""When the bot answers: a pure decision over plain data, plus the per-user cooldown.

Nothing here reads a clock or touches Discord: the chat cog gathers the facts, passes the time in and acts
on the decision, so every rule is tested with plain values.

Rules, in order (the first that matches decides):
1. Never the bot itself, never other bots.
2. Access lists: a blocked user, role or channel (a thread's parent counts) is ignored — block wins. A
   non-empty allow list is exclusive: users and roles are one "who" dimension (the author must be in
   `allowed_users` or hold one of `allowed_roles` when either list is set); channels are the "where"
   dimension and apply to guild channels only (DMs are governed by `answer_dms`).
3. Triggers. Explicit: a mention of the bot, a reply to one of the bot's messages, a DM (when `answer_dms`).
   Implicit: a channel an admin enabled with `/channel enable` (every message), and the follow-up window:
   for `followup_window_seconds` after the bot last spoke in a channel, messages from ANY of the channel's
   users are answered (a conversation with the bot is usually a group one), except messages that are
   visibly addressed to someone else (they mention another user or reply to another user's message).
4. Cooldown per user (all channels): within `cooldown_seconds` of the last answer to that user, an explicit
   trigger gets ONE short notice per cooldown period, then silence; implicit triggers are silent (a notice
   for a message that was not addressed to the bot would be noise).
Threads are their own conversations: they carry their own channel id.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from dataclasses import dataclass

from bot.config import Settings

COOLDOWN_USERS_LIMIT = 10_000  # cooldown entries kept; the least recently active users are forgotten first


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

    @property
    def is_dm(self) -> bool:
        """Whether the message is a direct message (no guild)."""
        return self.guild_id is None


@dataclass(frozen=True)
class ChannelState:
    """What the bot knows about the channel the message arrived in."""

    answer_all: bool = False  # enabled with /channel enable
    last_bot_message_at: float | None = None


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


def find_trigger(facts: MessageFacts, channel: ChannelState, policy: ReplyPolicy) -> Trigger | None:
    """Why this message calls for an answer (ignoring cooldowns), or None."""
    if facts.is_dm:
        return Trigger("dm", True) if policy.answer_dms else None
    if facts.mentions_bot:
        return Trigger("mention", True)
    if facts.replies_to_bot:
        return Trigger("reply to the bot", True)
    if channel.answer_all:
        return Trigger("channel answers every message", False)
    if _in_followup_window(facts, channel, policy):
        return Trigger("follow-up window", False)
    return None


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


def decide(facts: MessageFacts, channel: ChannelState, policy: ReplyPolicy) -> Decision:
    """Whether to answer, before cooldowns: self/bots ignored, access lists, then triggers."""
    if facts.author_id == policy.bot_user_id:
        return Decision(Action.IGNORE, "own message")
    if facts.author_is_bot:
        return Decision(Action.IGNORE, "author is a bot")
    denied = access_denied(facts, policy)
    if denied:
        return Decision(Action.IGNORE, denied)
    trigger = find_trigger(facts, channel, policy)
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
