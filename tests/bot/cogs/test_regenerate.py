"""Regenerate and Continue in simcord: the message context menus on the bot's replies, who may use them, what
they post and store, and how a replaced reply leaves prompts and the real export (a real SQLite file)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import discord
import pytest

from bot.cogs.regenerate import (
    CONTINUED,
    NOT_A_REPLY,
    NOT_ALLOWED,
    NOT_LATEST,
    REGENERATED,
    TOO_LONG,
    may_redo,
)
from bot.conversation import SEED_RANGE
from bot.export import ExportOptions, export_discord
from bot.storage import StoredReply
from bot.text import BUSY_REPLY
from model.api import ReplyRequest, ReplyTooLongToContinue
from tests.helpers import discord_harness
from tests.helpers.discord_harness import Harness, response_text, running_bot

harness = discord_harness.harness
simcord_bot = discord_harness.simcord_bot

REGENERATE, CONTINUE = "Regenerate reply", "Continue reply"


async def ask(
    h: Harness, text: str, reply: str, member: Any = None
) -> tuple[discord.Message, discord.Message]:
    """`member` (Alice) mentions the bot; the fake model answers `reply`. Returns (question, reply)."""
    assert h.bot.user is not None
    h.generator.replies.append(reply)
    question = await (member or h.alice).send(h.channel, f"{h.bot.user.mention} {text}")
    return question, h.bot_messages()[-1]


def history_texts(request: ReplyRequest) -> list[str]:
    return [turn.text for turn in request.history]


async def test_the_author_regenerates_a_new_reply_to_the_same_message(harness: Harness) -> None:
    question, old = await ask(harness, "tell me a joke", "first answer")
    await harness.bob.send(harness.channel, "a later message nobody addressed to the bot")
    first_request = harness.generator.requests[-1]
    harness.generator.replies.append("second answer")
    result = await harness.alice.context_menu(harness.channel, REGENERATE, old)
    assert result.ephemeral and response_text(result) == REGENERATED and harness.deferred()
    old_now, new = harness.bot_messages()[-2:]
    assert (old_now.id, old_now.content, new.content) == (old.id, "first answer", "second answer")  # kept
    assert new.reference is not None and new.reference.message_id == question.id
    request = harness.generator.requests[-1]
    assert history_texts(request) == history_texts(first_request)  # the same history; the later one left out
    assert first_request.params.seed is None and 0 <= request.params.seed < SEED_RANGE  # type: ignore[operator]
    assert "first answer" in request.recent_bot_replies  # an equal reply would be resampled once
    stored = await harness.storage.reply_for_message(new.id)
    assert stored is not None and stored.answers_message_id == question.id and stored.is_latest
    [entry] = await harness.storage.audit_log()
    assert (entry.actor_id, entry.action, entry.allowed) == (harness.alice.id, REGENERATE, True)
    await harness.alice.context_menu(harness.channel, REGENERATE, old)  # again: another new seed
    assert harness.generator.requests[-1].params.seed != request.params.seed


async def test_an_admin_may_regenerate_and_continue_someone_elses_reply(harness: Harness) -> None:
    _, old = await ask(harness, "hi", "hello")
    harness.generator.replies.extend(["hello again", " and welcome."])
    assert response_text(await harness.admin.context_menu(harness.channel, REGENERATE, old)) == REGENERATED
    new = harness.bot_messages()[-1]
    assert response_text(await harness.admin.context_menu(harness.channel, CONTINUE, new)) == CONTINUED
    assert harness.bot_messages()[-1].content == "hello again and welcome."


@pytest.mark.parametrize("command", [REGENERATE, CONTINUE])
async def test_someone_else_is_refused_in_one_line_and_audited(harness: Harness, command: str) -> None:
    _, old = await ask(harness, "hi", "hello")
    requests = len(harness.generator.requests)
    result = await harness.bob.context_menu(harness.channel, command, old)
    assert result.ephemeral and response_text(result) == NOT_ALLOWED
    assert len(harness.generator.requests) == requests and harness.bot_messages()[-1].content == "hello"
    [entry] = await harness.storage.audit_log()
    assert (entry.actor_id, entry.action, entry.allowed) == (harness.bob.id, command, False)


async def test_a_message_that_is_not_a_stored_reply_gets_one_line(harness: Harness) -> None:
    question, _ = await ask(harness, "hi", "hello")
    result = await harness.alice.context_menu(harness.channel, REGENERATE, question)
    assert response_text(result) == NOT_A_REPLY and len(harness.bot_messages()) == 1


async def test_dms_allow_the_only_other_party() -> None:
    stored = StoredReply(2, 1, 10, None, 100, ((2, "hi"),), True, 3)
    assert await may_redo(SimpleNamespace(guild=None, user=SimpleNamespace(id=555)), stored)  # type: ignore[arg-type]


async def export_text(h: Harness, out: Path) -> tuple[str, dict[str, Any]]:
    options = ExportOptions(3600.0, "Bot", h.bot_id)
    manifest = await export_discord(h.storage, out, options)
    text = "".join((out / name).read_text(encoding="utf-8") for name in ("train.jsonl", "val.jsonl"))
    return text, dict(manifest.filters)


async def test_a_replaced_reply_leaves_prompts_and_export_unless_its_person_keeps_it(
    harness: Harness, tmp_path: Path
) -> None:
    await harness.admin.slash(harness.channel, "privacy export", enabled=True)
    await harness.alice.slash(harness.channel, "optin")
    _, old = await ask(harness, "tell me a joke", "OLD-CANARY joke")
    harness.generator.replies.append("NEW-CANARY joke")
    await harness.alice.context_menu(harness.channel, REGENERATE, old)
    await ask(harness, "another one", "third answer")
    assert "OLD-CANARY joke" not in history_texts(harness.generator.requests[-1])
    assert "NEW-CANARY joke" in history_texts(harness.generator.requests[-1])
    text, filters = await export_text(harness, tmp_path / "dropped")
    assert "OLD-CANARY" not in text and "NEW-CANARY" in text and filters["bot_replies_dropped_replaced"] == 1
    await harness.bob.react(old, "👍")  # someone else's 👍 does not keep it
    assert "OLD-CANARY" not in (await export_text(harness, tmp_path / "bob"))[0]
    await harness.alice.react(old, "👍")  # the person it answered keeps it
    text, filters = await export_text(harness, tmp_path / "kept")
    assert "OLD-CANARY" in text and "bot_replies_dropped_replaced" not in filters
    await ask(harness, "and now?", "fourth answer")
    assert "OLD-CANARY joke" in history_texts(harness.generator.requests[-1])


async def test_continue_edits_the_message_and_the_stored_text(harness: Harness) -> None:
    _, reply = await ask(harness, "a story please", "Once upon a time")
    harness.generator.replies.append(" there was a cat.")
    result = await harness.alice.context_menu(harness.channel, CONTINUE, reply)
    assert result.ephemeral and response_text(result) == CONTINUED
    [edited] = harness.bot_messages()
    assert edited.id == reply.id and edited.content == "Once upon a time there was a cat."
    request = harness.generator.requests[-1]
    assert request.continue_text == "Once upon a time" and history_texts(request)[-1] == "a story please"
    stored = await harness.storage.reply_for_message(reply.id)
    assert stored is not None and stored.chunks == ((reply.id, "Once upon a time there was a cat."),)
    assert stored.completion_tokens == 4 + 4  # the fake counts words: both generations are accounted


async def test_a_continuation_too_long_for_the_message_is_posted_after_it(harness: Harness) -> None:
    _, reply = await ask(harness, "talk a lot", "word " * 396)
    harness.generator.replies.append(" more" * 10)
    assert response_text(await harness.alice.context_menu(harness.channel, CONTINUE, reply)) == CONTINUED
    first, follow_up = harness.bot_messages()
    assert first.id == reply.id and follow_up.content == ("more " * 10).strip()
    stored = await harness.storage.reply_for_message(follow_up.id)
    assert stored is not None and stored.reply_message_id == reply.id and len(stored.chunks) == 2


async def test_only_the_latest_reply_can_be_continued(harness: Harness) -> None:
    _, first = await ask(harness, "one", "answer one")
    await ask(harness, "two", "answer two")
    result = await harness.alice.context_menu(harness.channel, CONTINUE, first)
    assert response_text(result) == NOT_LATEST and harness.bot_messages()[0].content == "answer one"


async def test_a_reply_too_long_to_continue_says_so(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, reply = await ask(harness, "hi", "hello")

    async def too_long(request: ReplyRequest) -> Any:
        raise ReplyTooLongToContinue("the reply is too long to continue")

    monkeypatch.setattr(harness.generator, "generate", too_long)
    assert response_text(await harness.alice.context_menu(harness.channel, CONTINUE, reply)) == TOO_LONG


async def test_a_busy_model_gets_the_chat_cogs_line(harness: Harness) -> None:
    _, reply = await ask(harness, "hi", "hello")
    harness.generator.queue_size = 0
    assert response_text(await harness.alice.context_menu(harness.channel, REGENERATE, reply)) == BUSY_REPLY


async def test_continue_on_a_japanese_reply_joins_with_no_stray_space(tmp_path: Path) -> None:
    async with running_bot(tmp_path, bot_name="ボット") as h:
        _, reply = await ask(h, "こんにちは", "こんにちは、")
        h.generator.replies.append("元気ですか？")  # what a sentencepiece model continues with: no space
        await h.alice.context_menu(h.channel, CONTINUE, reply)
        assert h.bot_messages()[-1].content == "こんにちは、元気ですか？"
        stored = await h.storage.reply_for_message(reply.id)
        assert (
            stored is not None and json.dumps(stored.text, ensure_ascii=False) == '"こんにちは、元気ですか？"'
        )
