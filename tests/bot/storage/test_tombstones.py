"""Deletions and edits that win in any order of events, the scrub checkpoint, replies in one transaction.

Real SQLite files in tmp_path; "bytes" are the .db, -wal and -shm files as they lie on disk.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import bot.storage.store
from bot.storage import BotReplyRecord, Storage, StoredMessage
from tests.helpers.records import CHANNEL, msg

BOT = 999
CANARY = "TOMBSTONE-CANARY-4c1d"
GUILD_OFF = 7_000  # a guild whose logging is turned off in a test


class FakeClock:
    """A clock the test moves by hand (tombstone expiry)."""

    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def record(first_id: int, answers_id: int, latency_seconds: float = 0.5) -> BotReplyRecord:
    return BotReplyRecord(
        first_id, answers_id, CHANNEL, "tiny", "v1", {"top_k": 50}, latency_seconds, 3, 4, 9.0
    )


def raw_bytes(path: Path) -> bytes:
    parts = [Path(f"{path}{suffix}") for suffix in ("", "-wal", "-shm")]
    return b"".join(part.read_bytes() for part in parts if part.exists())


def raw_query(path: Path, sql: str) -> list[tuple]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "chatbot.db"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def storage(db_path: Path, clock: FakeClock) -> AsyncIterator[Storage]:
    async with Storage.open(db_path, clock=clock) as opened:
        for i in range(1, 20):  # some other rows, so the file has pages the canary could hide in
            await opened.add_message(msg(i, f"other text {i}"))
        yield opened


# -- every order of events --------------------------------------------------------------------------


async def test_delete_before_insert_stores_the_message_deleted_without_its_text(
    storage: Storage, db_path: Path
) -> None:
    assert await storage.mark_deleted([50]) == 0  # nothing stored yet: a tombstone
    assert not await storage.add_message(msg(50, CANARY))  # False: not to be answered
    assert await storage.get_message(50) == msg(50, "", deleted=True)
    assert CANARY.encode() not in raw_bytes(db_path)  # never written at all
    assert raw_query(db_path, "SELECT COUNT(*) FROM message_tombstones") == [(0,)]  # consumed
    assert not await storage.add_message(msg(50, CANARY))  # a replayed create changes nothing
    assert CANARY.encode() not in raw_bytes(db_path)


async def test_edit_before_insert_stores_the_edited_text(storage: Storage, db_path: Path) -> None:
    assert not await storage.mark_edited(50, "the fixed text", edited_at=60.0)
    assert not await storage.mark_edited(50, "an older edit", edited_at=55.0)  # out of order: the newer wins
    assert await storage.add_message(msg(50, CANARY))  # True: answered, with the edited text
    assert await storage.get_message(50) == msg(50, "the fixed text", edited_at=60.0)
    assert CANARY.encode() not in raw_bytes(db_path)


@pytest.mark.parametrize("order", ["edit, delete", "delete, edit"])
async def test_a_deletion_wins_over_an_edit_in_either_order(
    storage: Storage, db_path: Path, order: str
) -> None:
    for step in order.split(", "):
        if step == "edit":
            await storage.mark_edited(50, f"edited {CANARY}", edited_at=60.0)
        else:
            await storage.mark_deleted([50])
    assert not await storage.add_message(msg(50, CANARY))
    assert await storage.get_message(50) == msg(50, "", deleted=True)
    assert not await storage.mark_edited(50, "resurrected?", edited_at=70.0)
    await storage.close()
    assert CANARY.encode() not in raw_bytes(db_path)


async def test_bulk_delete_mixes_stored_and_not_yet_stored_messages(storage: Storage, db_path: Path) -> None:
    await storage.add_message(msg(50, f"{CANARY} stored"))
    assert await storage.mark_deleted([50, 51, 52, 5]) == 2  # 50 and 5 were stored; 51, 52 get tombstones
    assert not await storage.add_message(msg(51, f"{CANARY} late"))
    assert not await storage.add_message(msg(52, f"{CANARY} later"))
    assert await storage.add_message(msg(53, "not deleted"))
    history = await storage.recent_history(CHANNEL, 100)
    assert not any(CANARY in m.content for m in history) and history[-1].content == "not deleted"
    await storage.close()
    assert CANARY.encode() not in raw_bytes(db_path)


async def test_delete_during_insert_waits_for_the_insert_and_then_erases_it(
    storage: Storage, db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The insert is held at a gate inside its transaction; the delete arrives; then the insert finishes."""
    gate, at_gate = asyncio.Event(), asyncio.Event()
    real_insert = bot.storage.store._insert_message

    async def held_insert(db: object, message: StoredMessage) -> StoredMessage | None:
        at_gate.set()
        await gate.wait()
        return await real_insert(db, message)  # type: ignore[arg-type]

    monkeypatch.setattr(bot.storage.store, "_insert_message", held_insert)
    insert = asyncio.create_task(storage.add_message(msg(50, CANARY)))
    await at_gate.wait()
    delete = asyncio.create_task(storage.mark_deleted([50]))
    await asyncio.sleep(0.05)
    assert not delete.done()  # queued behind the insert's transaction, not lost
    gate.set()
    assert await insert  # stored first...
    assert await delete == 1  # ...then erased
    assert await storage.get_message(50) == msg(50, "", deleted=True)


async def test_a_reply_chunk_deleted_before_it_is_stored_stays_deleted(storage: Storage) -> None:
    await storage.mark_deleted([71])  # a moderator removed the bot's second chunk at once
    chunks = [
        msg(70 + i, f"chunk {i} {CANARY}", author_id=BOT, author_name="Bot", is_bot=True) for i in range(3)
    ]
    await storage.add_reply(chunks, record(70, answers_id=5))
    assert [(await storage.get_message(70 + i)).deleted for i in range(3)] == [False, True, False]  # type: ignore[union-attr]
    assert (await storage.stats()).bot_replies == 1


# -- expiry and the scrub -----------------------------------------------------------------------------


async def test_expired_tombstones_are_pruned(storage: Storage, db_path: Path, clock: FakeClock) -> None:
    await storage.mark_edited(60, f"edit of a message never stored {CANARY}", edited_at=1.0)
    await storage.mark_deleted([61])
    clock.now += bot.storage.store.TOMBSTONE_TTL_SECONDS + 1
    await storage.mark_deleted([62])  # any tombstone write prunes the expired ones
    assert raw_query(db_path, "SELECT message_id FROM message_tombstones") == [(62,)]
    await storage.close()
    assert CANARY.encode() not in raw_bytes(db_path)


async def test_an_edit_in_a_guild_that_stores_nothing_keeps_no_text(storage: Storage, db_path: Path) -> None:
    await storage.set_guild_logging(GUILD_OFF, False)
    assert not await storage.mark_edited(80, f"edited {CANARY}", edited_at=1.0, guild_id=GUILD_OFF)
    await storage.mark_edited(81, "a logging guild's pending edit", edited_at=1.0, guild_id=GUILD_OFF + 1)
    assert raw_query(db_path, "SELECT message_id FROM message_tombstones") == [(81,)]
    await storage.close()
    assert CANARY.encode() not in raw_bytes(db_path)


@pytest.mark.parametrize("erase", ["forget-me", "guild purge"])
async def test_forget_me_and_a_guild_purge_drop_pending_edits_text(
    storage: Storage, db_path: Path, erase: str
) -> None:
    await storage.mark_edited(90, f"edited {CANARY}", edited_at=1.0)  # its message is not stored yet
    await storage.mark_deleted([91])
    if erase == "forget-me":
        await storage.delete_user_data(4242, at=2.0)
    else:
        await storage.purge_guild_messages(GUILD_OFF)
    # Deletion tombstones hold no text and stay: message 91 must still arrive deleted.
    assert raw_query(db_path, "SELECT message_id, content FROM message_tombstones") == [(91, None)]
    await storage.close()
    assert CANARY.encode() not in raw_bytes(db_path)


@pytest.mark.parametrize("change", ["delete", "edit", "bulk delete"])
async def test_deleted_or_edited_text_leaves_the_db_and_wal_within_the_bound(
    storage: Storage, db_path: Path, change: str
) -> None:
    storage.scrub_delay_seconds = 0.3
    for i in (50, 51):
        await storage.add_message(msg(i, f"{CANARY} {i} " * 20))
    assert CANARY.encode() in raw_bytes(db_path)  # the check below can fail
    if change == "delete":
        await storage.mark_deleted([50])
        await storage.mark_deleted([51])  # joins the first one's timer: one checkpoint, still bounded
    elif change == "edit":
        await storage.mark_edited(50, "fine", edited_at=99.0)
        await storage.mark_edited(51, "fine too", edited_at=99.0)
    else:
        await storage.mark_deleted([50, 51])
    assert CANARY.encode() in raw_bytes(db_path)  # still in the -wal frames right after the change
    started = asyncio.get_running_loop().time()
    await storage.wait_scrubbed()
    assert asyncio.get_running_loop().time() - started <= storage.scrub_delay_seconds + 1.0
    assert CANARY.encode() not in raw_bytes(db_path)  # the storage is still open: no close-time checkpoint
    assert b"TOMBSTONE-CANARY" not in raw_bytes(db_path)
    assert await storage.integrity_check() == "ok"


async def test_scrub_constant_is_a_bounded_named_delay() -> None:
    assert 0 < bot.storage.store.SCRUB_CHECKPOINT_DELAY_SECONDS <= 10


# -- a reply in one transaction ---------------------------------------------------------------------


async def test_add_reply_stores_every_chunk_and_the_record_or_nothing(storage: Storage) -> None:
    chunks = [
        msg(80 + i, f"part {i}", author_id=BOT, author_name="Bot", is_bot=True, reply_to_id=5)
        for i in range(3)
    ]
    with pytest.raises(ValueError, match="JSON"):  # the record fails after the chunks were inserted...
        await storage.add_reply(chunks, dataclasses.replace(record(80, 5), params={"top_p": math.nan}))
    assert [await storage.get_message(80 + i) for i in range(3)] == [None, None, None]  # ...so none stays
    assert (await storage.stats()).bot_replies == 0
    await storage.add_reply(chunks, record(80, answers_id=5))
    assert [m.content for m in await storage.recent_history(CHANNEL, 3)] == ["part 0", "part 1", "part 2"]
    assert (await storage.stats()).bot_replies == 1
    await storage.add_reply(chunks, record(80, answers_id=5))  # idempotent on replay
    assert (await storage.stats()).bot_replies == 1
