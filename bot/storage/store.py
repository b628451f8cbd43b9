"""All SQL of the bot: the SQLite database on aiosqlite and its domain methods.

Long because: all the bot's SQL stays in one module; its ~45 one-statement domain methods read best together.
The records they take and return are in records.py; opening the file (checks, migrations, pragmas) is
database.py.

One write connection and one read-only connection per Storage. Every write is one `BEGIN IMMEDIATE`
transaction under an asyncio.Lock, because coroutines sharing one connection would otherwise run inside each
other's transactions; reads go through the second connection and never queue behind writes (WAL).
Time is passed in by the caller; the one clock here, for tombstone expiry, is injected (Storage.open's
`clock`). The schema lives in migrations.py; the errors and their one-line messages in errors.py.

A deletion or edit that arrives before its message is stored leaves a tombstone, which the insert consults and
consumes in its own transaction: no order of events stores deleted text. After a delete or edit a checkpoint
runs within SCRUB_CHECKPOINT_DELAY_SECONDS, so the erased text leaves the -wal file too.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Generator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiosqlite

from bot.storage.database import backup_file, connect, migrate
from bot.storage.errors import (
    DatabaseFull,
    DatabaseUnavailable,
    StorageError,
    raise_failure,
    storage_failure,
)
from bot.storage.records import (
    AuditEntry,
    BotReplyRecord,
    ChannelFact,
    ChannelSettings,
    ExportRow,
    GuildSettings,
    Stats,
    StoredMessage,
    StoredReply,
)

log = logging.getLogger(__name__)

EXPORT_BATCH_ROWS = 500  # rows per read while exporting, so no read transaction stays open for long
# A tombstone outlives the handling of one create event by far (busy_timeout is at most 600 s); an edit's text
# kept for a message that is never stored (e.g. logging off) is gone after this.
TOMBSTONE_TTL_SECONDS = 15 * 60.0
# A delete or edit starts this timer (later ones join it, so the bound holds under a stream of deletes); then
# one TRUNCATE checkpoint. Not PASSIVE: a passive checkpoint copies the frames into the database but leaves
# them in the -wal file, where the erased text would stay until overwritten. TRUNCATE empties the file; it
# waits only for readers, and the read connection holds no transaction between queries.
SCRUB_CHECKPOINT_DELAY_SECONDS = 2.0
_GUILD_COLUMNS = frozenset({"logging_enabled", "training_export_enabled", "persona", "sampling_json"})
_CHANNEL_COLUMNS = frozenset({
    "persona", "sampling_json", "thread_mode", "wake_words_json", "wake_on_name", "reply_chance",
    "chance_cooldown_seconds",
})  # fmt: skip
_WANTED_IDS = {1: "SELECT ? AS id", 2: "SELECT ? AS id UNION ALL SELECT ?"}  # ids asked of channel settings
_MESSAGE_COLUMNS = """m.message_id, m.channel_id, c.guild_id, m.author_id, u.display_name AS author_name,
    m.is_bot, m.content, m.created_at, m.reply_to_id, m.edited_at, m.deleted"""
_MESSAGE_FROM = """messages m JOIN channels c ON c.channel_id = m.channel_id
    JOIN users u ON u.user_id = m.author_id"""
# The messages of `:user`, and the bot replies that answered them (their text may quote the user): every
# chunk of a long reply references the message it answers, and the reply record names the first chunk.
_USER_MESSAGES = "SELECT message_id FROM messages WHERE author_id = :user"
_REPLIES_TO_USER = f"""SELECT reply_message_id FROM bot_replies WHERE answers_message_id IN ({_USER_MESSAGES})
    UNION SELECT message_id FROM messages WHERE is_bot = 1 AND reply_to_id IN ({_USER_MESSAGES})"""
_GUILD_MESSAGES = """SELECT message_id FROM messages
    WHERE channel_id IN (SELECT channel_id FROM channels WHERE guild_id = :guild)"""


def _message(row: sqlite3.Row) -> StoredMessage:
    return StoredMessage(
        message_id=row["message_id"],
        channel_id=row["channel_id"],
        guild_id=row["guild_id"],
        author_id=row["author_id"],
        author_name=row["author_name"],
        is_bot=bool(row["is_bot"]),
        content=row["content"],
        created_at=row["created_at"],
        reply_to_id=row["reply_to_id"],
        edited_at=row["edited_at"],
        deleted=bool(row["deleted"]),
    )


class _OpeningStorage:
    """What Storage.open returns: `await` it for a Storage, or use it in `async with` to close on exit."""

    def __init__(self, path: Path, busy_timeout_seconds: float, clock: Callable[[], float]) -> None:
        self._args = (path, busy_timeout_seconds, clock)
        self._storage: Storage | None = None

    def __await__(self) -> Generator[Any, None, Storage]:
        return Storage._open(*self._args).__await__()

    async def __aenter__(self) -> Storage:
        self._storage = await Storage._open(*self._args)
        return self._storage

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._storage is not None
        await self._storage.close()


class Storage:
    """The bot's database. Build with `await Storage.open(path)` or `async with Storage.open(path) as s`."""

    def __init__(
        self,
        path: Path,
        writer: aiosqlite.Connection,
        reader: aiosqlite.Connection,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._path = path
        self._writer = writer
        self._reader = reader
        self._clock = clock  # only for tombstone expiry
        self._write_lock = asyncio.Lock()
        self._closed = False
        self._scrub: asyncio.Task[None] | None = None
        self.scrub_delay_seconds = SCRUB_CHECKPOINT_DELAY_SECONDS
        self.failed_writes = 0  # writes lost to a full disk or an unwritable file (logged, counted, survived)

    @classmethod
    def open(
        cls, path: Path, busy_timeout_seconds: float = 5.0, *, clock: Callable[[], float] = time.time
    ) -> _OpeningStorage:
        """Create the parent folder, migrate, and open the write and read connections."""
        return _OpeningStorage(Path(path), busy_timeout_seconds, clock)

    @classmethod
    async def _open(cls, path: Path, busy_timeout_seconds: float, clock: Callable[[], float]) -> Storage:
        version = await asyncio.to_thread(migrate, path, busy_timeout_seconds)
        try:
            writer = await connect(path, busy_timeout_seconds, read_only=False)
        except sqlite3.Error as exc:
            raise_failure(exc, path)
            raise
        try:
            reader = await connect(path, busy_timeout_seconds, read_only=True)
        except BaseException as exc:
            await writer.close()
            if isinstance(exc, sqlite3.Error):
                raise_failure(exc, path)
            raise
        log.info("database %s open at schema version %d", path, version)
        return cls(path, writer, reader, clock)

    async def close(self) -> None:
        """Wait for the running write, then close both connections (the last close checkpoints the WAL)."""
        if self._scrub is not None:  # the close below checkpoints anyway
            self._scrub.cancel()
        async with self._write_lock:
            if self._closed:
                return
            self._closed = True
            await self._reader.close()
            await self._writer.close()

    async def __aenter__(self) -> Storage:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- plumbing -------------------------------------------------------------------------------------

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        """One serialized write transaction; rolled back on any exception, cancellation included.

        SQLite's operator-facing failures (busy, full, read-only, I/O) become one StorageError each.
        """
        async with self._write_lock:
            self._check_open()
            try:
                await self._writer.execute("BEGIN IMMEDIATE")
                try:
                    yield self._writer
                except BaseException:
                    await self._rollback()
                    raise
                await self._writer.execute("COMMIT")
            except sqlite3.Error as exc:
                await self._rollback()
                self._count_failure(exc)
                raise_failure(exc, self._path)
                raise

    async def _rollback(self) -> None:
        if self._writer.in_transaction:  # SQLite may already have rolled back (e.g. disk full)
            try:
                await self._writer.execute("ROLLBACK")
            except sqlite3.Error as exc:  # e.g. the file went away: the failure being raised says enough
                log.warning("rollback failed on %s: %s", self._path, exc)

    def _count_failure(self, exc: sqlite3.Error) -> None:
        """A write lost to a full disk or an unwritable file is counted and logged (never its parameters)."""
        failure = storage_failure(exc, self._path)
        if isinstance(failure, DatabaseFull | DatabaseUnavailable):
            self.failed_writes += 1
            log.warning("a database write failed (%d so far): %s", self.failed_writes, failure)

    def _check_open(self) -> None:
        if self._closed:  # e.g. an event handled during shutdown
            raise StorageError(f"the database {self._path} is closed")

    async def _write(self, sql: str, params: Sequence[Any] | Mapping[str, Any] = ()) -> int:
        """Run one statement in its own transaction; return the number of rows changed."""
        async with self._transaction() as db:
            return await _run(db, sql, params)

    async def _rows(self, sql: str, params: Sequence[Any] | Mapping[str, Any] = ()) -> list[sqlite3.Row]:
        self._check_open()
        async with self._reader.execute(sql, params) as cursor:
            return list(await cursor.fetchall())

    async def _one(self, sql: str, params: Sequence[Any] | Mapping[str, Any] = ()) -> sqlite3.Row | None:
        rows = await self._rows(sql, params)
        return rows[0] if rows else None

    async def _checkpoint(self) -> None:
        """Copy the WAL into the database and truncate it, so erased bytes leave the -wal file too."""
        async with self._write_lock:
            if self._closed:
                return
            async with self._writer.execute("PRAGMA wal_checkpoint(TRUNCATE)") as cursor:
                busy, _, _ = await cursor.fetchone() or (1, 0, 0)
        if busy:
            log.warning(
                "WAL checkpoint blocked by another connection; erased data stays in the WAL until later"
            )

    def _schedule_scrub(self) -> None:
        """Checkpoint within scrub_delay_seconds of the first delete or edit since the last checkpoint."""
        if self._scrub is None or self._scrub.done():
            self._scrub = asyncio.get_running_loop().create_task(self._scrub_later())

    async def _scrub_later(self) -> None:
        await asyncio.sleep(self.scrub_delay_seconds)
        self._scrub = None  # a delete from now on needs a checkpoint of its own
        try:
            await self._checkpoint()
        except sqlite3.Error as exc:  # e.g. disk I/O: the close checkpoints again
            log.warning("scrub checkpoint of %s failed: %s", self._path, exc)

    async def wait_scrubbed(self) -> None:
        """Wait for a scheduled scrub checkpoint, if any (close() cancels it and checkpoints by itself)."""
        if self._scrub is not None:
            await asyncio.shield(self._scrub)

    # -- guilds, channels, users ----------------------------------------------------------------------

    async def schema_version(self) -> int:
        """The schema version of the open database."""
        row = await self._one("PRAGMA user_version")
        return int(row[0]) if row else 0

    async def upsert_guild(self, guild_id: int, name: str) -> None:
        """Store or rename a guild (settings keep their values)."""
        await self._write(
            "INSERT INTO guilds (guild_id, name) VALUES (?, ?) "
            "ON CONFLICT (guild_id) DO UPDATE SET name = excluded.name",
            (guild_id, name),
        )

    async def upsert_channel(self, channel_id: int, guild_id: int | None, name: str) -> None:
        """Store or rename a channel (creating its guild row if needed)."""
        async with self._transaction() as db:
            await _ensure_channel(db, channel_id, guild_id)
            await _run(db, "UPDATE channels SET name = ? WHERE channel_id = ?", (name, channel_id))

    async def upsert_user(self, user_id: int, display_name: str) -> None:
        """Store or rename a user."""
        await self._write(_UPSERT_USER, (user_id, display_name))

    async def display_names(self, user_ids: Iterable[int]) -> dict[int, str]:
        """The stored display names of the given users (unknown or forgotten users are left out)."""
        ids = sorted(set(user_ids))
        names: dict[int, str] = {}
        for start in range(0, len(ids), 500):  # stay far below SQLite's bound-parameter limit
            chunk = ids[start : start + 500]
            rows = await self._rows(
                "SELECT user_id, display_name FROM users WHERE display_name != '' "
                f"AND user_id IN ({', '.join('?' * len(chunk))})",
                chunk,
            )
            names.update((row["user_id"], row["display_name"]) for row in rows)
        return names

    # -- messages -------------------------------------------------------------------------------------

    async def add_message(
        self,
        message: StoredMessage,
        mentioned: Iterable[tuple[int, str]] = (),
        parent_id: int | None = None,
    ) -> bool:
        """Store a message with its user and channel rows and the names of the users it mentions (user id,
        display name), in one transaction; False when its id was already stored (replay) or it was deleted
        before it could be stored (then it is stored deleted, without its text). `parent_id`: the parent
        channel of a thread, remembered with the thread's row."""
        async with self._transaction() as db:
            await _ensure_channel(db, message.channel_id, message.guild_id, parent_id)
            for user_id, name in mentioned:  # so later prompts can show their names
                await _run(db, _UPSERT_USER, (user_id, name))
            await _run(db, _UPSERT_USER, (message.author_id, message.author_name))
            stored = await _insert_message(db, message)
        return stored is not None and not stored.deleted

    async def add_reply(self, chunks: Sequence[StoredMessage], record: BotReplyRecord) -> bool:
        """Store every sent chunk of a bot reply and its record in ONE transaction: all of it or none.

        Nothing is stored when the guild turned logging off meanwhile (read inside the transaction, so a
        reply generated while an admin purged the guild never outlives the purge); False then.
        """
        if not chunks:
            return False
        first = chunks[0]
        async with self._transaction() as db:
            if not await _logs_messages(db, first.guild_id):
                return False
            await _ensure_channel(db, first.channel_id, first.guild_id)
            await _run(db, _UPSERT_USER, (first.author_id, first.author_name))
            for chunk in chunks:
                await _insert_message(db, chunk)
            await _run(db, _INSERT_BOT_REPLY, _reply_params(record))
        return True

    async def mark_edited(
        self, message_id: int, content: str, edited_at: float, guild_id: int | None = None
    ) -> bool:
        """Replace a stored, non-deleted message's content; False when there is no such message.

        An edit of a message not stored yet is kept as a tombstone that its insert applies, unless its
        guild (`guild_id`, None in DMs) stores no messages: then it never will be, and the text is not kept.
        """
        async with self._transaction() as db:
            changed = await _run(
                db,
                "UPDATE messages SET content = ?, edited_at = ? WHERE message_id = ? AND deleted = 0",
                (content, edited_at, message_id),
            )
            if changed == 0 and await _logs_messages(db, guild_id):
                await _run(db, _EDIT_TOMBSTONE, (message_id, content, edited_at, self._expiry(), message_id))
            await self._prune_tombstones(db)
        if changed:
            self._schedule_scrub()
        return changed == 1

    async def mark_deleted(self, message_ids: Iterable[int]) -> int:
        """Flag messages deleted and erase their content; return how many were newly deleted.

        A message not stored yet gets a tombstone, so its insert stores it deleted, without its text.
        """
        ids = list(message_ids)
        expires = self._expiry()
        async with self._transaction() as db:
            async with db.executemany(
                "UPDATE messages SET deleted = 1, content = '' WHERE message_id = ? AND deleted = 0",
                [(message_id,) for message_id in ids],
            ) as cursor:
                changed = cursor.rowcount
            await db.executemany(_DELETE_TOMBSTONE, [(i, expires, i) for i in ids])
            await self._prune_tombstones(db)
        if changed:
            self._schedule_scrub()
        return changed

    def _expiry(self) -> float:
        return self._clock() + TOMBSTONE_TTL_SECONDS

    async def _prune_tombstones(self, db: aiosqlite.Connection) -> None:
        await _run(db, "DELETE FROM message_tombstones WHERE expires_at < ?", (self._clock(),))

    async def recent_history(
        self, channel_id: int, limit: int, since: float | None = None
    ) -> list[StoredMessage]:
        """The newest `limit` non-deleted messages of a channel created at or after `since`, oldest first.

        A reply that a regeneration replaced is left out unless its person kept it (_DISCARDED_REPLIES).
        """
        return await self._history(channel_id, limit, since, until=None)

    async def _history(
        self, channel_id: int, limit: int, since: float | None, until: int | None
    ) -> list[StoredMessage]:
        """recent_history, ending at message `until` when given; replaced replies not kept are left out."""
        if limit <= 0:
            return []  # SQLite reads a negative LIMIT as "no limit"
        rows = await self._rows(
            _HISTORY_QUERY, {"channel": channel_id, "since": since, "limit": limit, "until": until}
        )
        return [_message(row) for row in rows]

    async def get_message(self, message_id: int) -> StoredMessage | None:
        """One stored message (deleted ones too, with empty content), or None."""
        row = await self._one(
            f"SELECT {_MESSAGE_COLUMNS} FROM {_MESSAGE_FROM} WHERE m.message_id = ?", (message_id,)
        )
        return _message(row) if row else None

    async def last_bot_message_at(self, channel_id: int, bot_user_id: int) -> float | None:
        """When this bot (not any bot) last posted in a channel (deleted posts included), or None."""
        row = await self._one(
            "SELECT MAX(created_at) FROM messages WHERE channel_id = ? AND author_id = ?",
            (channel_id, bot_user_id),
        )
        return row[0] if row else None

    async def purge_guild_messages(self, guild_id: int) -> int:
        """Delete every stored message of a guild, its reply records and feedback; return messages deleted.

        Remembered facts stay: they are settings an admin wrote on purpose, not logged conversation (their
        authors remove them with /forget-me, admins with /remember forget).
        """
        params = {"guild": guild_id}
        async with self._transaction() as db:
            await _run(db, f"DELETE FROM feedback WHERE message_id IN ({_GUILD_MESSAGES})", params)
            await _run(db, f"DELETE FROM bot_replies WHERE reply_message_id IN ({_GUILD_MESSAGES})", params)
            deleted = await _run(db, f"DELETE FROM messages WHERE message_id IN ({_GUILD_MESSAGES})", params)
            await _run(db, _FORGET_PENDING_EDITS)
        await self._checkpoint()
        log.info("purged %d stored messages of guild %d", deleted, guild_id)
        return deleted

    # -- replies and feedback -------------------------------------------------------------------------

    async def add_bot_reply(self, record: BotReplyRecord) -> None:
        """Record how a bot reply was produced (idempotent on the reply's message id)."""
        await self._write(_INSERT_BOT_REPLY, _reply_params(record))

    async def set_feedback(self, message_id: int, user_id: int, score: int, at: float) -> None:
        """Store one user's +1 / -1 on a message, replacing their earlier score."""
        if score not in (-1, 1):
            raise ValueError(f"feedback score must be +1 or -1, got {score!r}")
        await self._write(
            "INSERT INTO feedback (message_id, user_id, score, created_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (message_id, user_id) "
            "DO UPDATE SET score = excluded.score, created_at = excluded.created_at",
            (message_id, user_id, score, at),
        )

    async def remove_feedback(self, message_id: int, user_id: int) -> None:
        """Forget one user's feedback on a message."""
        await self._write("DELETE FROM feedback WHERE message_id = ? AND user_id = ?", (message_id, user_id))

    # -- privacy and settings -------------------------------------------------------------------------

    async def delete_user_data(self, user_id: int, at: float) -> int:
        """Delete a user's messages, the bot replies to them, feedback, audit rows and the facts they wrote
        (/remember); keep a tombstone."""
        params = {"user": user_id, "at": at}
        async with self._transaction() as db:
            deleted = await _run(
                db,
                f"DELETE FROM feedback WHERE user_id = :user OR message_id IN ({_USER_MESSAGES}) "
                f"OR message_id IN ({_REPLIES_TO_USER})",
                params,
            )
            deleted += await _run(
                db, f"DELETE FROM messages WHERE message_id IN ({_REPLIES_TO_USER})", params
            )
            deleted += await _run(
                db, f"DELETE FROM bot_replies WHERE answers_message_id IN ({_USER_MESSAGES})", params
            )
            deleted += await _run(db, "DELETE FROM messages WHERE author_id = :user", params)
            deleted += await _run(db, "DELETE FROM audit_log WHERE actor_id = :user", params)
            deleted += await _run(db, "DELETE FROM channel_facts WHERE author_id = :user", params)
            await _run(db, _TOMBSTONE_USER, params)
            await _run(db, _FORGET_PENDING_EDITS)
        await self._checkpoint()
        log.info("deleted %d rows of user %d at their request", deleted, user_id)
        return deleted

    async def set_training_opt_in(self, user_id: int, opted_in: bool, at: float) -> None:
        """Record a user's consent (or its withdrawal) to training use of their messages."""
        await self._write(
            "INSERT INTO users (user_id, training_opt_in, opted_in_at) VALUES (?, ?, ?) "
            "ON CONFLICT (user_id) DO UPDATE SET training_opt_in = excluded.training_opt_in, "
            "opted_in_at = excluded.opted_in_at",
            (user_id, opted_in, at if opted_in else None),
        )

    async def user_opted_in(self, user_id: int) -> bool:
        """Whether a user currently consents to training use."""
        row = await self._one("SELECT training_opt_in FROM users WHERE user_id = ?", (user_id,))
        return bool(row and row[0])

    async def guild_settings(self, guild_id: int) -> GuildSettings:
        """A guild's settings (defaults when unknown)."""
        row = await self._one("SELECT * FROM guilds WHERE guild_id = ?", (guild_id,))
        if row is None:
            return GuildSettings(guild_id)
        return GuildSettings(
            guild_id=guild_id,
            logging_enabled=bool(row["logging_enabled"]),
            training_export_enabled=bool(row["training_export_enabled"]),
            persona=row["persona"],
            sampling_overrides=json.loads(row["sampling_json"]),
        )

    async def set_guild_logging(self, guild_id: int, enabled: bool) -> None:
        """Turn message logging on or off for a guild (purging is a separate call)."""
        await self._set_guild(guild_id, "logging_enabled", enabled)

    async def set_guild_training_export(self, guild_id: int, enabled: bool) -> None:
        """Allow or forbid exporting a guild's messages for training."""
        await self._set_guild(guild_id, "training_export_enabled", enabled)

    async def set_guild_persona(self, guild_id: int, persona: str | None) -> None:
        """Override the persona for a guild; None returns to the global setting."""
        await self._set_guild(guild_id, "persona", persona)

    async def set_guild_sampling(self, guild_id: int, overrides: Mapping[str, float]) -> None:
        """Replace a guild's sampling overrides (finite numbers only)."""
        await self._set_guild(
            guild_id, "sampling_json", json.dumps(dict(overrides), sort_keys=True, allow_nan=False)
        )

    async def _set_guild(self, guild_id: int, column: str, value: object) -> None:
        assert column in _GUILD_COLUMNS, column  # column names are ours, never user input
        await self._write(
            f"INSERT INTO guilds (guild_id, {column}) VALUES (?, ?) "
            f"ON CONFLICT (guild_id) DO UPDATE SET {column} = excluded.{column}",
            (guild_id, value),
        )

    async def channel_settings(self, channel_id: int) -> ChannelSettings:
        """A channel's settings (defaults when unknown)."""
        channel, _ = await self.channel_and_parent_settings(channel_id, None)
        return channel

    async def set_channel_answer_all(self, channel_id: int, guild_id: int | None, enabled: bool) -> None:
        """Make the bot answer every message in a channel, or only when addressed."""
        async with self._transaction() as db:
            await _ensure_channel(db, channel_id, guild_id)
            await _run(db, "UPDATE channels SET answer_all = ? WHERE channel_id = ?", (enabled, channel_id))

    async def reset_channel(self, channel_id: int, at: float) -> None:
        """Stop using a channel's history before `at` for prompts (the rows stay)."""
        async with self._transaction() as db:
            await _ensure_channel(db, channel_id, None)
            await _run(db, "UPDATE channels SET reset_at = ? WHERE channel_id = ?", (at, channel_id))

    # -- channel settings and threads (issue 25: /channel persona, config, threads, wake, chance) ---------

    async def channel_and_parent_settings(
        self, channel_id: int, parent_id: int | None
    ) -> tuple[ChannelSettings, ChannelSettings | None]:
        """A channel's settings and, for a thread, its parent's (defaults when unknown), in ONE query.

        The parent is None when `parent_id` is None. Whether the channel is a thread the bot opened comes
        with it (bot_threads), so the message path reads all of it at once.
        """
        ids = [channel_id] if parent_id is None else [channel_id, parent_id]
        rows = await self._rows(
            f"SELECT wanted.id AS wanted_id, c.*, t.opened_for_message_id FROM ({_WANTED_IDS[len(ids)]}) "
            "wanted LEFT JOIN channels c ON c.channel_id = wanted.id "
            "LEFT JOIN bot_threads t ON t.thread_id = wanted.id",
            ids,
        )
        found = {row["wanted_id"]: _channel(row) for row in rows}
        return found[channel_id], (found[parent_id] if parent_id is not None else None)

    async def set_channel_persona(self, channel_id: int, guild_id: int | None, persona: str | None) -> None:
        """Override the persona in a channel; None returns to the parent channel's or guild's."""
        await self._set_channel(channel_id, guild_id, persona=persona)

    async def set_channel_sampling(
        self, channel_id: int, guild_id: int | None, overrides: Mapping[str, float]
    ) -> None:
        """Replace a channel's sampling overrides (finite numbers only; empty = the guild's)."""
        sampling_json = json.dumps(dict(overrides), sort_keys=True, allow_nan=False)
        await self._set_channel(channel_id, guild_id, sampling_json=sampling_json)

    async def reset_channel_config(self, channel_id: int, guild_id: int | None) -> None:
        """Forget a channel's persona and sampling overrides (back to the parent channel's or guild's)."""
        await self._set_channel(channel_id, guild_id, persona=None, sampling_json="{}")

    async def set_channel_thread_mode(self, channel_id: int, guild_id: int | None, enabled: bool) -> None:
        """Turn thread mode (a mention opens a thread) on or off in a channel."""
        await self._set_channel(channel_id, guild_id, thread_mode=enabled)

    async def set_channel_wake_words(
        self, channel_id: int, guild_id: int | None, words: Sequence[str]
    ) -> None:
        """Replace a channel's wake words."""
        await self._set_channel(channel_id, guild_id, wake_words_json=json.dumps(list(words)))

    async def set_channel_wake_on_name(self, channel_id: int, guild_id: int | None, enabled: bool) -> None:
        """Make the bot's name a wake word in a channel, or not."""
        await self._set_channel(channel_id, guild_id, wake_on_name=enabled)

    async def set_channel_reply_chance(
        self, channel_id: int, guild_id: int | None, chance: float, cooldown_seconds: float
    ) -> None:
        """Set the probability of an unprompted reply in a channel and the least time between two."""
        await self._set_channel(
            channel_id, guild_id, reply_chance=chance, chance_cooldown_seconds=cooldown_seconds
        )

    async def _set_channel(self, channel_id: int, guild_id: int | None, **values: object) -> None:
        assert set(values) <= _CHANNEL_COLUMNS, values  # column names are ours, never user input
        assignments = ", ".join(f"{column} = :{column}" for column in values)
        async with self._transaction() as db:
            await _ensure_channel(db, channel_id, guild_id)
            await _run(
                db,
                f"UPDATE channels SET {assignments} WHERE channel_id = :channel",
                {**values, "channel": channel_id},
            )

    async def add_bot_thread(
        self, thread_id: int, parent_id: int, guild_id: int | None, message_id: int, at: float
    ) -> None:
        """Remember a thread the bot opened from `message_id` (its channel row knows its parent)."""
        async with self._transaction() as db:
            await _ensure_channel(db, thread_id, guild_id, parent_id)
            await _run(
                db,
                "INSERT INTO bot_threads (thread_id, parent_id, guild_id, opened_for_message_id, created_at) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                (thread_id, parent_id, guild_id, message_id, at),
            )

    # -- remembered facts (/remember) -----------------------------------------------------------------

    async def add_fact(
        self, channel_id: int, guild_id: int | None, author_id: int, text: str, at: float, limit: int
    ) -> ChannelFact | None:
        """Remember a fact for a channel; None (nothing stored) when the channel has `limit` facts already.

        The count and the insert are one transaction, so two racing adds cannot pass the limit together.
        """
        async with self._transaction() as db:
            async with db.execute(
                "SELECT COUNT(*) FROM channel_facts WHERE channel_id = ?", (channel_id,)
            ) as c:
                row = await c.fetchone()
            if row is not None and row[0] >= limit:
                return None
            async with db.execute(
                "INSERT INTO channel_facts (channel_id, guild_id, author_id, text, created_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (channel_id, guild_id, author_id, text, at),
            ) as cursor:
                fact_id = cursor.lastrowid
        assert fact_id is not None
        return ChannelFact(fact_id, channel_id, author_id, text, at)

    async def channel_facts(self, channel_ids: Sequence[int]) -> list[ChannelFact]:
        """The facts of these channels in one read: `channel_ids`' order (a thread's parent, then the
        thread), each channel's oldest first."""
        if not channel_ids:
            return []
        rows = await self._rows(
            "SELECT fact_id, channel_id, author_id, text, created_at FROM channel_facts "
            f"WHERE channel_id IN ({', '.join('?' * len(channel_ids))})",
            list(channel_ids),
        )
        order = {channel_id: index for index, channel_id in enumerate(channel_ids)}
        facts = [ChannelFact(*row) for row in rows]
        return sorted(facts, key=lambda fact: (order[fact.channel_id], fact.fact_id))

    async def forget_fact(self, channel_id: int, number: int) -> ChannelFact | None:
        """Delete a channel's `number`-th fact (1 = oldest, as /remember list numbers them); None if none."""
        if number < 1:
            return None
        async with self._transaction() as db:
            async with db.execute(
                "SELECT fact_id, channel_id, author_id, text, created_at FROM channel_facts "
                "WHERE channel_id = ? ORDER BY fact_id LIMIT 1 OFFSET ?",
                (channel_id, number - 1),
            ) as cursor:
                row = await cursor.fetchone()
            if row is None:
                return None
            await _run(db, "DELETE FROM channel_facts WHERE fact_id = ?", (row[0],))
        self._schedule_scrub()  # the fact's text leaves the -wal file too
        return ChannelFact(*row)

    # -- regenerate and continue ---------------------------------------------------------------------

    async def reply_for_message(self, message_id: int) -> StoredReply | None:
        """The stored bot reply that a message is part of (any of its messages), or None."""
        row = await self._one(_REPLY_QUERY, {"message": message_id})
        if row is None:
            return None
        chunks = await self._rows(_REPLY_CHUNKS, {"reply": row["reply_message_id"]})
        return StoredReply(
            reply_message_id=row["reply_message_id"],
            answers_message_id=row["answers_message_id"],
            channel_id=row["channel_id"],
            guild_id=row["guild_id"],
            answered_author_id=row["answered_author_id"],
            chunks=tuple((chunk["message_id"], chunk["content"]) for chunk in chunks),
            is_latest=bool(row["is_latest"]),
            completion_tokens=row["completion_tokens"],
        )

    async def history_until(
        self, channel_id: int, message_id: int, limit: int, since: float | None = None
    ) -> list[StoredMessage]:
        """recent_history as it stood when `message_id` was the newest message (it included): what a reply
        to it was generated from, and what regenerating or continuing that reply generates from again."""
        return await self._history(channel_id, limit, since, until=message_id)

    async def extend_reply(
        self,
        reply_message_id: int,
        edited: tuple[int, str] | None,
        added: Sequence[StoredMessage],
        completion_tokens: int,
        at: float,
    ) -> bool:
        """A continued reply in ONE write: its edited message's new text (message id, text), the messages
        sent after it, and its completion tokens counted on; False when its guild stopped logging."""
        async with self._transaction() as db:
            async with db.execute(_REPLY_GUILD, (reply_message_id,)) as cursor:
                found = await cursor.fetchone()
            if found is None or not await _logs_messages(db, found[0]):
                return False
            if edited is not None:
                await _run(
                    db,
                    "UPDATE messages SET content = ?, edited_at = ? WHERE message_id = ? AND deleted = 0",
                    (edited[1], at, edited[0]),
                )
            for message in added:
                await _insert_message(db, message)
            await _run(
                db,
                "UPDATE bot_replies SET completion_tokens = completion_tokens + ? WHERE reply_message_id = ?",
                (completion_tokens, reply_message_id),
            )
        return True

    # -- audit, stats, export, backup -----------------------------------------------------------------

    async def add_audit(
        self, actor_id: int, guild_id: int | None, action: str, detail: str, allowed: bool, at: float
    ) -> None:
        """Append one admin action (allowed or refused) to the audit log."""
        await self._write(
            "INSERT INTO audit_log (at, actor_id, guild_id, action, detail, allowed) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (at, actor_id, guild_id, action, detail, allowed),
        )

    async def audit_log(self, limit: int = 50) -> list[AuditEntry]:
        """The newest `limit` audit entries, newest first."""
        rows = await self._rows("SELECT * FROM audit_log ORDER BY entry_id DESC LIMIT ?", (max(limit, 0),))
        return [AuditEntry(r[0], r[1], r[2], r[3], r[4], r[5], bool(r[6])) for r in rows]

    async def stats(self) -> Stats:
        """Row counts and reply latency p50 / p95."""
        row = await self._one(
            "SELECT (SELECT COUNT(*) FROM guilds), (SELECT COUNT(*) FROM channels), "
            "(SELECT COUNT(*) FROM users), (SELECT COUNT(*) FROM messages WHERE deleted = 0), "
            "(SELECT COUNT(*) FROM bot_replies)"
        )
        assert row is not None  # a SELECT without FROM always returns one row
        p50, p95 = [await self._latency_percentile(q, row[4]) for q in (0.50, 0.95)]
        return Stats(row[0], row[1], row[2], row[3], row[4], p50, p95)

    async def _latency_percentile(self, fraction: float, count: int) -> float | None:
        if count == 0:
            return None
        rank = max(1, math.ceil(fraction * count))  # nearest-rank percentile
        row = await self._one(
            "SELECT latency_seconds FROM bot_replies ORDER BY latency_seconds LIMIT 1 OFFSET ?", (rank - 1,)
        )
        return row[0] if row else None

    async def export_rows(
        self, guild_id: int | None = None, since: float | None = None
    ) -> AsyncIterator[ExportRow]:
        """Exportable messages ordered by channel then time, read in batches (see _EXPORT_QUERY for rules)."""
        position: tuple[int, float, int] = (-(2**63), -math.inf, -(2**63))
        while True:
            params = {"guild": guild_id, "since": since, "batch": EXPORT_BATCH_ROWS, "channel": None}
            params.update(zip(("after_channel", "after_time", "after_id"), position, strict=True))
            rows = await self._rows(_EXPORT_QUERY, params)
            for row in rows:
                yield ExportRow(
                    _message(row),
                    bool(row["author_opted_in"]),
                    int(row["feedback_score"]),
                    row["reply_id"],
                    bool(row["replaced"]),
                )
            if len(rows) < EXPORT_BATCH_ROWS:
                return
            position = (rows[-1]["channel_id"], rows[-1]["created_at"], rows[-1]["message_id"])

    async def backup(self, dest: Path) -> None:
        """Copy the live database to `dest` with SQLite's online backup API (atomic replace)."""
        await asyncio.to_thread(backup_file, self._path, Path(dest))

    async def integrity_check(self) -> str:
        """SQLite's integrity check: "ok" when healthy, else the problems found."""
        rows = await self._rows("PRAGMA integrity_check")
        return "\n".join(str(row[0]) for row in rows)


async def _run(db: aiosqlite.Connection, sql: str, params: Sequence[Any] | Mapping[str, Any] = ()) -> int:
    async with db.execute(sql, params) as cursor:
        return cursor.rowcount


async def _insert_message(db: aiosqlite.Connection, message: StoredMessage) -> StoredMessage | None:
    """Insert one message, applying (and consuming) its tombstone; the row as stored, or None on replay."""
    m = message
    async with db.execute(
        "SELECT deleted, content, edited_at FROM message_tombstones WHERE message_id = ?", (m.message_id,)
    ) as cursor:
        tombstone = await cursor.fetchone()
    if tombstone is not None:
        await _run(db, "DELETE FROM message_tombstones WHERE message_id = ?", (m.message_id,))
        if tombstone["deleted"]:
            m = dataclasses.replace(m, content="", deleted=True)
        else:
            m = dataclasses.replace(m, content=tombstone["content"], edited_at=tombstone["edited_at"])
    inserted = await _run(db, _INSERT_MESSAGE, (
        m.message_id, m.channel_id, m.author_id, m.is_bot, "" if m.deleted else m.content,
        m.created_at, m.edited_at, m.reply_to_id, m.deleted,
    ))  # fmt: skip
    return m if inserted == 1 else None


async def _logs_messages(db: aiosqlite.Connection, guild_id: int | None) -> bool:
    """Whether a guild's messages are stored, read inside the caller's transaction (DMs always are)."""
    if guild_id is None:
        return True
    async with db.execute("SELECT logging_enabled FROM guilds WHERE guild_id = ?", (guild_id,)) as cursor:
        row = await cursor.fetchone()
    return row is None or bool(row[0])


def _channel(row: sqlite3.Row) -> ChannelSettings:
    """A channels row (LEFT JOINed: all NULL when the channel is unknown) as settings."""
    if row["channel_id"] is None:
        return ChannelSettings(row["wanted_id"], opened_for_message_id=row["opened_for_message_id"])
    return ChannelSettings(
        channel_id=row["channel_id"],
        answer_all=bool(row["answer_all"]),
        reset_at=row["reset_at"],
        persona=row["persona"],
        sampling_overrides=json.loads(row["sampling_json"]),
        parent_id=row["parent_id"],
        thread_mode=bool(row["thread_mode"]),
        wake_words=tuple(json.loads(row["wake_words_json"])),
        wake_on_name=bool(row["wake_on_name"]),
        reply_chance=row["reply_chance"],
        chance_cooldown_seconds=row["chance_cooldown_seconds"],
        opened_for_message_id=row["opened_for_message_id"],
    )


def _reply_params(r: BotReplyRecord) -> tuple[Any, ...]:
    params_json = json.dumps(dict(r.params), sort_keys=True, allow_nan=False)
    return (r.reply_message_id, r.answers_message_id, r.channel_id, r.model_name, r.model_version,
            params_json, r.latency_seconds, r.prompt_tokens, r.completion_tokens, r.created_at,
            r.replaces_reply_id)  # fmt: skip


async def _ensure_channel(
    db: aiosqlite.Connection, channel_id: int, guild_id: int | None, parent_id: int | None = None
) -> None:
    """Create the guild and channel rows if missing; a channel first seen without a guild (or a thread
    without its parent) gains one later."""
    if guild_id is not None:
        await _run(
            db, "INSERT INTO guilds (guild_id) VALUES (?) ON CONFLICT (guild_id) DO NOTHING", (guild_id,)
        )
    await _run(
        db,
        "INSERT INTO channels (channel_id, guild_id, parent_id) VALUES (?, ?, ?) ON CONFLICT (channel_id) "
        "DO UPDATE SET guild_id = COALESCE(channels.guild_id, excluded.guild_id), "
        "parent_id = COALESCE(channels.parent_id, excluded.parent_id)",
        (channel_id, guild_id, parent_id),
    )


_INSERT_MESSAGE = (
    "INSERT INTO messages (message_id, channel_id, author_id, is_bot, content, created_at, edited_at, "
    "reply_to_id, deleted) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (message_id) DO NOTHING"
)
_INSERT_BOT_REPLY = (
    "INSERT INTO bot_replies (reply_message_id, answers_message_id, channel_id, model_name, "
    "model_version, params_json, latency_seconds, prompt_tokens, completion_tokens, created_at, "
    "replaces_reply_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (reply_message_id) DO NOTHING"
)
# Tombstones only for messages not stored; a deletion wins over any edit, a later edit over an earlier one.
_DELETE_TOMBSTONE = (
    "INSERT INTO message_tombstones (message_id, deleted, expires_at) SELECT ?, 1, ? "
    "WHERE NOT EXISTS (SELECT 1 FROM messages WHERE message_id = ?) ON CONFLICT (message_id) "
    "DO UPDATE SET deleted = 1, content = NULL, edited_at = NULL, expires_at = excluded.expires_at"
)
_EDIT_TOMBSTONE = (
    "INSERT INTO message_tombstones (message_id, content, edited_at, expires_at) SELECT ?, ?, ?, ? "
    "WHERE NOT EXISTS (SELECT 1 FROM messages WHERE message_id = ?) ON CONFLICT (message_id) "
    "DO UPDATE SET content = excluded.content, edited_at = excluded.edited_at, "
    "expires_at = excluded.expires_at WHERE deleted = 0 AND edited_at <= excluded.edited_at"
)
# An edit tombstone names neither author nor guild, so a /forget-me or a guild purge drops every pending
# edit's text (deletion tombstones hold none and stay): at worst a message whose create and edit race that
# very moment keeps its first text.
_FORGET_PENDING_EDITS = "DELETE FROM message_tombstones WHERE deleted = 0"
_UPSERT_USER = (
    "INSERT INTO users (user_id, display_name) VALUES (?, ?) ON CONFLICT (user_id) "
    "DO UPDATE SET display_name = excluded.display_name WHERE excluded.display_name != ''"
)
_TOMBSTONE_USER = (
    "INSERT INTO users (user_id, forgotten_at) VALUES (:user, :at) ON CONFLICT (user_id) DO UPDATE SET "
    "display_name = '', training_opt_in = 0, opted_in_at = NULL, forgotten_at = excluded.forgotten_at"
)
# The reply (its first message's id) that a message of the bot is part of: the newest reply record of the
# same author answering the same message that started at or before it; NULL for any other message.
_REPLY_OF = """(SELECT MAX(o.reply_message_id) FROM bot_replies o
    JOIN messages f ON f.message_id = o.reply_message_id
    WHERE m.is_bot = 1 AND o.answers_message_id = m.reply_to_id AND o.reply_message_id <= m.message_id
    AND f.author_id = m.author_id)"""
# Whether message `mk` is one of reply `r`'s (a bot_replies alias): its first message, or one of its author's
# later messages answering the same message before the next reply to it.
_IN_REPLY = """mk.channel_id = r.channel_id AND mk.reply_to_id = r.answers_message_id AND mk.is_bot = 1
    AND mk.message_id >= r.reply_message_id
    AND mk.author_id = (SELECT author_id FROM messages WHERE message_id = r.reply_message_id)
    AND mk.message_id < COALESCE((SELECT MIN(o.reply_message_id) FROM bot_replies o
        WHERE o.answers_message_id = r.answers_message_id AND o.reply_message_id > r.reply_message_id),
        9223372036854775807)"""
# Replies a regeneration replaced (in channel :channel, or anywhere when NULL) that the person they
# answered did not keep (no 👍 of theirs on any message of the reply): left out of prompts and exports.
_DISCARDED_REPLIES = f"""SELECT n.replaces_reply_id FROM bot_replies n
    JOIN bot_replies r ON r.reply_message_id = n.replaces_reply_id
    LEFT JOIN messages a ON a.message_id = r.answers_message_id
    WHERE n.replaces_reply_id IS NOT NULL AND (:channel IS NULL OR n.channel_id = :channel)
    AND NOT EXISTS (SELECT 1 FROM feedback kf JOIN messages mk ON mk.message_id = kf.message_id
        WHERE kf.user_id = a.author_id AND kf.score = 1 AND {_IN_REPLY})"""
# A channel's newest :limit messages since :since (up to message :until when not NULL), oldest first.
_HISTORY_QUERY = f"""SELECT * FROM (SELECT {_MESSAGE_COLUMNS} FROM {_MESSAGE_FROM}
    WHERE m.channel_id = :channel AND m.deleted = 0 AND (:since IS NULL OR m.created_at >= :since)
    AND (:until IS NULL OR (m.created_at, m.message_id)
        <= (SELECT created_at, message_id FROM messages WHERE message_id = :until))
    AND (m.is_bot = 0 OR COALESCE({_REPLY_OF} NOT IN ({_DISCARDED_REPLIES}), 1))
    ORDER BY m.created_at DESC, m.message_id DESC LIMIT :limit) ORDER BY created_at, message_id"""
_REPLY_QUERY = f"""SELECT r.reply_message_id, r.answers_message_id, r.channel_id, r.completion_tokens,
    c.guild_id, a.author_id AS answered_author_id, NOT EXISTS (SELECT 1 FROM bot_replies l
        WHERE l.channel_id = r.channel_id AND l.reply_message_id > r.reply_message_id) AS is_latest
FROM messages m JOIN bot_replies r ON r.reply_message_id = {_REPLY_OF}
    JOIN channels c ON c.channel_id = r.channel_id LEFT JOIN messages a ON a.message_id = r.answers_message_id
WHERE m.message_id = :message AND m.deleted = 0"""
_REPLY_GUILD = """SELECT c.guild_id FROM bot_replies r JOIN channels c ON c.channel_id = r.channel_id
    WHERE r.reply_message_id = ?"""
_REPLY_CHUNKS = f"""SELECT mk.message_id, mk.content FROM bot_replies r JOIN messages mk
WHERE r.reply_message_id = :reply AND mk.deleted = 0 AND {_IN_REPLY} ORDER BY mk.message_id"""
# Only guilds with training export on; no deleted messages; no user who asked to be forgotten, unless they
# opted in again afterwards. Bot messages are included (the export decides what to do with them).
_EXPORT_QUERY = f"""SELECT {_MESSAGE_COLUMNS}, u.training_opt_in AS author_opted_in,
    COALESCE((SELECT SUM(f.score) FROM feedback f WHERE f.message_id = m.message_id), 0) AS feedback_score,
    {_REPLY_OF} AS reply_id, COALESCE({_REPLY_OF} IN ({_DISCARDED_REPLIES}), 0) AS replaced
FROM {_MESSAGE_FROM} JOIN guilds g ON g.guild_id = c.guild_id
WHERE g.training_export_enabled = 1 AND m.deleted = 0
    AND (u.forgotten_at IS NULL OR (u.training_opt_in = 1 AND u.opted_in_at > u.forgotten_at))
    AND (:guild IS NULL OR c.guild_id = :guild) AND (:since IS NULL OR m.created_at >= :since)
    AND (m.channel_id, m.created_at, m.message_id) > (:after_channel, :after_time, :after_id)
ORDER BY m.channel_id, m.created_at, m.message_id LIMIT :batch"""
