"""The bot's SQLite database: every SQL statement, the schema and its migrations, and the storage errors.

Callers import from here (Storage, the records it takes and returns, the errors). Reading order: `store`
(Storage: the domain methods, one transaction each, all the SQL), `records` (what they take and return),
`database` (opening the file: checks, migrations applied, pragmas, online backup), `migrations` (the
append-only schema) and `errors` (SQLite's failure codes → one line an operator can act on).
"""

from bot.storage.database import migrate
from bot.storage.errors import (
    DatabaseBusy,
    DatabaseFull,
    DatabaseTooNew,
    DatabaseUnavailable,
    StorageError,
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
from bot.storage.store import EXPORT_BATCH_ROWS, Storage

__all__ = [
    "EXPORT_BATCH_ROWS",
    "AuditEntry",
    "BotReplyRecord",
    "ChannelFact",
    "ChannelSettings",
    "DatabaseBusy",
    "DatabaseFull",
    "DatabaseTooNew",
    "DatabaseUnavailable",
    "ExportRow",
    "GuildSettings",
    "Stats",
    "Storage",
    "StorageError",
    "StoredMessage",
    "StoredReply",
    "migrate",
    "storage_failure",
]
