"""The open conversation corpora (chitchat-dataset, chatterbot-corpus) → conversations in the export format.

Both ship as Python packages (the `corpus` extra), so nothing is downloaded. In each conversation the first
speaker is the human ("User") and the other speaker is the bot, so a model trained on it answers as the bot.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import itertools
import json
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from model.prompt import Turn
from model.training.dataset import Conversation, Manifest, write_export

log = logging.getLogger(__name__)

USER_SPEAKER = "User"
# A conversation needs a human turn and a bot reply to teach anything about replying.
MIN_TURNS = 2
CORPUS_PACKAGES = {"chitchat": "chitchat-dataset", "chatterbot": "chatterbot-corpus"}
CORPUS_LICENCES = {"chitchat": "MIT", "chatterbot": "BSD-3-Clause"}


class CorpusError(ValueError):
    """A corpus spec is invalid or its package is missing; the message says what to do."""


def _package_dir(module: str, distribution: str) -> Path:
    """Where an installed corpus package lives, without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise CorpusError(
            f"{distribution} is not installed: pip install 'gpt2-discord-chatbot[corpus]' (or {distribution})"
        )
    return Path(spec.origin).parent


def _turn(text: str, is_bot: bool, bot_name: str) -> Turn:
    return Turn(speaker=bot_name if is_bot else USER_SPEAKER, text=text, is_bot=is_bot)


def chitchat_turns(messages: list[list[dict[str, Any]]], bot_name: str) -> tuple[Turn, ...]:
    """One chitchat conversation's turns: each inner list is one turn; its messages joined with a space."""
    turns: list[Turn] = []
    first_sender: str | None = None
    for turn_messages in messages:
        text = " ".join(str(m.get("text", "")).strip() for m in turn_messages).strip()
        if not turn_messages or not text:
            continue
        sender = str(turn_messages[0].get("sender", ""))
        first_sender = sender if first_sender is None else first_sender
        turns.append(_turn(text, is_bot=sender != first_sender, bot_name=bot_name))
    return tuple(turns)


def chitchat_conversations(
    limit: int | None = None, path: Path | None = None, bot_name: str = "Bot"
) -> Iterator[Conversation]:
    """Conversations of chitchat-dataset (id "chitchat:<id>"); `path` overrides the package's dataset.json."""
    dataset_path = path or _package_dir("chitchat_dataset", CORPUS_PACKAGES["chitchat"]) / "dataset.json"
    with open(dataset_path, encoding="utf-8") as source:
        data: dict[str, Any] = json.load(source)
    for count, (chat_id, chat) in enumerate(data.items()):
        if limit is not None and count >= limit:
            return
        turns = chitchat_turns(chat.get("messages", []), bot_name)
        yield Conversation(id=f"chitchat:{chat_id}", source="chitchat", turns=turns)


def chatterbot_languages() -> list[str]:
    """The languages chatterbot-corpus ships (folder names under chatterbot_corpus/data)."""
    data_dir = _package_dir("chatterbot_corpus", CORPUS_PACKAGES["chatterbot"]) / "data"
    return sorted(p.name for p in data_dir.iterdir() if p.is_dir() and any(p.glob("*.yml")))


def _load_yaml(path: Path) -> Any:
    import yaml

    # BaseLoader keeps every scalar a string: "yes", "no" or "1" are lines of dialogue, not booleans/ints.
    with open(path, encoding="utf-8") as source:
        return yaml.load(source, Loader=yaml.BaseLoader)


def chatterbot_conversations(language: str = "english", bot_name: str = "Bot") -> Iterator[Conversation]:
    """chatterbot-corpus conversations (id "chatterbot:<lang>:<file>:<index>"); lines alternate User/bot."""
    language_dir = _package_dir("chatterbot_corpus", CORPUS_PACKAGES["chatterbot"]) / "data" / language
    if not language_dir.is_dir():
        raise CorpusError(
            f"--corpus chatterbot:{language}: unknown language; "
            f"choose one of {', '.join(chatterbot_languages())}"
        )
    for yml in sorted(language_dir.glob("*.yml")):
        document = _load_yaml(yml) or {}
        for index, lines in enumerate(document.get("conversations") or []):
            texts = [str(line).strip() for line in lines if str(line).strip()]
            turns = tuple(_turn(text, is_bot=i % 2 == 1, bot_name=bot_name) for i, text in enumerate(texts))
            conversation_id = f"chatterbot:{language}:{yml.stem}:{index}"
            yield Conversation(id=conversation_id, source=f"chatterbot:{language}", turns=turns)


def parse_corpus_spec(spec: str) -> tuple[str, str | None]:
    """'chitchat' → ('chitchat', None); 'chatterbot[:lang]' → ('chatterbot', lang or 'english')."""
    name, _, language = spec.strip().partition(":")
    if name == "chitchat" and not language:
        return name, None
    if name == "chatterbot":
        return name, language or "english"
    raise CorpusError(f"--corpus must be 'chitchat' or 'chatterbot[:LANG]', got {spec!r}")


def _with_min_turns(conversations: Iterable[Conversation]) -> Iterator[Conversation]:
    return (c for c in conversations if len(c.turns) >= MIN_TURNS)


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def export_corpus(
    spec: str,
    out_dir: Path,
    bot_name: str = "Bot",
    *,
    limit: int | None = None,
    chitchat_path: Path | None = None,
    progress: bool = False,
) -> Manifest:
    """Export an open corpus ("chitchat" | "chatterbot[:lang]") in the Discord export's format."""
    name, language = parse_corpus_spec(spec)
    if name == "chitchat":
        source = "chitchat"
        conversations = chitchat_conversations(limit=limit, path=chitchat_path, bot_name=bot_name)
    else:
        source = f"chatterbot:{language}"
        conversations = chatterbot_conversations(language or "english", bot_name=bot_name)
        if limit is not None:
            conversations = itertools.islice(conversations, limit)
    package = CORPUS_PACKAGES[name]
    extra = {
        "corpus": spec,
        "package": package,
        "package_version": None if chitchat_path else _package_version(package),
        "licence": CORPUS_LICENCES[name],
        "bot_name": bot_name,
    }
    filters = {"min_turns": MIN_TURNS, "limit": limit}
    log.info("exporting corpus %s to %s", spec, out_dir)
    return write_export(
        out_dir,
        _with_min_turns(conversations),
        source=source,
        filters=filters,
        extra=extra,
        progress=progress,
    )
