"""Against a real vLLM (scripts/vllm_cpu_server.sh serving model/starter): the ids, stops and sampling fields
reach it as intended, shown by greedy replies equal to the local worker's (fp32), and `chatbot console`
answers through it. Skipped unless a server answers at BOT_TEST_VLLM_URL (default the script's port)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from bot.remote.generator import RemoteConfig, RemoteGenerator
from bot.text import BUSY_REPLY, ERROR_REPLY, UNAVAILABLE_REPLY
from model.api import ReplyRequest
from model.loading import starter_model_dir
from model.prompt import Turn
from model.sampling import SamplingParams
from model.serving.worker import ModelWorker
from tests.helpers.discord_harness import running_bot

VLLM_URL = os.environ.get("BOT_TEST_VLLM_URL", "http://127.0.0.1:8011/v1").rstrip("/")
# Greedy, with the repetition penalty on (so it must reach vLLM to match); no_repeat_ngram_size off,
# since stock vLLM has no such option.
GREEDY = SamplingParams(max_new_tokens=40, temperature=0.0, repetition_penalty=1.15, no_repeat_ngram_size=0)
PROMPTS = [
    "hello there", "how are you today?", "what's your favourite food?", "tell me a joke",
    "do you like music?", "what are you doing this weekend?", "I just got a new puppy!",
    "can you help me with my homework?", "what's the weather like where you are?", "good morning everyone",
    "who won the game last night?", "I'm so tired today", "recommend me a movie", "do you play video games?",
    "what's your name?", "I love pizza", "where are you from?", "that was hilarious lol",
    "any plans for tonight?", "happy birthday!", "I can't sleep", "what do you think about cats?",
]  # fmt: skip


def _vllm_serves() -> bool:
    try:
        with urllib.request.urlopen(f"{VLLM_URL}/models", timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(
        not _vllm_serves(), reason=f"no vLLM server at {VLLM_URL} (scripts/vllm_cpu_server.sh)"
    ),
]


def request(text: str) -> ReplyRequest:
    history = (Turn("alice", "hi!"), Turn("Bot", "hey, what's up?", is_bot=True), Turn("alice", text))
    return ReplyRequest("A friendly bot.", history, params=GREEDY, time_limit_seconds=120)


async def test_greedy_replies_equal_the_local_workers_on_the_starter() -> None:
    config = RemoteConfig((VLLM_URL,), "starter", str(starter_model_dir()), queue_size=64)
    async with RemoteGenerator(config) as remote:
        remote_replies = [await remote.generate(request(text)) for text in PROMPTS]
        info = remote.info()
    async with ModelWorker(str(starter_model_dir()), device="cpu", dtype="float32") as worker:
        local_replies = [await worker.generate(request(text)) for text in PROMPTS]
    pairs = (
        [(r.text, r.stop_reason) for r in remote_replies],
        [(r.text, r.stop_reason) for r in local_replies],
    )
    print("\n".join(f"{p!r}: vllm={a!r} local={b!r}" for p, a, b in zip(PROMPTS, *pairs, strict=True)))
    assert info.n_positions == 256  # vLLM's max_model_len for the starter
    assert len(PROMPTS) >= 20 and pairs[0] == pairs[1]
    assert {reason for _, reason in pairs[0]} & {"eos", "turn_end"}, "some replies end their turn themselves"


@pytest.mark.slow
def test_chatbot_console_answers_through_vllm(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "BOT_BACKEND": "openai",
        "BOT_OPENAI_BASE_URL": VLLM_URL,
        "BOT_OPENAI_MODEL": "starter",
        "BOT_DATA_DIR": str(tmp_path / "data"),
        "HF_HUB_OFFLINE": "1",
    }
    result = subprocess.run(
        [sys.executable, "-m", "bot.cli", "--env-file", str(tmp_path / "none"), "console"],
        input="hello\nhow are you?\n", capture_output=True, text=True, env=env, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    print(result.stdout)
    assert len(lines) == 2 and all(line.startswith("bot: ") and len(line) > 5 for line in lines), lines


async def test_the_discord_bot_answers_through_vllm(tmp_path: Path) -> None:
    config = RemoteConfig((VLLM_URL,), "starter", str(starter_model_dir()))
    async with RemoteGenerator(config) as remote, running_bot(tmp_path, generator=remote) as h:
        remote.external_wait = lambda awaitable: h.env.external_wait(awaitable, reason="vLLM")
        assert h.bot.user is not None
        await h.alice.send(h.channel, f"{h.bot.user.mention} hello there, how are you?")
        for _ in range(600):  # real time: the server is outside simcord's virtual world
            if h.bot_messages():
                break
            await asyncio.sleep(0.05)
        await h.env.settle()
        [reply] = h.bot_messages()
    print(f"bot: {reply.content}")
    assert reply.content and reply.content not in (ERROR_REPLY, BUSY_REPLY, UNAVAILABLE_REPLY)
