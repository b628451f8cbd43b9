"""Fail fast at start-up: check the token, the intent and the gateway while the model loads.

A large model takes minutes to load on a CPU; a rejected token, a missing intent or no network should be
reported in seconds, not after that. `checked_start` makes the worker (importing torch) and loads the
model while `check_discord` runs, and stops at the first failure of either. A known failure becomes a
`StartupError`: one line for the log and the exit code a supervisor acts on (78 and 79 are not worth a
restart, 69 is).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import aiohttp
import discord
from discord.http import HTTPClient

log = logging.getLogger(__name__)

EXIT_BAD_TOKEN = 78  # EX_CONFIG
EXIT_MISSING_INTENT = 79
EXIT_UNAVAILABLE = 69  # EX_UNAVAILABLE: Discord cannot be reached now; a restart later may succeed
CHECK_TIMEOUT_SECONDS = 10.0  # login, application flags and the gateway's hello, all together
# GATEWAY_MESSAGE_CONTENT (verified bots) | GATEWAY_MESSAGE_CONTENT_LIMITED (under 100 servers): the
# Developer Portal's Message Content switch sets one of them.
MESSAGE_CONTENT_FLAGS = (1 << 18) | (1 << 19)
GATEWAY_HELLO_OP = 10
# What "Discord is unreachable" looks like from aiohttp and discord.py: DNS, refused, TLS (aiohttp wraps
# each OSError in a ClientError), 5xx after discord.py's retries, no gateway address.
NETWORK_ERRORS: tuple[type[BaseException], ...] = (
    aiohttp.ClientError,
    discord.DiscordServerError,
    discord.GatewayNotFound,
)
BAD_TOKEN_LINE = (
    "Discord rejected DISCORD_TOKEN: copy the bot token again from the Developer Portal (exit 78)"
)
MISSING_INTENT_LINE = "enable the Message Content intent for this bot in the Developer Portal (exit 79)"


class Startable(Protocol):
    """The worker as start-up sees it (model.serving.worker.ModelWorker)."""

    async def start(self) -> object: ...

    async def close(self, grace_seconds: float = 10.0) -> None: ...


W = TypeVar("W", bound=Startable)
T = TypeVar("T")


@dataclass
class StartupError(Exception):
    """A known reason the bot cannot start: `line` is all the operator needs to read."""

    exit_code: int
    line: str

    def __str__(self) -> str:
        return self.line


def unreachable(exc: BaseException) -> StartupError:
    """A network failure → one line naming what failed, and the retryable exit code."""
    return StartupError(
        EXIT_UNAVAILABLE, f"cannot reach Discord: {describe_network_error(exc)}; retry later (exit 69)"
    )


def describe_network_error(exc: BaseException) -> str:
    """A few words for a network failure, most specific first (the subclasses come before their bases)."""
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return f"DNS lookup of {exc.host} failed (no network or no DNS server?)"
    if isinstance(exc, aiohttp.ClientConnectorCertificateError | aiohttp.ClientSSLError):
        return f"TLS failed ({type(exc).__name__}: check the system clock and CA certificates)"
    if isinstance(exc, aiohttp.ClientConnectorError):
        errno = exc.os_error.errno  # its strerror is asyncio's "Connect call failed (...)": less clear
        reason = os.strerror(errno) if errno else type(exc.os_error).__name__
        return f"cannot connect to {exc.host}:{exc.port} ({reason})"
    if isinstance(exc, discord.DiscordServerError):
        return f"Discord answered HTTP {exc.status} (an outage? see https://discordstatus.com)"
    if isinstance(exc, discord.GatewayNotFound):
        return "Discord did not give a gateway address"
    if isinstance(exc, TimeoutError):
        return str(exc) or "no answer in time"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


async def check_discord(token: str, timeout_seconds: float = CHECK_TIMEOUT_SECONDS) -> None:
    """Log in over HTTP, check the Message Content intent, and open the gateway once (no IDENTIFY)."""
    http = HTTPClient(asyncio.get_running_loop())
    try:
        async with asyncio.timeout(timeout_seconds):
            await http.static_login(token)
            application: Any = await http.application_info()
            if not int(application.get("flags", 0)) & MESSAGE_CONTENT_FLAGS:
                raise StartupError(EXIT_MISSING_INTENT, MISSING_INTENT_LINE)
            _, url, _ = await http.get_bot_gateway()
            await _gateway_hello(http, url)
    except discord.LoginFailure:
        raise StartupError(EXIT_BAD_TOKEN, BAD_TOKEN_LINE) from None
    except TimeoutError:
        raise unreachable(TimeoutError(f"no answer within {timeout_seconds:g} s")) from None
    except NETWORK_ERRORS as exc:
        raise unreachable(exc) from None
    finally:
        await http.close()
    log.info("Discord accepted the token and the gateway answered")


async def _gateway_hello(http: HTTPClient, url: str) -> None:
    """Open the gateway's websocket and wait for its HELLO: proves the gateway host is reachable."""
    socket = await http.ws_connect(f"{url}?v=10&encoding=json")
    try:
        message = await socket.receive_json()
        if message.get("op") != GATEWAY_HELLO_OP:
            raise discord.GatewayNotFound()
    finally:
        await socket.close()


async def load_while_checking(load_model: Awaitable[object], check: Awaitable[None]) -> None:
    """Load the model and check Discord at once; the first failure wins and the other is cancelled.

    A model load cancelled this way keeps its worker thread (it cannot be interrupted mid-load); the
    caller exits the process, which ends the daemon thread with it.
    """
    loading = asyncio.ensure_future(load_model)
    checking = asyncio.ensure_future(check)
    try:
        done, _ = await asyncio.wait({loading, checking}, return_when=asyncio.FIRST_EXCEPTION)
        for task in (checking, loading):  # a Discord problem is named first: it is the faster fix
            error = task.exception() if task in done else None
            if error is not None:
                raise error
        await asyncio.gather(loading, checking)
    finally:
        for task in (loading, checking):
            task.cancel()


@contextlib.asynccontextmanager
async def checked_start(
    make_worker: Callable[[], W], token: str, check: Callable[[str], Awaitable[None]] = check_discord
) -> AsyncIterator[W]:
    """Make and start the worker while Discord is checked; yield it, and close it on the way out.

    `make_worker` runs in a daemon thread: it imports torch, seconds on a busy machine that the check
    need not wait for, and that an exit after a failed check need not wait for either.
    """
    started: list[W] = []

    async def start() -> None:
        worker = await in_daemon_thread(make_worker)
        await worker.start()
        started.append(worker)

    try:
        await load_while_checking(start(), check(token))
        yield started[0]
    finally:
        for worker in started:
            await worker.close()


async def in_daemon_thread(func: Callable[[], T]) -> T:
    """`func()` in a daemon thread, awaited (asyncio.to_thread's threads are joined at exit: not these)."""
    loop = asyncio.get_running_loop()
    answer: asyncio.Future[T] = loop.create_future()

    def settle(value: T | None, error: BaseException | None) -> None:  # on the loop
        if answer.done():  # cancelled: nobody waits any more
            return
        if error is not None:
            answer.set_exception(error)
        else:
            answer.set_result(value)  # type: ignore[arg-type]

    def run() -> None:
        try:
            value, error = func(), None
        except BaseException as exc:  # handed to the awaiting task, which re-raises it
            value, error = None, exc
        with contextlib.suppress(RuntimeError):  # the loop is closed: the process is exiting
            loop.call_soon_threadsafe(settle, value, error)

    threading.Thread(target=run, name="make-worker", daemon=True).start()
    return await answer
