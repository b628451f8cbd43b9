"""Storage on real SQLite files: schema and migrations, concurrency, privacy guarantees, domain methods."""

from __future__ import annotations

import asyncio
import math
import re
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import bot.storage.store
from bot.storage import (
    BotReplyRecord,
    ChannelSettings,
    DatabaseTooNew,
    GuildSettings,
    Storage,
    StorageError,
    migrate,
)
from bot.storage.migrations import MIGRATIONS, SCHEMA_VERSION, upgrade
from tests.helpers.records import CHANNEL, GUILD, USER, msg

BOT_USER = 999

# Every table's exact columns: (name, declared type, NOT NULL, default, primary-key position).
EXPECTED_COLUMNS = {
    "guilds": [
        ("guild_id", "INTEGER", 0, None, 1),
        ("name", "TEXT", 1, "''", 0),
        ("logging_enabled", "INTEGER", 1, "1", 0),
        ("training_export_enabled", "INTEGER", 1, "0", 0),
        ("persona", "TEXT", 0, None, 0),
        ("sampling_json", "TEXT", 1, "'{}'", 0),
    ],
    "channels": [
        ("channel_id", "INTEGER", 0, None, 1),
        ("guild_id", "INTEGER", 0, None, 0),
        ("name", "TEXT", 1, "''", 0),
        ("answer_all", "INTEGER", 1, "0", 0),
        ("reset_at", "REAL", 0, None, 0),
        ("persona", "TEXT", 0, None, 0),
        ("sampling_json", "TEXT", 1, "'{}'", 0),
        ("parent_id", "INTEGER", 0, None, 0),
        ("thread_mode", "INTEGER", 1, "0", 0),
        ("wake_words_json", "TEXT", 1, "'[]'", 0),
        ("wake_on_name", "INTEGER", 1, "0", 0),
        ("reply_chance", "REAL", 1, "0", 0),
        ("chance_cooldown_seconds", "REAL", 1, "300", 0),
    ],
    "users": [
        ("user_id", "INTEGER", 0, None, 1),
        ("display_name", "TEXT", 1, "''", 0),
        ("training_opt_in", "INTEGER", 1, "0", 0),
        ("opted_in_at", "REAL", 0, None, 0),
        ("forgotten_at", "REAL", 0, None, 0),
    ],
    "messages": [
        ("message_id", "INTEGER", 0, None, 1),
        ("channel_id", "INTEGER", 1, None, 0),
        ("author_id", "INTEGER", 1, None, 0),
        ("is_bot", "INTEGER", 1, None, 0),
        ("content", "TEXT", 1, None, 0),
        ("created_at", "REAL", 1, None, 0),
        ("edited_at", "REAL", 0, None, 0),
        ("reply_to_id", "INTEGER", 0, None, 0),
        ("deleted", "INTEGER", 1, "0", 0),
    ],
    "bot_replies": [
        ("reply_message_id", "INTEGER", 0, None, 1),
        ("answers_message_id", "INTEGER", 1, None, 0),
        ("channel_id", "INTEGER", 1, None, 0),
        ("model_name", "TEXT", 1, None, 0),
        ("model_version", "TEXT", 1, None, 0),
        ("params_json", "TEXT", 1, None, 0),
        ("latency_seconds", "REAL", 1, None, 0),
        ("prompt_tokens", "INTEGER", 1, None, 0),
        ("completion_tokens", "INTEGER", 1, None, 0),
        ("created_at", "REAL", 1, None, 0),
        ("replaces_reply_id", "INTEGER", 0, None, 0),
    ],
    "feedback": [
        ("message_id", "INTEGER", 1, None, 1),
        ("user_id", "INTEGER", 1, None, 2),
        ("score", "INTEGER", 1, None, 0),
        ("created_at", "REAL", 1, None, 0),
    ],
    "audit_log": [
        ("entry_id", "INTEGER", 0, None, 1),
        ("at", "REAL", 1, None, 0),
        ("actor_id", "INTEGER", 1, None, 0),
        ("guild_id", "INTEGER", 0, None, 0),
        ("action", "TEXT", 1, None, 0),
        ("detail", "TEXT", 1, None, 0),
        ("allowed", "INTEGER", 1, None, 0),
    ],
    "message_tombstones": [
        ("message_id", "INTEGER", 0, None, 1),
        ("deleted", "INTEGER", 1, "0", 0),
        ("content", "TEXT", 0, None, 0),
        ("edited_at", "REAL", 0, None, 0),
        ("expires_at", "REAL", 1, None, 0),
    ],
    "bot_threads": [
        ("thread_id", "INTEGER", 0, None, 1),
        ("parent_id", "INTEGER", 1, None, 0),
        ("guild_id", "INTEGER", 0, None, 0),
        ("opened_for_message_id", "INTEGER", 1, None, 0),
        ("created_at", "REAL", 1, None, 0),
    ],
    "channel_facts": [
        ("fact_id", "INTEGER", 0, None, 1),
        ("channel_id", "INTEGER", 1, None, 0),
        ("guild_id", "INTEGER", 0, None, 0),
        ("author_id", "INTEGER", 1, None, 0),
        ("text", "TEXT", 1, None, 0),
        ("created_at", "REAL", 1, None, 0),
    ],
}
EXPECTED_INDEXES = {
    "messages_by_channel_time": "messages",
    "messages_by_author": "messages",
    "bot_replies_by_answered": "bot_replies",
    "bot_replies_by_latency": "bot_replies",
    "feedback_by_user": "feedback",
    "audit_log_by_actor": "audit_log",
    "message_tombstones_by_expiry": "message_tombstones",
    "channel_facts_by_channel": "channel_facts",
    "channel_facts_by_author": "channel_facts",
    "bot_replies_by_replaced": "bot_replies",
}


def reply(reply_id: int, answers_id: int, latency_seconds: float = 0.5) -> BotReplyRecord:
    """A bot-reply record in the default channel."""
    return BotReplyRecord(
        reply_message_id=reply_id,
        answers_message_id=answers_id,
        channel_id=CHANNEL,
        model_name="tiny",
        model_version="v1",
        params={"temperature": 0.8, "top_k": 50, "seed": None},
        latency_seconds=latency_seconds,
        prompt_tokens=12,
        completion_tokens=7,
        created_at=float(reply_id),
    )


def raw_bytes(path: Path) -> bytes:
    """The database, -wal and -shm files as they are on disk."""
    parts = [Path(f"{path}{suffix}") for suffix in ("", "-wal", "-shm")]
    return b"".join(part.read_bytes() for part in parts if part.exists())


def raw_query(path: Path, sql: str, params: tuple = ()) -> list[tuple]:
    """Run one query on a separate plain sqlite3 connection."""
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def schema_sql(path: Path) -> list[tuple]:
    """Every CREATE statement of a database, sorted by name."""
    return raw_query(path, "SELECT type, name, sql FROM sqlite_master WHERE sql IS NOT NULL ORDER BY name")


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "chatbot.db"  # the data folder does not exist yet: open() creates it


@pytest.fixture
async def storage(db_path: Path) -> AsyncIterator[Storage]:
    async with Storage.open(db_path) as opened:
        yield opened


async def export_all(storage: Storage, **kwargs: object) -> list[bot.storage.ExportRow]:
    return [row async for row in storage.export_rows(**kwargs)]  # type: ignore[arg-type]


# -- schema and migrations ----------------------------------------------------------------------------


async def test_blank_database_migrates_to_the_pinned_schema(storage: Storage, db_path: Path) -> None:
    assert await storage.schema_version() == SCHEMA_VERSION == 4
    tables = raw_query(
        db_path, "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
    )
    assert {name for (name,) in tables} == set(EXPECTED_COLUMNS)
    for table, columns in EXPECTED_COLUMNS.items():
        info = raw_query(db_path, f"PRAGMA table_info({table})")
        assert [row[1:] for row in info] == columns, table
    indexes = raw_query(
        db_path, "SELECT name, tbl_name FROM sqlite_master WHERE type = 'index' AND sql NOT NULL"
    )
    assert dict(indexes) == EXPECTED_INDEXES
    assert raw_query(db_path, "PRAGMA journal_mode") == [("wal",)]


async def test_connections_use_the_durability_and_safety_pragmas(db_path: Path) -> None:
    async with Storage.open(db_path, busy_timeout_seconds=2.5) as storage:
        writer = storage._writer  # private, but these per-connection settings are the contract
        for pragma, expected in [
            ("foreign_keys", 1),
            ("synchronous", 2),
            ("busy_timeout", 2500),
            ("secure_delete", 1),
        ]:
            async with writer.execute(f"PRAGMA {pragma}") as cursor:
                row = await cursor.fetchone()
            assert row is not None and tuple(row) == (expected,), pragma
        with pytest.raises(sqlite3.OperationalError, match=r"readonly|read-only"):
            await storage._reader.execute("DELETE FROM users")


def build_old_database(path: Path, version: int) -> None:
    """A database at `version` (written by the old code's migrations), holding one of everything."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    upgrade(conn, MIGRATIONS[:version])
    if version >= 1:  # the step-1 tables and columns
        conn.executescript(
            """BEGIN;
            INSERT INTO guilds (guild_id, name, training_export_enabled) VALUES (1, 'Guild', 1);
            INSERT INTO channels (channel_id, guild_id, name, answer_all) VALUES (10, 1, 'general', 1);
            INSERT INTO users (user_id, display_name, training_opt_in, opted_in_at)
                VALUES (100, 'ann', 1, 5.0);
            INSERT INTO messages (message_id, channel_id, author_id, is_bot, content, created_at)
                VALUES (1, 10, 100, 0, 'こんにちは 🌸', 1.0), (2, 10, 100, 0, 'second', 2.0);
            INSERT INTO feedback (message_id, user_id, score, created_at) VALUES (1, 100, 1, 3.0);
            INSERT INTO bot_replies VALUES (2, 1, 10, 'tiny', 'v1', '{}', 0.25, 3, 4, 2.0);
            INSERT INTO audit_log (at, actor_id, guild_id, action, detail, allowed)
                VALUES (4.0, 100, 1, 'reload', 'tiny', 1);
            COMMIT;"""
        )
    conn.close()


@pytest.mark.parametrize("old_version", range(SCHEMA_VERSION))
async def test_every_older_version_upgrades_with_data_kept(tmp_path: Path, old_version: int) -> None:
    fresh, old = tmp_path / "fresh.db", tmp_path / "old.db"
    migrate(fresh)
    build_old_database(old, old_version)
    async with Storage.open(old) as storage:
        assert await storage.schema_version() == SCHEMA_VERSION
        assert await storage.integrity_check() == "ok"
        history = await storage.recent_history(CHANNEL, 10)
        export = await export_all(storage)
        settings = await storage.guild_settings(GUILD)
        channel = await storage.channel_settings(CHANNEL)
        stats = await storage.stats()
        audit = await storage.audit_log()
        assert await storage.mark_deleted([77]) == 0  # the tombstones work on an upgraded database
        assert not await storage.add_message(msg(77, "deleted before it was stored"))
        assert (await storage.get_message(77)) == msg(77, "", deleted=True)
    assert schema_sql(old) == schema_sql(fresh)  # upgraded exactly as a new database is created
    if old_version == 0:
        assert history == [] and stats.messages == 0
        return
    assert [m.content for m in history] == ["こんにちは 🌸", "second"]
    assert [(r.message.message_id, r.author_opted_in, r.feedback_score) for r in export] == [
        (1, True, 1),
        (2, True, 0),
    ]
    assert settings == GuildSettings(GUILD, training_export_enabled=True)  # new columns take their defaults
    assert channel == ChannelSettings(CHANNEL, answer_all=True)
    assert (stats.bot_replies, stats.latency_p50_seconds) == (1, 0.25)
    assert [(entry.action, entry.detail, entry.allowed) for entry in audit] == [("reload", "tiny", True)]


async def test_database_newer_than_code_is_refused_and_left_alone(db_path: Path) -> None:
    db_path.parent.mkdir()
    conn = sqlite3.connect(db_path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    message = f"database schema version {SCHEMA_VERSION + 1} is newer than this code \\({SCHEMA_VERSION}\\)"
    with pytest.raises(DatabaseTooNew, match=message):
        await Storage.open(db_path)
    with pytest.raises(DatabaseTooNew, match="upgrade the bot"):
        migrate(db_path)
    assert raw_query(db_path, "PRAGMA user_version") == [(SCHEMA_VERSION + 1,)]
    assert raw_query(db_path, "SELECT COUNT(*) FROM sqlite_master") == [(0,)]


def test_a_failing_migration_step_leaves_the_database_at_its_old_version(db_path: Path) -> None:
    migrate(db_path)
    before = schema_sql(db_path)
    broken_step = ("CREATE TABLE half_done (x)", "ALTER TABLE guilds ADD COLUMN extra TEXT", "NOT SQL AT ALL")
    conn = sqlite3.connect(db_path, isolation_level=None)
    with pytest.raises(sqlite3.OperationalError, match="syntax error"):
        upgrade(conn, (*MIGRATIONS, broken_step))
    conn.close()
    assert raw_query(db_path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
    assert schema_sql(db_path) == before


async def test_open_works_awaited_and_as_async_context_manager(db_path: Path) -> None:
    opened = await Storage.open(db_path)
    async with opened as storage:
        assert await storage.add_message(msg(1))
    async with Storage.open(db_path) as storage:
        assert (await storage.get_message(1)) == msg(1)
    assert not Path(f"{db_path}-wal").exists()  # the last close checkpointed and removed the WAL
    await opened.close()  # closing twice is harmless
    with pytest.raises(StorageError, match="closed"):
        await opened.add_message(msg(2))
    with pytest.raises(StorageError, match="closed"):
        await opened.get_message(1)


# -- concurrency and transactions ---------------------------------------------------------------------


async def test_200_concurrent_writers_never_interleave_transactions(storage: Storage) -> None:
    statements: list[str] = []
    await storage._writer.set_trace_callback(statements.append)  # runs on the writer's own thread

    async def writer(k: int) -> None:
        # Ids carry k in 7 digits, so every traced statement names the coroutine it came from.
        user, message_id = 2_000_000 + k, 1_000_000 + k
        await storage.add_message(msg(message_id, f"text {k}", author_id=user, channel_id=10 + k % 5))
        await storage.set_feedback(message_id, user, 1 if k % 2 else -1, at=5.0)
        await storage.mark_edited(message_id, f"edited {k}", edited_at=6.0)
        if k % 10 == 0:
            await storage.delete_user_data(user, at=7.0)

    await asyncio.gather(*(writer(k) for k in range(200)))
    await storage._writer.set_trace_callback(None)  # type: ignore[arg-type]  # None removes it (sqlite3 API)
    owners: set[int] | None = None
    transactions = 0
    for sql in statements:
        if sql.startswith("BEGIN"):
            assert owners is None, "a transaction began inside another"
            owners, transactions = set(), transactions + 1
        elif sql in ("COMMIT", "ROLLBACK"):
            assert owners is not None and len(owners) <= 1, owners
            owners = None
        elif owners is not None:
            owners.update(int(n) % 1_000_000 for n in re.findall(r"\b\d{7}\b", sql))
    assert transactions == 200 * 3 + 20
    history = [m for c in range(10, 15) for m in await storage.recent_history(c, 1000)]
    assert sorted(m.content for m in history) == sorted(f"edited {k}" for k in range(200) if k % 10)
    assert (await storage.stats()).messages == 180


async def test_a_failed_write_rolls_back_the_whole_transaction(storage: Storage) -> None:
    bad = msg(1, content=None)  # type: ignore[arg-type]  # violates NOT NULL after the user/channel rows
    with pytest.raises(sqlite3.IntegrityError):
        await storage.add_message(bad)
    stats = await storage.stats()
    assert (stats.guilds, stats.channels, stats.users, stats.messages) == (0, 0, 0, 0)
    assert await storage.add_message(msg(1))  # the connection is usable again


async def test_a_message_and_the_names_it_mentions_are_one_write(storage: Storage) -> None:
    assert await storage.add_message(msg(1), mentioned=[(USER + 1, "bob"), (USER, "ann")])
    assert not await storage.add_message(msg(1), mentioned=[(USER + 2, "carol")])  # a replay
    assert await storage.display_names([USER, USER + 1, USER + 2]) == {
        USER: "ann",
        USER + 1: "bob",
        USER + 2: "carol",
    }
    assert (await storage.stats()).messages == 1


async def test_a_reply_is_stored_whole_unless_its_guild_stopped_logging(storage: Storage) -> None:
    chunks = [
        msg(2, "part one", author_id=BOT_USER, is_bot=True),
        msg(3, "part two", author_id=BOT_USER, is_bot=True),
    ]
    assert await storage.add_reply(chunks, reply(2, answers_id=1))
    stats = await storage.stats()
    assert (stats.messages, stats.bot_replies) == (2, 1)
    await storage.set_guild_logging(GUILD, False)
    assert not await storage.add_reply([msg(5, author_id=BOT_USER, is_bot=True)], reply(5, answers_id=4))
    stats = await storage.stats()
    assert (stats.messages, stats.bot_replies) == (2, 1)


# -- privacy ------------------------------------------------------------------------------------------


UNICODE_TEXTS = [
    "こんにちは、元気ですか？　全角スペースと「括弧」。",
    "emoji 😀👍🏽 family 👨‍👩‍👧‍👦 flag 🇯🇵 keycap 1️⃣",
    "astral 𝕳𝖊𝖑𝖑𝖔 𠀋 𐍈 \U0010fffd and combining e\u0301 vs \u00e9",
    "controls\ttab\nnewline\u2028sep\u200bzero-width\x00nul",
]


@pytest.mark.parametrize("text", UNICODE_TEXTS)
async def test_unicode_round_trips_byte_exact(storage: Storage, db_path: Path, text: str) -> None:
    await storage.set_guild_training_export(GUILD, True)
    await storage.add_message(msg(1, text, author_name=text[:20]))
    await storage.add_message(msg(2, "x", author_id=200))
    await storage.mark_edited(2, text[::-1], edited_at=3.0)
    stored = await storage.get_message(1)
    assert stored is not None
    assert stored.content.encode("utf-8") == text.encode("utf-8")
    assert stored.author_name.encode("utf-8") == text[:20].encode("utf-8")
    assert [m.content for m in await storage.recent_history(CHANNEL, 5)] == [text, text[::-1]]
    assert (await export_all(storage))[0].message.content == text
    blob = raw_query(db_path, "SELECT CAST(content AS BLOB) FROM messages WHERE message_id = 1")
    assert blob == [(text.encode("utf-8"),)]


async def plant_canary_user(storage: Storage, canary: str) -> None:
    """User 100 leaves the canary in every kind of row, surrounded by other users' data."""
    await storage.upsert_user(USER, f"name {canary}")
    await storage.set_training_opt_in(USER, True, at=1.0)
    for i in range(1, 41):  # the canary shares its pages with other users' messages
        await storage.add_message(msg(i * 10, f"msg {i} {canary} " * 20, reply_to_id=i * 10 - 10 or None))
        for j in range(1, 4):
            await storage.add_message(
                msg(i * 10 + j, f"other {i} {j} " * 10, author_id=200, author_name="bob")
            )
    await storage.mark_edited(10, f"edited {canary}", edited_at=2.0)
    bot_reply = msg(5, f"bot quoting {canary}", author_id=BOT_USER, author_name="Bot", is_bot=True)
    await storage.add_message(bot_reply)
    await storage.add_bot_reply(reply(5, answers_id=10))
    # The second chunk of that long reply: no reply record of its own, only its reference to message 10.
    chunk = msg(6, f"chunk two {canary}", author_id=BOT_USER, author_name="Bot", is_bot=True, reply_to_id=10)
    await storage.add_message(chunk)
    await storage.set_feedback(5, USER, 1, at=3.0)
    await storage.add_audit(USER, GUILD, "config", f"persona {canary}", allowed=False, at=4.0)
    for i in range(1000, 1200):  # later inserts split and rebalance the pages that held the canary
        await storage.add_message(msg(i, f"other user text {i} " * 8, author_id=201, author_name="cy"))


async def test_forget_user_leaves_no_trace_in_db_or_wal_bytes(storage: Storage, db_path: Path) -> None:
    canary = "CANARY-7f3a9c-カナリア"
    await plant_canary_user(storage, canary)
    assert canary.encode() in raw_bytes(db_path)  # the check below can fail
    deleted = await storage.delete_user_data(USER, at=10.0)
    assert deleted == 40 + 2 + 1 + 1 + 1  # messages, the 2 bot reply chunks, its record, feedback, audit
    assert canary.encode() not in raw_bytes(db_path)  # still open: gone from the db, -wal and -shm files
    assert b"CANARY-7f3a9c" not in raw_bytes(db_path)
    assert await storage.integrity_check() == "ok"
    assert (await storage.stats()).messages == 120 + 200  # other users' messages stay
    assert not await storage.user_opted_in(USER)
    assert raw_query(db_path, "SELECT display_name, forgotten_at FROM users WHERE user_id = ?", (USER,)) == [
        ("", 10.0)
    ]


async def test_forgotten_users_stay_out_of_exports_until_they_opt_in_again(storage: Storage) -> None:
    await storage.set_guild_training_export(GUILD, True)
    await storage.set_training_opt_in(USER, True, at=1.0)
    await storage.add_message(msg(1, "before"))
    await storage.add_message(msg(2, "someone else", author_id=200))
    await storage.delete_user_data(USER, at=5.0)
    await storage.add_message(msg(6, "after forgetting"))
    assert [r.message.message_id for r in await export_all(storage)] == [2]
    await storage.set_training_opt_in(USER, True, at=7.0)
    assert [(r.message.message_id, r.author_opted_in) for r in await export_all(storage)] == [
        (2, False),
        (6, True),
    ]


async def test_deleted_message_content_is_erased_not_only_flagged(storage: Storage, db_path: Path) -> None:
    canary = "DELETED-CANARY-51e2"
    for i in range(1, 30):
        await storage.add_message(msg(i, f"{canary} {i} " * 10 if i in (3, 4, 5) else f"keep {i}"))
    assert canary.encode() in raw_bytes(db_path)
    assert await storage.mark_deleted([3]) == 1
    assert await storage.mark_deleted(iter([4, 5, 6, 404])) == 3  # bulk; unknown ids are skipped
    assert await storage.mark_deleted([3, 4]) == 0
    assert await storage.get_message(4) == msg(4, "", deleted=True)
    assert raw_query(db_path, "SELECT COUNT(*) FROM messages WHERE deleted = 1 AND content = ''") == [(4,)]
    assert [m.message_id for m in await storage.recent_history(CHANNEL, 5)] == [25, 26, 27, 28, 29]
    assert not await storage.mark_edited(3, "resurrected?", edited_at=9.0)
    await storage.close()
    assert canary.encode() not in raw_bytes(db_path)  # secure_delete zeroed the old cells


async def test_guild_turning_logging_off_can_purge_its_messages(storage: Storage, db_path: Path) -> None:
    canary = "GUILD-CANARY-88"
    for i in range(1, 21):
        await storage.add_message(msg(i, f"{canary} {i}"))
    await storage.add_bot_reply(reply(20, answers_id=19))
    await storage.set_feedback(20, USER, -1, at=1.0)
    await storage.add_message(msg(30, "other guild", guild_id=2, channel_id=20))
    await storage.set_guild_logging(GUILD, False)
    assert await storage.purge_guild_messages(GUILD) == 20
    assert canary.encode() not in raw_bytes(db_path)
    assert (await storage.guild_settings(GUILD)).logging_enabled is False
    assert await storage.recent_history(CHANNEL, 50) == []
    assert [m.content for m in await storage.recent_history(20, 50)] == ["other guild"]
    stats = await storage.stats()
    assert (stats.messages, stats.bot_replies) == (1, 0)


# -- domain methods -----------------------------------------------------------------------------------


async def test_add_message_is_idempotent_and_creates_its_rows(storage: Storage) -> None:
    assert await storage.add_message(msg(1, "first"))
    assert not await storage.add_message(msg(1, "replayed"))
    assert (await storage.get_message(1)) == msg(1, "first")
    assert await storage.add_message(msg(2, "dm", guild_id=None, channel_id=77, author_name="ann renamed"))
    dm = await storage.get_message(2)
    assert dm is not None and dm.guild_id is None
    assert (await storage.get_message(1)).author_name == "ann renamed"  # type: ignore[union-attr]
    stats = await storage.stats()
    assert (stats.guilds, stats.channels, stats.users, stats.messages) == (1, 2, 1, 2)
    assert await storage.get_message(3) is None
    assert await storage.display_names([USER, 12345]) == {USER: "ann renamed"}


async def test_recent_history_is_oldest_first_limited_and_respects_since(storage: Storage) -> None:
    for i in range(1, 11):
        await storage.add_message(msg(i, f"m{i}"))
    await storage.add_message(msg(11, "other channel", channel_id=CHANNEL + 1))
    await storage.mark_deleted([9])
    assert [m.content for m in await storage.recent_history(CHANNEL, 3)] == ["m7", "m8", "m10"]
    assert [m.message_id for m in await storage.recent_history(CHANNEL, 100, since=8.0)] == [8, 10]
    assert await storage.recent_history(CHANNEL, 0) == []


async def test_channel_guild_and_user_settings_round_trip(storage: Storage) -> None:
    assert await storage.guild_settings(5) == GuildSettings(5)
    assert await storage.channel_settings(6) == ChannelSettings(6)
    await storage.upsert_guild(5, "Guild")
    await storage.set_guild_persona(5, "A pirate.")
    await storage.set_guild_sampling(5, {"temperature": 0.7, "top_p": 0.95})
    await storage.set_guild_training_export(5, True)
    with pytest.raises(ValueError):
        await storage.set_guild_sampling(5, {"temperature": math.nan})
    assert await storage.guild_settings(5) == GuildSettings(
        5, True, True, "A pirate.", {"temperature": 0.7, "top_p": 0.95}
    )
    await storage.set_guild_persona(5, None)
    assert (await storage.guild_settings(5)).persona is None
    await storage.upsert_channel(6, 5, "general")
    await storage.set_channel_answer_all(6, 5, True)
    await storage.reset_channel(6, at=123.5)
    await storage.reset_channel(7, at=1.0)  # an unknown channel is created
    assert await storage.channel_settings(6) == ChannelSettings(6, True, 123.5)
    await storage.set_training_opt_in(USER, True, at=1.0)
    assert await storage.user_opted_in(USER)
    await storage.set_training_opt_in(USER, False, at=2.0)
    assert not await storage.user_opted_in(USER) and not await storage.user_opted_in(4242)


async def test_feedback_is_one_score_per_user_and_only_plus_or_minus_one(storage: Storage) -> None:
    await storage.set_guild_training_export(GUILD, True)
    await storage.add_message(msg(1, "bot said", author_id=BOT_USER, is_bot=True))
    await storage.set_feedback(1, 200, 1, at=1.0)
    await storage.set_feedback(1, 201, 1, at=1.0)
    await storage.set_feedback(1, 200, -1, at=2.0)  # changed their mind
    assert [(r.message.is_bot, r.feedback_score) for r in await export_all(storage)] == [(True, 0)]
    await storage.remove_feedback(1, 200)
    assert (await export_all(storage))[0].feedback_score == 1
    with pytest.raises(ValueError, match=r"\+1 or -1"):
        await storage.set_feedback(1, 200, 2, at=3.0)


async def test_export_rows_follow_consent_deletion_and_order(
    storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bot.storage.store, "EXPORT_BATCH_ROWS", 3)  # several batches, with ties on created_at
    await storage.set_guild_training_export(GUILD, True)
    await storage.set_training_opt_in(USER, True, at=0.0)
    for i in range(1, 9):
        await storage.add_message(msg(i, f"m{i}", channel_id=CHANNEL + i % 2, created_at=float(i // 3)))
    await storage.add_message(msg(9, "bot", author_id=BOT_USER, is_bot=True, created_at=9.0))
    await storage.add_message(msg(20, "guild without export", guild_id=2, channel_id=30))
    await storage.add_message(msg(21, "a dm", guild_id=None, channel_id=31))
    await storage.add_message(msg(22, "not opted in", author_id=300, created_at=22.0))
    await storage.mark_deleted([4])
    rows = await export_all(storage)
    keys = [(r.message.channel_id, r.message.created_at, r.message.message_id) for r in rows]
    assert keys == sorted(keys)
    assert [r.message.message_id for r in rows] == [2, 6, 8, 9, 22, 1, 3, 5, 7]
    assert {r.message.message_id: r.author_opted_in for r in rows}[22] is False
    assert [r.message.message_id for r in await export_all(storage, since=2.0)] == [6, 8, 9, 22, 7]
    assert await export_all(storage, guild_id=2) == []


async def test_stats_count_rows_and_latency_percentiles(storage: Storage) -> None:
    empty = await storage.stats()
    assert (empty.latency_p50_seconds, empty.latency_p95_seconds) == (None, None)
    for i in range(1, 21):
        await storage.add_bot_reply(reply(100 + i, i, latency_seconds=float(i)))
    await storage.add_bot_reply(reply(101, 1, latency_seconds=999.0))  # replayed: ignored
    stats = await storage.stats()
    assert (stats.bot_replies, stats.latency_p50_seconds, stats.latency_p95_seconds) == (20, 10.0, 19.0)


async def test_last_bot_message_and_audit_log(storage: Storage) -> None:
    assert await storage.last_bot_message_at(CHANNEL, BOT_USER) is None
    await storage.add_message(msg(5, "bot", author_id=BOT_USER, is_bot=True))
    await storage.add_message(msg(7, "human"))
    await storage.add_message(msg(8, "another bot", author_id=777, is_bot=True))
    assert await storage.last_bot_message_at(CHANNEL, BOT_USER) == 5.0  # other bots do not count
    for i in range(3):
        await storage.add_audit(
            USER, GUILD if i else None, f"action{i}", "detail", allowed=i != 1, at=float(i)
        )
    entries = await storage.audit_log(limit=2)
    assert [(e.action, e.allowed, e.guild_id) for e in entries] == [
        ("action2", True, GUILD),
        ("action1", False, 1),
    ]


async def test_backup_under_load_is_a_consistent_copy(storage: Storage, tmp_path: Path) -> None:
    for i in range(1, 200):
        await storage.add_message(msg(i, f"m{i} " * 20))
    dest = tmp_path / "backups" / "copy.db"
    dest.parent.mkdir()
    dest.write_bytes(b"an older backup")

    async def keep_writing() -> None:
        for i in range(1000, 1100):
            await storage.add_message(msg(i, "during backup"))

    await asyncio.gather(storage.backup(dest), keep_writing())
    async with Storage.open(dest) as copy:
        assert await copy.integrity_check() == "ok"
        copied = (await copy.stats()).messages
    assert 199 <= copied <= 299
    assert not Path(f"{dest}.partial").exists()
