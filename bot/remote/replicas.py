"""The servers (replicas) of a remote backend: health, least-busy choice, back-off and their statistics.

Pure bookkeeping on the event loop (no I/O), so the choice and the circuit breaker are testable with a
fake clock. A replica that fails is left out for `retry_after` seconds (doubling while it keeps failing, up
to 8×), then gets requests again; when every replica is out the circuit is open and requests fail at once.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from bot.stats import percentile

LATENCY_SAMPLES = 512  # the newest reply times kept per replica for p50/p95
MAX_BACKOFF_FACTOR = 8


@dataclass(eq=False)
class Replica:
    """One server URL (ending in /v1) and what the bot has seen of it."""

    url: str
    in_flight: int = 0
    down_until: float = 0.0  # monotonic time before which it gets no requests
    consecutive_failures: int = 0
    last_error: str = ""
    requests: int = 0
    errors: int = 0
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_SAMPLES))

    def is_up(self, now: float) -> bool:
        return now >= self.down_until

    def summary(self, now: float) -> str:
        """One /stats line: health, in flight, latency p50/p95, errors (no secrets: the URL has none)."""
        state = (
            "up" if self.is_up(now) else f"down ({self.last_error}; retry in {self.down_until - now:.0f} s)"
        )
        p50, p95 = percentile(self.latencies, 0.5), percentile(self.latencies, 0.95)
        timing = (
            f"p50 {p50 * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms"
            if p50 is not None and p95
            else "no replies yet"
        )
        return (
            f"{self.url}: {state}, {self.in_flight} in flight, {timing}, {self.errors}/{self.requests} errors"
        )


class ReplicaPool:
    """Picks the least-busy replica that is up; takes failing ones out and lets them back in later."""

    def __init__(
        self, urls: Sequence[str], retry_after: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        assert urls, "a pool needs at least one server"
        self.replicas = [Replica(url) for url in urls]
        self._retry_after = retry_after
        self._clock = clock

    def pick(self, exclude: Sequence[Replica] = ()) -> Replica | None:
        """The replica with the fewest requests in flight among those up (not in `exclude`); None if none."""
        now = self._clock()
        up = [r for r in self.replicas if r.is_up(now) and r not in exclude]
        return min(up, key=lambda r: r.in_flight) if up else None

    def is_open(self) -> bool:
        """The circuit breaker: every replica is down, so requests fail at once."""
        now = self._clock()
        return not any(r.is_up(now) for r in self.replicas)

    def retry_in(self) -> float:
        """Seconds until the first replica that is down gets requests again."""
        now = self._clock()
        return max(0.0, min(r.down_until for r in self.replicas) - now)

    def succeeded(self, replica: Replica, seconds: float) -> None:
        replica.requests += 1
        replica.consecutive_failures = 0
        replica.down_until = 0.0
        replica.latencies.append(seconds)

    def failed(self, replica: Replica, reason: str) -> None:
        """Count the error and take the replica out, for longer each time it fails again."""
        replica.requests += 1
        replica.errors += 1
        replica.consecutive_failures += 1
        replica.last_error = reason
        factor = min(MAX_BACKOFF_FACTOR, 2 ** (replica.consecutive_failures - 1))
        replica.down_until = self._clock() + self._retry_after * factor

    def mark_up(self, replica: Replica) -> None:
        """A health check answered: the replica takes requests again now."""
        replica.consecutive_failures = 0
        replica.down_until = 0.0

    def summaries(self) -> tuple[str, ...]:
        now = self._clock()
        return tuple(r.summary(now) for r in self.replicas)
