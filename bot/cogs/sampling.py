"""Sampling settings and personas as /config (a server's) and /channel (a channel's) take and show them.

One place for what both commands share: the sampling options and their help, the checks that turn a bad
value into one line, and the description `/config show` prints, naming the level each value comes from
(the resolution itself is bot.conversation.MessageContext's).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import discord

from bot.cogs.common import chat_bot
from bot.config import SAMPLING_LIMITS, Settings
from bot.conversation import DEFAULT, MessageContext, apply_overrides
from bot.storage import ChannelSettings

PERSONA_MAX_CHARS = 1000
SAMPLING_HELP = {
    "temperature": "0–5: higher is more surprising; 0 always picks the likeliest word",
    "top_p": "0.01–1: sample only from the most likely words covering this probability",
    "top_k": "0–50000: sample only from this many likeliest words (0 = no limit)",
    "repetition_penalty": "1–3: discourage repeating words (1 = off)",
    "max_new_tokens": "1–1024: longest reply, in tokens",
    "no_repeat_ngram_size": "0–20: never repeat a phrase of this many tokens (0 = off)",
}


@dataclass(frozen=True)
class SamplingChange:
    """The options of /config set and /channel config, as given (None = unchanged)."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    max_new_tokens: int | None = None
    no_repeat_ngram_size: int | None = None

    def given(self) -> dict[str, float]:
        """Only the settings the admin actually passed."""
        return {key: value for key, value in vars(self).items() if value is not None}


def validate_sampling(overrides: Mapping[str, float]) -> str | None:
    """One line naming the first out-of-range setting, or None when all are valid."""
    for key, value in overrides.items():
        low, high = SAMPLING_LIMITS[key]
        if not (math.isfinite(value) and low <= value <= high):
            return f"{key} must be between {low:g} and {high:g} (got {value:g}); nothing was changed."
    return None


def validate_change(given: Mapping[str, float]) -> str | None:
    """The /config set and /channel config check: at least one setting, every one in range."""
    return validate_sampling(given) if given else "Give at least one setting to change."


def persona_error(persona: str | None) -> str | None:
    """One line when a persona is too long, else None."""
    if persona and len(persona) > PERSONA_MAX_CHARS:
        return f"The persona must be at most {PERSONA_MAX_CHARS} characters; nothing was changed."
    return None


def describe_config(context: MessageContext, settings: Settings) -> str:
    """The settings in effect where a command runs, each with the level it comes from."""
    sources = context.sampling_sources()
    params = apply_overrides(settings.sampling(), context.sampling_overrides())
    values = ", ".join(
        f"{key}={getattr(params, key):g} ({sources[key][1] if key in sources else DEFAULT})"
        for key in SAMPLING_LIMITS
    )
    persona, level = context.persona_source()
    lines = [f"Sampling: {values}", f"Persona ({level}): {persona or settings.persona}", _overrides(context)]
    if context.guild is not None:
        lines.append(describe_channel(context))
    return "\n".join(lines)


def _overrides(context: MessageContext) -> str:
    """What each level sets itself, shadowed values included (the server's under a channel's override)."""
    parts = []
    for level, persona, sampling in context.levels():
        values = [f"{key}={value:g}" for key, value in sorted(sampling.items())]
        values += [f"persona ({len(persona)} chars)"] if persona else []
        parts.append(f"{level}: {', '.join(values) or 'nothing'}")
    return "Overrides by level: " + "; ".join(parts)


def describe_channel(context: MessageContext) -> str:
    """This channel's /channel switches (in a thread, its parent's thread mode, wake words and chance)."""
    home = context.home
    inherited = " (from the parent channel)" if context.parent is not None else ""
    parts = [
        f"answers {'every message' if context.channel.answer_all else 'when addressed'}",
        f"thread mode {'on' if home.thread_mode else 'off'}{inherited}",
        f"wake words{inherited}: {_wake_words(home)}",
        f"reply chance{inherited}: {home.reply_chance:g} "
        f"(at most one per {home.chance_cooldown_seconds:g} s)",
    ]
    return "This channel: " + "; ".join(parts)


def _wake_words(channel: ChannelSettings) -> str:
    words = [*channel.wake_words, *(["(my name)"] if channel.wake_on_name else [])]
    return ", ".join(words) if words else "none"


async def settings_here(interaction: discord.Interaction) -> MessageContext:
    """The settings where a command runs (a thread's parent's too), read like a message's."""
    channel = interaction.channel
    parent_id = channel.parent_id if isinstance(channel, discord.Thread) else None
    assert interaction.channel_id is not None
    conversation = chat_bot(interaction).conversation
    return await conversation.settings_for(interaction.channel_id, interaction.guild_id, parent_id)
