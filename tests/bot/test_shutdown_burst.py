"""SIGTERM during a burst: every message delivered before the shutdown began is stored and answered or told.

A burst of 16 messages is delivered at once; the shutdown starts while their handlers are still storing them
(also with every write slowed down, as on a busy disk). The database must not close under them.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import pytest

from bot.storage import Storage
from bot.text import SHUTDOWN_REPLY
from tests.helpers.discord_harness import running_bot
from tests.helpers.fakes import FakeGenerator

BURST = 16
WRITE_DELAY_SECONDS = 0.03  # real time, in a thread: like +30 ms an fsync


def stored_ids(db_path: Path) -> set[int]:
    with sqlite3.connect(db_path) as db:
        return {row[0] for row in db.execute("SELECT message_id FROM messages WHERE is_bot = 0")}


@pytest.mark.parametrize("slow_writes", [False, True])
async def test_sigterm_during_a_burst_stores_and_answers_every_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, slow_writes: bool
) -> None:
    if slow_writes:
        real_add = Storage.add_message

        async def slow_add(self: Storage, *args: object, **kwargs: object) -> bool:
            await asyncio.to_thread(time.sleep, WRITE_DELAY_SECONDS)
            return await real_add(self, *args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(Storage, "add_message", slow_add)
    generator = FakeGenerator(["answer"] * BURST)
    async with running_bot(tmp_path, generator=generator, shutdown_grace_seconds=10, cooldown_seconds=0) as h:
        assert h.bot.user is not None
        users = [h.alice, h.bob]
        burst = [
            h.env.backend.create_message(h.channel.id, users[n % 2].id, f"{h.bot.user.mention} question {n}")
            for n in range(BURST)
        ]
        await asyncio.sleep(0)  # the gateway has delivered them: their handlers are running
        stopping = h.bot.request_shutdown("SIGTERM (simulated)")
        for _ in range(100):
            if stopping.done():
                break
            await h.env.advance_time(0.2)
            await asyncio.sleep(0.01)
        await stopping
        replies = h.bot_messages()
    asked = {m.id for m in burst}
    assert stored_ids(h.bot.settings.db_path) == asked  # before: "database is closed", none stored
    answered = {m.reference.message_id for m in replies if m.reference}
    assert answered == asked and len(replies) == BURST
    assert {m.content for m in replies} <= {"answer", SHUTDOWN_REPLY}
