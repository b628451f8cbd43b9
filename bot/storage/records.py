"""The plain records the bot's storage takes and returns (frozen dataclasses, no SQL).

bot.storage re-exports them, so callers import everything storage-related from there.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class StoredMessage:
    """One Discord message as stored; content is '' once deleted."""

    message_id: int
    channel_id: int
    guild_id: int | None  # None for DMs
    author_id: int
    author_name: str
    is_bot: bool
    content: str
    created_at: float  # unix seconds
    reply_to_id: int | None = None
    edited_at: float | None = None
    deleted: bool = False


@dataclass(frozen=True)
class GuildSettings:
    """Per-guild privacy switches and /config overrides."""

    guild_id: int
    logging_enabled: bool = True
    training_export_enabled: bool = False  # off by default (Discord Developer Policy)
    persona: str | None = None  # None = use the global setting
    sampling_overrides: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ChannelSettings:
    """Per-channel switches and /channel overrides (a thread inherits unset ones from its parent)."""

    channel_id: int
    answer_all: bool = False
    reset_at: float | None = None  # /reset: history before this time is not used for prompts
    persona: str | None = None  # None = the parent channel's, else the guild's
    sampling_overrides: Mapping[str, float] = field(default_factory=dict)
    parent_id: int | None = None  # a thread's parent channel
    thread_mode: bool = False  # /channel threads: a mention opens a thread
    wake_words: tuple[str, ...] = ()
    wake_on_name: bool = False  # the bot's name is a wake word
    reply_chance: float = 0.0  # probability of joining in unprompted
    chance_cooldown_seconds: float = 300.0  # at most one unprompted reply per this period
    opened_for_message_id: int | None = None  # set when this is a thread the bot opened (from that message)

    @property
    def is_bot_thread(self) -> bool:
        """Whether this channel is a thread the bot opened in thread mode."""
        return self.opened_for_message_id is not None


@dataclass(frozen=True)
class BotReplyRecord:
    """How one bot reply was produced."""

    reply_message_id: int
    answers_message_id: int
    channel_id: int
    model_name: str
    model_version: str
    params: Mapping[str, float | int | None]
    latency_seconds: float
    prompt_tokens: int
    completion_tokens: int
    created_at: float
    replaces_reply_id: int | None = None  # a regenerated reply: the first message id of the one it replaced


@dataclass(frozen=True)
class StoredReply:
    """One of the bot's stored replies, as regenerate and continue need it: its messages, whom it answered."""

    reply_message_id: int  # its first message
    answers_message_id: int
    channel_id: int
    guild_id: int | None
    answered_author_id: int | None  # who wrote the message it answers (None when that is not stored)
    chunks: tuple[tuple[int, str], ...]  # (message id, text) of each of its messages, in order
    is_latest: bool  # no later reply of the bot in this channel
    completion_tokens: int

    @property
    def text(self) -> str:
        """The whole reply (its messages were cut at whitespace or line breaks, folded in the prompt)."""
        return "\n".join(text for _, text in self.chunks)


@dataclass(frozen=True)
class Stats:
    """Counts and reply latency percentiles (nearest rank) for /stats."""

    guilds: int
    channels: int
    users: int
    messages: int
    bot_replies: int
    latency_p50_seconds: float | None
    latency_p95_seconds: float | None


@dataclass(frozen=True)
class ExportRow:
    """One non-deleted message of a guild whose training export is on."""

    message: StoredMessage
    author_opted_in: bool
    feedback_score: int  # sum of feedback on this message (+1 / -1 each); 0 when none
    reply_id: int | None = None  # a bot reply's message: the reply it is part of (its first message's id)
    replaced: bool = False  # part of a reply a regeneration replaced and its person did not keep (👍)


@dataclass(frozen=True)
class AuditEntry:
    """One admin action, allowed or refused."""

    entry_id: int
    at: float
    actor_id: int
    guild_id: int | None
    action: str
    detail: str
    allowed: bool


@dataclass(frozen=True)
class ChannelFact:
    """One remembered fact of a channel (/remember), with who wrote it (for /forget-me)."""

    fact_id: int
    channel_id: int
    author_id: int
    text: str
    created_at: float  # unix seconds
