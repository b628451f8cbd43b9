"""The chat cog against real discord.py in simcord: when it answers, what it sends, and what it stores."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import discord
import pytest
import simcord

from bot.storage import DatabaseBusy
from bot.text import BUSY_REPLY, COOLDOWN_REPLY, ERROR_REPLY, FALLBACK_REPLY, MESSAGE_LIMIT_CHARS, chunk_nonce
from tests.helpers import discord_harness
from tests.helpers.discord_harness import Harness, running_bot
from tests.helpers.fakes import FakeGenerator

harness = discord_harness.harness  # fixtures: the bot with default test settings, built for simcord_env
simcord_bot = discord_harness.simcord_bot


def mention(h: Harness, text: str = "hello") -> str:
    return f"{h.bot.user.mention} {text}" if h.bot.user else text


def burst(h: Harness, channel: simcord.ChannelHandle, author_id: int, text: str) -> None:
    """Deliver a message without waiting for the bot, so many can be in flight at once."""
    h.env.backend.create_message(channel.id, author_id, text)


async def test_mention_gets_typing_then_a_reply_referencing_the_message(harness: Harness) -> None:
    harness.generator.replies.append("hi alice")
    sent = await harness.alice.send(harness.channel, mention(harness))
    [reply] = harness.bot_messages()
    assert reply.content == "hi alice"
    assert reply.reference is not None and reply.reference.message_id == sent.id
    assert harness.typing_posts(), "a typing indicator is shown while generating"
    paths = [e.path for e in harness.env.http_requests if e.method == "POST"]
    assert paths.index(harness.typing_posts()[0]) < max(
        i for i, p in enumerate(paths) if p.endswith("/messages")
    )
    request = harness.generator.requests[-1]
    assert request.history[-1].speaker == "alice"
    assert request.history[-1].text == "hello"


async def test_plain_message_is_stored_but_not_answered(harness: Harness) -> None:
    sent = await harness.alice.send(harness.channel, "just chatting")
    assert harness.bot_messages() == []
    stored = await harness.storage.get_message(sent.id)
    assert stored is not None and stored.content == "just chatting"


async def test_reply_chain_and_dm(harness: Harness) -> None:
    harness.generator.replies.extend(["first answer", "second answer", "dm answer"])
    await harness.alice.send(harness.channel, mention(harness))
    [first] = harness.bot_messages()
    follow = await harness.alice.send(harness.channel, "and then?", reply_to=first)
    assert [m.content for m in harness.bot_messages()] == ["first answer", "second answer"]
    assert harness.bot_messages()[-1].reference.message_id == follow.id
    assert [t.text for t in harness.generator.requests[-1].history][-3:] == [
        "hello", "first answer", "and then?",
    ]  # fmt: skip
    await harness.alice.user.send_dm("hello in private")
    dm_replies = [m for m in harness.alice.user.dm_channel.history() if m.author.id == harness.bot_id]
    assert [m.content for m in dm_replies] == ["dm answer"]


async def test_enabled_channel_answers_every_message(harness: Harness) -> None:
    await harness.storage.set_channel_answer_all(harness.channel.id, harness.guild.id, True)
    for text in ("one", "two", "three"):
        await harness.alice.send(harness.channel, text)
    assert len(harness.bot_messages()) == 3


async def test_bots_and_itself_are_ignored(harness: Harness) -> None:
    await harness.storage.set_channel_answer_all(harness.channel.id, harness.guild.id, True)
    other_bot = harness.guild.add_member(harness.env.create_user("otherbot", bot=True))
    await other_bot.send(harness.channel, mention(harness, "bot to bot"))
    assert harness.bot_messages() == []
    assert harness.generator.requests == []
    # One human message: exactly one reply, and the bot's own reply triggers nothing more.
    await harness.alice.send(harness.channel, "human")
    assert len(harness.bot_messages()) == 1
    assert len(harness.generator.requests) == 1


async def test_generated_mentions_never_ping(harness: Harness) -> None:
    harness.generator.replies.append(f"@everyone @here <@&1> <@2> <@{harness.bob.id}> hi")
    await harness.alice.send(harness.channel, mention(harness))
    [payload] = harness.message_posts()
    assert payload["allowed_mentions"] == {"parse": []}
    assert payload["flags"] & discord.MessageFlags.suppress_embeds.flag
    [reply] = harness.bot_messages()
    delivered = harness.env.backend.get_message(harness.channel.id, reply.id)
    assert not delivered.mention_everyone
    assert delivered.ping_user_ids == [] and delivered.ping_role_ids == []


async def test_long_output_is_split_with_balanced_fences(harness: Harness) -> None:
    code = "```python\n" + "\n".join(f"value_{i} = {i}  # 😀" for i in range(150)) + "\n```"
    text = ("A long paragraph about nothing in particular. " * 40 + "\n\n" + code + "\n\nThe end.")[:5000]
    harness.generator.replies.append(text)
    sent = await harness.alice.send(harness.channel, mention(harness))
    replies = harness.bot_messages()
    assert len(replies) >= 3
    assert all(0 < len(m.content) <= MESSAGE_LIMIT_CHARS and m.content.count("```") % 2 == 0 for m in replies)
    assert replies[0].reference is not None and replies[0].reference.message_id == sent.id
    nonces = [int(p["nonce"]) for p in harness.message_posts()]
    assert nonces == [chunk_nonce(sent.id, i) for i in range(len(replies))]


async def test_empty_output_sends_the_fallback(harness: Harness) -> None:
    harness.generator.replies.append("   ")
    await harness.alice.send(harness.channel, mention(harness))
    assert [m.content for m in harness.bot_messages()] == [FALLBACK_REPLY]


async def test_full_queue_answers_busy(tmp_path: Path) -> None:
    generator = FakeGenerator(default="answer", queue_size=8, delay_seconds=30)
    async with running_bot(tmp_path, generator=generator) as h:
        users = [h.guild.add_member(h.env.create_user(f"user{i}")) for i in range(50)]
        for user in users:
            burst(h, h.channel, user.id, mention(h, f"hi from {user.name}"))
        await h.env.advance_time(31)  # the 8 in flight finish; the 42 others were told at once
        contents = Counter(m.content for m in h.bot_messages())
    assert contents == {"answer": 8, BUSY_REPLY: 42}


async def test_hundred_messages_in_twenty_channels_get_one_reply_each(tmp_path: Path) -> None:
    generator = FakeGenerator(default="answer", queue_size=8, delay_seconds=0.5)
    async with running_bot(tmp_path, generator=generator) as h:
        channels = [h.guild.create_text_channel(f"room{i}") for i in range(20)]
        users = [h.alice, h.bob, h.admin]
        for second_tenth in range(10):  # 100 messages over 2 virtual seconds
            for n in range(10):
                index = second_tenth * 10 + n
                burst(h, channels[index % 20], users[index % 3].id, mention(h, f"message {index}"))
            await h.env.advance_time(0.2)
        await h.env.advance_time(5)
        replies = [m for channel in channels for m in h.bot_messages(channel)]
        answered = Counter(m.reference.message_id for m in replies if m.reference)
        asked = [m.id for channel in channels for m in channel.history() if m.author.id != h.bot_id]
    assert len(asked) == 100
    assert all(answered[message_id] == 1 for message_id in asked)
    assert len(replies) == 100
    assert {m.content for m in replies} == {"answer", BUSY_REPLY}


async def test_rate_limit_then_server_error_then_success_posts_once(harness: Harness) -> None:
    harness.env.inject_error("POST", "/channels/*/messages", status=429, message="rate limited")
    harness.env.inject_error("POST", "/channels/*/messages", status=502, message="bad gateway")
    harness.generator.replies.append("delivered")
    sent = await harness.alice.send(harness.channel, mention(harness))
    assert [m.content for m in harness.bot_messages()] == ["delivered"]
    attempts = harness.message_posts()
    assert len(attempts) == 3
    assert {p["nonce"] for p in attempts} == {str(chunk_nonce(sent.id, 0))}


async def test_channel_without_send_permission_is_skipped(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    assert harness.bot.user is not None
    muted = harness.guild.create_text_channel(
        "muted", overwrites={harness.bot.user: discord.PermissionOverwrite(send_messages=False)}
    )
    caplog.set_level(logging.INFO)
    sent = await harness.alice.send(muted, mention(harness))
    posts = [e for e in harness.env.http_requests if e.method == "POST" and str(muted.id) in e.path]
    assert posts == []  # neither typing nor a message was attempted
    assert harness.generator.requests == []
    assert harness.bot.get_cog("ChatCog").skipped_sends == 1  # type: ignore[union-attr]
    assert "no Send Messages permission" in caplog.text
    assert await harness.storage.get_message(sent.id) is not None  # still part of the conversation


async def test_deleted_message_leaves_the_next_prompt(harness: Harness) -> None:
    secret = await harness.alice.send(harness.channel, "the secret plan is tuesday")
    harness.bot._connection._messages.clear()  # uncached: only the raw event can tell the bot
    await harness.alice.delete(secret)
    await harness.alice.send(harness.channel, mention(harness, "what was the plan?"))
    texts = [turn.text for turn in harness.generator.requests[-1].history]
    assert not any("secret plan" in text for text in texts)
    stored = await harness.storage.get_message(secret.id)
    assert stored is not None and stored.deleted and stored.content == ""


async def test_edit_and_bulk_delete_update_storage(harness: Harness) -> None:
    first = await harness.alice.send(harness.channel, "typo")
    await harness.alice.edit(first, "fixed")
    assert (await harness.storage.get_message(first.id)).content == "fixed"  # type: ignore[union-attr]
    second = await harness.bob.send(harness.channel, "spam one")
    third = await harness.bob.send(harness.channel, "spam two")
    harness.env.backend.bulk_delete_messages(harness.channel.id, [second.id, third.id])
    await harness.env.settle()
    history = await harness.storage.recent_history(harness.channel.id, 10)
    assert [m.content for m in history] == ["fixed"]


async def test_replayed_event_gets_no_second_reply(harness: Harness) -> None:
    sent = await harness.alice.send(harness.channel, mention(harness))
    stored = harness.env.backend.get_message(harness.channel.id, sent.id)
    harness.env.backend.announce_message_create(stored)  # the gateway delivers the same event again
    await harness.env.settle()
    assert len(harness.bot_messages()) == 1
    assert len(harness.generator.requests) == 1


async def test_cooldown_sends_one_notice_then_silence(tmp_path: Path) -> None:
    async with running_bot(tmp_path, cooldown_seconds=10) as h:
        for n in range(5):
            await h.alice.send(h.channel, mention(h, f"quick {n}"))
        assert [m.content for m in h.bot_messages()][1:] == [COOLDOWN_REPLY]
        assert len(h.generator.requests) == 1
        await h.env.advance_time(11)
        await h.alice.send(h.channel, mention(h, "later"))
        assert len(h.generator.requests) == 2


async def test_followup_window_answers_the_channel_then_closes(tmp_path: Path) -> None:
    async with running_bot(tmp_path, followup_window_seconds=60) as h:
        await h.alice.send(h.channel, mention(h))
        await h.bob.send(h.channel, "me too?")  # any of the channel's users, within the window
        assert len(h.bot_messages()) == 2
        await h.env.advance_time(120)
        await h.bob.send(h.channel, "anyone there?")
        assert len(h.bot_messages()) == 2


async def test_thread_is_its_own_conversation(harness: Harness) -> None:
    await harness.alice.send(harness.channel, "parent channel chatter")
    thread = harness.env.backend.create_thread(harness.channel.id, "side topic", harness.alice.id)
    handle = simcord.ChannelHandle(harness.env, harness.guild, thread)
    await harness.env.settle()
    await harness.alice.send(handle, mention(harness, "in the thread"))
    assert len(harness.bot_messages(handle)) == 1
    texts = [turn.text for turn in harness.generator.requests[-1].history]
    assert texts == ["in the thread"]


async def test_generation_failure_gets_one_apology_and_is_logged(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken(request: object) -> object:
        raise RuntimeError("model exploded")

    harness.generator.generate = broken  # type: ignore[method-assign]
    await harness.alice.send(harness.channel, mention(harness))
    assert [m.content for m in harness.bot_messages()] == [ERROR_REPLY]
    [record] = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert record.exc_info is not None and "model exploded" in str(record.exc_info[1])


async def test_default_logs_hold_no_token_and_no_message_text(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    token = "MTIzNDU2Nzg5.fake-token-value.never-log-me"
    async with running_bot(tmp_path, discord_token=token) as h:
        h.generator.replies.append("generated words that stay private")
        await h.alice.send(h.channel, mention(h, "my private words"))
        await h.storage.set_channel_answer_all(h.channel.id, h.guild.id, True)
        await h.bob.send(h.channel, "more private words")
        stats = await h.admin.slash(h.channel, "stats")
    text = caplog.text + "".join(f.content for f in stats.followups)
    assert caplog.records, "INFO logging was captured"
    for secret in (token, "private words", "generated words"):
        assert secret not in text


async def test_other_mentions_become_names_and_a_bare_mention_stays(harness: Harness) -> None:
    await harness.alice.send(harness.channel, mention(harness, f"say hi to {harness.bob.mention}"))
    await harness.alice.send(harness.channel, mention(harness, ""))
    texts = [turn.text for turn in harness.generator.requests[-1].history]
    assert texts[0] == "say hi to @bob"
    assert texts[-1] == "@TestBot"


async def test_a_locked_database_does_not_stop_answers(harness: Harness) -> None:
    async def locked(*args: object, **kwargs: object) -> bool:
        raise DatabaseBusy("another process holds the write lock")

    harness.storage.add_message = locked  # type: ignore[method-assign]
    await harness.alice.send(harness.channel, mention(harness, "are you there?"))
    assert len(harness.bot_messages()) == 1
    assert harness.generator.requests[-1].history[-1].text == "are you there?"


async def test_real_mentions_stored_as_ids_and_exported_by_consent(harness: Harness, tmp_path: Path) -> None:
    """Through the real ingest path: names only for consenting users, no @everyone, in the export."""
    import json

    from bot.export import ExportOptions, export_discord

    await harness.storage.set_guild_training_export(harness.guild.id, True)
    await harness.storage.set_training_opt_in(harness.alice.id, True, at=0.0)
    harness.generator.replies.append("sure thing")
    sent = await harness.alice.send(
        harness.channel, mention(harness, f"tell {harness.bob.mention} and @everyone hi")
    )
    stored = await harness.storage.get_message(sent.id)
    assert stored is not None and f"<@{harness.bob.id}>" in stored.content  # ids kept for the export
    assert harness.generator.requests[-1].history[-1].text == "tell @bob and everyone hi"
    options = ExportOptions(gap_seconds=1800, bot_user_id=harness.bot_id)
    await export_discord(harness.storage, tmp_path / "export", options)
    exported = "".join((tmp_path / "export" / name).read_text() for name in ("train.jsonl", "val.jsonl"))
    turns = [turn["text"] for line in exported.splitlines() for turn in json.loads(line)["turns"]]
    assert turns == ["tell someone and everyone hi", "sure thing"]  # bob never opted in
