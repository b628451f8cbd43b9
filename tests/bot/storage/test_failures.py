"""Conditions an operator meets: each is one clear line (never a traceback), and a full disk is survived.

Read-only files are real (chmod, with the process's DAC override dropped by `setpriv` when tests run as root);
a full disk is SQLite's own SQLITE_FULL, reached through `PRAGMA max_page_count` (the same error path as a
full filesystem, which cannot be mounted here without root devices).
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from bot.storage import DatabaseFull, DatabaseUnavailable, Storage, StoredMessage, migrate, storage_failure

REPO_ROOT = Path(__file__).resolve().parents[3]
EXIT_CONFIG = 2
EXIT_STORAGE = 4
CONFIG_HEADER = "chatbot: invalid configuration:"  # bot.config's errors: this line, then one per setting


def msg(message_id: int, content: str = "hello") -> StoredMessage:
    return StoredMessage(message_id, 10, 1, 100, "ann", False, content, float(message_id))


def chatbot(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`python -m bot ARGS` on this data folder, without root's permission override (real read-only files)."""
    prefix: list[str] = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: file permissions cannot be enforced")
        prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "BOT_DATA_DIR": str(data_dir), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [
            *prefix,
            sys.executable,
            "-c",
            "import sys; from bot.cli import main; sys.exit(main(sys.argv[1:]))",
            "--env-file",
            os.devnull,
            *args,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        cwd=data_dir.parent,
    )


def assert_one_line(result: subprocess.CompletedProcess[str], code: int, expected: str) -> None:
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip() and line != CONFIG_HEADER]
    assert len(lines) == 1 and expected in lines[0], result.stderr
    assert result.returncode == code


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    path = tmp_path / "data"
    path.mkdir()
    return path


# -- at start --------------------------------------------------------------------------------------


def test_a_file_that_is_not_a_database_is_one_line_and_left_alone(data_dir: Path) -> None:
    garbage = b"these are not the pages you are looking for\n" * 200
    (data_dir / "chatbot.db").write_bytes(garbage)
    result = chatbot(data_dir, "db", "check")
    assert_one_line(result, EXIT_STORAGE, "chatbot.db is not a SQLite database")
    assert "restore a backup" in result.stderr
    assert (data_dir / "chatbot.db").read_bytes() == garbage


async def test_not_a_database_raises_the_storage_error(data_dir: Path) -> None:
    (data_dir / "chatbot.db").write_bytes(b"\x00garbage" * 1000)
    with pytest.raises(DatabaseUnavailable, match="is not a SQLite database"):
        await Storage.open(data_dir / "chatbot.db")


@pytest.mark.parametrize("what", ["file", "folder"])
def test_a_read_only_database_at_start_is_one_line(data_dir: Path, what: str) -> None:
    db = data_dir / "chatbot.db"
    if what == "file":  # SQLite would open it read-only without a word, and fail every write later
        migrate(db)
        db.chmod(0o444)
        code, expected = EXIT_STORAGE, "chatbot.db is read-only"
    else:  # no file yet, and the folder is read-only: bot.config refuses it before anything opens
        code, expected = EXIT_CONFIG, "BOT_DATA_DIR folder"
    data_dir.chmod(0o555 if what == "folder" else 0o755)
    try:
        result = chatbot(data_dir, "db", "check")
    finally:
        data_dir.chmod(0o755)
    assert_one_line(result, code, expected)
    assert "writable" in result.stderr


# -- while running ---------------------------------------------------------------------------------


async def test_database_made_read_only_while_running_fails_the_write_clearly_and_recovers(
    tmp_path: Path,
) -> None:
    async with Storage.open(tmp_path / "chatbot.db") as storage:
        assert await storage.add_message(msg(1, "before"))
        await storage._writer.execute("PRAGMA query_only = ON")  # SQLite's SQLITE_READONLY, as a ro remount
        with pytest.raises(DatabaseUnavailable, match="is read-only"):
            await storage.add_message(msg(2, "during"))
        assert storage.failed_writes == 1
        assert [m.content for m in await storage.recent_history(10, 5)] == ["before"]  # reads go on
        await storage._writer.execute("PRAGMA query_only = OFF")
        assert await storage.add_message(msg(2, "after"))
        assert await storage.integrity_check() == "ok"


@pytest.mark.parametrize(
    ("code", "text", "expected"),
    [
        (sqlite3.SQLITE_IOERR_WRITE, "disk I/O error", "disk I/O error on the database"),
        (sqlite3.SQLITE_READONLY, "attempt to write a readonly database", "is read-only"),
        (sqlite3.SQLITE_CANTOPEN, "unable to open database file", "cannot open the database"),
        (sqlite3.SQLITE_FULL, "database or disk is full", "is full"),
    ],
)
def test_each_sqlite_failure_has_its_line(tmp_path: Path, code: int, text: str, expected: str) -> None:
    exc = sqlite3.OperationalError(text)
    exc.sqlite_errorcode = code  # type: ignore[attr-defined]  # as the sqlite3 module sets it
    failure = storage_failure(exc, tmp_path / "chatbot.db")
    assert expected in str(failure) and str(tmp_path) in str(failure)
    assert isinstance(failure, DatabaseFull if code == sqlite3.SQLITE_FULL else DatabaseUnavailable)


async def fill_the_disk(storage: Storage) -> None:
    """Let the database grow no further: SQLite then reports SQLITE_FULL, as for a full filesystem."""
    async with storage._writer.execute("PRAGMA page_count") as cursor:
        row = await cursor.fetchone()
    assert row is not None
    await storage._writer.execute(f"PRAGMA max_page_count = {int(row[0])}")


async def free_the_disk(storage: Storage) -> None:
    await storage._writer.execute("PRAGMA max_page_count = 1073741823")


async def test_a_full_disk_fails_the_write_clearly_and_storing_resumes_when_space_returns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "FULL-DISK-CANARY-93"
    async with Storage.open(tmp_path / "chatbot.db") as storage:
        assert await storage.add_message(msg(1, "before"))
        await fill_the_disk(storage)
        for i in range(2, 5):
            with pytest.raises(DatabaseFull, match="is full"):
                await storage.add_message(msg(i, f"{secret} {i} " * 400))  # needs new pages
        assert storage.failed_writes == 3
        assert secret not in caplog.text  # logged and counted, never with the text
        assert "a database write failed (3 so far)" in caplog.text
        await free_the_disk(storage)
        assert await storage.add_message(msg(5, "space is back " * 400))
        assert [m.message_id for m in await storage.recent_history(10, 10)] == [1, 5]
        assert await storage.integrity_check() == "ok"
