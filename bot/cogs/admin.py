"""Admin commands: /reload, /stats, /config and /reset; plus the event-loop lag probe for /stats.

Every admin command is guild-only and checked on the server side (bot.cogs.common.is_guild_admin); its
work runs through bot.cogs.common.respond: deferred at once (Discord's 3-second deadline), answered
ephemerally, audited.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands, tasks

from bot.cogs.common import (
    Answer,
    admin_check,
    admin_group,
    admin_only,
    is_bot_owner,
    is_guild_admin,
    respond,
)
from bot.cogs.sampling import (
    SAMPLING_HELP,
    SamplingChange,
    describe_config,
    persona_error,
    settings_here,
    validate_change,
)
from bot.runtime import model_source
from bot.sharding import shard_lines
from bot.stats import percentile
from bot.storage import Stats
from model.api import ModelInfo, ReloadFailed, ReloadInProgress

if TYPE_CHECKING:
    from bot.chatbot import ChatBot

log = logging.getLogger(__name__)

REFUSED_OTHER_MODEL = (
    "Only the bot's owners can load a different model, because one model serves every server. "
    "`/reload` without a model reloads the current one."
)

LAG_PROBE_INTERVAL_SECONDS = 0.5
LAG_SAMPLES = 240  # two minutes of probes


class LoopLagProbe:
    """Event-loop lag: how much later than planned a periodic timer fires (a blocked loop fires late)."""

    def __init__(
        self, interval_seconds: float = LAG_PROBE_INTERVAL_SECONDS, samples: int = LAG_SAMPLES
    ) -> None:
        self.interval_seconds = interval_seconds
        self.samples: deque[float] = deque(maxlen=samples)
        self._last: float | None = None

    def tick(self, now: float) -> None:
        """Record one timer firing at `now` (a monotonic reading)."""
        if self._last is not None:
            self.samples.append(max(0.0, now - self._last - self.interval_seconds))
        self._last = now


def format_duration(seconds: float) -> str:
    """`3d 04h 05m 06s`-style uptime."""
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    return (f"{days}d " if days else "") + f"{hours:02d}h {minutes:02d}m {secs:02d}s"


def _seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f} s"


def _gpu_line(info: ModelInfo) -> str | None:
    if info.gpu_memory_allocated_bytes is None:
        return None
    total = info.gpu_memory_total_bytes or 0
    return f"GPU memory: {info.gpu_memory_allocated_bytes / 2**30:.2f} GiB of {total / 2**30:.1f} GiB"


def _lag_line(lags: Sequence[float]) -> str:
    if not lags:
        return "Loop lag: no samples yet"
    p50, p99 = percentile(lags, 0.5) or 0.0, percentile(lags, 0.99) or 0.0
    return f"Loop lag: p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, max {max(lags) * 1000:.0f} ms"


def format_stats(
    uptime_seconds: float, stats: Stats, queue_depth: int, info: ModelInfo, lags: Sequence[float]
) -> str:
    """The /stats text (no secrets and no message text: counts, timings and the model description)."""
    lines = [
        f"Uptime: {format_duration(uptime_seconds)}",
        f"Stored: {stats.messages:,} messages, {stats.bot_replies:,} bot replies "
        f"({stats.guilds:,} servers, {stats.channels:,} channels, {stats.users:,} users)",
        f"Reply latency: p50 {_seconds(stats.latency_p50_seconds)}, "
        f"p95 {_seconds(stats.latency_p95_seconds)}",
        f"Queue depth: {queue_depth}",
        f"Model: {info.name} {info.version} ({info.total_params:,} parameters, {info.device}, "
        f"{info.dtype}, context {info.n_positions})",
        f"Engine: {info.engine}" if info.engine else "",
        _gpu_line(info),
        *(f"Server {line}" for line in info.details),
        _lag_line(lags),
    ]
    return "\n".join(line for line in lines if line)


async def can_reset(interaction: discord.Interaction) -> bool:
    """/reset: anyone in their own DM with the bot; a server admin in a server channel."""
    return interaction.guild is None or await is_guild_admin(interaction)


class AdminCog(commands.Cog):
    """Server admin commands and the loop-lag probe."""

    config = admin_group("config", "View or change this server's sampling settings and persona")

    def __init__(self, bot: ChatBot) -> None:
        self.bot = bot
        self.lag = LoopLagProbe()

    async def cog_load(self) -> None:
        """Start the lag probe (from setup_hook, once)."""
        self.lag_probe.start()

    async def cog_unload(self) -> None:
        """Stop the lag probe."""
        self.lag_probe.cancel()

    @tasks.loop(seconds=LAG_PROBE_INTERVAL_SECONDS)
    async def lag_probe(self) -> None:
        """Sample the event-loop lag."""
        self.lag.tick(time.perf_counter())

    @app_commands.command(name="reload")
    @app_commands.describe(
        model="model to load: a hub id, a local folder, or a registry version (default: current)"
    )
    @admin_only()
    async def reload(self, interaction: discord.Interaction, model: str | None = None) -> None:
        """Hot-swap the model; the old one keeps serving if anything fails."""
        await respond(interaction, lambda: self._reload(interaction, model))

    async def _reload(self, interaction: discord.Interaction, model: str | None) -> Answer:
        if model is not None and not await is_bot_owner(interaction):
            # One model serves every server the bot is in: only its owners may pick another one.
            return Answer(REFUSED_OTHER_MODEL, f"{model}: refused, not a bot owner", allowed=False)
        source = model or model_source(self.bot.settings)
        try:
            info = await self.bot.generator.reload(source)
        except ReloadInProgress:
            return Answer("A reload is already running; nothing was changed.", f"{source}: already running")
        except ReloadFailed as exc:
            return Answer(
                f"Reload failed at step '{exc.step}': {exc.reason}. The old model keeps serving.",
                f"{source}: failed at {exc.step}",
            )
        return Answer(
            f"Now serving {info.name} {info.version} on {info.device}.",
            f"{source}: now {info.name} {info.version}",
        )

    @app_commands.command(name="stats")
    @admin_only()
    async def stats(self, interaction: discord.Interaction) -> None:
        """Uptime, stored messages, reply latency, queue, model and loop lag."""
        await respond(interaction, self._stats)

    async def _stats(self) -> Answer:
        stats = await self.bot.storage.stats()
        text = format_stats(
            self.bot.clock() - self.bot.started_at,
            stats,
            self.bot.generator.queue_depth(),
            self.bot.generator.info(),
            list(self.lag.samples),
        )
        return Answer("\n".join([text, *shard_lines(self.bot)]), "viewed")  # per-shard latency if sharded

    @config.command(name="show")
    @admin_check()
    async def config_show(self, interaction: discord.Interaction) -> None:
        """Show the settings in effect here (this server's and this channel's) and where each comes from."""
        await respond(interaction, lambda: self._show_config(interaction))

    async def _show_config(self, interaction: discord.Interaction) -> Answer:
        return Answer(describe_config(await settings_here(interaction), self.bot.settings), "viewed")

    @config.command(name="set")
    @app_commands.describe(**SAMPLING_HELP)
    @admin_check()
    async def config_set(
        self,
        interaction: discord.Interaction,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        repetition_penalty: float | None = None,
        max_new_tokens: int | None = None,
        no_repeat_ngram_size: int | None = None,
    ) -> None:
        """Change sampling settings for this server (only the options you give)."""
        change = SamplingChange(
            temperature, top_p, top_k, repetition_penalty, max_new_tokens, no_repeat_ngram_size
        )
        await respond(interaction, lambda: self._apply_sampling(interaction, change.given()))

    async def _apply_sampling(self, interaction: discord.Interaction, given: dict[str, float]) -> Answer:
        error = validate_change(given)
        if error:
            return Answer(error, f"rejected: {error}")
        assert interaction.guild_id is not None
        current = await self.bot.storage.guild_settings(interaction.guild_id)
        merged = {**current.sampling_overrides, **given}
        await self.bot.storage.set_guild_sampling(interaction.guild_id, merged)
        return Answer(
            "Saved.\n" + describe_config(await settings_here(interaction), self.bot.settings),
            ", ".join(f"{k}={v:g}" for k, v in sorted(given.items())),
        )

    @config.command(name="persona")
    @app_commands.describe(text="the line that introduces every conversation; leave empty for the default")
    @admin_check()
    async def config_persona(self, interaction: discord.Interaction, text: str | None = None) -> None:
        """Set this server's persona (or go back to the default)."""
        await respond(interaction, lambda: self._set_persona(interaction, (text or "").strip() or None))

    async def _set_persona(self, interaction: discord.Interaction, persona: str | None) -> Answer:
        error = persona_error(persona)
        if error:
            return Answer(error, "rejected: too long")
        assert interaction.guild_id is not None
        await self.bot.storage.set_guild_persona(interaction.guild_id, persona)
        return Answer(
            "Persona saved." if persona else "Persona back to the default.",
            f"persona {'set' if persona else 'cleared'} ({len(persona or '')} chars)",
        )

    @config.command(name="reset")
    @admin_check()
    async def config_reset(self, interaction: discord.Interaction) -> None:
        """Forget this server's sampling overrides and persona."""
        await respond(interaction, lambda: self._reset_config(interaction))

    async def _reset_config(self, interaction: discord.Interaction) -> Answer:
        assert interaction.guild_id is not None
        await self.bot.storage.set_guild_sampling(interaction.guild_id, {})
        await self.bot.storage.set_guild_persona(interaction.guild_id, None)
        return Answer("Sampling settings and persona are back to the bot's defaults.", "reset to defaults")

    @app_commands.command(name="reset")
    @app_commands.check(can_reset)
    async def reset(self, interaction: discord.Interaction) -> None:
        """Start this conversation over: earlier messages no longer shape my replies."""
        await respond(interaction, lambda: self._reset_channel(interaction))

    async def _reset_channel(self, interaction: discord.Interaction) -> Answer:
        assert interaction.channel_id is not None
        # Discord's time, not the host's: history is cut on the messages' Discord timestamps.
        await self.bot.storage.reset_channel(interaction.channel_id, interaction.created_at.timestamp())
        return Answer(
            "Done: I'll answer as if this conversation starts now.", f"channel {interaction.channel_id}"
        )


async def setup(bot: ChatBot) -> None:
    """Extension entry point."""
    await bot.add_cog(AdminCog(bot))
