"""The storage errors an operator can act on, and how SQLite's result codes map to them (one line each).

bot.storage raises these; front ends catch StorageError and show its message, which names the database path
and SQLite's short error string, never an SQL parameter (message text).
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Mapping
from pathlib import Path

log = logging.getLogger(__name__)

_BUSY_CODES = frozenset({sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED})


class StorageError(Exception):
    """Base of the storage errors a user may be told about."""


class DatabaseTooNew(StorageError):
    """The database schema is newer than this code; it is refused, never downgraded."""


class DatabaseBusy(StorageError):
    """The write lock was not obtained within busy_timeout (another process holds it)."""


class DatabaseUnavailable(StorageError):
    """The database file cannot be opened, written or read as a database (permissions, I/O, not SQLite)."""


class DatabaseFull(StorageError):
    """The disk (or SQLite's page limit) is full; nothing of the failed write was stored."""


# SQLite primary result code → (error class, what is wrong and what to do). The message never holds SQL
# parameters (message text): only the path and SQLite's own short error string.
FAILURES: Mapping[int, tuple[type[StorageError], str]] = {
    sqlite3.SQLITE_READONLY: (
        DatabaseUnavailable,
        "the database {path} is read-only ({error}): make the file and its folder writable by the bot's user",
    ),
    sqlite3.SQLITE_CANTOPEN: (
        DatabaseUnavailable,
        "cannot open the database {path} ({error}): check that its folder exists and is writable",
    ),
    sqlite3.SQLITE_IOERR: (
        DatabaseUnavailable,
        "disk I/O error on the database {path} ({error}): check the disk and the file's permissions",
    ),
    sqlite3.SQLITE_NOTADB: (
        DatabaseUnavailable,
        "{path} is not a SQLite database ({error}): move it away or restore a backup (chatbot db backup)",
    ),
    sqlite3.SQLITE_CORRUPT: (
        DatabaseUnavailable,
        "the database {path} is corrupt ({error}): restore a backup (chatbot db backup)",
    ),
    sqlite3.SQLITE_FULL: (
        DatabaseFull,
        "the disk holding the database {path} is full ({error}): free space; nothing is stored until then",
    ),
}


def storage_failure(exc: sqlite3.Error, path: Path) -> Exception:
    """The StorageError an operator can act on for a SQLite error (busy included); others unchanged."""
    if isinstance(exc, sqlite3.OperationalError):
        busy = busy_error(exc, path)
        if busy is not exc:
            return busy
    code = getattr(exc, "sqlite_errorcode", None)
    known = FAILURES.get(code & 0xFF) if isinstance(code, int) else None
    if known is None and "file is not a database" in str(exc):  # raised without a code by some paths
        known = FAILURES[sqlite3.SQLITE_NOTADB]
    if known is None:
        return exc
    kind, text = known
    return kind(text.format(path=path, error=str(exc)))


def raise_failure(exc: sqlite3.Error, path: Path) -> None:
    """Raise the operator-facing StorageError for `exc`, if it has one (the caller re-raises otherwise)."""
    failure = storage_failure(exc, path)
    if failure is not exc:
        raise failure from exc


def busy_error(exc: sqlite3.OperationalError, path: Path) -> Exception:
    """DatabaseBusy for a lock timeout (logged); any other OperationalError unchanged."""
    if getattr(exc, "sqlite_errorcode", None) not in _BUSY_CODES and "locked" not in str(exc):
        return exc
    log.warning("database write lock not obtained in time (%s): %s", path, exc)
    return DatabaseBusy(f"another process holds the database write lock ({path}); try again later")
