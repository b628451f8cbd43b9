"""BOT_BACKEND=openai end to end: the real ChatBot in simcord and the real `chatbot console`, replies from
the loopback OpenAI-compatible test server (the tiny GPT-2 through the project's own engine)."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import discord
import pytest

from bot.config import Settings
from bot.runtime import create_worker
from bot.text import BUSY_REPLY, ERROR_REPLY, UNAVAILABLE_REPLY
from tests.helpers.console import run_console_process
from tests.helpers.discord_harness import Harness, running_bot
from tests.helpers.openai_server import OpenAIServer


def remote_env(url: str, tiny_model_dir: Path, **extra: str) -> dict[str, str]:
    return {
        "BOT_BACKEND": "openai",
        "BOT_OPENAI_BASE_URL": url,
        "BOT_OPENAI_MODEL": "tiny",
        "BOT_OPENAI_TOKENIZER": str(tiny_model_dir),
        "BOT_MAX_NEW_TOKENS": "12",
        **extra,
    }


@asynccontextmanager
async def remote_bot(
    tmp_path: Path, server: OpenAIServer, tiny_model_dir: Path, **extra: str
) -> AsyncIterator[Harness]:
    """The bot in simcord with the generator `create_worker` makes from BOT_BACKEND=openai settings."""
    env = {**remote_env(server.url, tiny_model_dir, **extra), "BOT_DATA_DIR": str(tmp_path / "data")}
    settings = Settings.from_env(env)
    async with create_worker(settings) as generator:
        names = ("backend", "openai_base_urls", "openai_model", "queue_size", "max_new_tokens")
        overrides = {name: getattr(settings, name) for name in names}
        async with running_bot(tmp_path, generator=generator, **overrides) as h:
            generator.external_wait = lambda awaitable: h.env.external_wait(awaitable, reason="model server")  # type: ignore[union-attr]
            yield h


async def replies_in(
    h: Harness, count: int, messages: Callable[[], list[discord.Message]] | None = None
) -> list[discord.Message]:
    """Wait (real time, 30 s at most) until the bot posted `count` messages there; the server's work is
    outside simcord's virtual world, so a send returns before the reply comes."""
    look = messages or h.bot_messages
    for _ in range(600):
        if len(look()) >= count:
            break
        await asyncio.sleep(0.05)
    await h.env.settle()
    return look()


def mention(h: Harness, text: str) -> str:
    assert h.bot.user is not None
    return f"{h.bot.user.mention} {text}"


async def test_mention_and_dm_get_model_replies_from_the_server(tmp_path: Path, tiny_model_dir: Path) -> None:
    async with OpenAIServer(tiny_model_dir) as server, remote_bot(tmp_path, server, tiny_model_dir) as h:
        sent = await h.alice.send(h.channel, mention(h, "hello there"))
        [reply] = await replies_in(h, 1)
        assert reply.reference is not None and reply.reference.message_id == sent.id
        assert reply.content and reply.content not in (ERROR_REPLY, BUSY_REPLY)
        follow = await h.alice.send(h.channel, "and then?", reply_to=reply)
        assert (await replies_in(h, 2))[-1].reference.message_id == follow.id  # type: ignore[union-attr]
        await h.bob.user.send_dm("hello in private")
        dm_replies = await replies_in(
            h, 1, lambda: [m for m in h.bob.user.dm_channel.history() if m.author.id == h.bot_id]
        )
        assert len(dm_replies) == 1 and dm_replies[0].content not in (ERROR_REPLY, BUSY_REPLY)
        replies = server.bodies[1:]  # the first is the start-up check's one-token probe
        assert [body["model"] for body in replies] == ["tiny"] * 3
        assert [(len(b["prompt"]) + b["max_tokens"] <= 1024, b["max_tokens"]) for b in replies] == [
            (True, 12)
        ] * 3


@pytest.mark.parametrize("fault", ["500", "429", "drop", "slow"])
async def test_a_burst_under_each_fault_gets_exactly_one_reply_per_message(
    tmp_path: Path, tiny_model_dir: Path, fault: str
) -> None:
    server = OpenAIServer(tiny_model_dir, slow_seconds=0.2)
    async with server, remote_bot(tmp_path, server, tiny_model_dir, BOT_QUEUE_SIZE="4") as h:
        server.fault = fault  # after the start-up check, which a faulty server fails
        users = [h.guild.add_member(h.env.create_user(f"user{i}")) for i in range(10)]
        for user in users:
            h.env.backend.create_message(h.channel.id, user.id, mention(h, f"hi from {user.name}"))
        for _ in range(200):
            await h.env.advance_time(0.1)  # the client's back-off sleeps are virtual here
            await asyncio.sleep(0.05)
            if len(h.bot_messages()) >= 10:
                break
        replies = await replies_in(h, 10)
    answered = Counter(m.reference.message_id for m in replies if m.reference)
    assert len(replies) == 10 and set(answered.values()) == {1}
    contents = set(m.content for m in replies)
    if fault in ("500", "drop"):  # the first fails, then the circuit is open: the rest are told at once
        assert ERROR_REPLY in contents and contents <= {BUSY_REPLY, ERROR_REPLY, UNAVAILABLE_REPLY}
    if fault == "429":
        assert contents == {BUSY_REPLY}
    if fault == "slow":
        assert not contents & {ERROR_REPLY, UNAVAILABLE_REPLY}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.slow
def test_chatbot_console_with_the_openai_backend(tmp_path: Path, tiny_model_dir: Path) -> None:
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "tests.helpers.openai_server", str(tiny_model_dir), "--port", str(port)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None and server.stdout.readline().startswith("serving")
        env = {
            **os.environ,
            **remote_env(f"http://127.0.0.1:{port}/v1", tiny_model_dir),
            "BOT_DATA_DIR": str(tmp_path / "data"),
            "HF_HUB_OFFLINE": "1",
        }
        result = run_console_process(tmp_path / "none", env, "hello\nhow are you?\n")
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        assert len(lines) == 2 and all(line.startswith("bot: ") and len(line) > 5 for line in lines), lines
        wrong = {**env, "BOT_OPENAI_MODEL": "nope"}
        failed = run_console_process(tmp_path / "none", wrong, "hi\n")
        assert failed.returncode == 3
        assert "does not serve a model named 'nope'" in failed.stderr and "Traceback" not in failed.stderr
    finally:
        server.kill()
        server.wait()
