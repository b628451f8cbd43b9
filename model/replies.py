"""What ends a reply and how it is made fit to post, shared by every engine and the worker.

`stop_token_ids` gives the ids that end the bot's turn (end-of-text and newline tokens); `clean_reply` trims a
raw continuation (a newline or a leaked "Name:" tag ends it, a dangling half-sentence is dropped); the repeat
guard (`is_repeat`, `resample_params`) decides the one retry of a reply the bot just said. For a reply being
continued, `continuation_of` and `clean_continuation` give the text to append, joined as the tokenizer joins.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

from model.prompt import SPEAKER_COLONS
from model.sampling import SamplingParams

# "." ends a sentence only before whitespace or the end (so "3.5" and "v1.2" do not); "!" "?" "…" and
# the Japanese 。！？ end one wherever they stand (Japanese text, NFKC-normalised "?" "!" too, has no spaces).
# Closing quotes and brackets after the mark belong to the sentence.
_CLOSERS = "\"'”’」』）)】］\\]"
_ANYWHERE_MARKS = "!?…。！？"
_SENTENCE_END = re.compile(rf"(?:\.+[{_CLOSERS}]*(?=\s|$)|[{_ANYWHERE_MARKS}]+[{_CLOSERS}]*)")
_COLON = "[" + "".join(SPEAKER_COLONS) + "]"  # full-width colons end a speaker tag in Japanese text


# ----------------------------------------------------------------------------------------------------
# stop tokens


def stop_token_ids(tokenizer: Any) -> frozenset[int]:
    """The end-of-text id plus every vocabulary id whose text contains a newline (which ends a turn)."""
    eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    newline_ids = tokenizer.encode("\n", add_special_tokens=False)
    if "\n" not in tokenizer.decode(newline_ids):
        # e.g. sentencepiece models whose normaliser folds "\n" into a space: the model never saw a
        # newline, so only end-of-text stops it and clean_reply cuts at leaked speaker tags.
        return frozenset(eos)
    marker = _byte_level_newline(tokenizer, newline_ids)
    if marker is not None:
        ids = {i for token, i in tokenizer.get_vocab().items() if marker in token}
    else:
        ids = {i for i in range(len(tokenizer)) if "\n" in tokenizer.decode([i])}
    return frozenset(ids | eos)


def _byte_level_newline(tokenizer: Any, newline_ids: list[int]) -> str | None:
    """The one-character stand-in a byte-level BPE vocabulary (GPT-2) uses for "\\n", else None."""
    # GPT-2 maps every byte to a printable character ("\n" → "Ċ"); in such a vocabulary that character
    # means byte 10 and nothing else, so scanning token strings finds every newline token without
    # decoding 50k ids one by one.
    tokens = tokenizer.convert_ids_to_tokens(newline_ids)
    if len(tokens) != 1 or len(tokens[0]) != 1 or tokens[0] == "\n":
        return None
    return tokens[0] if tokenizer.convert_tokens_to_string(tokens) == "\n" else None


# ----------------------------------------------------------------------------------------------------
# reply cleanup


def clean_reply(text: str, speaker_names: Iterable[str] = (), *, has_ended_turn: bool = False) -> str:
    """Trim a raw continuation into a postable reply; "" when nothing usable remains.

    Cuts at a newline or a leaked "Name:" speaker tag, and drops a dangling half-sentence after the last
    complete one unless `has_ended_turn` (the model closed its turn itself, so the line is whole).
    """
    text = text.replace("\ufffd", "")  # half of a multi-byte character cut off by the token limit
    text = cut_at_speaker_tag(text.split("\n", 1)[0], speaker_names).strip()
    if not has_ended_turn:
        text = _drop_dangling(text).strip()
    return text if _is_usable(text) else ""


def clean_continuation(text: str, speaker_names: Iterable[str] = (), *, has_ended_turn: bool = False) -> str:
    """clean_reply for text that continues a reply: its leading space (GPT-2 words carry one; Japanese has
    none) is kept as one space, so `existing + result` joins exactly; "" when nothing usable remains."""
    body = clean_reply(text, speaker_names, has_ended_turn=has_ended_turn)
    starts_apart = text[:1].isspace() and text.split("\n", 1)[0].strip() != ""
    return (" " + body) if body and starts_apart else body


def continuation_of(before: str, after: str, alone: str) -> str:
    """What new ids add to a continued reply: decode(context + new) minus decode(context), where context is
    the prompt's last ids. Decoding the new ids `alone` would lose a sentencepiece word's leading space
    (its decode drops the first "▁"); that is the fallback only where the context's text changed."""
    return after[len(before) :] if after.startswith(before) else alone


def cut_at_speaker_tag(text: str, speaker_names: Iterable[str]) -> str:
    """Cut where the model starts writing someone's turn inline ("… Alice: hi")."""
    if not any(colon in text for colon in SPEAKER_COLONS):  # a tag needs a colon: skip the regex (~8 µs)
        return text
    pattern = _speaker_tag_pattern(tuple(speaker_names))
    match = pattern.search(text) if pattern is not None else None
    return text[: match.start()] if match else text


@functools.lru_cache(maxsize=1024)
def _speaker_tag_pattern(speaker_names: tuple[str, ...]) -> re.Pattern[str] | None:
    """A "Name:" tag of any of these speakers (longest name first), compiled once per set of names:
    building it took ~10 µs a reply, a burst's replies mostly share their speakers."""
    names = sorted({n.strip() for n in speaker_names if n.strip()}, key=len, reverse=True)
    if not names:
        return None
    alternatives = "|".join(re.escape(n) for n in names)
    return re.compile(r"(?:^|(?<=\s))(?:" + alternatives + r")\s*" + _COLON, re.IGNORECASE)


def _drop_dangling(text: str) -> str:
    """Keep text up to its last complete sentence when words follow it."""
    end = _last_sentence_end(text)
    if not end or not any(ch.isalnum() for ch in text[end:]):
        return text
    return text[:end]


def _last_sentence_end(text: str) -> int:
    """Where _SENTENCE_END's last match in `text` ends; 0 when none does. Every match starts at a mark, and
    one always starts at a "!?…。！？" mark: the last match starts at the rightmost of those or at a run of
    dots after it, and a run of dots matches from any of its dots or from none. So only those runs are
    tried, right to left (scanning every match took ~7 µs a reply, a burst's worth of them ~2 ms)."""
    anywhere = max(text.rfind(mark) for mark in _ANYWHERE_MARKS)
    limit = len(text)
    while (dot := text.rfind(".", anywhere + 1, limit)) >= 0:
        match = _SENTENCE_END.match(text, dot)
        if match:
            return match.end()
        limit = dot  # none of this run matches: go on left of its first dot
        while limit > anywhere + 1 and text[limit - 1] == ".":
            limit -= 1
    match = _SENTENCE_END.match(text, anywhere) if anywhere >= 0 else None
    return match.end() if match else 0


def _is_usable(text: str) -> bool:
    """Words, digits or symbols (emoji count); punctuation or whitespace alone is not a reply."""
    return any(ch.isalnum() or unicodedata.category(ch).startswith("S") for ch in text)


# ----------------------------------------------------------------------------------------------------
# the repeat guard


def is_repeat(reply: str, recent_replies: Iterable[str]) -> bool:
    """Whether `reply` says the same as one of the bot's recent replies (case and spacing ignored)."""
    key = _comparable(reply)
    return bool(key) and any(key == _comparable(old) for old in recent_replies)


def resample_params(params: SamplingParams) -> SamplingParams:
    """Settings for the one retry after a repeated reply: a fresh seed, and sampling even if greedy."""
    # Greedy decoding would only produce the same reply again, so the retry samples at the default
    # temperature; a fixed seed moves on by one so a seeded retry differs too.
    seed = None if params.seed is None else params.seed + 1
    temperature = params.temperature if not params.is_greedy else SamplingParams().temperature
    return replace(params, seed=seed, temperature=temperature)


def _comparable(text: str) -> str:
    return " ".join(text.casefold().split())
