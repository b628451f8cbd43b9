"""Liveness for supervisors: the bot's heartbeat file, and `chatbot health`, which reads it.

Only the running bot knows whether it is connected, whether its model worker is alive and whether its
event loop keeps up, so it writes `heartbeat.json` in the data dir every HEARTBEAT_INTERVAL_SECONDS while
all three hold, and never otherwise. `chatbot health` (a container HEALTHCHECK, the systemd timer) then
needs no connection to the bot: a missing, stale or dead-process heartbeat is unhealthy. A blocked loop
cannot write, a dead worker or a lost gateway stops the writes, a clean stop removes the file.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

HEARTBEAT_FILE = "heartbeat.json"
HEARTBEAT_INTERVAL_SECONDS = 5.0
# A heartbeat older than this is unhealthy: three missed writes, so one slow disk write is not an alarm,
# and a blocked loop, a dead worker or a lost connection shows within 30 s.
HEARTBEAT_STALE_AFTER_SECONDS = 15.0
MAX_LOOP_LAG_SECONDS = 1.0  # an event loop this late to wake up is not answering Discord in time
EXIT_HEALTHY = 0
EXIT_UNHEALTHY = 1


@dataclass(frozen=True)
class Vitals:
    """What the bot measured on one beat."""

    is_connected: bool
    is_worker_alive: bool
    loop_lag_seconds: float

    def problems(self, max_lag_seconds: float) -> list[str]:
        """Why this beat is unhealthy (empty when healthy)."""
        found = []
        if not self.is_connected:
            found.append("not connected to Discord")
        if not self.is_worker_alive:
            found.append("the model worker is not running")
        if self.loop_lag_seconds > max_lag_seconds:
            found.append(f"event loop lag {self.loop_lag_seconds:.2f} s (limit {max_lag_seconds:g} s)")
        return found


def heartbeat_path(data_dir: Path) -> Path:
    """Where the bot on this data dir keeps its heartbeat."""
    return data_dir / HEARTBEAT_FILE


def write_heartbeat(path: Path, vitals: Vitals, at: float, stale_after_seconds: float) -> None:
    """Replace the heartbeat atomically (write a temporary file, then rename), so a reader never sees half."""
    record = {
        "timestamp": at,
        "pid": os.getpid(),
        "stale_after_seconds": stale_after_seconds,
        "loop_lag_seconds": round(vitals.loop_lag_seconds, 4),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(record), encoding="utf-8")
    os.replace(temporary, path)


def check_health(path: Path, now: float) -> tuple[bool, str]:
    """(healthy?, one line saying why) from the heartbeat file; never raises for a bad file."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        at, pid = float(record["timestamp"]), int(record["pid"])
        stale_after = float(record.get("stale_after_seconds", HEARTBEAT_STALE_AFTER_SECONDS))
    except FileNotFoundError:
        return False, f"no heartbeat at {path}: the bot is not running (or not connected yet)"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return False, f"unreadable heartbeat {path}: {exc}"
    age = now - at
    if age > stale_after:
        return False, f"last heartbeat {age:.1f} s ago (limit {stale_after:g} s): the bot is stuck or stopped"
    if not _process_exists(pid):
        return False, f"the bot that wrote {path} (pid {pid}) is not running"
    return True, f"healthy: heartbeat {age:.1f} s ago, pid {pid}"


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process (e.g. the health check runs as root): it exists
        return True
    return True


class Heartbeat:
    """Measures the loop's lag each beat and refreshes the heartbeat file only while the bot is healthy."""

    def __init__(
        self,
        path: Path,
        is_connected: Callable[[], bool],
        is_worker_alive: Callable[[], bool],
        *,
        interval_seconds: float = HEARTBEAT_INTERVAL_SECONDS,
        stale_after_seconds: float = HEARTBEAT_STALE_AFTER_SECONDS,
        max_lag_seconds: float = MAX_LOOP_LAG_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        self.is_connected = is_connected
        self.is_worker_alive = is_worker_alive
        self.interval_seconds = interval_seconds
        self.stale_after_seconds = stale_after_seconds
        self.max_lag_seconds = max_lag_seconds
        self.clock = clock
        self.loop_lag_seconds = 0.0  # the last measurement, for the metrics
        self._last_problems: list[str] = []

    async def measure_lag(self) -> float:
        """Sleep one interval and return how much later than asked the loop woke us (seconds)."""
        started = time.monotonic()
        await asyncio.sleep(self.interval_seconds)
        self.loop_lag_seconds = max(0.0, time.monotonic() - started - self.interval_seconds)
        return self.loop_lag_seconds

    def beat(self, lag_seconds: float) -> None:
        """Write the heartbeat if all is well; log a change of health once, not every beat."""
        vitals = Vitals(self.is_connected(), self.is_worker_alive(), lag_seconds)
        problems = vitals.problems(self.max_lag_seconds)
        if problems != self._last_problems:
            if problems:
                log.warning("unhealthy (no heartbeat written): %s", "; ".join(problems))
            else:
                log.info("healthy again")
            self._last_problems = problems
        if not problems:
            try:
                write_heartbeat(self.path, vitals, self.clock(), self.stale_after_seconds)
            except OSError as exc:  # a full or read-only disk: the check will say stale; keep measuring
                log.warning("cannot write the heartbeat %s: %s", self.path, exc)

    async def run(self) -> None:
        """Beat until cancelled."""
        self.beat(0.0)
        while True:
            self.beat(await self.measure_lag())

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Heartbeat]:
        """Beat in the background; on the way out stop and remove the file (a stopped bot is unhealthy)."""
        task = asyncio.get_running_loop().create_task(self.run(), name="heartbeat")
        try:
            yield self
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            self.path.unlink(missing_ok=True)


def run_health_check(data_dir: Path) -> int:
    """`chatbot health`: print one line; 0 when the bot on this data dir is healthy, 1 otherwise."""
    is_healthy, line = check_health(heartbeat_path(data_dir), time.time())
    print(line)
    return EXIT_HEALTHY if is_healthy else EXIT_UNHEALTHY
