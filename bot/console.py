"""`chatbot console`: the conversation core in a terminal, interactive or scripted through a pipe."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import sys
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


async def read_line(stream: TextIO, prompt: str | None) -> str | None:
    """Read one line without blocking the event loop; None at end of input."""
    if prompt:
        print(prompt, end="", flush=True)
    line = await asyncio.get_running_loop().run_in_executor(None, stream.readline)
    return line if line else None


async def chat_loop(chat: ConsoleChat, stream: TextIO) -> None:
    """Answer lines until end of input or /quit; a prompt is shown only on a terminal."""
    prompt = "you> " if stream.isatty() else None
    if prompt:
        chat._print(HELP)
    while (line := await read_line(stream, prompt)) is not None:
        if not await chat.handle_line(line):
            break


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
