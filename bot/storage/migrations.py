"""The database schema as an append-only list of migrations, and the synchronous migrator.

`PRAGMA user_version` is the number of steps applied. Never edit or reorder a shipped step: append a new one.
All pending steps run in one `BEGIN IMMEDIATE` transaction (SQLite DDL is transactional), so a crash or a
kill during an upgrade leaves the database at its old version, untouched.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Sequence

log = logging.getLogger(__name__)

Migration = tuple[str, ...]  # the statements of one step, run in order

# Step 1: the initial schema. Discord ids are 64-bit snowflakes and fit SQLite's signed INTEGER; times are
# unix seconds (REAL); booleans are 0/1 with a CHECK. Guild, channel and user rows are created on first use.
INITIAL_SCHEMA: Migration = (
    """CREATE TABLE guilds (
        guild_id INTEGER PRIMARY KEY,
        name TEXT NOT NULL DEFAULT '',
        logging_enabled INTEGER NOT NULL DEFAULT 1 CHECK (logging_enabled IN (0, 1)),
        training_export_enabled INTEGER NOT NULL DEFAULT 0 CHECK (training_export_enabled IN (0, 1))
    )""",
    """CREATE TABLE channels (
        channel_id INTEGER PRIMARY KEY,
        guild_id INTEGER REFERENCES guilds (guild_id) ON DELETE CASCADE,
        name TEXT NOT NULL DEFAULT '',
        answer_all INTEGER NOT NULL DEFAULT 0 CHECK (answer_all IN (0, 1)),
        reset_at REAL
    )""",
    """CREATE TABLE users (
        user_id INTEGER PRIMARY KEY,
        display_name TEXT NOT NULL DEFAULT '',
        training_opt_in INTEGER NOT NULL DEFAULT 0 CHECK (training_opt_in IN (0, 1)),
        opted_in_at REAL,
        forgotten_at REAL
    )""",
    # message_id is the Discord id and the primary key, hence UNIQUE: a replayed event is never stored twice.
    """CREATE TABLE messages (
        message_id INTEGER PRIMARY KEY,
        channel_id INTEGER NOT NULL REFERENCES channels (channel_id) ON DELETE CASCADE,
        author_id INTEGER NOT NULL REFERENCES users (user_id),
        is_bot INTEGER NOT NULL CHECK (is_bot IN (0, 1)),
        content TEXT NOT NULL,
        created_at REAL NOT NULL,
        edited_at REAL,
        reply_to_id INTEGER,
        deleted INTEGER NOT NULL DEFAULT 0 CHECK (deleted IN (0, 1))
    )""",
    # No foreign key to messages: the reply may be recorded before or after its message row.
    """CREATE TABLE bot_replies (
        reply_message_id INTEGER PRIMARY KEY,
        answers_message_id INTEGER NOT NULL,
        channel_id INTEGER NOT NULL,
        model_name TEXT NOT NULL,
        model_version TEXT NOT NULL,
        params_json TEXT NOT NULL,
        latency_seconds REAL NOT NULL,
        prompt_tokens INTEGER NOT NULL,
        completion_tokens INTEGER NOT NULL,
        created_at REAL NOT NULL
    )""",
    """CREATE TABLE feedback (
        message_id INTEGER NOT NULL,
        user_id INTEGER NOT NULL,
        score INTEGER NOT NULL CHECK (score IN (-1, 1)),
        created_at REAL NOT NULL,
        PRIMARY KEY (message_id, user_id)
    )""",
    """CREATE TABLE audit_log (
        entry_id INTEGER PRIMARY KEY AUTOINCREMENT,
        at REAL NOT NULL,
        actor_id INTEGER NOT NULL,
        guild_id INTEGER,
        action TEXT NOT NULL,
        detail TEXT NOT NULL,
        allowed INTEGER NOT NULL CHECK (allowed IN (0, 1))
    )""",
)

# Step 2: per-guild /config overrides, and the indexes that history, forget-me and stats queries use.
GUILD_CONFIG_AND_INDEXES: Migration = (
    "ALTER TABLE guilds ADD COLUMN persona TEXT",
    "ALTER TABLE guilds ADD COLUMN sampling_json TEXT NOT NULL DEFAULT '{}'",
    "CREATE INDEX messages_by_channel_time ON messages (channel_id, created_at, message_id)",
    "CREATE INDEX messages_by_author ON messages (author_id)",
    "CREATE INDEX bot_replies_by_answered ON bot_replies (answers_message_id)",
    "CREATE INDEX bot_replies_by_latency ON bot_replies (latency_seconds)",
    "CREATE INDEX feedback_by_user ON feedback (user_id)",
    "CREATE INDEX audit_log_by_actor ON audit_log (actor_id)",
)

# Step 3: tombstones for deletions and edits that arrive before their message is stored (the delete event can
# be handled while the create is still being handled). The insert consults and consumes them in the same
# transaction; `content` is the edited text (NULL for a deletion); rows past `expires_at` are pruned.
MESSAGE_TOMBSTONES: Migration = (
    """CREATE TABLE message_tombstones (
        message_id INTEGER PRIMARY KEY,
        deleted INTEGER NOT NULL DEFAULT 0 CHECK (deleted IN (0, 1)),
        content TEXT,
        edited_at REAL,
        expires_at REAL NOT NULL
    )""",
    "CREATE INDEX message_tombstones_by_expiry ON message_tombstones (expires_at)",
)

# Step 4: the conversation features of issue 25.
# - channels: per-channel persona and sampling overrides (NULL / '{}' = the guild's), a thread's parent (a
#   thread inherits its parent's settings), thread mode, wake words, the reply chance and its cooldown.
# - bot_threads: the threads this bot opened (thread mode answers in its own threads only).
# - channel_facts: /remember facts, with their author so that /forget-me deletes what a user wrote.
# - bot_replies.replaces_reply_id: a regenerated reply points at the reply it replaced.
CONVERSATION_FEATURES: Migration = (
    "ALTER TABLE channels ADD COLUMN persona TEXT",
    "ALTER TABLE channels ADD COLUMN sampling_json TEXT NOT NULL DEFAULT '{}'",
    "ALTER TABLE channels ADD COLUMN parent_id INTEGER",
    "ALTER TABLE channels ADD COLUMN thread_mode INTEGER NOT NULL DEFAULT 0 CHECK (thread_mode IN (0, 1))",
    "ALTER TABLE channels ADD COLUMN wake_words_json TEXT NOT NULL DEFAULT '[]'",
    "ALTER TABLE channels ADD COLUMN wake_on_name INTEGER NOT NULL DEFAULT 0 CHECK (wake_on_name IN (0, 1))",
    "ALTER TABLE channels ADD COLUMN reply_chance REAL NOT NULL DEFAULT 0 "
    "CHECK (reply_chance >= 0 AND reply_chance <= 1)",
    "ALTER TABLE channels ADD COLUMN chance_cooldown_seconds REAL NOT NULL DEFAULT 300 "
    "CHECK (chance_cooldown_seconds >= 0)",
    """CREATE TABLE bot_threads (
        thread_id INTEGER PRIMARY KEY,
        parent_id INTEGER NOT NULL,
        guild_id INTEGER,
        opened_for_message_id INTEGER NOT NULL UNIQUE,
        created_at REAL NOT NULL
    )""",
    """CREATE TABLE channel_facts (
        fact_id INTEGER PRIMARY KEY AUTOINCREMENT,
        channel_id INTEGER NOT NULL,
        guild_id INTEGER,
        author_id INTEGER NOT NULL,
        text TEXT NOT NULL,
        created_at REAL NOT NULL
    )""",
    "CREATE INDEX channel_facts_by_channel ON channel_facts (channel_id, fact_id)",
    "CREATE INDEX channel_facts_by_author ON channel_facts (author_id)",
    "ALTER TABLE bot_replies ADD COLUMN replaces_reply_id INTEGER",
    "CREATE INDEX bot_replies_by_replaced ON bot_replies (replaces_reply_id)",
)

MIGRATIONS: tuple[Migration, ...] = (
    INITIAL_SCHEMA,
    GUILD_CONFIG_AND_INDEXES,
    MESSAGE_TOMBSTONES,
    CONVERSATION_FEATURES,
)
SCHEMA_VERSION = len(MIGRATIONS)


class MigrationError(Exception):
    """The schema could not be brought up to date; the database is left at its previous version."""


class SchemaTooNew(MigrationError):
    """The database was written by newer code; it is never "upgraded" down."""

    def __init__(self, found: int, supported: int) -> None:
        super().__init__(
            f"database schema version {found} is newer than this code ({supported}); upgrade the bot"
        )
        self.found = found
        self.supported = supported


def read_version(conn: sqlite3.Connection) -> int:
    """The schema version stored in the database header (0 for a blank database)."""
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def upgrade(conn: sqlite3.Connection, steps: Sequence[Migration] = MIGRATIONS) -> int:
    """Apply the pending `steps` in one transaction on an autocommit connection; return the new version.

    Raises SchemaTooNew when the database is newer than `steps`.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = read_version(conn)  # re-read under the write lock: another process may have migrated
        if version > len(steps):
            raise SchemaTooNew(version, len(steps))
        for number in range(version, len(steps)):
            _apply(conn, number + 1, steps[number])
        _check_foreign_keys(conn)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return len(steps)


def _apply(conn: sqlite3.Connection, number: int, step: Migration) -> None:
    log.info("applying database migration %d", number)
    for statement in step:
        conn.execute(statement)
    # PRAGMA does not take parameters; `number` is an int we computed.
    conn.execute(f"PRAGMA user_version = {int(number)}")


def _check_foreign_keys(conn: sqlite3.Connection) -> None:
    problems = conn.execute("PRAGMA foreign_key_check").fetchall()
    if problems:
        raise MigrationError(f"migration left {len(problems)} rows with broken foreign keys: {problems[:5]}")
