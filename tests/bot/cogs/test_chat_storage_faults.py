"""The Discord bot keeps answering when it cannot store: a full disk (T23) and a lock held elsewhere (T22).

simcord with real discord.py and a real SQLite file. The full disk is SQLite's own SQLITE_FULL reached through
`PRAGMA max_page_count` on the bot's write connection (no filesystem can be mounted here); the lock is held by
a real second process (tests/helpers/storage_child.py hold).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bot.storage import DatabaseFull, Storage, StoredMessage
from tests.helpers.discord_harness import Harness, running_bot

REPO_ROOT = Path(__file__).resolve().parents[3]
CHILD = REPO_ROOT / "tests" / "helpers" / "storage_child.py"
CANARY = "DISK-FULL-CANARY-5e77"


def mention(h: Harness, text: str) -> str:
    assert h.bot.user is not None
    return f"{h.bot.user.mention} {text}"


async def fill_the_disk(storage: Storage) -> None:
    """Let the file grow no further, then use up its free pages: every insert now fails with SQLITE_FULL."""
    async with storage._writer.execute("PRAGMA page_count") as cursor:
        row = await cursor.fetchone()
    assert row is not None
    await storage._writer.execute(f"PRAGMA max_page_count = {int(row[0])}")
    filler = 10**9
    for size in (3000, 300, 30, 1):  # large rows, then smaller ones into what is left of the pages
        while True:
            filler += 1
            try:
                await storage.add_message(StoredMessage(filler, 1, None, 1, "filler", False, "x" * size, 0.0))
            except DatabaseFull:
                break
    storage.failed_writes = 0


async def free_the_disk(storage: Storage) -> None:
    await storage._writer.execute("PRAGMA max_page_count = 1073741823")


async def test_a_full_disk_leaves_the_bot_answering_and_storing_again_when_space_returns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with running_bot(tmp_path) as h:
        await h.alice.send(h.channel, "stored before the disk filled up")
        await fill_the_disk(h.storage)
        h.generator.replies.extend(["still here", "and stored again"])
        lost = await h.alice.send(h.channel, mention(h, f"{CANARY} " * 60))
        assert [m.content for m in h.bot_messages()] == ["still here"]  # answered all the same
        assert h.generator.requests[-1].history[-1].text.startswith(CANARY)  # from what it has
        assert await h.storage.get_message(lost.id) is None
        assert h.storage.failed_writes >= 2  # the message and the reply: counted
        assert "is full" in caplog.text and "not stored" in caplog.text
        assert CANARY not in caplog.text  # logged without the text
        assert "Traceback" not in caplog.text
        await free_the_disk(h.storage)
        later = await h.alice.send(h.channel, mention(h, "space is back"))
        assert [m.content for m in h.bot_messages()][-1] == "and stored again"
        stored = await h.storage.get_message(later.id)
        assert stored is not None and stored.content == "space is back"
        reply = await h.storage.get_message(h.bot_messages()[-1].id)
        assert reply is not None and reply.content == "and stored again"
        assert await h.storage.integrity_check() == "ok"


def hold_lock(path: Path, seconds: float) -> subprocess.Popen[str]:
    """Another process takes the database's write lock and keeps it; returns once it holds it."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.Popen(
        [sys.executable, str(CHILD), "hold", str(path), str(seconds)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
    return proc


async def test_a_lock_held_past_busy_timeout_leaves_the_bot_answering(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with running_bot(tmp_path, db_busy_timeout_seconds=0.5) as h:
        await h.alice.send(h.channel, "said before the lock")
        holder = hold_lock(h.bot.settings.db_path, 30)  # T22: 30 s, far past busy_timeout
        try:
            h.generator.replies.append("answered anyway")
            during = await h.alice.send(h.channel, mention(h, "are you there?"))
            assert [m.content for m in h.bot_messages()] == ["answered anyway"]
            assert [t.text for t in h.generator.requests[-1].history] == [
                "said before the lock",
                "are you there?",
            ]
            assert await h.storage.get_message(during.id) is None
            assert "another process holds the database write lock" in caplog.text
            assert "Traceback" not in caplog.text
        finally:
            holder.kill()
            holder.communicate()
        after = await h.alice.send(h.channel, "the lock is gone")
        assert await h.storage.get_message(after.id) is not None
