"""Process-level storage tests: SIGKILL during writes, replies and migrations; a lock held elsewhere."""

from __future__ import annotations

import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bot.storage import DatabaseBusy, Storage, StoredMessage, migrate
from bot.storage.migrations import MIGRATIONS, SCHEMA_VERSION, upgrade

REPO_ROOT = Path(__file__).resolve().parents[3]
CHILD = REPO_ROOT / "tests" / "helpers" / "storage_child.py"
WRITER_KILLS = 50
MIGRATION_KILLS = 20
MIGRATION_ROWS = 60_000  # enough rows that building the step-2 indexes takes a killable while


def start_child(*args: str) -> subprocess.Popen[str]:
    """Start tests/helpers/storage_child.py and wait until it says "ready"."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.Popen(
        [sys.executable, str(CHILD), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line != "ready\n":
        proc.kill()
        raise AssertionError(f"child did not start: {line!r} {proc.communicate()[1]}")
    return proc


def kill(proc: subprocess.Popen[str]) -> list[str]:
    """SIGKILL the child and return every line it had printed after "ready"."""
    proc.send_signal(signal.SIGKILL)
    out, _ = proc.communicate(timeout=10)
    assert proc.returncode == -signal.SIGKILL, "the child finished before the kill; lengthen its work"
    return out.splitlines()


@pytest.fixture
def child_procs() -> Iterator[list[subprocess.Popen[str]]]:
    """Children started by a test; any still running at the end are killed."""
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def check_after_writer_kill(path: Path, lines: list[str], in_flight: list[list[int]]) -> None:
    """Integrity ok, no broken FK, every acknowledged id stored, every bulk delete all-or-nothing."""
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
        stored = {row[0]: row[1] for row in conn.execute("SELECT message_id, deleted FROM messages")}
    finally:
        conn.close()
    for line in lines:
        word, *ids = line.split()
        if word == "added":
            assert int(ids[0]) in stored, f"acknowledged message {ids[0]} lost"
        elif word == "deleted":
            assert all(stored[int(i)] == 1 for i in ids), f"acknowledged delete {ids} lost"
        elif word == "deleting":
            in_flight.append([int(i) for i in ids])
    for batch in in_flight:  # a delete cut by the kill is either complete or absent
        assert sum(stored[i] for i in batch) in (0, len(batch)), batch


@pytest.mark.slow
def test_sigkill_during_writes_never_loses_acknowledged_rows(tmp_path: Path, child_procs: list) -> None:
    path = tmp_path / "data" / "chatbot.db"
    rng = random.Random(20261127)
    next_id, acknowledged = 1, 0
    for _ in range(WRITER_KILLS):
        proc = start_child("write", str(path), str(next_id))
        child_procs.append(proc)
        time.sleep(rng.uniform(0.0, 0.12))  # the random kill point, not synchronisation
        lines = kill(proc)
        check_after_writer_kill(path, lines, in_flight=[])
        added = [int(line.split()[1]) for line in lines if line.startswith("added")]
        acknowledged += len(added)
        next_id = max(added, default=next_id) + 100  # skip ids a killed, unacknowledged insert may hold
    assert acknowledged > WRITER_KILLS, "the kills landed before any write; the test proves nothing"


@pytest.fixture(scope="module")
def v1_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A closed database at schema version 1 holding MIGRATION_ROWS messages."""
    path = tmp_path_factory.mktemp("v1") / "v1.db"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    upgrade(conn, MIGRATIONS[:1])
    conn.execute("BEGIN")
    conn.execute("INSERT INTO guilds (guild_id, name) VALUES (1, 'g')")
    conn.execute("INSERT INTO channels (channel_id, guild_id, name) VALUES (2, 1, 'c')")
    conn.execute("INSERT INTO users (user_id, display_name) VALUES (3, 'u')")
    conn.executemany(
        "INSERT INTO messages (message_id, channel_id, author_id, is_bot, content, created_at) "
        "VALUES (?, 2, 3, 0, ?, ?)",
        ((i, f"text {i}", float(i)) for i in range(MIGRATION_ROWS)),
    )
    conn.execute("COMMIT")
    conn.close()
    return path


def schema_of(path: Path) -> tuple[int, list[tuple[str, str]]]:
    """The schema version and the sorted CREATE statements of a database."""
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert conn.execute("SELECT COUNT(*) FROM messages").fetchone() == (MIGRATION_ROWS,)
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        sql = conn.execute(
            "SELECT name, sql FROM sqlite_master WHERE sql IS NOT NULL ORDER BY name"
        ).fetchall()
    finally:
        conn.close()
    return version, sql


@pytest.mark.slow
def test_sigkill_during_migration_is_all_or_nothing(tmp_path: Path, v1_template: Path, child_procs: list):
    old = schema_of(v1_template)
    done = tmp_path / "done.db"
    shutil.copy(v1_template, done)
    started = time.monotonic()
    migrate(done)
    window_seconds = (time.monotonic() - started) * 1.5 + 0.05  # child start-up noise included
    new = schema_of(done)
    assert old[0] == 1 and new[0] == SCHEMA_VERSION and old[1] != new[1]
    rng = random.Random(7)
    outcomes = set()
    for attempt in range(MIGRATION_KILLS):
        path = tmp_path / f"kill{attempt}.db"
        shutil.copy(v1_template, path)
        proc = start_child("migrate", str(path))
        child_procs.append(proc)
        time.sleep(rng.uniform(0.0, window_seconds))  # the random kill point
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=10)
        after = schema_of(path)
        assert after in (old, new), f"half-migrated schema after kill {attempt}: {after}"
        outcomes.add(after[0])
    assert 1 in outcomes, "no kill landed before the migration committed; the test proves nothing"


async def test_write_lock_held_longer_than_busy_timeout_fails_clearly(
    tmp_path: Path, child_procs: list, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "chatbot.db"
    async with Storage.open(path, busy_timeout_seconds=0.5) as storage:
        await storage.add_message(StoredMessage(1, 2, 3, 4, "ann", False, "before", 1.0))
        holder = start_child("hold", str(path), "30")
        child_procs.append(holder)
        started = time.monotonic()
        with pytest.raises(DatabaseBusy, match="another process holds the database write lock"):
            await storage.add_message(StoredMessage(5, 2, 3, 4, "ann", False, "during", 2.0))
        waited_seconds = time.monotonic() - started
        assert 0.4 <= waited_seconds < 3.0, waited_seconds  # waited busy_timeout, then gave up: no hang
        assert "write lock" in caplog.text
        # Reads do not queue behind the other process's write lock.
        assert [m.content for m in await storage.recent_history(2, 10)] == ["before"]
        kill(holder)  # the lock dies with its process; the bot's next write succeeds
        assert await storage.add_message(StoredMessage(5, 2, 3, 4, "ann", False, "after", 3.0))
        assert await storage.integrity_check() == "ok"


async def test_write_lock_held_shorter_than_busy_timeout_waits_and_succeeds(
    tmp_path: Path, child_procs: list
) -> None:
    path = tmp_path / "chatbot.db"
    async with Storage.open(path, busy_timeout_seconds=10.0) as storage:
        holder = start_child("hold", str(path), "3")  # T22: another process holds the write lock 3 s
        child_procs.append(holder)
        started = time.monotonic()
        assert await storage.add_message(StoredMessage(1, 2, 3, 4, "ann", False, "waited", 1.0))
        waited_seconds = time.monotonic() - started
        assert holder.wait(timeout=10) == 0
        assert 2.5 <= waited_seconds < 8.0, waited_seconds
        assert (await storage.get_message(1)) is not None


REPLY_KILLS = 120
REPLY_CHUNKS = 3  # tests/helpers/storage_child.py sends every reply as 3 chunks


def spawn_converser(path: Path) -> subprocess.Popen[str]:
    """Start a `converse` child; it imports, then waits for "go FIRST_ID" (so the next one starts early)."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.Popen(
        [sys.executable, str(CHILD), "converse", str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def go(proc: subprocess.Popen[str], first_id: int) -> None:
    """Let a spawned child open the database and wait until it says "ready"."""
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(f"go {first_id}\n")
    proc.stdin.flush()
    line = proc.stdout.readline()
    if line != "ready\n":
        proc.kill()
        raise AssertionError(f"child did not start: {line!r} {proc.communicate()[1]}")


def check_after_converser_kill(path: Path, lines: list[str]) -> tuple[int, int]:
    """Integrity ok; every acknowledged message and reply stored; every reply whole or absent."""
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        user_ids = {row[0] for row in conn.execute("SELECT message_id FROM messages WHERE is_bot = 0")}
        chunks = dict(
            conn.execute("SELECT reply_to_id, COUNT(*) FROM messages WHERE is_bot = 1 GROUP BY reply_to_id")
        )
        records = dict(conn.execute("SELECT answers_message_id, reply_message_id FROM bot_replies"))
    finally:
        conn.close()
    for answered in set(chunks) | set(records):  # no half-written reply, acknowledged or not
        found = (chunks.get(answered), records.get(answered))
        assert found == (REPLY_CHUNKS, answered + 1), f"half-written reply to {answered}: {found}"
    messages = [int(line.split()[1]) for line in lines if line.startswith("message ")]
    replies = [int(line.split()[1]) for line in lines if line.startswith("reply ")]
    assert set(messages) <= user_ids, f"acknowledged messages lost: {set(messages) - user_ids}"
    assert all(base in records for base in replies), "an acknowledged reply was lost"
    return len(messages), len(replies)


def test_sigkill_while_recording_replies_never_leaves_half_a_reply(tmp_path: Path, child_procs: list) -> None:
    path = tmp_path / "data" / "chatbot.db"
    rng = random.Random(20261207)
    next_id, acknowledged_replies = 1, 0
    started = time.monotonic()
    proc = spawn_converser(path)
    child_procs.append(proc)
    for _ in range(REPLY_KILLS):
        go(proc, next_id)
        following = spawn_converser(path)  # imports while this one runs
        child_procs.append(following)
        time.sleep(rng.uniform(0.0, 0.08))  # the random kill point, not synchronisation
        lines = kill(proc)
        acknowledged_replies += check_after_converser_kill(path, lines)[1]
        ids = [int(line.split()[1]) for line in lines if line.split()[0] in ("message", "reply")]
        next_id = max(ids, default=next_id) + 100  # past any unacknowledged id the kill cut short
        proc = following
    elapsed = time.monotonic() - started
    assert acknowledged_replies > REPLY_KILLS, "the kills landed before any reply; the test proves nothing"
    print(f"{REPLY_KILLS} kills in {elapsed:.1f}s, {acknowledged_replies} acknowledged replies")
