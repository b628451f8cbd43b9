"""`chatbot health` and the heartbeat: 0 for a running bot; non-zero soon after its loop blocks, its worker
dies or it stops (issue 22). Time constants are shrunk here; the production ones are checked below."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from bot.operations.health import (
    HEARTBEAT_INTERVAL_SECONDS,
    HEARTBEAT_STALE_AFTER_SECONDS,
    Heartbeat,
    Vitals,
    check_health,
    heartbeat_path,
    write_heartbeat,
)
from bot.operations.metrics import BotMetrics
from bot.operations.sidecar import operations
from tests.helpers.discord_harness import Harness, running_bot

INTERVAL_SECONDS = 0.1
STALE_AFTER_SECONDS = 1.0
HEALTH_DEADLINE_SECONDS = 30.0  # the bar: unhealthy within 30 s
HEALTHY = Vitals(is_connected=True, is_worker_alive=True, loop_lag_seconds=0.0)


def chatbot_health(data_dir: Path) -> subprocess.CompletedProcess[str]:
    """The real command, as a container HEALTHCHECK or the systemd timer runs it."""
    env = {**os.environ, "BOT_DATA_DIR": str(data_dir)}
    command = [sys.executable, "-c", "import sys; from bot.cli import main; sys.exit(main(sys.argv[1:]))"]
    return subprocess.run(
        [*command, "--env-file", "/nonexistent/.env", "health"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def in_thread(func, *args):  # type: ignore[no-untyped-def]
    """Run blocking work off the loop, so the heartbeat keeps beating meanwhile."""
    return await asyncio.to_thread(func, *args)


async def wait_for(predicate, timeout_seconds: float) -> float:  # type: ignore[no-untyped-def]
    """Poll in real time (the harness's asyncio clock is virtual); return the seconds it took."""
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < timeout_seconds, "timed out"
        await in_thread(time.sleep, 0.05)
    return time.monotonic() - started


def beating(h: Harness):  # type: ignore[no-untyped-def]
    return operations(
        h.bot, h.generator, h.bot.settings, BotMetrics(),
        interval_seconds=INTERVAL_SECONDS, stale_after_seconds=STALE_AFTER_SECONDS,
    )  # fmt: skip


def is_healthy(data_dir: Path) -> bool:
    return check_health(heartbeat_path(data_dir), time.time())[0]


def test_production_constants_report_trouble_within_30_seconds() -> None:
    # Worst case: the last beat just before the trouble, then the heartbeat goes stale.
    assert HEARTBEAT_STALE_AFTER_SECONDS + HEARTBEAT_INTERVAL_SECONDS <= HEALTH_DEADLINE_SECONDS
    assert HEARTBEAT_STALE_AFTER_SECONDS >= 2 * HEARTBEAT_INTERVAL_SECONDS  # one slow beat is no alarm


def test_fresh_stale_missing_broken_and_orphaned_heartbeats(tmp_path: Path) -> None:
    path = tmp_path / "heartbeat.json"
    assert check_health(path, 100.0) == (
        False,
        f"no heartbeat at {path}: the bot is not running (or not connected yet)",
    )
    write_heartbeat(path, HEALTHY, at=100.0, stale_after_seconds=15.0)
    assert check_health(path, 110.0)[0]
    healthy, line = check_health(path, 116.0)
    assert not healthy and line.startswith("last heartbeat 16.0 s ago (limit 15 s)")
    record = json.loads(path.read_text())
    dead_pid = subprocess.Popen([sys.executable, "-c", "pass"])
    dead_pid.wait()
    path.write_text(json.dumps({**record, "pid": dead_pid.pid}))
    assert check_health(path, 101.0) == (
        False,
        f"the bot that wrote {path} (pid {dead_pid.pid}) is not running",
    )
    path.write_text("{not json")
    assert not check_health(path, 101.0)[0]
    assert not list(tmp_path.glob(".*.tmp")), "the atomic write leaves no temporary file"


async def test_health_is_zero_for_a_running_bot_and_not_after_it_stops(tmp_path: Path) -> None:
    async with running_bot(tmp_path) as h:
        data_dir = h.bot.settings.data_dir
        async with beating(h):
            await wait_for(lambda: is_healthy(data_dir), 5)
            result = await in_thread(chatbot_health, data_dir)
            assert result.returncode == 0 and result.stdout.startswith("healthy: heartbeat"), result
        result = await in_thread(chatbot_health, data_dir)  # stopped: the heartbeat file is gone
        assert result.returncode == 1 and "no heartbeat" in result.stdout


async def test_health_fails_soon_after_the_loop_blocks_and_recovers(tmp_path: Path) -> None:
    async with running_bot(tmp_path) as h, beating(h):
        data_dir = h.bot.settings.data_dir
        await wait_for(lambda: is_healthy(data_dir), 5)
        seen: list[tuple[float, int]] = []  # (seconds since the block, exit code of `chatbot health`)
        blocked_at = time.monotonic()

        def probe() -> None:  # from another thread: the loop itself is stuck
            while time.monotonic() - blocked_at < 4.0:
                seen.append((time.monotonic() - blocked_at, chatbot_health(data_dir).returncode))

        prober = threading.Thread(target=probe)
        prober.start()
        time.sleep(4.5)  # blocks the event loop, as a generation run on it by mistake would
        prober.join()
        failed = [at for at, code in seen if code != 0]
        assert failed and failed[0] < HEALTH_DEADLINE_SECONDS, seen
        assert seen[-1][1] == 1, seen
        await wait_for(lambda: is_healthy(data_dir), 5)  # the loop runs again: so do the beats


async def test_health_fails_soon_after_the_worker_dies(tmp_path: Path) -> None:
    async with running_bot(tmp_path) as h, beating(h):
        data_dir = h.bot.settings.data_dir
        await wait_for(lambda: is_healthy(data_dir), 5)
        await h.generator.close()  # the worker is gone (FakeGenerator.is_alive() is now False)
        took = await wait_for(lambda: not is_healthy(data_dir), HEALTH_DEADLINE_SECONDS)
        assert took < STALE_AFTER_SECONDS + 1.0
        result = await in_thread(chatbot_health, data_dir)
        assert result.returncode == 1 and "last heartbeat" in result.stdout


async def test_no_heartbeat_until_connected(tmp_path: Path) -> None:
    async with running_bot(tmp_path) as h:
        h.bot.ws.open = False  # type: ignore[union-attr]  # the gateway dropped: discord.py reconnects
        async with beating(h):
            await in_thread(time.sleep, 5 * INTERVAL_SECONDS)
            assert not heartbeat_path(h.bot.settings.data_dir).exists()


async def test_a_heartbeat_that_cannot_be_written_is_logged_and_beating_goes_on(tmp_path: Path) -> None:
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the data dir should be")
    heartbeat = Heartbeat(blocked / "heartbeat.json", lambda: True, lambda: True, interval_seconds=0.01)
    heartbeat.beat(0.0)
    heartbeat.beat(0.0)  # no exception: the task that beats must not die of it
    assert not check_health(heartbeat.path, time.time())[0]
