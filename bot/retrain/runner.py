"""The bot's side of the retraining child: its environment, starting it, reading its events, cancelling it.

No Discord here: `follow` folds the child's events into a RetrainStatus and calls back with the progress
text now and then; the cog decides where that text goes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from bot.config import Settings
from bot.retrain.progress import RetrainStatus, format_progress

log = logging.getLogger(__name__)

T = TypeVar("T")
CANCEL_GRACE_SECONDS = 10.0
EDIT_INTERVAL_SECONDS = 3.0
EVENT_LINE_LIMIT_BYTES = 1 << 20  # the final event carries the comparison table
CHILD_MODULE = "bot.retrain"

Wait = Callable[[Awaitable[Any]], Awaitable[Any]]


def _env_text(value: object) -> str:
    """A setting's value as its variable spells it, so Settings.from_env reads back the same value."""
    if value is None:
        return ""  # an optional setting left unset
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, frozenset):
        return ",".join(str(v) for v in sorted(value))
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def child_environment(settings: Settings, base: Mapping[str, str]) -> dict[str, str]:
    """The child's environment: `base` (PATH, HF_HOME, …) plus every setting, and never the Discord token."""
    env = {key: value for key, value in base.items() if key not in ("DISCORD_TOKEN", "DISCORD_TOKEN_FILE")}
    for f in dataclasses.fields(settings):
        if f.repr:  # the token (and its file) are hidden from repr: the child does not need them
            env[f.metadata["env"]] = _env_text(getattr(settings, f.name))
    return env


def parse_event(line: bytes) -> dict[str, Any] | None:
    """One stdout line of the child → its event dict; None for anything that is not one."""
    try:
        event = json.loads(line)
    except ValueError:
        return None
    return event if isinstance(event, dict) and isinstance(event.get("event"), str) else None


class RetrainRunner:
    """One child process: start it, read its events, wait for it, or cancel it (SIGTERM, then SIGKILL)."""

    def __init__(self, command: Sequence[str], env: Mapping[str, str], log_path: Path) -> None:
        self.command = list(command)
        self.env = dict(env)
        self.log_path = log_path
        self._process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        """Spawn the child; its stderr (library logs, tracebacks) goes to log_path."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as stderr:  # the child keeps its own copy of the descriptor
            self._process = await asyncio.create_subprocess_exec(
                *self.command, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=stderr, env=self.env, limit=EVENT_LINE_LIMIT_BYTES,
            )  # fmt: skip
        log.info("retraining started: pid %d, log %s", self._process.pid, self.log_path)

    @property
    def is_running(self) -> bool:
        """Whether the child has been started and has not exited."""
        return self._process is not None and self._process.returncode is None

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """The child's events until it closes stdout."""
        assert self._process is not None and self._process.stdout is not None
        while line := await self._process.stdout.readline():
            if (event := parse_event(line)) is not None:
                yield event

    async def wait(self) -> int:
        """The child's exit code."""
        assert self._process is not None
        return await self._process.wait()

    async def cancel(self, grace_seconds: float = CANCEL_GRACE_SECONDS) -> None:
        """SIGTERM (the child cleans its scratch files up), then SIGKILL after the grace period."""
        if not self.is_running:
            return
        assert self._process is not None
        self._process.terminate()
        try:
            await asyncio.wait_for(self._process.wait(), grace_seconds)
        except TimeoutError:
            log.warning("retraining did not stop within %.0f s of SIGTERM: killing it", grace_seconds)
            self._process.kill()
            await self._process.wait()


async def plain_wait(awaitable: Awaitable[T]) -> T:
    """Await it (how the bot waits for the child; tests wait through simcord instead)."""
    return await awaitable


async def follow(
    runner: RetrainRunner,
    status: RetrainStatus,
    clock: Callable[[], float],
    show: Callable[[str], Awaitable[bool]],
    wait: Wait = plain_wait,
) -> None:
    """Fold the child's events into `status` until it exits, showing the progress now and then.

    `show` returns False when the text can no longer be shown (then it is not called again); `wait` is how
    the child is awaited (tests route it through simcord's external_wait). The status ends with the
    child's result, or an error saying why there is none.
    """
    try:
        await _read_events(runner, status, clock, show, wait)
        code = await wait(runner.wait())
    except Exception as exc:  # a task nobody awaits: log here, or the failure would vanish
        log.exception("following the retraining child failed")
        status.error = f"internal error: {exc}"
        await runner.cancel()
        code = -1
    if code != 0 and status.error is None and not status.cancelled:
        status.error = f"exit code {code}; see {runner.log_path}"


async def _read_events(runner: RetrainRunner, status: RetrainStatus, clock: Callable[[], float],
                       show: Callable[[str], Awaitable[bool]], wait: Wait) -> None:  # fmt: skip
    last_shown, can_show = clock(), True
    events = runner.events()
    while (event := await wait(anext(events, None))) is not None:
        status.apply(event)
        if can_show and clock() - last_shown >= EDIT_INTERVAL_SECONDS and not status.is_finished:
            last_shown = clock()
            can_show = await show(format_progress(status, last_shown))
