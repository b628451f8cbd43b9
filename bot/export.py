"""`chatbot export` from the database: consented, scrubbed Discord conversations → the export writer.

What leaves the database (README, "Retraining", says the same for admins):
- only guilds whose training export is on, only non-deleted messages, never a `/forget-me` user (storage's
  export_rows enforces these three);
- a channel's messages are cut into conversations at gaps longer than BOT_EXPORT_GAP_MINUTES; the id
  `discord:{channel_id}:{first_message_id}` decides the train/val side, so it never moves between exports;
- turns of users who did not opt in are DROPPED (not replaced), and so are the bot replies that answer them
  (a reply can quote what it answers) or answer a message that is not in the export (deleted, or in another
  conversation); other bots' messages are dropped too;
- the bot's replies rated 👎 (every chunk of that reply) and repeats of a bot text already said in the same
  conversation are dropped; so is a reply that "Regenerate reply" replaced, unless the person it answered
  kept it (👍 on it): a regeneration says the reply was not wanted (bot/cogs/regenerate.py);
- every remaining text is scrubbed (bot.scrub); mentions of opted-in users become their display name, of
  anyone else "someone";
- conversations left with fewer than 2 turns, no bot turn or no human turn are dropped; exact duplicates are
  removed by the writer. Every count lands in manifest.json under "filters".
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import sys
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from bot.config import Settings
from bot.scrub import USER_MENTION, scrub_text
from bot.storage import ExportRow, Storage
from model.prompt import Turn
from model.training.dataset import Conversation, Manifest, write_export

log = logging.getLogger(__name__)

SOURCE = "discord"
CONSENT_POLICY = "unconsented turns dropped, with the bot replies that answer them"


class ExportArgumentError(ValueError):
    """A bad --since / --guild value; the message names the flag."""


@dataclass(frozen=True)
class ExportOptions:
    """How rows become conversations."""

    gap_seconds: float
    bot_name: str = "Bot"
    # The bot's own user id. None: the bot's messages are recognised as is_bot rows stored under bot_name
    # (ConversationService stores its replies that way); any other bot's messages are dropped.
    bot_user_id: int | None = None

    def is_own(self, row: ExportRow) -> bool:
        """Whether a row is one of this bot's replies."""
        m = row.message
        if self.bot_user_id is not None:
            return m.author_id == self.bot_user_id
        return m.is_bot and m.author_name == self.bot_name


def parse_since(text: str | None) -> float | None:
    """`--since` (YYYY-MM-DD, an ISO date-time, or unix seconds) → unix seconds; naive times are UTC."""
    if text is None or not text.strip():
        return None
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ExportArgumentError(
            f"--since must be YYYY-MM-DD, an ISO date-time or unix seconds, got {text!r}"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return moment.timestamp()


class GapSplitter:
    """Cuts rows (ordered by channel, then time) into raw conversations at channel changes and long gaps."""

    def __init__(self, gap_seconds: float) -> None:
        self.gap_seconds = gap_seconds
        self._current: list[ExportRow] = []

    def push(self, row: ExportRow) -> list[ExportRow] | None:
        """Add a row; returns the finished conversation when this row starts a new one."""
        last = self._current[-1].message if self._current else None
        m = row.message
        if last is not None and (
            m.channel_id != last.channel_id or m.created_at - last.created_at > self.gap_seconds
        ):
            finished, self._current = self._current, [row]
            return finished
        self._current.append(row)
        return None

    def flush(self) -> list[ExportRow] | None:
        """The last conversation, if any."""
        finished, self._current = self._current, []
        return finished or None


def split_at_gaps(rows: Iterable[ExportRow], gap_seconds: float) -> list[list[ExportRow]]:
    """All raw conversations of `rows` (a convenience over GapSplitter for tests and small data)."""
    splitter, groups = GapSplitter(gap_seconds), []
    for row in rows:
        if (group := splitter.push(row)) is not None:
            groups.append(group)
    if (group := splitter.flush()) is not None:
        groups.append(group)
    return groups


def mentioned_user_ids(rows: Iterable[ExportRow]) -> set[int]:
    """Every user id mentioned as <@id> / <@!id> in the rows' text."""
    return {int(match) for row in rows for match in USER_MENTION.findall(row.message.content)}


def _fold(text: str) -> str:
    return " ".join(text.split()).casefold()


def _reply_key(row: ExportRow) -> int | None:
    """Which reply a bot message is part of (a regenerated reply answers the same message as the old one)."""
    return row.reply_id if row.reply_id is not None else row.message.reply_to_id


def _kept_rows(rows: Sequence[ExportRow], options: ExportOptions, counts: Counter[str]) -> list[ExportRow]:
    """Consent and feedback filtering of one raw conversation (before scrubbing)."""
    own = {r.message.message_id for r in rows if options.is_own(r)}
    consented = {
        r.message.message_id
        for r in rows
        if r.message.message_id not in own and not r.message.is_bot and r.author_opted_in
    }
    downvoted = {_reply_key(r) for r in rows if r.message.message_id in own and r.feedback_score < 0}
    kept = []
    for row in rows:
        m = row.message
        if m.message_id not in own and m.message_id not in consented:
            counts["messages_dropped_" + ("other_bot" if m.is_bot else "not_opted_in")] += 1
        elif m.message_id in own and m.reply_to_id is not None and m.reply_to_id not in consented:
            # It answers an unconsented, deleted or out-of-conversation message and may quote it.
            counts["bot_replies_dropped_answering_unexported"] += 1
        elif m.message_id in own and _reply_key(row) in downvoted:
            counts["bot_replies_dropped_downvoted"] += 1
        elif m.message_id in own and row.replaced:  # regenerated, and its person did not keep it (👍)
            counts["bot_replies_dropped_replaced"] += 1
        else:
            kept.append(row)
    return kept


def _turns(
    rows: Sequence[ExportRow], options: ExportOptions, names: Mapping[int, str], counts: Counter[str]
) -> list[Turn]:
    """Scrubbed turns of the kept rows; repeated bot texts and texts left empty are dropped."""
    said: set[str] = set()
    turns = []
    for row in rows:
        is_bot = options.is_own(row)
        text = scrub_text(row.message.content, names).strip()
        if not text:
            counts["messages_dropped_empty"] += 1
            continue
        if is_bot and _fold(text) in said:
            counts["bot_replies_dropped_repeated"] += 1
            continue
        if is_bot:
            said.add(_fold(text))
        speaker = options.bot_name if is_bot else row.message.author_name
        turns.append(Turn(speaker=speaker, text=text, is_bot=is_bot))
    return turns


def build_conversation(
    rows: Sequence[ExportRow], options: ExportOptions, names: Mapping[int, str], counts: Counter[str]
) -> Conversation | None:
    """One raw conversation → an exportable Conversation, or None (the reason is counted)."""
    counts["messages_read"] += len(rows)
    turns = _turns(_kept_rows(rows, options, counts), options, names, counts)
    if len(turns) < 2:
        counts["conversations_dropped_too_short"] += 1
    elif not any(t.is_bot for t in turns):
        counts["conversations_dropped_no_bot_turn"] += 1
    elif all(t.is_bot for t in turns):
        counts["conversations_dropped_no_human_turn"] += 1
    else:
        first = rows[0].message
        counts["turns_exported"] += len(turns)
        return Conversation(f"discord:{first.channel_id}:{first.message_id}", SOURCE, tuple(turns))
    return None


class MentionNames:
    """Display names for mentions: the bot's own name, opted-in users' names, nobody else's (→ "someone")."""

    def __init__(self, storage: Storage, options: ExportOptions) -> None:
        self._storage = storage
        self._options = options
        self._names: dict[int, str] = {}
        self._resolved: set[int] = set()

    async def for_rows(self, rows: Sequence[ExportRow]) -> Mapping[int, str]:
        """The name map, extended with every user mentioned in `rows` (looked up once per user)."""
        for row in rows:
            if self._options.is_own(row):
                self._names[row.message.author_id] = self._options.bot_name
                self._resolved.add(row.message.author_id)
        if self._options.bot_user_id is not None:
            self._names[self._options.bot_user_id] = self._options.bot_name
            self._resolved.add(self._options.bot_user_id)
        missing = mentioned_user_ids(rows) - self._resolved
        if missing:
            await self._resolve(missing)
        return self._names

    async def _resolve(self, user_ids: set[int]) -> None:
        self._resolved |= user_ids
        found = await self._storage.display_names(user_ids)
        for user_id, name in found.items():
            if await self._storage.user_opted_in(user_id):
                self._names[user_id] = name


async def _raw_conversations(
    rows: AsyncIterator[ExportRow], gap_seconds: float
) -> AsyncIterator[list[ExportRow]]:
    splitter = GapSplitter(gap_seconds)
    async for row in rows:
        if (group := splitter.push(row)) is not None:
            yield group
    if (group := splitter.flush()) is not None:
        yield group


async def collect_conversations(
    storage: Storage, options: ExportOptions, *, guild_id: int | None = None, since: float | None = None
) -> tuple[list[Conversation], Counter[str]]:
    """Read, split, filter and scrub everything exportable; return the conversations and filter counts."""
    counts: Counter[str] = Counter()
    names = MentionNames(storage, options)
    conversations = []
    async for rows in _raw_conversations(
        storage.export_rows(guild_id=guild_id, since=since), options.gap_seconds
    ):
        conversation = build_conversation(rows, options, await names.for_rows(rows), counts)
        if conversation is not None:
            conversations.append(conversation)
    return conversations, counts


async def export_discord(
    storage: Storage,
    out_dir: Path,
    options: ExportOptions,
    *,
    guild_id: int | None = None,
    since: float | None = None,
    progress: bool = False,
    database: str = "",
) -> Manifest:
    """Export the database's consented conversations to out_dir (train.jsonl, val.jsonl, manifest.json)."""
    conversations, counts = await collect_conversations(storage, options, guild_id=guild_id, since=since)
    filters = {
        "gap_minutes": options.gap_seconds / 60,
        "guild_id": guild_id,
        "since": since,
        "consent": CONSENT_POLICY,
        "scrubbed": ["mentions", "urls", "emails", "phone_numbers", "token_like_strings"],
        **dict(sorted(counts.items())),
    }
    # The writer fsyncs files: keep that off the event loop (the bot runs this too).
    return await asyncio.to_thread(
        write_export,
        Path(out_dir),
        conversations,
        source=SOURCE,
        filters=filters,
        extra={"database": database},
        progress=progress,
    )


async def export_from_database(
    settings: Settings,
    out_dir: Path,
    *,
    guild_id: int | None = None,
    since: str | None = None,
    bot_user_id: int | None = None,
    progress: bool | None = None,
) -> Manifest:
    """`chatbot export`: open the settings' database and export it (a progress bar when stderr is a TTY)."""
    since_seconds = parse_since(since)
    options = ExportOptions(settings.export_gap_minutes * 60, settings.bot_name, bot_user_id)
    show = sys.stderr.isatty() if progress is None else progress
    async with await Storage.open(settings.db_path, settings.db_busy_timeout_seconds) as storage:
        return await export_discord(
            storage,
            out_dir,
            options,
            guild_id=guild_id,
            since=since_seconds,
            progress=show,
            database=str(settings.db_path),
        )
