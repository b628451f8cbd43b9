"""Discord-log export: consent, deletions, forget-me, scrubbing (planted canaries), filters, stable splits."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from bot.config import Settings
from bot.export import (
    ExportArgumentError,
    ExportOptions,
    build_conversation,
    export_discord,
    export_from_database,
    parse_since,
    split_at_gaps,
)
from bot.storage import ExportRow, Storage, StoredMessage
from model.training.dataset import read_conversations, verify_export

GUILD, OFF_GUILD = 1, 2
BOT, ALICE, BOB, CAROL, DAVE, OTHER_BOT = 900, 11, 12, 13, 14, 950
GAP_SECONDS = 30 * 60
OPTIONS = ExportOptions(GAP_SECONDS, "Bot", BOT)
NAMES = {ALICE: "Alice", BOB: "Bob", CAROL: "Carol", DAVE: "Dave", BOT: "Bot", OTHER_BOT: "Mee6"}
CANARIES = {
    "email": "canary.person@example.com",
    "phone": "+44 20 7946 0958",
    "mention": "<@12>",
    "token": "MTA5ODc2NTQzMjEwOTg3NjU0.GaBcDe.canaryTOKENcanaryTOKENcanary123456",
    "opted_out": "CANARY-BOB-NEVER-OPTED-IN",
    "deleted": "CANARY-DELETED-MESSAGE",
    "forgotten": "CANARY-DAVE-FORGOT-ME",
    "other_guild": "CANARY-GUILD-WITHOUT-EXPORT",
    "other_bot": "CANARY-OTHER-BOT",
    "downvoted": "CANARY-DOWNVOTED-REPLY",
}


def row(
    message_id: int,
    author: int,
    content: str,
    at: float,
    *,
    channel: int = 100,
    opted_in: bool = True,
    score: int = 0,
    reply_to: int | None = None,
) -> ExportRow:
    message = StoredMessage(message_id, channel, GUILD, author, NAMES[author], author in (BOT, OTHER_BOT),
                            content, at, reply_to_id=reply_to)  # fmt: skip
    return ExportRow(message, opted_in and author not in (BOT, OTHER_BOT), score)


def test_split_at_gaps_and_channels() -> None:
    rows = [row(1, ALICE, "a", 0), row(2, BOT, "b", 60), row(3, ALICE, "c", 60 + GAP_SECONDS + 1),
            row(4, ALICE, "d", 70 + GAP_SECONDS, channel=101)]  # fmt: skip
    assert [[r.message.message_id for r in g] for g in split_at_gaps(rows, GAP_SECONDS)] == [[1, 2], [3], [4]]


def test_conversation_id_and_turns() -> None:
    counts: Counter[str] = Counter()
    rows = [row(7, ALICE, "hi <@900>", 0), row(8, BOT, "hello Alice!", 5, reply_to=7)]
    conversation = build_conversation(rows, OPTIONS, {BOT: "Bot"}, counts)
    assert conversation is not None
    assert conversation.id == "discord:100:7"
    assert [(t.speaker, t.text, t.is_bot) for t in conversation.turns] == [
        ("Alice", "hi Bot", False), ("Bot", "hello Alice!", True)]  # fmt: skip


def test_unconsented_turns_and_the_replies_to_them_are_dropped() -> None:
    counts: Counter[str] = Counter()
    rows = [row(1, ALICE, "hi bot", 0), row(2, BOT, "hi Alice", 1, reply_to=1),
            row(3, BOB, "secret stuff", 2, opted_in=False),
            row(4, BOT, "you said secret stuff", 3, reply_to=3),
            row(5, OTHER_BOT, "level up!", 4), row(6, ALICE, "bye", 5)]  # fmt: skip
    conversation = build_conversation(rows, OPTIONS, {}, counts)
    assert conversation is not None
    assert [t.text for t in conversation.turns] == ["hi bot", "hi Alice", "bye"]
    assert counts["messages_dropped_not_opted_in"] == 1
    assert counts["bot_replies_dropped_answering_unexported"] == 1
    assert counts["messages_dropped_other_bot"] == 1


def test_downvoted_and_repeated_bot_replies_are_dropped() -> None:
    counts: Counter[str] = Counter()
    rows = [row(1, ALICE, "q1", 0), row(2, BOT, "bad answer part 1", 1, reply_to=1, score=-1),
            row(3, BOT, "bad answer part 2", 2, reply_to=1), row(4, ALICE, "q2", 3),
            row(5, BOT, "I like turtles", 4, reply_to=4), row(6, ALICE, "q3", 5),
            row(7, BOT, "i like   TURTLES", 6, reply_to=6)]  # fmt: skip
    conversation = build_conversation(rows, OPTIONS, {}, counts)
    assert conversation is not None
    assert [t.text for t in conversation.turns] == ["q1", "q2", "I like turtles", "q3"]
    assert counts["bot_replies_dropped_downvoted"] == 2
    assert counts["bot_replies_dropped_repeated"] == 1


@pytest.mark.parametrize(
    ("rows", "reason"),
    [
        ([row(1, ALICE, "alone", 0)], "conversations_dropped_too_short"),
        ([row(1, ALICE, "a", 0), row(2, CAROL, "b", 1)], "conversations_dropped_no_bot_turn"),
        ([row(1, BOT, "a", 0), row(2, BOT, "b", 1)], "conversations_dropped_no_human_turn"),
        (
            [row(1, BOB, "a", 0, opted_in=False), row(2, BOT, "b", 1, reply_to=1)],
            "conversations_dropped_too_short",
        ),
    ],
)
def test_unusable_conversations_are_dropped(rows: list[ExportRow], reason: str) -> None:
    counts: Counter[str] = Counter()
    assert build_conversation(rows, OPTIONS, {}, counts) is None
    assert counts[reason] == 1


def test_bot_recognised_by_name_when_id_unknown() -> None:
    counts: Counter[str] = Counter()
    options = ExportOptions(GAP_SECONDS, "Bot", bot_user_id=None)
    rows = [row(1, ALICE, "hi", 0), row(2, BOT, "hello", 1, reply_to=1), row(3, OTHER_BOT, "spam", 2)]
    conversation = build_conversation(rows, options, {}, counts)
    assert conversation is not None
    assert [t.is_bot for t in conversation.turns] == [False, True]


def test_parse_since() -> None:
    assert parse_since(None) is None
    assert parse_since("2024-01-02") == 1704153600.0
    assert parse_since("2024-01-02T01:00:00+01:00") == 1704153600.0
    assert parse_since("1704153600") == 1704153600.0
    with pytest.raises(ExportArgumentError, match="--since"):
        parse_since("last tuesday")


# --- against a real database -----------------------------------------------------------------------------


class Seeder:
    """Writes messages into a Storage with increasing ids and times."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self.next_id = 1000

    async def say(
        self,
        author: int,
        content: str,
        at: float,
        *,
        channel: int = 100,
        guild: int = GUILD,
        reply_to: int | None = None,
    ) -> int:
        self.next_id += 1
        is_bot = author in (BOT, OTHER_BOT)
        message = StoredMessage(self.next_id, channel, guild, author, NAMES[author], is_bot, content, at,
                                reply_to_id=reply_to)  # fmt: skip
        assert await self.storage.add_message(message)
        return self.next_id

    async def exchange(
        self, channel: int, at: float, question: str, answer: str, author: int = ALICE
    ) -> tuple[int, int]:
        asked = await self.say(author, question, at, channel=channel)
        return asked, await self.say(BOT, answer, at + 5, channel=channel, reply_to=asked)


async def seed_canaries(seeder: Seeder) -> None:
    """One conversation per canary in channel 100 (gaps between them), plus the consent set-up."""
    storage = seeder.storage
    await storage.set_guild_training_export(GUILD, True)
    for user in (ALICE, CAROL, DAVE):
        await storage.set_training_opt_in(user, True, at=1.0)
    await storage.upsert_user(CAROL, "Carol")  # known by name, but never speaks: only mentioned
    await storage.upsert_user(BOB, "Bob")
    t = 10_000.0
    await seeder.exchange(100, t, f"mail me at {CANARIES['email']}", "ok")
    await seeder.exchange(100, t + 1 * GAP_SECONDS * 2, f"call {CANARIES['phone']} pls", "sure")
    await seeder.exchange(100, t + 2 * GAP_SECONDS * 2, f"ask {CANARIES['mention']} and <@13>", "will do")
    await seeder.exchange(100, t + 3 * GAP_SECONDS * 2, f"my token is {CANARIES['token']}", "hide it!")
    await seeder.exchange(100, t + 4 * GAP_SECONDS * 2, "hello", "hi there")
    bob = await seeder.say(BOB, CANARIES["opted_out"], t + 4 * GAP_SECONDS * 2 + 10)
    await seeder.say(BOT, f"Bob said {CANARIES['opted_out']}", t + 4 * GAP_SECONDS * 2 + 12, reply_to=bob)
    deleted = await seeder.say(ALICE, CANARIES["deleted"], t + 4 * GAP_SECONDS * 2 + 20)
    await storage.mark_deleted([deleted])
    await seeder.say(OTHER_BOT, CANARIES["other_bot"], t + 4 * GAP_SECONDS * 2 + 30)
    # No bot_replies row links this reply to Dave, so storage keeps it: the export must drop it itself.
    await seeder.exchange(100, t + 5 * GAP_SECONDS * 2, CANARIES["forgotten"], "noted, Dave", author=DAVE)
    await storage.delete_user_data(DAVE, at=2.0)
    await seeder.exchange(100, t + 6 * GAP_SECONDS * 2, CANARIES["other_guild"], "x")
    await seeder.say(ALICE, CANARIES["other_guild"], t, channel=200, guild=OFF_GUILD)
    await seeder.say(BOT, "answer in the other guild", t + 1, channel=200, guild=OFF_GUILD)
    _, bad = await seeder.exchange(100, t + 7 * GAP_SECONDS * 2, "tell me a joke", CANARIES["downvoted"])
    await storage.set_feedback(bad, ALICE, -1, at=3.0)


def exported_text(out_dir: Path) -> str:
    return "".join((out_dir / name).read_text(encoding="utf-8") for name in ("train.jsonl", "val.jsonl",
                                                                             "manifest.json"))  # fmt: skip


async def test_export_honours_consent_deletions_forget_me_and_scrubbing(tmp_path: Path) -> None:
    async with Storage.open(tmp_path / "chatbot.db") as storage:
        await seed_canaries(Seeder(storage))
        manifest = await export_discord(storage, tmp_path / "out", OPTIONS, database="test.db")
    text = exported_text(tmp_path / "out")
    leaked = [name for name, canary in CANARIES.items() if canary in text and name != "other_guild"]
    assert leaked == []
    # The other guild's canary was also said in the exporting guild by Alice, on purpose: it shows up once.
    assert text.count(CANARIES["other_guild"]) == 1
    assert "ask Bob" not in text and "ask someone and Carol" in text  # Bob never opted in: no name either
    assert verify_export(tmp_path / "out") == manifest
    assert manifest.source == "discord" and manifest.extra["database"] == "test.db"
    assert manifest.filters["messages_dropped_not_opted_in"] == 1
    assert manifest.filters["bot_replies_dropped_downvoted"] == 1
    assert manifest.filters["consent"].startswith("unconsented turns dropped")
    conversations = [
        c for split in ("train", "val") for c in read_conversations(tmp_path / "out" / f"{split}.jsonl")
    ]
    assert sum(manifest.counts.values()) == len(conversations) == 6  # the downvoted one has no bot turn left
    assert all(c.id.startswith("discord:100:") for c in conversations)


async def add_conversations(seeder: Seeder, start: float, count: int, label: str) -> None:
    for i in range(count):
        await seeder.exchange(
            300 + i % 7, start + i * GAP_SECONDS * 3, f"{label} question {i}", f"answer {i}"
        )


def split_ids(out_dir: Path) -> dict[str, set[str]]:
    return {
        split: {c.id for c in read_conversations(out_dir / f"{split}.jsonl")} for split in ("train", "val")
    }


async def test_splits_are_stable_across_exports_with_new_data(tmp_path: Path) -> None:
    async with Storage.open(tmp_path / "chatbot.db") as storage:
        seeder = Seeder(storage)
        await storage.set_guild_training_export(GUILD, True)
        await storage.set_training_opt_in(ALICE, True, at=1.0)
        await add_conversations(seeder, 10_000.0, 40, "old")
        await export_discord(storage, tmp_path / "first", OPTIONS)
        await add_conversations(seeder, 10_000_000.0, 40, "new")
        await export_discord(storage, tmp_path / "second", OPTIONS)
    first, second = split_ids(tmp_path / "first"), split_ids(tmp_path / "second")
    assert first["val"] and first["train"]  # the test means something only when both sides are used
    assert first["train"] <= second["train"] and first["val"] <= second["val"]
    assert not second["train"] & second["val"]
    assert len(second["train"] | second["val"]) == 80


async def test_export_from_database_uses_settings(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, export_gap_minutes=30.0, bot_name="Bot")
    async with Storage.open(settings.db_path) as storage:
        seeder = Seeder(storage)
        await storage.set_guild_training_export(GUILD, True)
        await storage.set_training_opt_in(ALICE, True, at=1.0)
        await add_conversations(seeder, 1_700_000_000.0, 3, "recent")
    manifest = await export_from_database(settings, tmp_path / "out", guild_id=GUILD, since="2023-11-14")
    assert sum(manifest.counts.values()) == 3
    assert manifest.filters["guild_id"] == GUILD and manifest.extra["database"] == str(settings.db_path)
    later = await export_from_database(settings, tmp_path / "later", since="2030-01-01")
    assert sum(later.counts.values()) == 0
    assert json.loads((tmp_path / "later" / "manifest.json").read_text())["counts"] == {"train": 0, "val": 0}
