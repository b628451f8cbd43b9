"""/retrain (admins): fine-tune, evaluate and promote in a child process; and the hot-reload watcher.

The child (`python -m bot.retrain`) reports JSON events on stdout; this cog turns them into one ephemeral
message that it edits at most every EDIT_INTERVAL_SECONDS, so the bot keeps answering while a model
trains. A background task polls the registry every few seconds and hot-reloads the worker when `current`
changes: after /retrain, after `chatbot promote` or `chatbot rollback` in a shell, whoever promoted.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import discord
from discord import app_commands
from discord.ext import commands, tasks

from bot.cogs.common import admin_check, admin_group, answer, audit, defer
from bot.config import Settings
from bot.retrain import RetrainOptions
from bot.text import split_message
from model.training.registry import WATCH_INTERVAL_SECONDS, CurrentWatcher, RegistryError, current_source

if TYPE_CHECKING:
    from bot.discord_app import ChatBot

log = logging.getLogger(__name__)

T = TypeVar("T")
EDIT_INTERVAL_SECONDS = 3.0
CANCEL_GRACE_SECONDS = 10.0
EVENT_LINE_LIMIT_BYTES = 1 << 20  # the final event carries the comparison table
CHILD_MODULE = "bot.retrain"


# --- the child process, seen from the bot (no Discord here) ---------------------------------------------


def _env_text(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, frozenset):
        return ",".join(str(v) for v in sorted(value))
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
    import json

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


# --- progress, as the admin sees it ---------------------------------------------------------------------


@dataclass
class RetrainStatus:
    """What is known about one run so far; `apply` folds in each event from the child."""

    admin_id: int
    started_at: float
    stage: str = "starting"
    train_conversations: int | None = None
    val_conversations: int | None = None
    step: int = 0
    max_steps: int = 0
    loss: float | None = None
    eta_seconds: float | None = None
    version: str | None = None
    result: Mapping[str, Any] | None = None
    error: str | None = None
    cancelled: bool = False
    reload_note: str = ""

    def apply(self, event: Mapping[str, Any]) -> None:
        """Update from one child event (unknown events are ignored)."""
        kind = event["event"]
        if kind == "stage":
            self.stage = str(event.get("stage", self.stage))
        elif kind == "export":
            self.train_conversations, self.val_conversations = event.get("train"), event.get("val")
        elif kind == "train":
            self.step, self.max_steps = int(event.get("step", 0)), int(event.get("max_steps", 0))
            self.loss, self.eta_seconds = event.get("loss"), event.get("eta_seconds")
        elif kind == "registered":
            self.version = event.get("version")
        elif kind == "done":
            self.stage, self.result = "done", event
        elif kind == "error":
            self.error = f"{event.get('stage', '?')}: {event.get('message', 'unknown error')}"

    @property
    def is_finished(self) -> bool:
        """Whether the run ended (finished, failed or cancelled)."""
        return self.result is not None or self.error is not None or self.cancelled


def format_seconds(seconds: float) -> str:
    """`1h 02m`, `3m 05s` or `12s`."""
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


def _ppl(value: object) -> str:
    return f"{value:.2f}" if isinstance(value, float | int) else "n/a"


def _training_line(status: RetrainStatus) -> str | None:
    if not status.max_steps:
        return None
    loss = f", loss {status.loss:.3f}" if status.loss is not None else ""
    eta = f", about {format_seconds(status.eta_seconds)} left" if status.eta_seconds is not None else ""
    return f"Training: step {status.step}/{status.max_steps}{loss}{eta}"


def format_progress(status: RetrainStatus, now: float) -> str:
    """The admin's message while the run goes on (and the first lines of the final one)."""
    lines = [f"Retraining: {status.stage} ({format_seconds(now - status.started_at)} elapsed)"]
    if status.train_conversations is not None:
        lines.append(
            f"Exported {status.train_conversations} training and {status.val_conversations} validation "
            "conversations."
        )
    lines.append(_training_line(status) or "")
    return "\n".join(line for line in lines if line)


def first_message(text: str) -> str:
    """What fits in one Discord message (UTF-16 length, code fences closed), via the reply splitter."""
    return split_message(text)[0] if text else text


def _metrics_table(table: str) -> str:
    """The metrics part of the comparison (the replies table goes into the attached report)."""
    return table.split("\n\n", 1)[0]


def format_final(status: RetrainStatus, now: float) -> str:
    """The admin's last message: outcome, perplexities, the metrics table; at most 2000 characters."""
    if status.cancelled:
        head = "Retraining cancelled; nothing was promoted."
    elif status.error is not None or status.result is None:
        head = f"Retraining failed ({status.error or 'the child process exited without a result'})."
    else:
        head = _outcome(status.result) + status.reload_note
    body = format_progress(status, now)
    table = _metrics_table(str(status.result.get("table", ""))) if status.result else ""
    text = f"{head}\n{body}" + (f"\n```\n{table}\n```" if table else "")
    return first_message(text)


def _outcome(result: Mapping[str, Any]) -> str:
    numbers = f"held-out perplexity {_ppl(result.get('val_ppl'))} vs {_ppl(result.get('current_ppl'))} now"
    if result.get("promoted"):
        return f"Retraining finished: {result.get('version')} promoted ({numbers})."
    version, reason = result.get("version"), result.get("reason")
    return f"Retraining finished: {version} kept, not promoted: {reason} ({numbers})."


# --- the cog -------------------------------------------------------------------------------------------


async def _plain(awaitable: Awaitable[T]) -> T:
    return await awaitable


class RetrainCog(commands.Cog):
    """/retrain start|cancel|status and the registry watcher."""

    retrain = admin_group(
        "retrain", "Retrain the model on consented conversations, then promote it if better"
    )

    def __init__(self, bot: ChatBot) -> None:
        self.bot = bot
        self.command: list[str] = [sys.executable, "-m", CHILD_MODULE]
        # How the follow-up task awaits the child; tests route it through simcord's external_wait.
        self.external_wait: Callable[[Awaitable[Any]], Awaitable[Any]] = _plain
        self.runner: RetrainRunner | None = None
        self.status: RetrainStatus | None = None
        self.follower: asyncio.Task[None] | None = None
        self._reload_lock = asyncio.Lock()
        self.last_reload_error: str | None = None
        self.failed_source: str | None = None
        self.watcher = CurrentWatcher(bot.settings.models_dir, bot.generator.reload, self._reload_failed)

    async def cog_load(self) -> None:
        """Start watching the registry (from setup_hook, once)."""
        self.watch_registry.start()

    async def cog_unload(self) -> None:
        """Stop watching; a retraining still running is cancelled."""
        self.watch_registry.cancel()
        if self.runner is not None:
            await self.runner.cancel()

    @tasks.loop(seconds=WATCH_INTERVAL_SECONDS)
    async def watch_registry(self) -> None:
        """Hot-reload the worker when the registry's current version changed."""
        await self.poll_registry()

    async def poll_registry(self) -> str | None:
        """One watcher poll, never two at once; returns the source it reloaded."""
        async with self._reload_lock:
            try:
                reloaded = await self.watcher.poll()
            except (RegistryError, OSError) as exc:
                log.error("cannot read the model registry: %s", exc)
                return None
        if reloaded is not None:
            self.failed_source = self.last_reload_error = None
        return reloaded

    async def _reload_failed(self, source: str, exc: BaseException) -> None:
        self.failed_source = source
        self.last_reload_error = (
            f"hot reload of {Path(source).name} failed: {exc}; the old model keeps serving"
        )

    @retrain.command(name="start")
    @app_commands.describe(
        steps="optimizer steps (default: one pass over the data)",
        force="promote even if the new model's held-out perplexity is worse",
    )
    @admin_check()
    async def retrain_start(
        self,
        interaction: discord.Interaction,
        steps: app_commands.Range[int, 1, 1_000_000] | None = None,
        force: bool = False,
    ) -> None:
        """Export consented conversations, fine-tune, compare with the current model, promote if better."""
        await defer(interaction)
        if self.runner is not None and self.runner.is_running:
            await answer(
                interaction, "A retraining is already running: `/retrain status` or `/retrain cancel`."
            )
            await audit(interaction, "refused: one is already running", allowed=True)
            return
        options = RetrainOptions(bot_user_id=self.bot.user.id if self.bot.user else None,
                                 max_steps=steps or -1, force=force)  # fmt: skip
        await self._start(interaction, options)
        await audit(interaction, f"started (steps={steps or 'one epoch'}, force={force})", allowed=True)

    async def _start(self, interaction: discord.Interaction, options: RetrainOptions) -> None:
        settings = self.bot.settings
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(self.bot.clock()))
        env = child_environment(settings, os.environ)  # the child inherits PATH etc., not the token
        runner = RetrainRunner([*self.command, *options.to_argv()], env,
                               settings.data_dir / "logs" / f"retrain-{stamp}.log")  # fmt: skip
        self.status = RetrainStatus(interaction.user.id, self.bot.clock())
        await runner.start()
        self.runner = runner
        await interaction.edit_original_response(content=format_progress(self.status, self.bot.clock()))
        self.follower = asyncio.create_task(self._follow(interaction, runner, self.status))

    async def _follow(
        self, interaction: discord.Interaction, runner: RetrainRunner, status: RetrainStatus
    ) -> None:
        """Fold the child's events into `status`, editing the admin's message now and then; then report."""
        try:
            await self._read_events(interaction, runner, status)
            code = await self.external_wait(runner.wait())
        except Exception as exc:  # a task nobody awaits: log here, or the failure would vanish
            log.exception("following the retraining child failed")
            status.error = f"internal error: {exc}"
            await runner.cancel()
            code = -1
        if code != 0 and status.error is None and not status.cancelled:
            status.error = f"exit code {code}; see {runner.log_path}"
        if status.result and status.result.get("promoted"):
            await self._reload_now(status)
        await self._report(interaction, status)

    async def _read_events(self, interaction: discord.Interaction, runner: RetrainRunner,
                           status: RetrainStatus) -> None:  # fmt: skip
        last_edit, can_edit = self.bot.clock(), True
        events = runner.events()
        while (event := await self.external_wait(anext(events, None))) is not None:
            status.apply(event)
            if can_edit and self.bot.clock() - last_edit >= EDIT_INTERVAL_SECONDS and not status.is_finished:
                last_edit = self.bot.clock()
                can_edit = await self._edit(interaction, format_progress(status, last_edit))

    async def _reload_now(self, status: RetrainStatus) -> None:
        """Serve the promoted model now rather than at the next poll (which may have done it already)."""
        await self.poll_registry()
        promoted = current_source(self.bot.settings.models_dir)
        if promoted is not None and promoted == self.failed_source:
            status.reload_note = f" But the {self.last_reload_error}."
        elif promoted is not None and promoted == self.watcher.seen_source:
            status.reload_note = " Now serving it."

    async def _edit(self, interaction: discord.Interaction, text: str) -> bool:
        try:
            await interaction.edit_original_response(content=text)
        except discord.HTTPException as exc:  # e.g. the 15-minute interaction token expired
            log.warning("cannot update the /retrain message: %s", exc)
            return False
        return True

    async def _report(self, interaction: discord.Interaction, status: RetrainStatus) -> None:
        text = format_final(status, self.bot.clock())
        table = str(status.result.get("table", "")) if status.result else ""
        if await self._edit(interaction, text):
            if table:
                report = discord.File(io.BytesIO(table.encode("utf-8")), filename="retrain-report.md")
                await interaction.followup.send(file=report, ephemeral=True)
            return
        try:  # the token expired during a long run: tell the admin directly
            await interaction.user.send(text)
        except discord.HTTPException as exc:
            log.warning("cannot send the /retrain result to the admin: %s", exc)

    @retrain.command(name="cancel")
    @admin_check()
    async def retrain_cancel(self, interaction: discord.Interaction) -> None:
        """Stop the running retraining (nothing is promoted)."""
        await defer(interaction)
        if self.runner is None or not self.runner.is_running or self.status is None:
            await answer(interaction, "No retraining is running.")
            await audit(interaction, "nothing to cancel", allowed=True)
            return
        self.status.cancelled = True
        await self.runner.cancel()
        await answer(interaction, "Retraining cancelled; the current model keeps serving.")
        await audit(interaction, "cancelled", allowed=True)

    @retrain.command(name="status")
    @admin_check()
    async def retrain_status(self, interaction: discord.Interaction) -> None:
        """Show the progress of the running (or last) retraining."""
        await defer(interaction)
        if self.status is None:
            text = "No retraining has run since the bot started."
        elif self.status.is_finished:
            text = format_final(self.status, self.bot.clock())
        else:
            text = format_progress(self.status, self.bot.clock())
        if self.last_reload_error:
            text += f"\nLast hot reload: {self.last_reload_error}."
        await answer(interaction, first_message(text))
        await audit(interaction, "viewed", allowed=True)


async def setup(bot: ChatBot) -> None:
    """discord.py extension entry point."""
    await bot.add_cog(RetrainCog(bot))
