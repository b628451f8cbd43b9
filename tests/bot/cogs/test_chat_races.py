"""A deleted message stays deleted whatever the order of events (simcord, real discord.py, real SQLite).

The orders are forced with gates, not timed: the create's handler is held at a named point inside storage,
the raw delete (or edit) is delivered and handled to the end, then the create is released. After each: the
deleted text is in no table, no prompt (FakeGenerator records every request), no export row, and, after the
scrub checkpoint, not in the bytes of the .db or -wal file.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

import bot.storage.store
from bot.storage import Storage, StoredMessage
from tests.helpers.discord_harness import Harness, running_bot

SECRET = "PASSWORD-hunter2-7d41"
SPAM = "SPAM-CANARY-0b9e stored before the purge"
WAIT_SECONDS = 10.0  # a bound for each gate, so a broken order fails instead of hanging


class Gate:
    """Holds the create handler of the message holding SECRET at one point until released."""

    def __init__(self) -> None:
        self.reached = asyncio.Event()
        self.opened = asyncio.Event()

    async def hold(self, content: str) -> None:
        if SECRET in content:
            self.reached.set()
            await asyncio.wait_for(self.opened.wait(), WAIT_SECONDS)

    async def reached_in_time(self) -> None:
        await asyncio.wait_for(self.reached.wait(), WAIT_SECONDS)


def hold_before_insert(monkeypatch: pytest.MonkeyPatch, storage: Storage, gate: Gate) -> None:
    """The create handler has started (the event arrived) but its insert has not begun."""
    real = storage.add_message

    async def held(message: StoredMessage, *rest: Any) -> bool:  # rest: the mentioned users
        await gate.hold(message.content)
        return await real(message, *rest)

    monkeypatch.setattr(storage, "add_message", held)


def hold_inside_insert(monkeypatch: pytest.MonkeyPatch, gate: Gate) -> None:
    """The insert's transaction is open and holds the write lock."""
    real = bot.storage.store._insert_message

    async def held(db: Any, message: StoredMessage) -> StoredMessage | None:
        await gate.hold(message.content)
        return await real(db, message)

    monkeypatch.setattr(bot.storage.store, "_insert_message", held)


def hold_after_insert(monkeypatch: pytest.MonkeyPatch, storage: Storage, gate: Gate) -> None:
    """The insert has committed; the handler has not yet built the prompt."""
    real = storage.add_message

    async def held(message: StoredMessage, *rest: Any) -> bool:  # rest: the mentioned users
        stored = await real(message, *rest)
        await gate.hold(message.content)
        return stored

    monkeypatch.setattr(storage, "add_message", held)


def watch(monkeypatch: pytest.MonkeyPatch, storage: Storage, name: str) -> asyncio.Event:
    """An event set when the storage method `name` (mark_deleted / mark_edited) has committed."""
    real: Callable[..., Awaitable[Any]] = getattr(storage, name)
    done = asyncio.Event()

    async def watched(*args: Any) -> Any:
        result = await real(*args)
        done.set()
        return result

    monkeypatch.setattr(storage, name, watched)
    return done


def raw_bytes(path: Path) -> bytes:
    return b"".join(Path(f"{path}{s}").read_bytes() for s in ("", "-wal") if Path(f"{path}{s}").exists())


def table_texts(path: Path) -> str:
    """Every text value of every table, read on a separate connection."""
    conn = sqlite3.connect(path)
    try:
        tables = [row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return "\n".join(str(row) for table in tables for row in conn.execute(f"SELECT * FROM {table}"))
    finally:
        conn.close()


async def assert_secret_gone(h: Harness, secret: str = SECRET) -> None:
    """In no table, no prompt, no export row, and (after the scrub) not in the .db or -wal bytes."""
    path = h.bot.settings.db_path
    assert secret not in table_texts(path)
    prompts = [turn.text for request in h.generator.requests for turn in request.history]
    assert not any(secret in text for text in prompts), prompts
    assert h.generator.requests, "nothing was prompted: the check above proved nothing"
    await h.storage.set_guild_training_export(h.guild.id, True)
    await h.storage.set_training_opt_in(h.alice.id, True, at=0.0)
    exported = [row.message.content async for row in h.storage.export_rows()]
    assert exported and not any(secret in text for text in exported)
    await h.storage.wait_scrubbed()
    assert secret.encode() not in raw_bytes(path)


def mention(h: Harness, text: str) -> str:
    assert h.bot.user is not None
    return f"{h.bot.user.mention} {text}"


async def converse_first(h: Harness) -> None:
    """Some history, so there is a later prompt to look into; the bot answers a mention."""
    await h.alice.send(h.channel, "earlier words")
    await h.alice.send(h.channel, mention(h, "hi there"))


async def ask_again(h: Harness) -> None:
    """A later message whose prompt would show the secret if it were still stored."""
    await h.bob.send(h.channel, mention(h, "what did alice say?"))


@asynccontextmanager
async def started(tmp_path: Path) -> AsyncIterator[Harness]:
    """The bot in simcord after a first exchange, its scrub delay short for the test."""
    async with running_bot(tmp_path) as harness:
        harness.storage.scrub_delay_seconds = 0.2
        await converse_first(harness)
        yield harness


async def test_delete_before_insert(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with started(tmp_path) as h:
        gate = Gate()
        hold_before_insert(monkeypatch, h.storage, gate)
        deleted = watch(monkeypatch, h.storage, "mark_deleted")
        secret = h.env.backend.create_message(h.channel.id, h.alice.id, mention(h, f"my {SECRET}"))
        await gate.reached_in_time()
        h.env.backend.delete_message(h.channel.id, secret.id)  # "oops": deleted before the bot stored it
        await asyncio.wait_for(deleted.wait(), WAIT_SECONDS)
        gate.opened.set()
        await h.env.settle()
        stored = await h.storage.get_message(secret.id)
        assert stored is not None and stored.deleted and stored.content == ""
        assert len(h.bot_messages()) == 1  # the deleted message itself is not answered
        await ask_again(h)
        await assert_secret_gone(h)


async def test_delete_during_insert(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with started(tmp_path) as h:
        inside, after = Gate(), Gate()
        hold_inside_insert(monkeypatch, inside)
        hold_after_insert(monkeypatch, h.storage, after)
        deleted = watch(monkeypatch, h.storage, "mark_deleted")
        secret = h.env.backend.create_message(h.channel.id, h.alice.id, mention(h, f"my {SECRET}"))
        await inside.reached_in_time()  # the insert's transaction holds the write lock
        h.env.backend.delete_message(h.channel.id, secret.id)
        await asyncio.sleep(0.05)
        assert not deleted.is_set()  # the delete waits for the insert, it is not lost
        inside.opened.set()
        await after.reached_in_time()  # the insert committed ...
        await asyncio.wait_for(deleted.wait(), WAIT_SECONDS)  # ... then the delete erased it
        after.opened.set()  # only now does the handler build its prompt
        await h.env.settle()
        await ask_again(h)
        await assert_secret_gone(h)


async def test_edit_before_insert(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with started(tmp_path) as h:
        gate = Gate()
        hold_before_insert(monkeypatch, h.storage, gate)
        edited = watch(monkeypatch, h.storage, "mark_edited")
        secret = h.env.backend.create_message(h.channel.id, h.alice.id, mention(h, f"my {SECRET}"))
        await gate.reached_in_time()
        h.env.backend.edit_message(h.channel.id, secret.id, {"content": mention(h, "never mind")})
        await asyncio.wait_for(edited.wait(), WAIT_SECONDS)
        gate.opened.set()
        await h.env.settle()
        stored = await h.storage.get_message(secret.id)
        assert stored is not None and stored.content == "never mind" and stored.edited_at is not None
        assert h.generator.requests[-1].history[-1].text == "never mind"  # its own reply saw the edit
        await ask_again(h)
        await assert_secret_gone(h)


@pytest.mark.parametrize("hold", ["before insert", "inside insert"])
async def test_bulk_delete_races(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hold: str) -> None:
    async with started(tmp_path) as h:
        first, after = Gate(), Gate()
        if hold == "before insert":
            hold_before_insert(monkeypatch, h.storage, first)
        else:
            hold_inside_insert(monkeypatch, first)
            hold_after_insert(monkeypatch, h.storage, after)
        deleted = watch(monkeypatch, h.storage, "mark_deleted")
        spam = await h.bob.send(h.channel, SPAM)
        secret = h.env.backend.create_message(h.channel.id, h.alice.id, mention(h, f"my {SECRET}"))
        await first.reached_in_time()
        h.env.backend.bulk_delete_messages(h.channel.id, [spam.id, secret.id])  # a moderator's purge
        if hold == "before insert":
            await asyncio.wait_for(deleted.wait(), WAIT_SECONDS)
            first.opened.set()
        else:
            await asyncio.sleep(0.05)
            assert not deleted.is_set()  # queued behind the insert's transaction
            first.opened.set()
            await after.reached_in_time()
            await asyncio.wait_for(deleted.wait(), WAIT_SECONDS)
            after.opened.set()
        await h.env.settle()
        await ask_again(h)
        await assert_secret_gone(h)
        await assert_secret_gone(h, secret=SPAM)
