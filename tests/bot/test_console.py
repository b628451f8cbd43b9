"""The terminal chat: scripted through a pipe, history persisted, /reset; and the real `chatbot console`."""

from __future__ import annotations

import io
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from bot.config import Settings
from bot.console import CONSOLE_BOT_ID, ConsoleChat, channel_id_for, run_console
from bot.conversation import ConversationService
from bot.storage import Storage
from tests.helpers.console import run_console_process
from tests.helpers.fakes import FakeGenerator


def settings_for(tmp_path: Path) -> Settings:
    return Settings.from_env({"BOT_DATA_DIR": str(tmp_path / "data")})


def stored_rows(db_path: Path) -> list[tuple[int, str]]:
    with sqlite3.connect(db_path) as db:
        return db.execute("SELECT is_bot, content FROM messages ORDER BY message_id").fetchall()


async def test_piped_lines_get_one_bot_line_each_and_are_stored(tmp_path: Path) -> None:
    out = io.StringIO()
    fake = FakeGenerator(["Hi there!", "Fine, thanks."])
    code = await run_console(
        settings_for(tmp_path), fake, stdin=io.StringIO("hello\n\nhow are you?\n"), stdout=out
    )
    assert code == 0
    assert out.getvalue().splitlines() == ["bot: Hi there!", "bot: Fine, thanks."]
    rows = stored_rows(settings_for(tmp_path).db_path)
    assert rows == [(0, "hello"), (1, "Hi there!"), (0, "how are you?"), (1, "Fine, thanks.")]


async def test_history_persists_across_runs_and_reset_starts_over(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    fake = FakeGenerator()
    await run_console(settings, fake, stdin=io.StringIO("first\n"), stdout=io.StringIO())
    await run_console(settings, fake, stdin=io.StringIO("second\n"), stdout=io.StringIO())
    assert fake.requests[-1].history[0].text == "first"
    await run_console(settings, fake, stdin=io.StringIO("/reset\nthird\n"), stdout=io.StringIO())
    assert [t.text for t in fake.requests[-1].history] == ["third"]


async def test_channels_are_separate_conversations(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    fake = FakeGenerator()
    await run_console(settings, fake, channel="a", stdin=io.StringIO("in a\n"), stdout=io.StringIO())
    await run_console(settings, fake, channel="b", stdin=io.StringIO("in b\n"), stdout=io.StringIO())
    assert [t.text for t in fake.requests[-1].history] == ["in b"]
    assert channel_id_for("a") != channel_id_for("b")


async def test_busy_generator_is_reported_not_fatal(tmp_path: Path) -> None:
    out = io.StringIO()
    await run_console(
        settings_for(tmp_path), FakeGenerator(queue_size=0), stdin=io.StringIO("hi\n"), stdout=out
    )
    assert out.getvalue().startswith("bot: (no reply:")


@pytest.mark.slow
def test_chatbot_console_with_a_real_tiny_model(tmp_path: Path, tiny_model_dir: Path) -> None:
    env = {
        **os.environ,
        "BOT_DATA_DIR": str(tmp_path / "data"),
        "BOT_MODEL": str(tiny_model_dir),
        "BOT_MAX_NEW_TOKENS": "12",
        "HF_HUB_OFFLINE": "1",
    }
    result = run_console_process(tmp_path / "none", env, "hello\nhow are you?\n")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2 and all(line.startswith("bot: ") and len(line) > 5 for line in lines), lines
    rows = stored_rows(tmp_path / "data" / "chatbot.db")
    assert [is_bot for is_bot, _ in rows] == [0, 1, 0, 1]


def test_train_and_eval_hand_their_flags_through(capsys: pytest.CaptureFixture[str]) -> None:
    from bot.cli import main

    with pytest.raises(SystemExit):
        main(["--env-file", "/nonexistent", "train", "--help"])
    assert "--from_scratch" in capsys.readouterr().out  # model.training.train's own help, not chatbot's
    with pytest.raises(SystemExit):
        main(["--env-file", "/nonexistent", "models", "--bogus"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


async def test_a_lock_held_elsewhere_leaves_the_console_answering(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """T22 for the console: like the Discord bot it keeps answering; what it cannot store is logged."""
    settings = Settings.from_env(
        {"BOT_DATA_DIR": str(tmp_path / "data"), "BOT_DB_BUSY_TIMEOUT_SECONDS": "0.3"}
    )
    await run_console(settings, FakeGenerator(), stdin=io.StringIO("before\n"), stdout=io.StringIO())
    child = Path(__file__).resolve().parents[1] / "helpers" / "storage_child.py"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    holder = subprocess.Popen(
        [sys.executable, str(child), "hold", str(settings.db_path), "30"],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "ready\n"
        out = io.StringIO()
        fake = FakeGenerator(["one", "two"])
        code = await run_console(settings, fake, stdin=io.StringIO("during\n/reset\nstill?\n"), stdout=out)
    finally:
        holder.kill()
        holder.communicate()
    assert code == 0
    assert out.getvalue().splitlines() == [
        "bot: one",
        "(the database is unavailable: the conversation was not reset)",
        "bot: two",
    ]
    assert [t.text for t in fake.requests[-1].history] == ["before", "hello from the fake model", "still?"]
    assert "another process holds the database write lock" in caplog.text
    assert stored_rows(settings.db_path) == [(0, "before"), (1, "hello from the fake model")]


async def test_a_full_disk_leaves_the_console_answering_and_storing_again(tmp_path: Path) -> None:
    """T23 for the console: SQLite's SQLITE_FULL (max_page_count); storing resumes when space returns."""
    settings = settings_for(tmp_path)
    async with Storage.open(settings.db_path) as storage:
        service = ConversationService(
            storage, FakeGenerator(["a", "b"]), settings, bot_user_id=CONSOLE_BOT_ID
        )
        out = io.StringIO()
        chat = ConsoleChat(service, "console", "User", out)
        await storage._writer.execute("PRAGMA max_page_count = 1")  # no page can be added: full
        assert await chat.handle_line("lost " * 2000)
        assert storage.failed_writes >= 1
        await storage._writer.execute("PRAGMA max_page_count = 1073741823")
        assert await chat.handle_line("kept")
    assert out.getvalue().splitlines() == ["bot: a", "bot: b"]
    assert stored_rows(settings.db_path)[-2:] == [(0, "kept"), (1, "b")]


async def test_a_console_channels_facts_reach_its_prompts_only(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    async with Storage.open(settings.db_path) as storage:
        await storage.add_fact(channel_id_for("a"), None, 1, "the llama is called Pat", 0.0, limit=10)
    fake = FakeGenerator()
    await run_console(settings, fake, channel="a", stdin=io.StringIO("who?\n"), stdout=io.StringIO())
    await run_console(settings, fake, channel="b", stdin=io.StringIO("who?\n"), stdout=io.StringIO())
    assert [request.facts for request in fake.requests] == [("the llama is called Pat",), ()]
