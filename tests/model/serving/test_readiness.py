"""model.serving.readiness: the smoke test builds a real prompt with the bot's reply budget.

A model whose context window cannot hold the persona, a short message and the reply would load, pass a tiny
smoke prompt and then fail every request; it is refused at start and at reload instead, with a clear line.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from model.api import ReloadFailed, ReplyRequest
from model.prompt import Turn
from model.sampling import SamplingParams
from model.serving.readiness import default_smoke_request
from model.serving.worker import ModelWorker
from tests.helpers.models import build_tiny_gpt2

BOT_SAMPLING = SamplingParams(max_new_tokens=60)  # the bot's default reply budget (BOT_MAX_NEW_TOKENS)
PERSONA = "A friendly chat between a helpful bot and the people of a Discord server."


def worker_for(source: Path) -> ModelWorker:
    smoke = default_smoke_request(BOT_SAMPLING, PERSONA, "Bot")
    return ModelWorker(str(source), device="cpu", sampling=BOT_SAMPLING, smoke_request=smoke)


def a_request(text: str = "hello, what are you up to?") -> ReplyRequest:
    return ReplyRequest(PERSONA, (Turn("alice", text),), params=SamplingParams(max_new_tokens=60))


async def test_a_tiny_context_model_is_refused_at_reload(tiny_model_dir: Path, tmp_path: Path) -> None:
    tiny_context = build_tiny_gpt2(tmp_path / "ctx16", n_positions=16)
    async with worker_for(tiny_model_dir) as worker:
        version = worker.info().version
        with pytest.raises(ReloadFailed, match=r"context window \(16 positions\)") as caught:
            await worker.reload(str(tiny_context))
        assert caught.value.step == "smoke"
        assert "n_positions" in str(caught.value)  # it says what to do
        reply = await worker.generate(a_request())  # the old model keeps answering
        assert reply.model_version == version == worker.info().version


async def test_a_tiny_context_model_is_refused_at_start(tmp_path: Path) -> None:
    tiny_context = build_tiny_gpt2(tmp_path / "ctx16", n_positions=16)
    worker = worker_for(tiny_context)
    with pytest.raises(ValueError, match=r"context window \(16 positions\) cannot hold"):
        await worker.start()
    await worker.close(grace_seconds=1)


async def test_a_small_context_that_fits_the_budget_serves(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Not over-strict: 128 positions hold the persona, a message and the capped budget (64 tokens)."""
    small_context = build_tiny_gpt2(tmp_path / "ctx128", n_positions=128)
    async with worker_for(tiny_model_dir) as worker:
        info = await worker.reload(str(small_context))
        assert info.n_positions == 128
        reply = await worker.generate(a_request("tell me something about the sea " * 20))
        assert reply.prompt_tokens + reply.completion_tokens <= 128
