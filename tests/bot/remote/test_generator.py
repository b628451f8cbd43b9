"""The remote generator against a real OpenAI-compatible server on loopback (tests/helpers/openai_server.py):
what it sends, that replies equal the local worker's, start-up checks, faults, the circuit breaker,
recovery, blue/green reloads. No client mocks: real sockets, the real tokenizer, the tiny GPT-2."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from bot.cogs.admin import format_stats
from bot.remote.generator import RemoteConfig, RemoteGenerator
from bot.remote.replicas import percentile
from bot.storage import Stats
from model.api import GenerationFailed, ReloadFailed, Reply, ReplyRequest, WorkerBusy
from model.loading import ModelLoadError
from model.prompt import Turn, build_prompt
from model.replies import stop_token_ids
from model.sampling import SamplingParams
from model.serving.worker import ModelWorker
from tests.helpers.openai_server import OpenAIServer

GREEDY = SamplingParams(max_new_tokens=12, temperature=0.0, repetition_penalty=1.15, no_repeat_ngram_size=0)


def request(text: str = "hello there", params: SamplingParams = GREEDY, limit: float = 10.0) -> ReplyRequest:
    return ReplyRequest("A friendly bot.", (Turn("alice", text),), params=params, time_limit_seconds=limit)


def config(*urls: str, model: str = "tiny", tokenizer: Path, **kwargs: object) -> RemoteConfig:
    return RemoteConfig(tuple(urls), model, str(tokenizer), **kwargs)  # type: ignore[arg-type]


@pytest.fixture
async def server(tiny_model_dir: Path) -> AsyncIterator[OpenAIServer]:
    async with OpenAIServer(tiny_model_dir, also_named=("green",)) as running:
        yield running


@contextlib.asynccontextmanager
async def started(cfg: RemoteConfig) -> AsyncIterator[RemoteGenerator]:
    async with RemoteGenerator(cfg) as generator:
        yield generator


class LagProbe:
    """Samples how late a 5 ms sleep wakes up: the event loop's lag while the test runs."""

    def __init__(self) -> None:
        self.lags: list[float] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            before = time.perf_counter()
            await asyncio.sleep(0.005)
            self.lags.append(time.perf_counter() - before - 0.005)

    async def __aenter__(self) -> LagProbe:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._task is not None
        self._task.cancel()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_sends_token_ids_stops_and_every_sampling_field_and_matches_the_local_worker(
    server: OpenAIServer, tiny_model_dir: Path, gpt2_tokenizer: object
) -> None:
    prompts = ["hello there", "what is the weather like?", "tell me a story about a cat"]
    async with started(config(server.url, tokenizer=tiny_model_dir, api_key="sk-secret")) as remote:
        remote_replies = [await remote.generate(request(text)) for text in prompts]
        info = remote.info()
        assert remote.is_alive()
    assert not remote.is_alive()
    async with ModelWorker(str(tiny_model_dir), device="cpu", dtype="float32") as worker:
        local_replies = [await worker.generate(request(text)) for text in prompts]
    assert [r.text for r in remote_replies] == [r.text for r in local_replies]
    assert [r.stop_reason for r in remote_replies] == [r.stop_reason for r in local_replies]
    body = server.bodies[-1]
    expected = build_prompt(gpt2_tokenizer, "A friendly bot.", (Turn("alice", prompts[-1]),), "Bot", 12, 1024)  # type: ignore[arg-type]
    assert body["prompt"] == list(expected.input_ids)
    assert len(body["prompt"]) + body["max_tokens"] <= 1024
    assert body["stop_token_ids"] == sorted(stop_token_ids(gpt2_tokenizer))
    assert {k: body[k] for k in ("max_tokens", "temperature", "top_p", "top_k", "repetition_penalty")} == {
        "max_tokens": 12, "temperature": 0.0, "top_p": 0.9, "top_k": 50, "repetition_penalty": 1.15,
    }  # fmt: skip
    assert set(server.auth_headers) == {"Bearer sk-secret"}
    assert info.backend == "openai" and info.n_positions == 1024
    assert "sk-secret" not in repr(info) and any("up" in line for line in info.details)
    assert any("no_repeat_ngram_size" in line for line in info.details)
    stats_text = format_stats(1.0, Stats(1, 2, 3, 0, 0, None, None), 0, info, [])
    assert f"Server {server.url}: up, 0 in flight, p50 " in stats_text and "sk-secret" not in stats_text


async def test_start_up_says_what_is_wrong(server: OpenAIServer, tiny_model_dir: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(ModelLoadError, match="unreachable"):
        await RemoteGenerator(config(dead, tokenizer=tiny_model_dir)).start()
    with pytest.raises(ModelLoadError, match=r"does not serve a model named 'nope'.*tiny"):
        await RemoteGenerator(config(server.url, model="nope", tokenizer=tiny_model_dir)).start()
    async with OpenAIServer(tiny_model_dir, vocab_size=1000) as smaller:
        with pytest.raises(ModelLoadError, match="vocabulary is smaller"):
            await RemoteGenerator(config(smaller.url, tokenizer=tiny_model_dir)).start()


async def test_one_dead_replica_is_left_out_and_the_other_serves(
    server: OpenAIServer, tiny_model_dir: Path
) -> None:
    dead = f"http://127.0.0.1:{free_port()}/v1"
    async with started(config(dead, server.url, tokenizer=tiny_model_dir)) as remote:
        replies = await asyncio.gather(*(remote.generate(request(f"hi {i}")) for i in range(4)))
        assert all(isinstance(r, Reply) for r in replies)
        dead_line, live_line = remote.info().details[:2]
    assert "down" in dead_line and live_line.startswith(server.url) and "0/4 errors" in live_line


@pytest.mark.parametrize("fault", ["500", "429", "503", "drop", "slow"])
async def test_under_each_fault_every_request_gets_one_outcome_and_the_loop_stays_responsive(
    server: OpenAIServer, tiny_model_dir: Path, fault: str
) -> None:
    cfg = config(server.url, tokenizer=tiny_model_dir, queue_size=4, retry_after_seconds=0.2)
    async with started(cfg) as remote, LagProbe() as probe:
        server.fault, server.slow_seconds = fault, 0.3
        outcomes = await asyncio.gather(
            *(remote.generate(request(f"hi {i}", limit=1.0)) for i in range(12)), return_exceptions=True
        )
    kinds = {type(o).__name__ for o in outcomes}
    assert len(outcomes) == 12 and kinds <= {"Reply", "WorkerBusy", "GenerationFailed", "ModelUnavailable"}, (
        outcomes
    )
    # 503 is retried on another server (there is none): the circuit opens; 500 and a drop fail their request
    expected = {"slow": "Reply", "429": "WorkerBusy", "503": "ModelUnavailable"}.get(
        fault, "GenerationFailed"
    )
    assert expected in kinds
    assert sum(isinstance(o, WorkerBusy) for o in outcomes) >= (8 if fault != "429" else 12)
    assert (percentile(probe.lags, 0.99) or 0.0) < 0.050, max(probe.lags)


async def test_circuit_breaker_fails_at_once_then_recovers_by_itself(
    server: OpenAIServer, tiny_model_dir: Path
) -> None:
    async with started(config(server.url, tokenizer=tiny_model_dir, retry_after_seconds=0.5)) as remote:
        server.fault = "500"
        with pytest.raises(GenerationFailed, match="HTTP 500"):
            await remote.generate(request())
        sent = len(server.bodies)
        begun = time.perf_counter()
        with pytest.raises(GenerationFailed, match="model unavailable"):
            await remote.generate(request())
        assert time.perf_counter() - begun < 0.05 and len(server.bodies) == sent  # no request went out
        server.fault = None
        await asyncio.sleep(0.6)
        assert isinstance(await remote.generate(request()), Reply)


async def test_a_hung_server_fails_within_the_time_limit(server: OpenAIServer, tiny_model_dir: Path) -> None:
    async with started(config(server.url, tokenizer=tiny_model_dir)) as remote:
        server.fault = "hang"
        begun = time.perf_counter()
        with pytest.raises(GenerationFailed, match="timed out"):
            await remote.generate(request(limit=1.0))
        assert time.perf_counter() - begun < 1.5


async def test_blue_green_reload_switches_the_served_model_name(
    server: OpenAIServer, tiny_model_dir: Path
) -> None:
    async with started(config(server.url, tokenizer=tiny_model_dir, local_source="starter")) as remote:
        assert (await remote.reload("starter")).name == "tiny"  # /reload alone: re-check, same model
        info = await remote.reload("green")
        await remote.generate(request())
        assert info.name == "green" and server.bodies[-1]["model"] == "green"
        with pytest.raises(ReloadFailed, match="does not serve a model named 'blue'"):
            await remote.reload("blue")
        assert remote.info().name == "green"


@pytest.mark.slow
async def test_a_server_process_killed_mid_request_fails_it_and_its_return_is_picked_up(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    port = free_port()

    def spawn(*extra: str) -> subprocess.Popen[str]:
        args = [sys.executable, "-m", "tests.helpers.openai_server", str(tiny_model_dir), "--port", str(port)]
        child = subprocess.Popen([*args, *extra], stdout=subprocess.PIPE, text=True)
        assert child.stdout is not None and child.stdout.readline().startswith("serving")
        return child

    child = spawn()
    cfg = config(f"http://127.0.0.1:{port}/v1", tokenizer=tiny_model_dir, retry_after_seconds=0.5)
    try:
        async with started(cfg) as remote, aiohttp.ClientSession() as session:
            await session.post(f"http://127.0.0.1:{port}/test/fault", json={"fault": "hang"})
            pending = asyncio.create_task(remote.generate(request(limit=20.0)))
            await asyncio.sleep(0.5)
            child.kill()  # the server dies with the request in flight
            begun = time.perf_counter()
            with pytest.raises(GenerationFailed):
                await pending
            assert time.perf_counter() - begun < 2.0
            with pytest.raises(GenerationFailed, match="model unavailable"):
                await remote.generate(request())
            child.wait()
            child = spawn()
            await asyncio.sleep(0.6)
            assert isinstance(await remote.generate(request()), Reply)
    finally:
        child.kill()
        child.wait()


async def test_remembered_facts_reach_the_remote_prompt(
    server: OpenAIServer, tiny_model_dir: Path, gpt2_tokenizer: object
) -> None:
    facts = ("The llama is called Pat.", "Meetings are on Fridays.")
    with_facts = dataclasses.replace(request("who is Pat?"), facts=facts)
    async with started(config(server.url, tokenizer=tiny_model_dir)) as remote:
        await remote.generate(with_facts)
    history = (Turn("alice", "who is Pat?"),)
    expected = build_prompt(gpt2_tokenizer, "A friendly bot.", history, "Bot", 12, 1024, facts=facts)  # type: ignore[arg-type]
    assert expected.text.startswith(
        "A friendly bot.\n- The llama is called Pat.\n- Meetings are on Fridays.\n"
    )
    assert server.bodies[-1]["prompt"] == list(expected.input_ids)
