"""A fake reply generator with a queue of canned replies, so bot tests never need a real model."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterable

from model.api import ModelInfo, ReloadFailed, Reply, ReplyRequest, WorkerBusy, WorkerClosed


class FakeGenerator:
    """Implements model.api.ReplyGenerator; replies are taken from `replies` in order, then `default`."""

    def __init__(
        self,
        replies: Iterable[str] = (),
        *,
        default: str = "hello from the fake model",
        queue_size: int = 32,
        delay_seconds: float = 0.0,
    ) -> None:
        self.replies: deque[str] = deque(replies)
        self.default = default
        self.queue_size = queue_size
        self.delay_seconds = delay_seconds
        self.requests: list[ReplyRequest] = []
        self.reloads: list[str] = []
        self.fail_reload_at: str | None = None  # e.g. "load": the next reload fails at that step
        self.model_name = "fake"
        self.version = "v1"
        self.in_flight = 0
        self.closed = False

    async def generate(self, request: ReplyRequest) -> Reply:
        """Answer with the next canned reply; WorkerBusy when queue_size requests are already in flight."""
        if self.closed:
            raise WorkerClosed("closed")
        if self.in_flight >= self.queue_size:
            raise WorkerBusy("queue full")
        self.in_flight += 1
        try:
            self.requests.append(request)
            if self.delay_seconds:
                await asyncio.sleep(self.delay_seconds)
            text = self.replies.popleft() if self.replies else self.default
            return Reply(
                text,
                10,
                len(text.split()),
                0.0,
                self.delay_seconds,
                "turn_end",
                self.model_name,
                self.version,
                len(request.history),
            )
        finally:
            self.in_flight -= 1

    async def reload(self, source: str) -> ModelInfo:
        """Pretend to swap models; fail at `fail_reload_at` when set (old model keeps serving)."""
        self.reloads.append(source)
        if self.fail_reload_at:
            step, self.fail_reload_at = self.fail_reload_at, None
            raise ReloadFailed(step, "broken model")
        self.model_name, self.version = source, f"v{len(self.reloads) + 1}"
        return self.info()

    def info(self) -> ModelInfo:
        """A fixed description of the fake model."""
        return ModelInfo(self.model_name, self.version, "cpu", "float32", 1000, 1000, 1024)

    def queue_depth(self) -> int:
        """Requests currently in flight."""
        return self.in_flight

    def is_alive(self) -> bool:
        """Alive until closed (a test "kills the worker" by closing it)."""
        return not self.closed

    async def close(self, grace_seconds: float = 10.0) -> None:
        """Stop accepting requests."""
        self.closed = True
