"""The composition root: clean shutdown, signal handlers, exit codes for a bad token or a missing intent."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import discord
import pytest

from bot.chatbot import COG_MODULES, ChatBot, shutdown
from bot.discord_app import (
    EXIT_BAD_TOKEN,
    EXIT_MISSING_INTENT,
    EXIT_OK,
    install_signal_handlers,
    remove_signal_handlers,
    run_bot,
    serve,
)
from bot.storage import Storage
from tests.helpers.discord_harness import make_settings, running_bot
from tests.helpers.fake_discord_api import free_port
from tests.helpers.fakes import FakeGenerator

TOKEN = "MTIzNDU2Nzg5MDEy.Gabcde.this-is-not-a-real-token-value"


@pytest.fixture
async def offline_bot(tmp_path: Path) -> AsyncIterator[ChatBot]:
    """A ChatBot that never logs in, on a temporary database."""
    settings = make_settings(tmp_path, discord_token=TOKEN, shutdown_grace_seconds=0.5)
    storage = await Storage.open(settings.db_path)
    bot = ChatBot(settings, storage, FakeGenerator(), cog_modules=())
    yield bot
    await bot.close()
    await storage.close()


async def storage_is_closed(storage: Storage) -> bool:
    try:
        await storage.stats()
    except Exception:
        return True
    return False


async def test_shutdown_closes_bot_worker_and_database(offline_bot: ChatBot) -> None:
    await shutdown(offline_bot, grace_seconds=0.5)
    assert offline_bot.is_closed()
    assert offline_bot.generator.closed  # type: ignore[attr-defined]
    assert await storage_is_closed(offline_bot.storage)
    assert not offline_bot.is_accepting


async def test_sigterm_starts_the_clean_shutdown(offline_bot: ChatBot) -> None:
    loop = asyncio.get_running_loop()
    installed = install_signal_handlers(offline_bot, loop)
    try:
        assert installed == [signal.SIGTERM, signal.SIGINT]
        os.kill(os.getpid(), signal.SIGTERM)
        async with asyncio.timeout(5):  # the signal reaches the loop through its wake-up pipe
            while offline_bot._shutdown is None:
                await asyncio.sleep(0.01)
        await offline_bot.wait_shutdown()
        assert offline_bot.is_closed() and await storage_is_closed(offline_bot.storage)
        assert offline_bot.request_shutdown() is offline_bot._shutdown  # a second signal changes nothing
    finally:
        remove_signal_handlers(loop, installed)


async def test_shutdown_lets_a_reply_in_flight_finish(tmp_path: Path) -> None:
    generator = FakeGenerator(["finished during shutdown"], delay_seconds=30)
    async with running_bot(tmp_path, generator=generator, shutdown_grace_seconds=60) as h:
        assert h.bot.user is not None
        await h.alice.send(h.channel, f"{h.bot.user.mention} slow question")
        assert generator.in_flight == 1
        stopping = h.bot.request_shutdown("test")
        h.env.backend.create_message(h.channel.id, h.bob.id, f"{h.bot.user.mention} too late")
        await h.env.advance_time(0.1)  # (advancing, not settling: the typing loop's timer stays virtual)
        done, _ = await asyncio.wait({stopping}, timeout=0.2)
        assert not done, "shutdown waits for the reply in flight"
        await h.env.advance_time(31)
        await stopping
        assert [m.content for m in h.bot_messages()] == ["finished during shutdown"]
        assert generator.closed and h.bot.is_closed()
        assert len(generator.requests) == 1


async def test_serve_maps_a_rejected_token_to_its_exit_code(
    offline_bot: ChatBot, caplog: pytest.LogCaptureFixture
) -> None:
    async def rejected(token: str, *, reconnect: bool = True) -> None:
        raise discord.LoginFailure("Improper token has been passed.")

    offline_bot.start = rejected  # type: ignore[method-assign]
    assert await serve(offline_bot, TOKEN) == EXIT_BAD_TOKEN
    [line] = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert "DISCORD_TOKEN" in line and TOKEN not in caplog.text


async def test_serve_maps_a_missing_intent_to_its_exit_code(offline_bot: ChatBot) -> None:
    async def no_intent(token: str, *, reconnect: bool = True) -> None:
        raise discord.PrivilegedIntentsRequired(shard_id=None)

    offline_bot.start = no_intent  # type: ignore[method-assign]
    assert await serve(offline_bot, TOKEN) == EXIT_MISSING_INTENT


async def test_serve_maps_a_lost_network_to_69(
    offline_bot: ChatBot, caplog: pytest.LogCaptureFixture
) -> None:
    async def no_network(token: str, *, reconnect: bool = True) -> None:  # after the start-up check passed
        http = discord.http.HTTPClient(asyncio.get_running_loop())
        try:
            await http.static_login(token)
        finally:
            await http.close()

    offline_bot.start = no_network  # type: ignore[method-assign]
    port = free_port()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(discord.http.Route, "BASE", f"http://127.0.0.1:{port}/api/v10")
        assert await serve(offline_bot, TOKEN) == 69
    [line] = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert line.startswith(f"cannot reach Discord: cannot connect to 127.0.0.1:{port}")


async def test_serve_returns_zero_after_a_signalled_shutdown(offline_bot: ChatBot) -> None:
    async def runs_until_signal(token: str, *, reconnect: bool = True) -> None:
        offline_bot.request_shutdown("SIGTERM (simulated)")

    offline_bot.start = runs_until_signal  # type: ignore[method-assign]
    assert await serve(offline_bot, TOKEN) == EXIT_OK
    assert offline_bot.generator.closed  # type: ignore[attr-defined]
    assert await storage_is_closed(offline_bot.storage)


async def test_run_bot_without_a_token_exits_78_before_opening_anything(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    assert await run_bot(settings) == EXIT_BAD_TOKEN
    assert not settings.db_path.exists()


def test_python_dash_m_bot_is_the_run_command() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bot", "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0 and "usage: chatbot" in result.stdout


async def test_production_cog_list_loads_and_syncs_every_command(tmp_path: Path) -> None:
    async with running_bot(tmp_path, cog_modules=COG_MODULES) as h:
        names = {command.name for command in h.bot.tree.get_commands()}
        assert set(h.bot.cogs) >= {"ChatCog", "AdminCog", "PrivacyCog", "FeedbackCog"}
        assert {
            "reload",
            "stats",
            "channel",
            "config",
            "reset",
            "privacy",
            "optin",
            "optout",
            "forget-me",
        } <= names
        chat_input = discord.AppCommandType.chat_input
        assert all(
            h.env.backend.find_command(c.name, h.guild.id, getattr(c, "type", chat_input).value)
            for c in h.bot.tree.get_commands()
        )
        assert {"Regenerate reply", "Continue reply"} <= names  # message context menus (bot.cogs.regenerate)
