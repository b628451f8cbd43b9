"""Signals and bad input at the real `chatbot console` / `chatbot run` processes (pty and pipes).

Ctrl+C at the idle `you>` prompt exits at once (130); SIGTERM exits 0 after the reply in progress; invalid
UTF-8 and lone surrogates are stored with U+FFFD instead of crashing; `chatbot run` stopped by SIGTERM while
it loads the model exits 0. Each time the database is closed cleanly: SQLite removes the `-wal` file when
the last connection closes, and it is there while the console runs.
"""

from __future__ import annotations

import io
import os
import pty
import select
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from bot.config import Settings
from bot.console import run_console
from tests.helpers.fakes import FakeGenerator

CLI = [sys.executable, "-m", "bot.cli"]


def console_env(tmp_path: Path, model_dir: Path) -> dict[str, str]:
    return {**os.environ, "BOT_DATA_DIR": str(tmp_path / "data"), "BOT_MODEL": str(model_dir),
            "BOT_MAX_NEW_TOKENS": "8", "HF_HUB_OFFLINE": "1"}  # fmt: skip


def read_until(fd: int, marker: bytes, timeout: float = 120.0) -> bytes:
    """Bytes from fd until `marker` shows up (or the timeout)."""
    seen, deadline = b"", time.monotonic() + timeout
    while marker not in seen and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # the pty closed: the child exited
                break
            seen += chunk
    assert marker in seen, seen[-2000:]
    return seen


def contents(db_path: Path) -> list[str]:
    with sqlite3.connect(db_path) as db:
        return [row[0] for row in db.execute("SELECT content FROM messages ORDER BY message_id")]


def test_ctrl_c_at_the_idle_prompt_exits_at_once(tmp_path: Path, tiny_model_dir: Path) -> None:
    main_fd, child_fd = pty.openpty()
    child = subprocess.Popen([*CLI, "--env-file", str(tmp_path / "none"), "console"], stdin=child_fd,
                             stdout=child_fd, stderr=child_fd, env=console_env(tmp_path, tiny_model_dir),
                             close_fds=True)  # fmt: skip
    os.close(child_fd)
    try:
        read_until(main_fd, b"you> ")
        db = tmp_path / "data" / "chatbot.db"
        assert Path(f"{db}-wal").exists()  # the console has the database open
        sent = time.monotonic()
        child.send_signal(signal.SIGINT)
        assert child.wait(timeout=10) == 130  # before: blocked until Enter (the executor's readline)
        assert time.monotonic() - sent < 5
        assert not Path(f"{db}-wal").exists(), "the database was not closed"
    finally:
        if child.poll() is None:
            child.kill()
        os.close(main_fd)


def test_sigterm_ends_the_console_cleanly_and_bad_bytes_are_kept(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    child = subprocess.Popen([*CLI, "--env-file", str(tmp_path / "none"), "console"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             env=console_env(tmp_path, tiny_model_dir))  # fmt: skip
    assert child.stdin is not None and child.stdout is not None
    try:
        child.stdin.write(b"caf\xe9 and \xed\xa0\x80 ok\n")  # Latin-1, and a UTF-8-encoded lone surrogate
        child.stdin.flush()
        assert child.stdout.readline().startswith(b"bot: ")
        child.send_signal(signal.SIGTERM)  # stdin still open: the console is idle, waiting for a line
        assert child.wait(timeout=10) == 0  # before: -15
        assert b"Traceback" not in child.stderr.read()  # type: ignore[union-attr]
    finally:
        if child.poll() is None:
            child.kill()
    db = tmp_path / "data" / "chatbot.db"
    assert not Path(f"{db}-wal").exists(), "the database was not closed"
    stored = contents(db)
    assert stored[0].startswith("caf\ufffd and ") and stored[0].endswith(" ok") and len(stored) == 2


async def test_lone_surrogates_are_replaced_not_fatal(tmp_path: Path) -> None:
    settings = Settings.from_env({"BOT_DATA_DIR": str(tmp_path / "data")})
    out = io.StringIO()
    code = await run_console(
        settings, FakeGenerator(["fine"]), stdin=io.StringIO("lone \ud800 here\n"), stdout=out
    )
    assert code == 0 and out.getvalue() == "bot: fine\n"
    stored = contents(settings.db_path)
    assert stored[0].startswith("lone \ufffd") and stored[0].endswith(" here")


def test_chatbot_run_stopped_while_loading_the_model_exits_0(tmp_path: Path, tiny_model_dir: Path) -> None:
    env = {**console_env(tmp_path, tiny_model_dir), "DISCORD_TOKEN": "MTIz.fake.token-never-sent"}
    child = subprocess.Popen([*CLI, "--env-file", str(tmp_path / "none"), "run"], stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)  # fmt: skip
    assert child.stderr is not None
    try:
        read_until(child.stderr.fileno(), b"starting: opening the database and loading the model")
        child.send_signal(signal.SIGTERM)  # torch is still being imported: the model is not loaded yet
        assert child.wait(timeout=60) == 0  # before: -15
        rest = child.stderr.read()
        assert b"stopped by a signal before serving" in rest and b"Traceback" not in rest
    finally:
        if child.poll() is None:
            child.kill()
