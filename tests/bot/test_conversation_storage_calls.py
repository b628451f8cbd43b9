"""How often one message's path reaches storage: counted on a real Storage (SQLite in tmp_path) in simcord.

The conversation core reads the guild/channel context once per message and writes the incoming message
(with its author and the users it mentions) in one transaction.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import simcord

from model.api import Reply, ReplyRequest
from tests.helpers.discord_harness import Harness, running_bot
from tests.helpers.storage_calls import TRANSACTIONS, StorageCalls

log = logging.getLogger(__name__)


def counts_at_generate(h: Harness, calls: StorageCalls) -> list[Counter[str]]:
    """Snapshots of the counts each time the generator is called (what was done before generating)."""
    snapshots: list[Counter[str]] = []
    generate = h.generator.generate

    async def counting_generate(request: ReplyRequest) -> Reply:
        snapshots.append(calls.snapshot())
        return await generate(request)

    h.generator.generate = counting_generate  # type: ignore[method-assign]
    return snapshots


async def test_one_reply_in_a_server_reads_each_setting_once_and_writes_the_message_once(
    tmp_path: Path,
) -> None:
    async with running_bot(tmp_path) as h:
        assert h.bot.user is not None
        await h.alice.send(h.channel, "an earlier message")  # the channel and alice are known already
        calls = StorageCalls.watch(h.storage)
        at_generate = counts_at_generate(h, calls)
        await h.alice.send(h.channel, f"{h.bot.user.mention} say hi to {h.bob.mention}")
        assert [m.content for m in h.bot_messages()] == ["hello from the fake model"]
        per_reply, [before_generate] = calls.snapshot(), at_generate
    log.info("storage calls for one reply: %s; before generating: %s", dict(per_reply), dict(before_generate))
    assert per_reply["guild_settings"] <= 1
    # One query for the channel row, a thread's parent row and whether it is the bot's thread (issue 25).
    assert per_reply["channel_and_parent_settings"] == 1
    # /remember: one more read per reply, the channel's facts (with a thread's parent's) in one query.
    assert per_reply["channel_facts"] == 1
    assert before_generate[TRANSACTIONS] == 1  # the incoming message, its author and mentioned users


async def test_a_reply_in_a_thread_reads_the_thread_and_its_parent_in_one_call(tmp_path: Path) -> None:
    async with running_bot(tmp_path) as h:
        assert h.bot.user is not None
        thread = h.env.backend.create_thread(h.channel.id, "side topic", h.alice.id)
        handle = simcord.ChannelHandle(h.env, h.guild, thread)
        await h.env.settle()
        await h.alice.send(handle, "an earlier message")
        calls = StorageCalls.watch(h.storage)
        await h.alice.send(handle, f"{h.bot.user.mention} hi")
        assert len(h.bot_messages(handle)) == 1
        per_reply = calls.snapshot()
    assert per_reply["guild_settings"] == 1 and per_reply["channel_and_parent_settings"] == 1
    assert per_reply["channel_settings"] == 0
    assert per_reply["channel_facts"] == 1  # the thread's and its parent's facts, in one query too


async def test_a_stored_message_that_gets_no_reply_is_one_transaction(tmp_path: Path) -> None:
    async with running_bot(tmp_path) as h:
        calls = StorageCalls.watch(h.storage)
        sent = await h.alice.send(h.channel, f"just chatting with {h.bob.mention}")
        counts = calls.snapshot()
        stored = await h.storage.get_message(sent.id)
    assert stored is not None and stored.author_name == "alice"
    assert counts[TRANSACTIONS] == 1
    assert counts["guild_settings"] <= 1 and counts["channel_and_parent_settings"] <= 1
