"""`chatbot console`: the conversation core in a terminal, interactive or scripted through a pipe.

Ctrl+C exits at once (exit 130; a reply being written is dropped, the message was stored); SIGTERM and end
of input exit 0 after the reply being written. Either way the database is closed cleanly.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import signal
import sys
import threading
import time
from collections.abc import Awaitable
from typing import TextIO

from bot.config import Settings
from bot.conversation import ConversationService, IncomingMessage
from bot.storage import Storage, StorageError
from model.api import GeneratorError, ReplyGenerator

log = logging.getLogger(__name__)

CONSOLE_USER_ID = 1
CONSOLE_BOT_ID = 2
HELP = "Type a message and press Enter. Commands: /reset (start the conversation over), /quit."


def channel_id_for(name: str) -> int:
    """A stable channel id for a console conversation name (48 bits, so it never collides with 0/1/2)."""
    return int.from_bytes(hashlib.sha256(f"console:{name}".encode()).digest()[:6], "big") + 1000


async def try_store(write: Awaitable[object]) -> bool:
    """Run a write; a busy, full or unwritable database is one log line and the chat goes on, like the
    Discord bot's (it answers from what storage has). False when nothing was stored."""
    try:
        await write
    except StorageError as exc:
        log.warning("not stored: %s", exc)
        return False
    return True


class MessageIds:
    """Increasing, unique message ids derived from the clock (like Discord snowflakes, never repeating)."""

    def __init__(self) -> None:
        self._last = 0

    def next(self) -> int:
        """The next id: microseconds since the epoch, bumped when the clock has not moved."""
        self._last = max(self._last + 1, time.time_ns() // 1000)
        return self._last


class ConsoleChat:
    """One terminal conversation driven through the ConversationService."""

    def __init__(self, service: ConversationService, channel: str, user_name: str, out: TextIO) -> None:
        self.service = service
        self.channel_id = channel_id_for(channel)
        self.user_name = user_name
        self.out = out
        self.ids = MessageIds()

    async def handle_line(self, line: str) -> bool:
        """Answer one input line; False when the user asked to quit."""
        text = line.strip()
        if text in {"/quit", "/exit"}:
            return False
        if text == "/reset":
            if await try_store(self.service.storage.reset_channel(self.channel_id, time.time())):
                self._print("(conversation reset)")
            else:
                self._print("(the database is unavailable: the conversation was not reset)")
        elif text == "/help":
            self._print(HELP)
        elif text:
            await self._answer(text)
        return True

    async def _answer(self, text: str) -> None:
        message = IncomingMessage(
            self.ids.next(), self.channel_id, None, CONSOLE_USER_ID, self.user_name, False, text, time.time()
        )
        context = await self.service.context_for(message)
        await try_store(self.service.record(message, context))
        try:
            draft = await self.service.compose_reply(message, context)
        except GeneratorError as exc:
            self._print(f"bot: (no reply: {exc})")
            return
        self._print(f"bot: {draft.text}")
        sent = [(self.ids.next(), draft.text)]
        await try_store(self.service.record_reply(message, context, draft, sent, time.time()))

    def _print(self, text: str) -> None:
        print(text, file=self.out, flush=True)


def clean_line(line: str | bytes) -> str:
    """Text that can be stored: invalid UTF-8 and lone surrogates become U+FFFD, the rest of the line kept."""
    if isinstance(line, bytes):
        return line.decode("utf-8", errors="replace")
    # A surrogate cannot be encoded (SQLite would raise): surrogatepass lets it through as bytes that are
    # not UTF-8, which the decode then replaces.
    return line.encode("utf-8", errors="surrogatepass").decode("utf-8", errors="replace")


class LineReader:
    """Lines of a stream, read by a daemon thread and handed to the event loop; None at end of input.

    Not the default executor: `asyncio.run` waits for its threads at exit, so a readline blocked at an idle
    prompt would hold Ctrl+C and SIGTERM until Enter. A daemon thread is simply left behind.
    """

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._lines: asyncio.Queue[str | None] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self.is_stopping = False
        threading.Thread(target=self._read_all, name="console-stdin", daemon=True).start()

    def _read_all(self) -> None:
        # Bytes where the stream has them, so that undecodable input reaches clean_line instead of raising.
        readline = getattr(getattr(self._stream, "buffer", None), "readline", self._stream.readline)
        try:
            while line := readline():
                self._put(clean_line(line))
        except (OSError, ValueError):  # the stream was closed under us
            pass
        self._put(None)

    def _put(self, line: str | None) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody reads any more
            self._loop.call_soon_threadsafe(self._lines.put_nowait, line)

    def stop(self) -> None:
        """End the chat after the line being answered (SIGTERM)."""
        self.is_stopping = True
        self._lines.put_nowait(None)

    async def next(self, prompt: str | None) -> str | None:
        """The next line, or None at end of input or once stopping."""
        if self.is_stopping:
            return None
        if prompt:
            print(prompt, end="", flush=True)
        line = await self._lines.get()
        return None if self.is_stopping else line


async def chat_loop(chat: ConsoleChat, stream: TextIO) -> None:
    """Answer lines until end of input, /quit or SIGTERM; a prompt is shown only on a terminal."""
    prompt = "you> " if stream.isatty() else None
    if prompt:
        chat._print(HELP)
    reader = LineReader(stream)
    loop = asyncio.get_running_loop()
    # SIGTERM ends the chat as end of input does: the reply being written finishes, the database closes.
    with contextlib.suppress(NotImplementedError, RuntimeError):  # Windows, or not the main thread
        loop.add_signal_handler(signal.SIGTERM, reader.stop)
    try:
        while (line := await reader.next(prompt)) is not None:
            if not await chat.handle_line(line):
                break
    finally:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.remove_signal_handler(signal.SIGTERM)


async def run_console(
    settings: Settings,
    generator: ReplyGenerator,
    channel: str = "console",
    stdin: TextIO = sys.stdin,
    stdout: TextIO = sys.stdout,
) -> int:
    """Open the database and chat on the terminal with an already started generator; returns an exit code."""
    async with await Storage.open(settings.db_path, settings.db_busy_timeout_seconds) as storage:
        service = ConversationService(storage, generator, settings, bot_user_id=CONSOLE_BOT_ID)
        await try_store(storage.upsert_user(CONSOLE_BOT_ID, settings.bot_name))
        chat = ConsoleChat(service, channel, user_name="User", out=stdout)
        await chat_loop(chat, stdin)
    return 0
