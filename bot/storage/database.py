"""Opening the SQLite file: the start-up checks, migrations applied, WAL and the connection pragmas, and
the online backup. The statements of the bot's domain live in bot/storage/store.py.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import aiosqlite

from bot.storage.errors import FAILURES, DatabaseTooNew, DatabaseUnavailable, raise_failure
from bot.storage.migrations import SCHEMA_VERSION, SchemaTooNew, read_version, upgrade


def migrate(path: Path, busy_timeout_seconds: float = 5.0) -> int:
    """Create or upgrade the database at `path` (WAL mode); return its schema version.

    An unusable file (read-only, not a database, full disk...) raises a StorageError with one clear line.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DatabaseUnavailable(f"cannot create the data folder {path.parent}: {exc.strerror}") from exc
    _check_writable(path)
    try:
        return _migrate(path, busy_timeout_seconds)
    except sqlite3.Error as exc:
        raise_failure(exc, path)
        raise


def _check_writable(path: Path) -> None:
    """Refuse at start what would fail every write later: SQLite opens a read-only file without a word."""
    if path.exists() and not os.access(path, os.R_OK | os.W_OK):
        kind, text = FAILURES[sqlite3.SQLITE_READONLY]
        raise kind(text.format(path=path, error="no write permission"))
    if not os.access(path.parent, os.W_OK | os.X_OK):  # the -wal and -shm files are created beside it
        kind, text = FAILURES[sqlite3.SQLITE_CANTOPEN]
        raise kind(text.format(path=path, error=f"no write permission on {path.parent}"))


def _migrate(path: Path, busy_timeout_seconds: float) -> int:
    """Refuse a newer schema, switch to WAL, and upgrade an older one."""
    conn = sqlite3.connect(path, timeout=busy_timeout_seconds, isolation_level=None)
    try:
        version = read_version(conn)
        if version > SCHEMA_VERSION:
            raise DatabaseTooNew(str(SchemaTooNew(version, SCHEMA_VERSION)))
        conn.execute("PRAGMA journal_mode = WAL")  # persistent: stored in the database file
        conn.execute("PRAGMA synchronous = FULL")
        return _upgrade(conn, path) if version < SCHEMA_VERSION else version
    finally:
        conn.close()


def _upgrade(conn: sqlite3.Connection, path: Path) -> int:
    """Apply the pending migrations; a lost race or an SQLite failure becomes a StorageError."""
    try:
        return upgrade(conn)
    except SchemaTooNew as exc:  # another process upgraded it between our two reads
        raise DatabaseTooNew(str(exc)) from exc
    except sqlite3.Error as exc:
        raise_failure(exc, path)
        raise


async def connect(path: Path, busy_timeout_seconds: float, read_only: bool) -> aiosqlite.Connection:
    """One connection to the file: the writer (foreign keys, FULL sync, secure delete) or the reader."""
    target = f"{path.resolve().as_uri()}?mode=ro" if read_only else str(path)
    conn = await aiosqlite.connect(target, uri=read_only, timeout=busy_timeout_seconds, isolation_level=None)
    conn.row_factory = sqlite3.Row
    pragmas = [f"PRAGMA busy_timeout = {int(busy_timeout_seconds * 1000)}"]
    if read_only:
        pragmas.append("PRAGMA query_only = ON")
    else:  # secure_delete: deleted and overwritten content is zeroed in the file, not just unlinked
        pragmas += ["PRAGMA foreign_keys = ON", "PRAGMA synchronous = FULL", "PRAGMA secure_delete = ON"]
    for pragma in pragmas:
        await conn.execute(pragma)
    return conn


def backup_file(source: Path, dest: Path) -> None:
    """Copy a live database to `dest` with SQLite's online backup API (fsynced, then an atomic replace)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".partial")
    partial.unlink(missing_ok=True)
    src = sqlite3.connect(f"{source.resolve().as_uri()}?mode=ro", uri=True)
    target = sqlite3.connect(partial)
    try:
        src.backup(target)  # one step: a consistent snapshot even while the bot writes
    finally:
        target.close()
        src.close()
    with open(partial, "rb") as f:
        os.fsync(f.fileno())
    os.replace(partial, dest)
