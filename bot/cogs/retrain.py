"""/retrain start|cancel|status (admins), and the registry watcher's timer.

The work is in the bot.retrain package: this cog starts a RetrainRunner, lets `follow` turn the child's
events into the admin's ephemeral message (edited every few seconds, so the bot keeps answering while a
model trains), and polls the RegistryWatcher every WATCH_INTERVAL_SECONDS, so any promotion hot-reloads
the worker.
"""

from __future__ import annotations

import asyncio
import functools
import io
import logging
import os
import sys
import time
from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands, tasks

from bot.cogs.common import admin_check, admin_group, answer, audit, defer
from bot.retrain.options import RetrainOptions, describe
from bot.retrain.progress import RetrainStatus, first_message, format_final, format_progress, reload_note
from bot.retrain.runner import CHILD_MODULE, RetrainRunner, Wait, child_environment, follow, plain_wait
from bot.retrain.watcher import WATCH_INTERVAL_SECONDS, RegistryWatcher

if TYPE_CHECKING:
    from bot.discord_app import ChatBot

log = logging.getLogger(__name__)


class RetrainCog(commands.Cog):
    """/retrain start|cancel|status and the registry watcher's timer."""

    retrain = admin_group(
        "retrain", "Retrain the model on consented conversations, then promote it if better"
    )

    def __init__(self, bot: ChatBot) -> None:
        self.bot = bot
        self.command: list[str] = [sys.executable, "-m", CHILD_MODULE]
        # How the follow-up task awaits the child; tests route it through simcord's external_wait.
        self.external_wait: Wait = plain_wait
        self.runner: RetrainRunner | None = None
        self.status: RetrainStatus | None = None
        self.follower: asyncio.Task[None] | None = None
        self.watcher = RegistryWatcher(bot.settings.models_dir, bot.generator.reload)

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
        await self.watcher.poll()

    @retrain.command(name="start")
    @app_commands.describe(steps=describe("max_steps"), force=describe("force"))
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
        """Follow the child to its end, editing the admin's message now and then; then report."""
        show = functools.partial(self._edit, interaction)
        await follow(runner, status, self.bot.clock, show, self.external_wait)
        if status.result and status.result.get("promoted"):
            # Serve the promoted model now rather than at the next poll (which may have done it already).
            status.reload_note = reload_note(await self.watcher.catch_up(), self.watcher.last_error)
        await self._report(interaction, status)

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
        if self.watcher.last_error:
            text += f"\nLast hot reload: {self.watcher.last_error}."
        await answer(interaction, first_message(text))
        await audit(interaction, "viewed", allowed=True)


async def setup(bot: ChatBot) -> None:
    """discord.py extension entry point."""
    await bot.add_cog(RetrainCog(bot))
