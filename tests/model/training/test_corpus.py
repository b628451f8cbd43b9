"""Open corpora → export format: chitchat (a small fake file + the real package), chatterbot:japanese."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from model.training.corpus import (
    CorpusError,
    chatterbot_conversations,
    chitchat_conversations,
    export_corpus,
    parse_corpus_spec,
)
from model.training.dataset import read_conversations, split_of, verify_export


def message(text: str, sender: str) -> dict[str, str]:
    return {"text": text, "sender": sender, "timestamp": "2018-05-02T19:38:15Z"}


FAKE_CHITCHAT = {
    "c1": {
        "messages": [
            [message("Hello", "s-a"), message("How are you doing today?", "s-a")],
            [message("whats up", "s-b"), message("im doing good", "s-b")],
            [message("great to hear", "s-a")],
        ]
    },
    "c2": {"messages": [[message("hi there", "s-x"), message("are you there?", "s-x")]]},  # nobody answered
    "c3": {"messages": [[message("yo", "s-q")], [message("  ", "s-r")], [message("hey", "s-r")]]},
}


@pytest.fixture
def fake_chitchat(tmp_path: Path) -> Path:
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps(FAKE_CHITCHAT), encoding="utf-8")
    return path


def test_chitchat_turns_join_messages_and_map_speakers(fake_chitchat: Path) -> None:
    conversations = {c.id: c for c in chitchat_conversations(path=fake_chitchat, bot_name="Robo")}
    first = conversations["chitchat:c1"]
    assert [t.text for t in first.turns] == [
        "Hello How are you doing today?",
        "whats up im doing good",
        "great to hear",
    ]
    assert [(t.speaker, t.is_bot) for t in first.turns] == [("User", False), ("Robo", True), ("User", False)]
    assert first.source == "chitchat"
    assert [t.text for t in conversations["chitchat:c3"].turns] == ["yo", "hey"]  # the empty turn is dropped
    assert len(list(chitchat_conversations(limit=1, path=fake_chitchat))) == 1


def test_export_chitchat_from_a_fake_file(tmp_path: Path, fake_chitchat: Path) -> None:
    manifest = export_corpus("chitchat", tmp_path / "out", chitchat_path=fake_chitchat)
    assert manifest.source == "chitchat"
    assert sum(manifest.counts.values()) == 2  # c2 has no reply, so the min_turns filter drops it
    assert manifest.filters["min_turns"] == 2 and manifest.extra["licence"] == "MIT"
    verify_export(tmp_path / "out")
    for split in ("train", "val"):
        for conversation in read_conversations(tmp_path / "out" / f"{split}.jsonl"):
            assert split_of(conversation.id) == split


def test_export_chatterbot_japanese(tmp_path: Path) -> None:
    pytest.importorskip("yaml")
    manifest = export_corpus("chatterbot:japanese", tmp_path)
    assert manifest.source == "chatterbot:japanese"
    conversations = [c for split in ("train", "val") for c in read_conversations(tmp_path / f"{split}.jsonl")]
    assert len(conversations) == sum(manifest.counts.values()) > 400
    greeting = next(c for c in conversations if c.id.startswith("chatterbot:japanese:greetings:"))
    assert [t.is_bot for t in greeting.turns] == [i % 2 == 1 for i in range(len(greeting.turns))]
    assert any("こんにちは" in t.text for c in conversations for t in c.turns)
    assert all(c.id.count(":") == 3 and c.source == "chatterbot:japanese" for c in conversations)


def test_chatterbot_keeps_yaml_booleans_as_text() -> None:
    pytest.importorskip("yaml")
    texts = {t.text for c in chatterbot_conversations("english") for t in c.turns}
    assert "True" not in texts and "False" not in texts  # BaseLoader: "yes"/"no" stay words


def test_corpus_spec_errors_name_the_flag() -> None:
    assert parse_corpus_spec("chatterbot") == ("chatterbot", "english")
    assert parse_corpus_spec("chatterbot:japanese") == ("chatterbot", "japanese")
    assert parse_corpus_spec("chitchat") == ("chitchat", None)
    with pytest.raises(CorpusError, match="--corpus"):
        parse_corpus_spec("reddit")
    with pytest.raises(CorpusError, match=r"unknown language.*japanese"):
        list(chatterbot_conversations("klingon"))


def test_real_chitchat_package_limited() -> None:
    pytest.importorskip("chitchat_dataset", reason="chitchat-dataset (the corpus extra) is not installed")
    conversations = list(chitchat_conversations(limit=25))
    assert len(conversations) == 25
    assert all(c.id.startswith("chitchat:") for c in conversations)
    two_sided = [c for c in conversations if any(t.is_bot for t in c.turns)]
    assert two_sided and all(not c.turns[0].is_bot for c in two_sided)
