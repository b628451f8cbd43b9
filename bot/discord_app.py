"""The Discord front end's composition root: `run_bot()`, `serve()`, the signal handlers and the exit codes.

`run_bot` opens every resource with `async with` (database → model worker → bot) and passes them into the
ChatBot (bot/chatbot.py); one-time setup happens in its `setup_hook` (never `on_ready`, which fires again
after reconnects).

Exit codes of `chatbot run` (for supervisors, e.g. systemd `RestartPreventExitStatus=78 79`):
  0   stopped by SIGTERM or SIGINT after a clean shutdown (replies in flight sent, worker drained, DB closed),
      also when the signal comes while the model is still loading
  78  DISCORD_TOKEN is missing or Discord rejected it. Restarting cannot help, and every failed login counts
      toward Discord's 1000 logins a day, after which the token is reset.
  79  a privileged intent (Message Content) is not enabled for the application in the Developer Portal.
  69  Discord cannot be reached (no network, DNS, TLS, an outage): retryable. Token, intent and gateway are
      checked while the model loads (bot/operations/startup.py), so all three codes come in seconds, not
      after it.
  2   (bot.cli) invalid settings, e.g. BOT_DATA_DIR is a file or a folder that cannot be created.
  4   (bot.cli) the database cannot be used at start: read-only, not a SQLite file, corrupt, full, or
      locked past busy_timeout while upgrading the schema; one line says what to fix. Once serving, a
      failed write is logged and counted, and the bot keeps answering (bot.cogs.chat).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Iterable

import discord

from bot.chatbot import ChatBot
from bot.config import Settings
from bot.operations.metrics import BotMetrics, MeteredGenerator
from bot.operations.sidecar import operations
from bot.operations.startup import (
    BAD_TOKEN_LINE,
    EXIT_BAD_TOKEN,
    EXIT_MISSING_INTENT,
    EXIT_UNAVAILABLE,
    MISSING_INTENT_LINE,
    NETWORK_ERRORS,
    StartupError,
    checked_start,
    unreachable,
)
from bot.storage import Storage

log = logging.getLogger(__name__)

EXIT_OK = 0
SHUTDOWN_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def install_signal_handlers(bot: ChatBot, loop: asyncio.AbstractEventLoop) -> list[signal.Signals]:
    """SIGTERM and SIGINT start the clean shutdown (discord.py installs no handler of its own)."""
    installed = []
    for sig in SHUTDOWN_SIGNALS:
        try:
            loop.add_signal_handler(sig, bot.request_shutdown, f"received {sig.name}")
        except (NotImplementedError, RuntimeError):  # Windows, or not the main thread: Ctrl+C still works
            continue
        installed.append(sig)
    return installed


def remove_signal_handlers(loop: asyncio.AbstractEventLoop, signals: Iterable[signal.Signals]) -> None:
    """Give the signals back to their defaults."""
    for sig in signals:
        loop.remove_signal_handler(sig)


async def serve(bot: ChatBot, token: str) -> int:
    """Log in and run until a signal shuts the bot down; a bad token or missing intent → its exit code."""
    loop = asyncio.get_running_loop()
    installed = install_signal_handlers(bot, loop)
    try:
        async with bot:
            await bot.start(token)
    except discord.LoginFailure:
        log.error(BAD_TOKEN_LINE)
        return EXIT_BAD_TOKEN
    except discord.PrivilegedIntentsRequired:
        log.error(MISSING_INTENT_LINE)
        return EXIT_MISSING_INTENT
    except NETWORK_ERRORS as exc:  # the network went away between the start-up check and the login
        log.error("%s", unreachable(exc))
        return EXIT_UNAVAILABLE
    finally:
        await bot.wait_shutdown()
        remove_signal_handlers(loop, installed)
    return EXIT_OK


async def run_bot(settings: Settings) -> int:
    """`chatbot run`: settings → storage → worker → bot, closed in reverse order; returns the exit code."""
    if not settings.discord_token:
        log.error("DISCORD_TOKEN is not set: put the bot token in .env (exit 78)")
        return EXIT_BAD_TOKEN
    loop, task = asyncio.get_running_loop(), asyncio.current_task()
    assert task is not None
    # Until serve() takes the signals over, SIGTERM / SIGINT stop the start-up (model load included):
    # storage closes and the process exits 0 instead of dying of the signal.
    signals = [sig for sig in SHUTDOWN_SIGNALS if _on_signal(loop, sig, task.cancel)]
    log.info("starting: opening the database and loading the model")
    try:
        from bot.datalock import hold_data_dir
        from bot.runtime import create_worker  # loads torch: only when the bot really runs
        from bot.sharding import build_bot

        metrics = BotMetrics()
        with hold_data_dir(settings.data_dir):
            async with Storage.open(settings.db_path, settings.db_busy_timeout_seconds) as storage:
                try:
                    async with checked_start(
                        lambda: create_worker(settings), settings.discord_token
                    ) as worker:
                        remove_signal_handlers(loop, signals)  # serve() installs its own
                        signals = []
                        bot = build_bot(settings, storage, MeteredGenerator(worker, metrics))
                        async with operations(bot, bot.generator, settings, metrics):
                            return await serve(bot, settings.discord_token)
                except StartupError as exc:
                    log.error("%s", exc)
                    return exc.exit_code
    except asyncio.CancelledError:
        if not signals:
            raise
        log.info("stopped by a signal before serving (exit 0)")
        return EXIT_OK
    finally:
        remove_signal_handlers(loop, signals)


def _on_signal(loop: asyncio.AbstractEventLoop, sig: signal.Signals, callback: Callable[[], object]) -> bool:
    """Run `callback` on `sig`; False where the loop cannot (Windows, or not the main thread)."""
    try:
        loop.add_signal_handler(sig, callback)
    except (NotImplementedError, RuntimeError):
        return False
    return True
