"""A child process for the storage crash and lock tests (run as a script; the parent SIGKILLs it).

    python tests/helpers/storage_child.py write DB FIRST_ID   add messages forever, printing each id once
                                                            it is committed
    python tests/helpers/storage_child.py converse DB         read "go FIRST_ID" on stdin, then record
                                                            messages and 3-chunk replies through the
                                                            conversation core forever, printing
                                                            "message ID" / "reply ID" once each is stored
    python tests/helpers/storage_child.py migrate DB          migrate DB to the latest schema
    python tests/helpers/storage_child.py hold DB SECONDS     hold the write lock for SECONDS, then commit

Each mode prints "ready" once it is about to do the interesting part, and flushes every line, so the parent
knows exactly what was acknowledged before the kill.
"""

from __future__ import annotations

import asyncio
import sqlite3
import sys
import time
from pathlib import Path

from bot.config import Settings
from bot.conversation import ConversationService, IncomingMessage
from bot.storage import Storage, StoredMessage, migrate
from tests.helpers.fakes import FakeGenerator

DELETE_EVERY = 7  # every 7th message, bulk-delete the 5 previous ones in one transaction
DELETE_BATCH = 5  # ids written by this run only
REPLY_CHUNKS = 3  # every reply is sent as this many chunks (ids: the message's id + 1, + 2, + 3)
CONVERSE_BOT_ID = 2


def say(line: str) -> None:
    """Print one protocol line and flush it at once (the parent reads it before the kill)."""
    print(line, flush=True)


def message(message_id: int) -> StoredMessage:
    """A message whose channel, guild and author differ between calls (so rows of every table are written)."""
    return StoredMessage(
        message_id=message_id,
        channel_id=100 + message_id % 3,
        guild_id=10,
        author_id=1000 + message_id % 11,
        author_name=f"user {message_id % 11} 🐍",
        is_bot=False,
        content=f"message {message_id} こんにちは " * 4,
        created_at=float(message_id),
    )


async def write_forever(path: Path, first_id: int) -> None:
    """Add messages until killed; acknowledge each commit on stdout."""
    async with Storage.open(path) as storage:
        say("ready")
        for message_id in range(first_id, first_id + 1_000_000):
            await storage.add_message(message(message_id))
            say(f"added {message_id}")
            if message_id % DELETE_EVERY == 0 and message_id - DELETE_BATCH >= first_id:
                batch = list(range(message_id - DELETE_BATCH, message_id))
                say("deleting " + " ".join(map(str, batch)))
                await storage.mark_deleted(batch)
                say("deleted " + " ".join(map(str, batch)))


async def converse_forever(path: Path) -> None:
    """Drive the conversation core the way the chat cog does: record, compose, "send", record the reply."""
    first_id = int(sys.stdin.readline().split()[1])  # the parent starts the next child while this one runs
    settings = Settings()
    async with Storage.open(path) as storage:
        service = ConversationService(
            storage, FakeGenerator(default="a reply " * 30), settings, CONVERSE_BOT_ID
        )
        say("ready")
        for base in range(first_id, first_id + 4_000_000, REPLY_CHUNKS + 1):
            incoming = IncomingMessage(
                base, 100 + base % 3, 10, 1000 + base % 11, f"user {base % 11}", False, f"hi {base}", base
            )
            context = await service.context_for(incoming)
            await service.record(incoming, context)
            say(f"message {base}")
            draft = await service.compose_reply(incoming, context)
            sent = [(base + 1 + i, f"part {i} of {draft.text}") for i in range(REPLY_CHUNKS)]
            await service.record_reply(incoming, context, draft, sent, float(base))
            say(f"reply {base}")


def hold_write_lock(path: Path, seconds: float) -> None:
    """Take the write lock from this process, keep it for `seconds`, then commit."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    say("ready")
    time.sleep(seconds)
    conn.execute("COMMIT")
    say("released")


def main(argv: list[str]) -> int:
    """Dispatch on the mode word."""
    mode, path = argv[0], Path(argv[1])
    if mode == "write":
        asyncio.run(write_forever(path, int(argv[2])))
    elif mode == "converse":
        asyncio.run(converse_forever(path))
    elif mode == "migrate":
        say("ready")
        say(f"migrated {migrate(path)}")
    elif mode == "hold":
        hold_write_lock(path, float(argv[2]))
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
