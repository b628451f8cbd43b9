"""Every cut-off that compares with stored message times uses Discord's time, never the host's clock.

The bot's `clock` (the host) is skewed ±5 s from simcord's virtual Discord time: /reset, the follow-up
window and the order of a reply in the history must not move.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.helpers.discord_harness import Harness, running_bot, virtual_clock

SKEWS_SECONDS = (-5.0, 5.0)


def skewed(seconds: float) -> Callable[[], float]:
    """The host's clock, `seconds` off Discord's."""
    return lambda: virtual_clock() + seconds


def mention(h: Harness, text: str) -> str:
    assert h.bot.user is not None
    return f"{h.bot.user.mention} {text}"


@pytest.mark.parametrize("skew", SKEWS_SECONDS)
async def test_reset_cuts_on_discord_time(tmp_path: Path, skew: float) -> None:
    async with running_bot(tmp_path, clock=skewed(skew)) as h:
        await h.alice.send(h.channel, "old topic: llamas")
        await h.env.advance_time(1)
        await h.admin.slash(h.channel, "reset")
        await h.env.advance_time(1)
        await h.alice.send(h.channel, "a turn after the reset")
        await h.alice.send(h.channel, mention(h, "new topic"))
        texts = [turn.text for turn in h.generator.requests[-1].history]
        # host 5 s behind: the old turn stayed; 5 s ahead: the turn after /reset was dropped
        assert texts == ["a turn after the reset", "new topic"]


@pytest.mark.parametrize("skew", SKEWS_SECONDS)
async def test_followup_window_and_reply_order_use_discord_time(tmp_path: Path, skew: float) -> None:
    async with running_bot(tmp_path, clock=skewed(skew), followup_window_seconds=10) as h:
        await h.alice.send(h.channel, mention(h, "hello"))
        await h.env.advance_time(1)
        await h.bob.send(h.channel, "me too?")  # within the window by Discord's clock
        assert len(h.bot_messages()) == 2  # host 5 s ahead: "sent" after bob spoke, so no follow-up
        texts = [turn.text for turn in h.generator.requests[-1].history]
        assert texts[-1] == "me too?" and texts[:1] == ["hello"]  # the bot's reply sorted between them
        await h.env.advance_time(12)
        await h.bob.send(h.channel, "anyone there?")  # out of the window (host 5 s behind: still inside)
        assert len(h.bot_messages()) == 2
