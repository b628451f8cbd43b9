"""Prometheus metrics: a scrape of /metrics while the simcord harness runs moves with a reply (issue 22)."""

from __future__ import annotations

import asyncio
import logging
import socket
import urllib.request
from pathlib import Path

import pytest
import simcord
from prometheus_client.parser import text_string_to_metric_families

from bot.config import Settings
from bot.operations.metrics import BotMetrics, LiveSources, MeteredGenerator, serving_metrics
from bot.operations.sidecar import operations
from bot.storage import Storage
from model.api import GenerationFailed, ModelInfo, ReplyRequest, WorkerBusy
from model.prompt import Turn
from tests.helpers.discord_harness import TEST_COGS, build_bot, make_settings
from tests.helpers.fake_discord_api import free_port
from tests.helpers.fakes import FakeGenerator

REQUEST = ReplyRequest(persona="A chat.", history=(Turn("alice", "hi"),))


def scrape(port: int) -> dict[str, float]:
    """Every sample of http://127.0.0.1:PORT/metrics as {'name{label="value"}': value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def test_metrics_are_off_by_default_and_bind_to_localhost() -> None:
    settings = Settings.from_env({})
    assert settings.metrics_port == 0 and settings.metrics_host == "127.0.0.1"


async def test_a_scrape_before_and_after_a_reply_sees_the_values_move(tmp_path: Path) -> None:
    port = free_port()
    settings = make_settings(tmp_path, metrics_port=port)
    metrics, fake = BotMetrics(), FakeGenerator(["hello there alice"])
    async with Storage.open(settings.db_path, settings.db_busy_timeout_seconds) as storage:
        bot = build_bot(settings, storage, MeteredGenerator(fake, metrics), TEST_COGS)  # type: ignore[arg-type]
        async with simcord.run(bot) as env, operations(bot, bot.generator, settings, metrics):
            guild = env.create_guild("Test Guild")
            channel = guild.create_text_channel("general")
            alice = guild.add_member(env.create_user("alice"))
            before = await asyncio.to_thread(scrape, port)
            assert bot.user is not None
            await alice.send(channel, f"{bot.user.mention} hi bot")
            after = await asyncio.to_thread(scrape, port)
    assert [m.content for m in channel.history() if m.author.id == bot.user.id] == ["hello there alice"]
    assert before.get('chatbot_replies_total{stop_reason="turn_end"}', 0.0) == 0.0
    assert after['chatbot_replies_total{stop_reason="turn_end"}'] == 1.0
    assert before["chatbot_reply_latency_seconds_count"] == 0.0
    assert after["chatbot_reply_latency_seconds_count"] == 1.0
    assert after["chatbot_generated_tokens_total"] - before["chatbot_generated_tokens_total"] == 3.0
    assert after["chatbot_prompt_tokens_total"] == 10.0
    for name in ("chatbot_busy_refusals_total", "chatbot_queue_depth", "chatbot_event_loop_lag_seconds"):
        assert after[name] == 0.0, name
    assert after['chatbot_model_info{device="cpu",dtype="float32",name="fake",version="v1"}'] == 1.0
    assert after['chatbot_gateway_latency_seconds{shard="0"}'] == 0.0  # simcord's gateway answers at once
    assert after["chatbot_registry_versions"] == 0.0 and after["chatbot_registry_promotions"] == 0.0


async def test_busy_and_failed_generations_are_counted() -> None:
    metrics = BotMetrics()
    busy = MeteredGenerator(FakeGenerator(queue_size=0), metrics)
    with pytest.raises(WorkerBusy):
        await busy.generate(REQUEST)

    class Failing(FakeGenerator):
        async def generate(self, request: ReplyRequest):  # type: ignore[no-untyped-def]
            raise GenerationFailed("CUDA out of memory")

    with pytest.raises(GenerationFailed):
        await MeteredGenerator(Failing(), metrics).generate(REQUEST)
    slow = MeteredGenerator(FakeGenerator(delay_seconds=30), metrics)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(slow.generate(REQUEST), 0.05)  # BOT_GENERATION_TIMEOUT_SECONDS
    value = metrics.registry.get_sample_value
    assert value("chatbot_busy_refusals_total") == 1.0
    assert value("chatbot_failed_generations_total", {"error": "GenerationFailed"}) == 1.0
    assert value("chatbot_failed_generations_total", {"error": "cancelled"}) == 1.0
    assert value("chatbot_replies_total", {"stop_reason": "turn_end"}) is None


def test_gpu_memory_and_per_shard_latency_are_read_at_scrape_time(tmp_path: Path) -> None:
    class OnGpu(FakeGenerator):
        def info(self) -> ModelInfo:
            return ModelInfo(
                "gpt2", "v7", "NVIDIA H100 (79.2 GiB)", "bfloat16", 1, 1, 1024, 2**30, 80 * 2**30
            )

    latencies = [(0, 0.04), (1, float("nan"))]  # shard 1 has not had a heartbeat ack yet
    sources = LiveSources(OnGpu(), lambda: 0.25, lambda: latencies, tmp_path / "models")
    metrics = BotMetrics()
    metrics.add_live(sources)
    value = metrics.registry.get_sample_value
    assert value("chatbot_gpu_memory_allocated_bytes") == 2**30
    assert value("chatbot_gpu_memory_total_bytes") == 80 * 2**30
    assert value("chatbot_event_loop_lag_seconds") == 0.25
    assert value("chatbot_gateway_latency_seconds", {"shard": "0"}) == 0.04
    assert value("chatbot_gateway_latency_seconds", {"shard": "1"}) is None
    assert value("chatbot_model_info", {"name": "gpt2", "version": "v7", "device": "NVIDIA H100 (79.2 GiB)",
                                        "dtype": "bfloat16"}) == 1.0  # fmt: skip


def test_two_bots_never_share_counts() -> None:
    first, second = BotMetrics(), BotMetrics()
    first.busy.inc()
    assert second.registry.get_sample_value("chatbot_busy_refusals_total") == 0.0


def test_a_port_in_use_is_one_line_and_the_bot_runs_on(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with (
            caplog.at_level(logging.ERROR),
            serving_metrics(BotMetrics().registry, "127.0.0.1", port) as is_serving,
        ):
            assert not is_serving
    [line] = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert line.startswith(f"cannot serve metrics on 127.0.0.1:{port}") and not caplog.records[0].exc_info
