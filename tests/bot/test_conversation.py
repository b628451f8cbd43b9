"""The conversation core with a real SQLite file and the fake generator."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bot.config import Settings
from bot.conversation import ConversationService, IncomingMessage, MessageContext, apply_overrides
from bot.storage import ChannelSettings, GuildSettings, Storage
from model.sampling import SamplingParams
from tests.helpers.fakes import FakeGenerator

BOT_ID = 999
CHANNEL = 10
GUILD = 1
THREAD = 11


def incoming(
    message_id: int, text: str, author_id: int = 5, at: float = 1000.0, **kw: object
) -> IncomingMessage:
    fields: dict = dict(
        channel_id=CHANNEL,
        guild_id=GUILD,
        author_id=author_id,
        author_name=f"user{author_id}",
        is_bot=False,
        content=text,
        created_at=at + message_id,
    )
    fields.update(kw)
    return IncomingMessage(message_id=message_id, **fields)


@pytest.fixture
async def storage(tmp_path: Path) -> AsyncIterator[Storage]:
    async with await Storage.open(tmp_path / "chat.db") as db:
        yield db


@pytest.fixture
def fake() -> FakeGenerator:
    return FakeGenerator(["first reply", "second reply"])


@pytest.fixture
def service(storage: Storage, fake: FakeGenerator) -> ConversationService:
    return ConversationService(storage, fake, Settings.from_env({"BOT_NAME": "Robo"}), bot_user_id=BOT_ID)


async def record(service: ConversationService, message: IncomingMessage) -> bool:
    """Store one message the way a front end does: its context read once, then the message."""
    return await service.record(message, await service.context_for(message))


async def exchange(service: ConversationService, message: IncomingMessage, reply_id: int) -> str:
    context = await service.context_for(message)
    assert await service.record(message, context)
    draft = await service.compose_reply(message, context)
    await service.record_reply(message, context, draft, [(reply_id, draft.text)], message.created_at + 1)
    return draft.text


async def test_history_builds_the_request_and_replies_are_stored(
    service: ConversationService, storage: Storage, fake: FakeGenerator
) -> None:
    assert await exchange(service, incoming(1, "hello"), reply_id=2) == "first reply"
    assert await exchange(service, incoming(3, "how are you?"), reply_id=4) == "second reply"
    history = fake.requests[-1].history
    assert [(t.speaker, t.text, t.is_bot) for t in history] == [
        ("user5", "hello", False),
        ("Robo", "first reply", True),
        ("user5", "how are you?", False),
    ]
    assert fake.requests[-1].recent_bot_replies == ("first reply",)
    assert fake.requests[-1].bot_name == "Robo"
    stats = await storage.stats()
    assert (stats.messages, stats.bot_replies) == (4, 2)


async def test_replayed_message_is_not_new(service: ConversationService) -> None:
    assert await record(service, incoming(1, "hi"))
    assert not await record(service, incoming(1, "hi"))


async def test_other_bots_speak_as_users(service: ConversationService, fake: FakeGenerator) -> None:
    await record(service, incoming(1, "beep", author_id=77, is_bot=True))
    await exchange(service, incoming(2, "hi"), reply_id=3)
    assert [t.is_bot for t in fake.requests[-1].history] == [False, False]


async def test_reset_hides_older_history(
    service: ConversationService, storage: Storage, fake: FakeGenerator
) -> None:
    await exchange(service, incoming(1, "old topic", at=0), reply_id=2)
    await storage.reset_channel(CHANNEL, at=500.0)
    await exchange(service, incoming(3, "new topic", at=1000), reply_id=4)
    assert [t.text for t in fake.requests[-1].history] == ["new topic"]


async def test_guild_with_logging_off_stores_nothing_but_still_answers(
    service: ConversationService, storage: Storage, fake: FakeGenerator
) -> None:
    await storage.set_guild_logging(GUILD, False)
    assert await exchange(service, incoming(1, "secret"), reply_id=2) == "first reply"
    assert (await storage.stats()).messages == 0
    assert [t.text for t in fake.requests[-1].history] == ["secret"]
    assert not await record(service, incoming(1, "secret"))  # replay still detected in memory


async def test_logging_turned_off_while_generating_stores_no_reply(
    service: ConversationService, storage: Storage
) -> None:
    """The guild's switch is read once per message, but the reply's write checks it again: a purge wins."""
    message = incoming(1, "hello")
    context = await service.context_for(message)
    assert await service.record(message, context)
    draft = await service.compose_reply(message, context)
    await storage.set_guild_logging(GUILD, False)  # an admin's /privacy logging off, meanwhile
    await storage.purge_guild_messages(GUILD)
    await service.record_reply(message, context, draft, [(2, draft.text)], message.created_at + 1)
    stats = await storage.stats()
    assert (stats.messages, stats.bot_replies) == (0, 0)


async def test_guild_overrides_apply(
    service: ConversationService, storage: Storage, fake: FakeGenerator
) -> None:
    await storage.set_guild_sampling(GUILD, {"temperature": 0.3, "max_new_tokens": 20})
    await storage.set_guild_persona(GUILD, "A pirate bot.")
    await exchange(service, incoming(1, "ahoy"), reply_id=2)
    request = fake.requests[-1]
    assert request.persona == "A pirate bot."
    assert (request.params.temperature, request.params.max_new_tokens) == (0.3, 20)


def test_apply_overrides_ignores_unknown_keys_and_keeps_types() -> None:
    params = apply_overrides(SamplingParams(), {"top_k": 7.0, "bogus": 1.0})
    assert params.top_k == 7 and isinstance(params.top_k, int)


def test_settings_resolve_per_value_from_channel_to_parent_to_server_to_default() -> None:
    guild = GuildSettings(
        GUILD, persona="Server persona.", sampling_overrides={"temperature": 0.9, "top_k": 10}
    )
    parent = ChannelSettings(CHANNEL, persona="Parent persona.", sampling_overrides={"temperature": 0.5})
    thread = ChannelSettings(THREAD, sampling_overrides={"top_p": 0.8}, parent_id=CHANNEL)
    context = MessageContext(guild, thread, parent)
    assert context.persona_source() == ("Parent persona.", "parent channel")
    assert context.sampling_sources() == {
        "temperature": (0.5, "parent channel"),
        "top_k": (10, "server"),
        "top_p": (0.8, "this channel"),
    }
    assert context.home is parent
    assert MessageContext(None, ChannelSettings(CHANNEL)).persona_source() == (None, "default")
    assert MessageContext(guild, ChannelSettings(CHANNEL)).sampling_overrides() == {
        "temperature": 0.9,
        "top_k": 10,
    }


async def test_a_bot_threads_history_starts_with_the_message_that_opened_it(
    service: ConversationService, fake: FakeGenerator
) -> None:
    opener = incoming(1, "let's plan the trip")
    context = await service.context_for(opener)
    assert await service.record(opener, context)
    in_thread, thread_context = await service.open_thread(opener, context, THREAD, at=1002.0)
    assert in_thread.channel_id == THREAD and thread_context.channel.is_bot_thread
    draft = await service.compose_reply(in_thread, thread_context)
    await service.record_reply(in_thread, thread_context, draft, [(2, draft.text)], 1003.0)
    follow_up = incoming(3, "I can drive", channel_id=THREAD, parent_channel_id=CHANNEL)
    await exchange(service, follow_up, reply_id=4)
    history = [turn.text for turn in fake.requests[-1].history]
    assert history == ["let's plan the trip", "first reply", "I can drive"]
    assert (await service.context_for(follow_up)).parent == context.channel  # the parent, read with it
