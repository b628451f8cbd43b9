"""Small exports for tests: patterned conversations a 2×64 model learns in a few dozen CPU steps, and
deterministic two-speaker conversations for the export format's own tests."""

from __future__ import annotations

import random
from pathlib import Path

from model.prompt import Turn
from model.training import dataset
from model.training.dataset import Conversation, write_export

QUESTIONS_AND_ANSWERS = [
    ("what is your favourite colour?", "I like blue, it is calm."),
    ("how old are you?", "I am twenty years old."),
    ("do you like music?", "yes, I listen to jazz every day."),
    ("where do you live?", "I live in a small town by the sea."),
    ("what do you do?", "I am a student of history."),
]


def make_synthetic_export(out_dir: Path, count: int = 300, seed: int = 0) -> Path:
    """A small export of patterned conversations that a 2×64 model can learn in a few dozen steps."""
    rng = random.Random(seed)
    conversations = []
    for n in range(count):
        pairs = rng.sample(QUESTIONS_AND_ANSWERS, 2)
        turns = [Turn(f"user{n % 7}", "hi!"), Turn("Bot", "hello! how are you?", is_bot=True)]
        for question, answer in pairs:
            turns += [Turn(f"user{n % 7}", question), Turn("Bot", answer, is_bot=True)]
        conversations.append(Conversation(id=f"synthetic:{n}", source="test", turns=tuple(turns)))
    write_export(out_dir, conversations, source="test", filters={})
    return out_dir


def make_conversations(count: int, start: int = 0, words: int = 8) -> list[Conversation]:
    """Deterministic two-speaker conversations with ids conv-<n>."""
    return [
        Conversation(
            id=f"conv-{n}",
            source="test",
            turns=(
                Turn("alice", f"hello number {n} " + "word " * words),
                Turn("Bot", f"hi {n}, nice to meet you", is_bot=True),
                Turn("alice", "こんにちは、元気ですか？"),
            ),
        )
        for n in range(start, start + count)
    ]


def export(out_dir: Path, conversations: list[Conversation]) -> dataset.Manifest:
    return write_export(out_dir, conversations, source="test", filters={"min_turns": 2})
