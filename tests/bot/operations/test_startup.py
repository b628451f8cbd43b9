"""Start-up fails fast: token, intent and gateway are checked while the model loads (T: issue 22)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import discord.http
import pytest

from bot.operations.startup import (
    EXIT_BAD_TOKEN,
    EXIT_MISSING_INTENT,
    EXIT_UNAVAILABLE,
    StartupError,
    check_discord,
    checked_start,
    load_while_checking,
)
from model.api import ReplyRequest
from model.prompt import Turn
from model.serving.worker import ModelWorker
from tests.helpers.fake_discord_api import fake_discord_api, free_port

ROOT = Path(__file__).resolve().parents[3]
FAIL_FAST_LIMIT_SECONDS = 15.0


@pytest.fixture
def api_at(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """Point discord.py's HTTP client at a base URL for this test only."""
    return lambda base: monkeypatch.setattr(discord.http.Route, "BASE", base)


async def test_a_closed_port_is_unreachable_in_one_line(api_at) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    api_at(f"http://127.0.0.1:{port}/api/v10")
    started = time.monotonic()
    with pytest.raises(StartupError) as failed:
        await check_discord("x")
    assert time.monotonic() - started < 5
    assert failed.value.exit_code == EXIT_UNAVAILABLE == 69
    reason = f"cannot connect to 127.0.0.1:{port} (Connection refused)"
    assert str(failed.value) == f"cannot reach Discord: {reason}; retry later (exit 69)"


@pytest.mark.parametrize(
    ("options", "code", "words"),
    [
        ({"status": 401}, EXIT_BAD_TOKEN, "rejected DISCORD_TOKEN"),
        ({"flags": 0}, EXIT_MISSING_INTENT, "Message Content intent"),
        ({"status": 503}, EXIT_UNAVAILABLE, "Discord answered HTTP 503"),
    ],
)
async def test_each_known_failure_has_its_code(api_at, options: dict, code: int, words: str) -> None:  # type: ignore[no-untyped-def]
    async with fake_discord_api(**options) as base:
        api_at(base)
        with pytest.raises(StartupError) as failed:
            await check_discord("x")
    assert failed.value.exit_code == code and words in str(failed.value)


async def test_a_good_token_with_the_intent_reaches_the_gateway(api_at) -> None:  # type: ignore[no-untyped-def]
    async with fake_discord_api() as base:
        api_at(base)
        await check_discord("x")  # login, flags, the gateway's HELLO: no error


async def test_a_silent_server_times_out_as_unreachable(api_at) -> None:  # type: ignore[no-untyped-def]
    done = asyncio.Event()

    async def accept_and_say_nothing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await done.wait()
        writer.close()

    server = await asyncio.start_server(accept_and_say_nothing, "127.0.0.1", 0)
    async with server:
        api_at(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/api/v10")
        with pytest.raises(StartupError) as failed:
            await check_discord("x", timeout_seconds=0.5)
        done.set()
    assert failed.value.exit_code == EXIT_UNAVAILABLE and "no answer within 0.5 s" in str(failed.value)


class SlowWorker:
    """A worker whose model takes a minute to load."""

    def __init__(self) -> None:
        self.is_started = self.is_closed = False

    async def start(self) -> None:
        await asyncio.sleep(60)
        self.is_started = True

    async def close(self, grace_seconds: float = 10.0) -> None:
        self.is_closed = True


async def test_the_check_fails_while_the_model_is_still_loading(api_at) -> None:  # type: ignore[no-untyped-def]
    api_at(f"http://127.0.0.1:{free_port()}/api/v10")
    worker, started = SlowWorker(), time.monotonic()
    with pytest.raises(StartupError):
        async with checked_start(lambda: worker, "x"):
            pytest.fail("the bot must not start")
    assert time.monotonic() - started < 5 and not worker.is_started and not worker.is_closed


async def test_the_check_does_not_wait_for_the_worker_to_be_made(api_at) -> None:  # type: ignore[no-untyped-def]
    api_at(f"http://127.0.0.1:{free_port()}/api/v10")

    def slow_imports() -> SlowWorker:  # importing torch on a busy machine, in its own thread
        time.sleep(3)
        return SlowWorker()

    started = time.monotonic()
    with pytest.raises(StartupError):
        async with checked_start(slow_imports, "x"):
            pytest.fail("the bot must not start")
    assert time.monotonic() - started < 2


async def test_a_started_worker_is_yielded_and_closed_after(api_at) -> None:  # type: ignore[no-untyped-def]
    class QuickWorker(SlowWorker):
        async def start(self) -> None:
            self.is_started = True

    async def passes(token: str) -> None:
        assert token == "x"

    worker = QuickWorker()
    async with checked_start(lambda: worker, "x", check=passes) as running:
        assert running is worker and worker.is_started and not worker.is_closed
    assert worker.is_closed


async def test_a_load_failure_wins_over_a_slow_check() -> None:
    async def slow_check() -> None:
        await asyncio.sleep(60)

    async def broken_load() -> None:
        raise RuntimeError("bad weights")

    with pytest.raises(RuntimeError, match="bad weights"):
        await asyncio.wait_for(load_while_checking(broken_load(), slow_check()), 5)


def test_chatbot_run_without_discord_exits_69_in_one_line_before_the_model_loads(tmp_path: Path) -> None:
    """The real command in a subprocess: no network (a closed loopback port), a model that loads for 60 s."""
    env = {**os.environ, "DISCORD_TOKEN": "x", "BOT_DATA_DIR": str(tmp_path / "data"), "HF_HUB_OFFLINE": "1"}
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "tests.helpers.unreachable_run", str(free_port())],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    elapsed = time.monotonic() - started
    assert done.returncode == EXIT_UNAVAILABLE, done.stderr
    assert elapsed < FAIL_FAST_LIMIT_SECONDS
    lines = [line for line in done.stderr.splitlines() if " INFO " not in line]  # INFO: the database opened
    assert len(lines) == 1, done.stderr
    assert " ERROR " in lines[0] and "cannot reach Discord: cannot connect to 127.0.0.1" in lines[0]
    assert "Traceback" not in done.stderr + done.stdout


async def test_the_real_worker_made_in_its_thread_serves_once_started(tiny_model_dir: Path) -> None:
    async def passes(token: str) -> None:
        return None

    async with checked_start(
        lambda: ModelWorker(str(tiny_model_dir), device="cpu"), "x", check=passes
    ) as worker:
        assert worker.is_alive()
        reply = await worker.generate(ReplyRequest(persona="A chat.", history=(Turn("alice", "hi"),)))
        assert reply.text
    assert not worker.is_alive()
