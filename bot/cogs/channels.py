"""The /channel commands: how the bot behaves in one channel.

`/channel enable|disable` (answer every message), `persona`, `config` and `reset-config` (overriding the
server's /config), `threads enable|disable` (thread mode), `wake add|remove|list|name` (wake words) and
`chance` (joining in unprompted). Each is an admin command: guild-only, checked on the server side
(bot.cogs.common.is_guild_admin), deferred, answered ephemerally and audited through respond; a bad value
gets one line and changes nothing.

A thread follows its parent channel: the settings commands other than enable/disable are refused in a
thread (one line saying to run them in the parent), so a thread's own row never holds overrides and what
/config show says in a thread is exactly what its parent has.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

from bot.cogs.common import Answer, admin_check, admin_group, respond
from bot.cogs.sampling import (
    SAMPLING_HELP,
    SamplingChange,
    describe_config,
    persona_error,
    settings_here,
    validate_change,
)
from bot.policy import CHANCE_COOLDOWN_MAX_SECONDS

if TYPE_CHECKING:
    from bot.chatbot import ChatBot

WAKE_WORD_MAX_CHARS = 50
WAKE_WORDS_MAX = 20  # per channel
IN_A_THREAD = "A thread follows its parent channel's settings: run this in the parent channel."


def wake_word_error(word: str, current: tuple[str, ...]) -> str | None:
    """One line when a wake word cannot be added, else None."""
    if not 1 <= len(word) <= WAKE_WORD_MAX_CHARS:
        return f"A wake word is 1 to {WAKE_WORD_MAX_CHARS} characters; nothing was changed."
    if word.casefold() in {w.casefold() for w in current}:
        return f"“{word}” is already a wake word here."
    if len(current) >= WAKE_WORDS_MAX:
        return f"A channel has at most {WAKE_WORDS_MAX} wake words; remove one first."
    return None


def chance_error(probability: float, cooldown_seconds: float | None) -> str | None:
    """One line when a reply chance or its cooldown is out of range, else None."""
    if not (math.isfinite(probability) and 0 <= probability <= 1):
        return f"The chance must be between 0 and 1 (got {probability:g}); nothing was changed."
    if cooldown_seconds is not None and not (
        math.isfinite(cooldown_seconds) and 0 <= cooldown_seconds <= CHANCE_COOLDOWN_MAX_SECONDS
    ):
        return (
            f"The cooldown must be between 0 and {CHANCE_COOLDOWN_MAX_SECONDS:g} seconds "
            f"(got {cooldown_seconds:g}); nothing was changed."
        )
    return None


def here(interaction: discord.Interaction) -> tuple[int, int | None]:
    """(channel id, guild id) of the command."""
    assert interaction.channel_id is not None
    return interaction.channel_id, interaction.guild_id


def in_thread(interaction: discord.Interaction) -> bool:
    """Whether the command runs in a thread."""
    return isinstance(interaction.channel, discord.Thread)


class ChannelsCog(commands.Cog):
    """The /channel group."""

    channel = admin_group("channel", "How the bot behaves in this channel")
    threads = app_commands.Group(
        name="threads", description="Thread mode: a mention opens a thread the bot answers in", parent=channel
    )
    wake = app_commands.Group(
        name="wake", description="Words that make the bot answer without a mention", parent=channel
    )

    def __init__(self, bot: ChatBot) -> None:
        self.bot = bot

    async def _respond(
        self,
        interaction: discord.Interaction,
        work: Callable[[], Awaitable[Answer]],
        *,
        in_threads: bool = False,
    ) -> None:
        """respond (defer → answer → audit), refusing settings commands in a thread unless `in_threads`."""

        async def guarded() -> Answer:
            if not in_threads and in_thread(interaction):
                return Answer(IN_A_THREAD, "rejected: in a thread")
            return await work()

        await respond(interaction, guarded)

    # -- answer every message -------------------------------------------------------------------------

    @channel.command(name="enable")
    @admin_check()
    async def channel_enable(self, interaction: discord.Interaction) -> None:
        """Answer every message in this channel."""
        await self._respond(interaction, lambda: self._answer_all(interaction, True), in_threads=True)

    @channel.command(name="disable")
    @admin_check()
    async def channel_disable(self, interaction: discord.Interaction) -> None:
        """Answer only mentions, replies and follow-ups in this channel."""
        await self._respond(interaction, lambda: self._answer_all(interaction, False), in_threads=True)

    async def _answer_all(self, interaction: discord.Interaction, enabled: bool) -> Answer:
        channel_id, guild_id = here(interaction)
        await self.bot.storage.set_channel_answer_all(channel_id, guild_id, enabled)
        state = "every message" if enabled else "only when addressed"
        return Answer(f"In this channel I now answer {state}.", f"channel {channel_id}: {state}")

    # -- persona and sampling -------------------------------------------------------------------------

    @channel.command(name="persona")
    @app_commands.describe(text="the line that introduces conversations here; leave empty for the server's")
    @admin_check()
    async def channel_persona(self, interaction: discord.Interaction, text: str | None = None) -> None:
        """Set this channel's persona (or go back to the server's)."""
        persona = (text or "").strip() or None
        await self._respond(interaction, lambda: self._set_persona(interaction, persona))

    async def _set_persona(self, interaction: discord.Interaction, persona: str | None) -> Answer:
        error = persona_error(persona)
        if error:
            return Answer(error, "rejected: too long")
        await self.bot.storage.set_channel_persona(*here(interaction), persona)
        return Answer(
            "Persona saved for this channel." if persona else "This channel uses the server's persona again.",
            f"persona {'set' if persona else 'cleared'} ({len(persona or '')} chars)",
        )

    @channel.command(name="config")
    @app_commands.describe(**SAMPLING_HELP)
    @admin_check()
    async def channel_config(
        self,
        interaction: discord.Interaction,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        repetition_penalty: float | None = None,
        max_new_tokens: int | None = None,
        no_repeat_ngram_size: int | None = None,
    ) -> None:
        """Change sampling settings for this channel only (only the options you give)."""
        change = SamplingChange(
            temperature, top_p, top_k, repetition_penalty, max_new_tokens, no_repeat_ngram_size
        )
        await self._respond(interaction, lambda: self._apply_sampling(interaction, change.given()))

    async def _apply_sampling(self, interaction: discord.Interaction, given: dict[str, float]) -> Answer:
        error = validate_change(given)
        if error:
            return Answer(error, f"rejected: {error}")
        channel_id, guild_id = here(interaction)
        current = await self.bot.storage.channel_settings(channel_id)
        await self.bot.storage.set_channel_sampling(
            channel_id, guild_id, {**current.sampling_overrides, **given}
        )
        return Answer(
            "Saved for this channel.\n"
            + describe_config(await settings_here(interaction), self.bot.settings),
            ", ".join(f"{key}={value:g}" for key, value in sorted(given.items())),
        )

    @channel.command(name="reset-config")
    @admin_check()
    async def channel_reset_config(self, interaction: discord.Interaction) -> None:
        """Forget this channel's sampling settings and persona (back to the server's)."""
        await self._respond(interaction, lambda: self._reset_config(interaction))

    async def _reset_config(self, interaction: discord.Interaction) -> Answer:
        await self.bot.storage.reset_channel_config(*here(interaction))
        return Answer("This channel uses the server's sampling settings and persona again.", "reset")

    # -- thread mode ----------------------------------------------------------------------------------

    @threads.command(name="enable")
    @admin_check()
    async def threads_enable(self, interaction: discord.Interaction) -> None:
        """A mention opens a thread, and I answer every message in my threads."""
        await self._respond(interaction, lambda: self._thread_mode(interaction, True))

    @threads.command(name="disable")
    @admin_check()
    async def threads_disable(self, interaction: discord.Interaction) -> None:
        """Answer mentions in the channel itself again (threads I opened keep working)."""
        await self._respond(interaction, lambda: self._thread_mode(interaction, False))

    async def _thread_mode(self, interaction: discord.Interaction, enabled: bool) -> Answer:
        await self.bot.storage.set_channel_thread_mode(*here(interaction), enabled)
        state = "on" if enabled else "off"
        text = "a mention opens a thread and I answer in it" if enabled else "I answer mentions here"
        return Answer(f"Thread mode {state}: {text}.", f"thread mode {state}")

    # -- wake words and reply chance ------------------------------------------------------------------

    @wake.command(name="add")
    @app_commands.describe(word="a word or phrase that makes me answer (case-insensitive)")
    @admin_check()
    async def wake_add(self, interaction: discord.Interaction, word: str) -> None:
        """Answer messages containing this word, without a mention."""
        await self._respond(interaction, lambda: self._wake_add(interaction, word.strip()))

    async def _wake_add(self, interaction: discord.Interaction, word: str) -> Answer:
        channel_id, guild_id = here(interaction)
        current = (await self.bot.storage.channel_settings(channel_id)).wake_words
        error = wake_word_error(word, current)
        if error:
            return Answer(error, "rejected: bad wake word")
        await self.bot.storage.set_channel_wake_words(channel_id, guild_id, [*current, word])
        return Answer(f"“{word}” is now a wake word here.", f"wake word added ({len(word)} chars)")

    @wake.command(name="remove")
    @app_commands.describe(word="the wake word to remove")
    @admin_check()
    async def wake_remove(self, interaction: discord.Interaction, word: str) -> None:
        """Stop answering this wake word."""
        await self._respond(interaction, lambda: self._wake_remove(interaction, word.strip()))

    async def _wake_remove(self, interaction: discord.Interaction, word: str) -> Answer:
        channel_id, guild_id = here(interaction)
        current = (await self.bot.storage.channel_settings(channel_id)).wake_words
        kept = [w for w in current if w.casefold() != word.casefold()]
        if len(kept) == len(current):
            return Answer(
                f"“{word}” is not a wake word here; nothing was changed.", "rejected: not a wake word"
            )
        await self.bot.storage.set_channel_wake_words(channel_id, guild_id, kept)
        return Answer(f"“{word}” is no longer a wake word here.", "wake word removed")

    @wake.command(name="list")
    @admin_check()
    async def wake_list(self, interaction: discord.Interaction) -> None:
        """Show this channel's wake words."""
        await self._respond(interaction, lambda: self._wake_list(interaction))

    async def _wake_list(self, interaction: discord.Interaction) -> Answer:
        channel = await self.bot.storage.channel_settings(here(interaction)[0])
        words = ", ".join(f"“{w}”" for w in channel.wake_words) or "none"
        name = "on" if channel.wake_on_name else "off"
        return Answer(f"Wake words here: {words}. My name as a wake word: {name}.", "viewed")

    @wake.command(name="name")
    @app_commands.describe(enabled="whether my name (and my display name here) makes me answer")
    @admin_check()
    async def wake_name(self, interaction: discord.Interaction, enabled: bool) -> None:
        """Make my name a wake word in this channel, or not."""
        await self._respond(interaction, lambda: self._wake_name(interaction, enabled))

    async def _wake_name(self, interaction: discord.Interaction, enabled: bool) -> Answer:
        await self.bot.storage.set_channel_wake_on_name(*here(interaction), enabled)
        state = "now" if enabled else "no longer"
        return Answer(f"My name is {state} a wake word here.", f"wake on name {'on' if enabled else 'off'}")

    @channel.command(name="chance")
    @app_commands.describe(
        probability="0–1: the chance that I join in on a message not addressed to me (0 = never)",
        cooldown_seconds="least time between two such replies in this channel (default: unchanged, 300 s)",
    )
    @admin_check()
    async def channel_chance(
        self, interaction: discord.Interaction, probability: float, cooldown_seconds: float | None = None
    ) -> None:
        """Join in unprompted with this probability, at most once per cooldown."""
        await self._respond(interaction, lambda: self._chance(interaction, probability, cooldown_seconds))

    async def _chance(
        self, interaction: discord.Interaction, probability: float, cooldown_seconds: float | None
    ) -> Answer:
        error = chance_error(probability, cooldown_seconds)
        if error:
            return Answer(error, f"rejected: {error}")
        channel_id, guild_id = here(interaction)
        if cooldown_seconds is None:
            cooldown_seconds = (await self.bot.storage.channel_settings(channel_id)).chance_cooldown_seconds
        await self.bot.storage.set_channel_reply_chance(channel_id, guild_id, probability, cooldown_seconds)
        return Answer(
            f"Reply chance here: {probability:g}, at most once every {cooldown_seconds:g} s.",
            f"chance={probability:g} cooldown={cooldown_seconds:g}",
        )


async def setup(bot: ChatBot) -> None:
    """Extension entry point."""
    await bot.add_cog(ChannelsCog(bot))
