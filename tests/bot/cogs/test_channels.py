"""/channel in simcord: per-channel persona and sampling (threads inherit), /config show by level, thread
mode, wake words, the reply chance over many messages, refusals and bad values."""

from __future__ import annotations

import itertools
import logging
import math
import random

import discord
import pytest
import simcord
from discord import app_commands

from bot.cogs.channels import IN_A_THREAD
from bot.cogs.common import REFUSED_NOT_ADMIN
from tests.helpers import discord_harness
from tests.helpers.discord_harness import Harness, response_text

harness = discord_harness.harness  # fixtures: the bot with default test settings, built for simcord_env
simcord_bot = discord_harness.simcord_bot


def mention(h: Harness, text: str = "hello") -> str:
    assert h.bot.user is not None
    return f"{h.bot.user.mention} {text}"


async def user_thread(h: Harness, name: str = "side topic") -> simcord.ChannelHandle:
    """A thread someone else (alice) opened in #general."""
    thread = h.env.backend.create_thread(h.channel.id, name, h.alice.id)
    await h.env.settle()
    return simcord.ChannelHandle(h.env, h.guild, thread)


def history_texts(h: Harness) -> list[str]:
    return [turn.text for turn in h.generator.requests[-1].history]


async def test_channel_enable_then_disable(harness: Harness) -> None:
    result = await harness.admin.slash(harness.channel, "channel enable")
    assert "every message" in response_text(result)
    await harness.alice.send(harness.channel, "anyone?")
    await harness.admin.slash(harness.channel, "channel disable")
    await harness.alice.send(harness.channel, "anyone at all?")
    assert len(harness.bot_messages()) == 1
    assert [e.action for e in await harness.storage.audit_log()] == ["channel disable", "channel enable"]


async def test_channel_persona_reaches_the_prompt_and_its_threads_inherit_it(harness: Harness) -> None:
    h = harness
    await h.admin.slash(h.channel, "config persona", text="The server's librarian.")
    other = h.guild.create_text_channel("other")
    result = await h.admin.slash(h.channel, "channel persona", text="A pirate who only talks about ships.")
    assert "Persona saved for this channel" in response_text(result)
    await h.alice.send(h.channel, mention(h, "ahoy"))
    assert h.generator.requests[-1].persona == "A pirate who only talks about ships."
    thread = await user_thread(h)
    await h.alice.send(thread, mention(h, "in the thread"))
    assert h.generator.requests[-1].persona == "A pirate who only talks about ships."
    assert (
        await h.storage.channel_settings(thread.id)
    ).parent_id == h.channel.id  # remembered on first sight
    await h.alice.send(other, mention(h, "elsewhere"))
    assert h.generator.requests[-1].persona == "The server's librarian."
    await h.admin.slash(h.channel, "channel reset-config")
    await h.alice.send(h.channel, mention(h, "again"))
    assert h.generator.requests[-1].persona == "The server's librarian."


async def test_channel_config_overrides_the_server_per_setting_and_config_show_names_each_level(
    harness: Harness,
) -> None:
    h = harness
    await h.admin.slash(h.channel, "config set", temperature=0.5, top_k=10)
    saved = await h.admin.slash(h.channel, "channel config", temperature=0.3)
    assert "Saved for this channel" in response_text(saved)
    await h.alice.send(h.channel, mention(h))
    params = h.generator.requests[-1].params
    assert (params.temperature, params.top_k) == (0.3, 10)  # the channel's, then the server's

    shown = response_text(await h.admin.slash(h.channel, "config show"))
    assert "temperature=0.3 (this channel)" in shown and "top_k=10 (server)" in shown
    assert f"top_p={h.bot.settings.top_p:g} (default)" in shown
    assert f"Persona (default): {h.bot.settings.persona}" in shown
    assert "this channel: temperature=0.3; server: temperature=0.5, top_k=10" in shown  # shadowed too

    thread = await user_thread(h)
    await h.alice.send(thread, mention(h))
    assert h.generator.requests[-1].params.temperature == 0.3
    in_thread = response_text(await h.admin.slash(thread, "config show"))
    assert "temperature=0.3 (parent channel)" in in_thread and "top_k=10 (server)" in in_thread


async def test_thread_mode_opens_one_thread_per_mention_and_answers_every_message_in_it(
    harness: Harness,
) -> None:
    h = harness
    await h.admin.slash(h.channel, "channel threads enable")
    opener = await h.alice.send(h.channel, mention(h, f"let's plan the trip with {h.bob.mention}"))
    [thread] = h.channel.threads
    assert thread.name == "let's plan the trip with @bob"
    assert [m.type for m in h.bot_messages()] == [discord.MessageType.thread_created]  # no answer there
    assert [m.content for m in h.bot_messages(thread)] == ["hello from the fake model"]
    assert history_texts(h) == ["let's plan the trip with @bob"]

    await h.bob.send(thread, "I can drive")  # no mention: the bot's own thread answers every message
    assert len(h.bot_messages(thread)) == 2
    assert history_texts(h) == ["let's plan the trip with @bob", "hello from the fake model", "I can drive"]
    assert len(h.channel.threads) == 1  # a message in the thread never opens another
    assert (await h.storage.channel_settings(thread.id)).opened_for_message_id == opener.id

    await h.alice.send(h.channel, mention(h, "second question"))
    assert len(h.channel.threads) == 2  # one thread per mention


async def test_thread_mode_leaves_other_threads_and_archived_threads_alone(harness: Harness) -> None:
    h = harness
    await h.admin.slash(h.channel, "channel threads enable")
    others = await user_thread(h)
    await h.alice.send(others, "just us humans here")
    assert h.bot_messages(others) == [] and len(h.channel.threads) == 1
    await h.alice.send(h.channel, mention(h, "open one"))
    mine = next(t for t in h.channel.threads if t.id != others.id)
    h.env.backend.edit_channel(mine.id, {}, thread_metadata={"archived": True})
    await h.env.settle()
    requests = len(h.generator.requests)
    await h.alice.send(mine, "are you still there?")
    assert len(h.generator.requests) == requests and len(h.bot_messages(mine)) == 1
    assert h.env.backend.get_channel(mine.id).thread_metadata.archived  # not unarchived


async def test_thread_mode_without_permission_answers_in_the_channel_and_logs_once(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    h = harness
    assert h.bot.user is not None
    closed = h.guild.create_text_channel(
        "no-threads", overwrites={h.bot.user: discord.PermissionOverwrite(create_public_threads=False)}
    )
    await h.admin.slash(closed, "channel threads enable")
    caplog.set_level(logging.WARNING)
    await h.alice.send(closed, mention(h, "one"))
    await h.alice.send(closed, mention(h, "two"))
    assert closed.threads == [] and len(h.bot_messages(closed)) == 2
    assert caplog.text.count("cannot open a thread") == 1 and "Traceback" not in caplog.text
    assert h.env.errors == []


async def test_wake_words_and_the_bot_name_wake_the_bot(harness: Harness) -> None:
    h = harness
    added = await h.admin.slash(h.channel, "channel wake add", word="Pineapple")
    assert "is now a wake word" in response_text(added)
    await h.admin.slash(h.channel, "channel wake add", word="天気")
    await h.alice.send(h.channel, "pineapples are great")  # not the whole word
    await h.alice.send(h.channel, "bot, are you there?")  # the name is not a wake word yet
    assert h.bot_messages() == []
    await h.alice.send(h.channel, "I love PINEAPPLE!")
    await h.alice.send(h.channel, "今日の天気はどう？")
    assert len(h.bot_messages()) == 2
    await h.admin.slash(h.channel, "channel wake name", enabled=True)
    await h.alice.send(h.channel, "bot, are you there?")
    assert len(h.bot_messages()) == 3
    listed = response_text(await h.admin.slash(h.channel, "channel wake list"))
    assert "“Pineapple”, “天気”" in listed and "name as a wake word: on" in listed
    await h.admin.slash(h.channel, "channel wake remove", word="pineapple")
    await h.alice.send(h.channel, "pineapple again")
    assert len(h.bot_messages()) == 3
    thread = await user_thread(h)  # a thread follows its parent's wake words
    await h.alice.send(thread, "天気は？")
    assert len(h.bot_messages(thread)) == 1


def four_sigma(trials: int, p: float) -> tuple[float, float]:
    spread = 4 * math.sqrt(trials * p * (1 - p))
    return trials * p - spread, trials * p + spread


async def test_reply_chance_over_1000_messages_is_within_bounds_and_respects_the_cooldown(
    harness: Harness,
) -> None:
    h = harness
    cog = h.bot.get_cog("ChatCog")
    cog.random = random.Random(25)  # type: ignore[union-attr]
    await h.admin.slash(h.channel, "channel chance", probability=0.2, cooldown_seconds=30)
    for index in range(1000):
        await h.alice.send(h.channel, f"chatter {index}")
        await h.env.advance_time(10)
    replies = [m.created_at.timestamp() for m in h.bot_messages()]
    gaps = [later - earlier for earlier, later in itertools.pairwise(replies)]
    assert replies and min(gaps) >= 30  # never more than one chance reply per cooldown window
    # After a reply the next two messages (20 s) are inside the cooldown; every other message is one draw.
    eligible = 1000 - 2 * len(replies)
    low, high = four_sigma(eligible, 0.2)
    assert low <= len(replies) <= high, (len(replies), eligible)


async def test_reply_chance_without_a_cooldown_matches_the_probability(harness: Harness) -> None:
    h = harness
    h.bot.get_cog("ChatCog").random = random.Random(7)  # type: ignore[union-attr]
    await h.admin.slash(h.channel, "channel chance", probability=0.5, cooldown_seconds=0)
    for index in range(200):
        await h.alice.send(h.channel, f"chatter {index}")
    low, high = four_sigma(200, 0.5)
    assert low <= len(h.bot_messages()) <= high


@pytest.mark.parametrize(
    ("command", "options"),
    [
        ("channel persona", {"text": "A pirate."}),
        ("channel config", {"temperature": 0.1}),
        ("channel reset-config", {}),
        ("channel threads enable", {}),
        ("channel wake add", {"word": "pineapple"}),
        ("channel wake name", {"enabled": True}),
        ("channel chance", {"probability": 0.5}),
    ],
)
async def test_non_admins_are_refused_and_audited(
    harness: Harness, command: str, options: dict[str, object]
) -> None:
    harness.open_command_to("channel", harness.alice)  # the UI hint alone must not be the guard
    result = await harness.alice.slash(harness.channel, command, **options)
    assert result.ephemeral and response_text(result) == REFUSED_NOT_ADMIN
    assert [type(e) for e in harness.env.errors] == [app_commands.MissingPermissions]
    channel = await harness.storage.channel_settings(harness.channel.id)
    assert (channel.persona, channel.sampling_overrides, channel.thread_mode, channel.wake_words) == (
        None,
        {},
        False,
        (),
    )
    assert (channel.wake_on_name, channel.reply_chance) == (False, 0.0)
    [entry] = await harness.storage.audit_log()
    assert (entry.actor_id, entry.action, entry.allowed) == (harness.alice.id, command, False)


@pytest.mark.parametrize(
    ("command", "options", "line"),
    [
        ("channel chance", {"probability": 1.5}, "The chance must be between 0 and 1 (got 1.5)"),
        ("channel chance", {"probability": 0.5, "cooldown_seconds": -1.0}, "The cooldown must be between 0"),
        ("channel wake add", {"word": "   "}, "A wake word is 1 to 50 characters"),
        ("channel wake add", {"word": "x" * 51}, "A wake word is 1 to 50 characters"),
        ("channel wake remove", {"word": "never added"}, "“never added” is not a wake word here"),
        ("channel persona", {"text": "p" * 1001}, "The persona must be at most 1000 characters"),
        ("channel config", {"top_p": 0.0}, "top_p must be between 0.01 and 1"),
        ("channel config", {}, "Give at least one setting to change."),
    ],
)
async def test_bad_values_get_one_line_and_change_nothing(
    harness: Harness, command: str, options: dict[str, object], line: str
) -> None:
    before = await harness.storage.channel_settings(harness.channel.id)
    result = await harness.admin.slash(harness.channel, command, **options)
    text = response_text(result)
    assert result.ephemeral and text.startswith(line) and "\n" not in text
    assert harness.env.errors == []
    assert await harness.storage.channel_settings(harness.channel.id) == before
    [entry] = await harness.storage.audit_log()
    assert entry.detail.startswith("rejected")


async def test_settings_commands_in_a_thread_point_to_the_parent_channel(harness: Harness) -> None:
    thread = await user_thread(harness)
    result = await harness.admin.slash(thread, "channel persona", text="A thread persona.")
    assert response_text(result) == IN_A_THREAD
    assert (await harness.storage.channel_settings(thread.id)).persona is None
