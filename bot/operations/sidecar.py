"""What runs beside the Discord bot for its operator: the heartbeat (`chatbot health`) and /metrics."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import discord

from bot.config import Settings
from bot.operations.health import Heartbeat, heartbeat_path
from bot.operations.metrics import BotMetrics, LiveSources, serving_metrics
from model.api import ReplyGenerator


def is_connected(client: discord.Client) -> bool:
    """Logged in, READY received, and the gateway's websocket open (False while it reconnects)."""
    socket = client.ws
    return client.is_ready() and not client.is_closed() and socket is not None and bool(socket.open)


def gateway_latencies(client: discord.Client) -> list[tuple[int, float]]:
    """(shard id, heartbeat round trip in seconds) per shard; one unsharded connection is shard 0."""
    if isinstance(client, discord.AutoShardedClient):
        return list(client.latencies)
    return [(client.shard_id or 0, client.latency)]


@contextlib.asynccontextmanager
async def operations(
    client: discord.Client,
    generator: ReplyGenerator,
    settings: Settings,
    metrics: BotMetrics,
    **heartbeat_options: Any,
) -> AsyncIterator[Heartbeat]:
    """Beat the heartbeat, and serve the metrics when BOT_METRICS_PORT is set, while inside."""
    heartbeat = Heartbeat(
        heartbeat_path(settings.data_dir),
        lambda: is_connected(client),
        generator.is_alive,
        **heartbeat_options,
    )
    metrics.add_live(
        LiveSources(
            generator,
            lambda: heartbeat.loop_lag_seconds,
            lambda: gateway_latencies(client),
            settings.models_dir,
        )
    )
    with contextlib.ExitStack() as stack:
        if settings.metrics_port:
            stack.enter_context(
                serving_metrics(metrics.registry, settings.metrics_host, settings.metrics_port)
            )
        async with heartbeat.running():
            yield heartbeat
