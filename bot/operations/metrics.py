"""Prometheus metrics: counted where replies pass (MeteredGenerator), read live at scrape time (the rest).

Opt-in: `BOT_METRICS_PORT` (0 = off) serves `/metrics` on `BOT_METRICS_HOST` (127.0.0.1 by default).
Every metric lives on the bot's own CollectorRegistry, so two bots in one process (tests) never share
counts. Names follow Prometheus conventions: `chatbot_` prefix, `_total` counters, base units (`_seconds`,
`_bytes`). deploy/grafana-dashboard.json charts them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from model.api import GeneratorError, ModelInfo, Reply, ReplyGenerator, ReplyRequest, WorkerBusy

log = logging.getLogger(__name__)

# A reply takes from well under a second (GPU, short) to BOT_GENERATION_TIMEOUT_SECONDS (CPU, long).
REPLY_LATENCY_BUCKETS_SECONDS = (0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0)


class BotMetrics:
    """The counters and histograms the bot updates, on one CollectorRegistry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.replies = Counter(
            "chatbot_replies", "Replies generated, by stop reason", ["stop_reason"], registry=r
        )
        self.busy = Counter(
            "chatbot_busy_refusals", "Requests refused because the queue was full", registry=r
        )
        self.failed = Counter(
            "chatbot_failed_generations", "Generations that failed, by error", ["error"], registry=r
        )
        self.reply_latency = Histogram(
            "chatbot_reply_latency_seconds", "Request to finished reply, queueing included",
            buckets=REPLY_LATENCY_BUCKETS_SECONDS, registry=r,
        )  # fmt: skip
        self.tokens = Counter("chatbot_generated_tokens", "Completion tokens generated", registry=r)
        self.prompt_tokens = Counter("chatbot_prompt_tokens", "Prompt tokens read", registry=r)

    def add_live(self, sources: LiveSources) -> None:
        """Add the gauges read at scrape time (once the bot and its worker exist)."""
        self.registry.register(LiveCollector(sources))

    def observe_reply(self, reply: Reply, seconds: float) -> None:
        """Count one finished reply."""
        self.replies.labels(reply.stop_reason).inc()
        self.reply_latency.observe(seconds)
        self.tokens.inc(reply.completion_tokens)
        self.prompt_tokens.inc(reply.prompt_tokens)


class MeteredGenerator:
    """A ReplyGenerator that counts what passes through it; everything else goes to the one it wraps."""

    def __init__(self, inner: ReplyGenerator, metrics: BotMetrics) -> None:
        self.inner = inner
        self.metrics = metrics

    async def generate(self, request: ReplyRequest) -> Reply:
        """Generate and count the reply, the refusal or the failure (a timeout counts as `cancelled`)."""
        started = time.monotonic()
        try:
            reply = await self.inner.generate(request)
        except WorkerBusy:
            self.metrics.busy.inc()
            raise
        except GeneratorError as exc:
            self.metrics.failed.labels(type(exc).__name__).inc()
            raise
        except asyncio.CancelledError:  # BOT_GENERATION_TIMEOUT_SECONDS, or shutdown
            self.metrics.failed.labels("cancelled").inc()
            raise
        self.metrics.observe_reply(reply, time.monotonic() - started)
        return reply

    async def reload(self, source: str) -> ModelInfo:
        return await self.inner.reload(source)

    def info(self) -> ModelInfo:
        return self.inner.info()

    def queue_depth(self) -> int:
        return self.inner.queue_depth()

    def is_alive(self) -> bool:
        return self.inner.is_alive()

    async def close(self, grace_seconds: float = 10.0) -> None:
        await self.inner.close(grace_seconds)


@dataclass(frozen=True)
class LiveSources:
    """Where the scrape-time metrics are read from (called on the HTTP server's thread)."""

    generator: ReplyGenerator
    loop_lag_seconds: Callable[[], float]
    gateway_latencies: Callable[[], Iterable[tuple[int, float]]]  # (shard id, seconds)
    models_dir: Path


class LiveCollector(Collector):
    """Gauges read when Prometheus scrapes: queue, loop lag, GPU memory, model, gateway, registry."""

    def __init__(self, sources: LiveSources) -> None:
        self.sources = sources

    def collect(self) -> Iterator[Metric]:
        s = self.sources
        yield _gauge("chatbot_queue_depth", "Generate requests waiting or running", s.generator.queue_depth())
        yield _gauge(
            "chatbot_event_loop_lag_seconds", "How late the event loop woke up", s.loop_lag_seconds()
        )
        yield from _model_metrics(s.generator)
        latency = GaugeMetricFamily(
            "chatbot_gateway_latency_seconds", "Gateway heartbeat round trip, by shard", labels=["shard"]
        )
        for shard, seconds in s.gateway_latencies():
            if seconds == seconds and seconds != float("inf"):  # nan/inf until the first heartbeat ack
                latency.add_metric([str(shard)], seconds)
        yield latency
        yield from _registry_metrics(s.models_dir)


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _model_metrics(generator: ReplyGenerator) -> Iterator[Metric]:
    try:
        info = generator.info()
    except GeneratorError:  # no model loaded (yet, or any more)
        return
    model = InfoMetricFamily("chatbot_model", "The model serving now")
    model.add_metric(
        [], {"name": info.name, "version": info.version, "device": info.device, "dtype": info.dtype}
    )
    yield model
    if info.gpu_memory_allocated_bytes is not None:
        yield _gauge(
            "chatbot_gpu_memory_allocated_bytes", "GPU memory held by torch", info.gpu_memory_allocated_bytes
        )
    if info.gpu_memory_total_bytes is not None:
        yield _gauge("chatbot_gpu_memory_total_bytes", "The GPU's memory", info.gpu_memory_total_bytes)


def _registry_metrics(models_dir: Path) -> Iterator[Metric]:
    """Retraining's results from the model registry: versions (one per finished run) and promotions."""
    from model.training.registry import Registry, RegistryError

    try:
        registry = Registry(models_dir)
        versions, promotions = len(registry.versions()), len(registry.history())
    except (RegistryError, OSError, ValueError):
        return
    yield _gauge(
        "chatbot_registry_versions", "Model versions in the registry (finished retrain runs)", versions
    )
    yield _gauge("chatbot_registry_promotions", "Promotions and rollbacks in the registry", promotions)


@contextlib.contextmanager
def serving_metrics(registry: CollectorRegistry, host: str, port: int) -> Iterator[bool]:
    """Serve /metrics on host:port in a thread while inside; yields False (and logs one line) if it cannot."""
    try:
        server, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        log.error(
            "cannot serve metrics on %s:%d: %s (the bot runs without them)", host, port, exc.strerror or exc
        )
        yield False
        return
    log.info("metrics on http://%s:%d/metrics", host, port)
    try:
        yield True
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
