"""Privacy and feedback in simcord: /forget-me, /optin, /optout, /privacy switches, 👍/👎 on replies."""

from __future__ import annotations

import discord

from bot.cogs.feedback import feedback_score
from tests.helpers import discord_harness
from tests.helpers.discord_harness import Harness, response_text

harness = discord_harness.harness  # fixtures: the bot with default test settings, built for simcord_env
simcord_bot = discord_harness.simcord_bot


def mention(h: Harness, text: str = "hello") -> str:
    assert h.bot.user is not None
    return f"{h.bot.user.mention} {text}"


async def feedback_by_message(h: Harness) -> dict[int, int]:
    """Every stored message's feedback score, read through the export API (training export turned on)."""
    await h.storage.set_guild_training_export(h.guild.id, True)
    return {row.message.message_id: row.feedback_score async for row in h.storage.export_rows()}


async def test_forget_me_removes_the_users_rows(harness: Harness) -> None:
    mine = await harness.alice.send(harness.channel, mention(harness, "my canary-4417 message"))
    [reply_to_me] = harness.bot_messages()
    theirs = await harness.bob.send(harness.channel, "bob stays")
    result = await harness.alice.slash(harness.channel, "forget-me")
    assert result.ephemeral and "deleted" in response_text(result)
    assert await harness.storage.get_message(mine.id) is None
    assert await harness.storage.get_message(reply_to_me.id) is None  # the reply may quote her
    assert await harness.storage.get_message(theirs.id) is not None
    assert not await harness.storage.user_opted_in(harness.alice.id)


async def test_optin_and_optout_explain_and_persist(harness: Harness) -> None:
    result = await harness.alice.slash(harness.channel, "optin")
    assert result.ephemeral and "Training use means" in response_text(result)
    assert await harness.storage.user_opted_in(harness.alice.id)
    result = await harness.alice.user.slash("optout")  # works in DMs too
    assert result.ephemeral and "opted out" in response_text(result)
    assert not await harness.storage.user_opted_in(harness.alice.id)


async def test_logging_off_needs_confirmation_then_purges(harness: Harness) -> None:
    first = await harness.alice.send(harness.channel, "stored before")
    result = await harness.admin.slash(harness.channel, "privacy logging", enabled=False)
    assert "confirm:True" in response_text(result)
    assert (await harness.storage.guild_settings(harness.guild.id)).logging_enabled
    assert await harness.storage.get_message(first.id) is not None

    result = await harness.admin.slash(harness.channel, "privacy logging", enabled=False, confirm=True)
    assert "1 stored messages were deleted" in response_text(result)
    assert await harness.storage.get_message(first.id) is None
    later = await harness.alice.send(harness.channel, mention(harness, "still there?"))
    assert len(harness.bot_messages()) == 1  # still answers
    assert await harness.storage.get_message(later.id) is None  # but stores nothing
    assert harness.generator.requests[-1].history[-1].text == "still there?"
    await harness.admin.slash(harness.channel, "privacy logging", enabled=True)
    assert (await harness.storage.guild_settings(harness.guild.id)).logging_enabled


async def test_training_export_switch(harness: Harness) -> None:
    assert not (await harness.storage.guild_settings(harness.guild.id)).training_export_enabled
    result = await harness.admin.slash(harness.channel, "privacy export", enabled=True)
    assert "Training export is on" in response_text(result)
    assert (await harness.storage.guild_settings(harness.guild.id)).training_export_enabled
    show = await harness.admin.slash(harness.channel, "privacy show")
    assert "Message logging: on. Training export: on" in response_text(show)
    assert [e.action for e in await harness.storage.audit_log()] == ["privacy show", "privacy export"]


async def test_thumbs_on_bot_replies_are_stored_and_removed(harness: Harness) -> None:
    question = await harness.alice.send(harness.channel, mention(harness))
    [reply] = harness.bot_messages()
    await harness.alice.react(reply, "👍")
    await harness.bob.react(question, "👍")  # not the bot's message: ignored
    await harness.bob.react(reply, "🎉")  # not feedback: ignored
    scores = await feedback_by_message(harness)
    assert (scores[reply.id], scores[question.id]) == (1, 0)
    await harness.bob.react(reply, "👎🏽")
    assert (await feedback_by_message(harness))[reply.id] == 0  # +1 and -1
    await harness.bob.unreact(reply, "👎🏽")
    assert (await feedback_by_message(harness))[reply.id] == 1
    await harness.alice.unreact(reply, "👍")
    assert (await feedback_by_message(harness))[reply.id] == 0


def test_feedback_score_of_emoji() -> None:
    assert feedback_score(discord.PartialEmoji(name="👍")) == 1
    assert feedback_score(discord.PartialEmoji(name="👎🏿")) == -1
    assert feedback_score(discord.PartialEmoji(name="😀")) is None
    assert feedback_score(discord.PartialEmoji(name="thumbsup", id=123)) is None
