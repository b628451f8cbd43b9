"""What the bot sends: splitting a reply into Discord-sized chunks, the fallback line and per-chunk nonces.

Pure functions over strings. Lengths are counted in UTF-16 code units (what Discord's clients count; never
less than Python's code-point count), so a chunk is within the limit however it is measured.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass

from model.api import FALLBACK_REPLY

MESSAGE_LIMIT_CHARS = 2000
MAX_REPLY_CHUNKS = 8  # a nonce is message_id * 8 + chunk index, so a reply has at most 8 chunks
BUSY_REPLY = "I'm busy answering other people right now — please try again in a moment."
SHUTDOWN_REPLY = "I'm restarting right now — please ask me again in a minute."
ERROR_REPLY = "Sorry, something went wrong while I was thinking. Please try again."
UNAVAILABLE_REPLY = "My model is unavailable right now — please try again in a little while."
COOLDOWN_REPLY = "You're going a bit fast for me — give me a few seconds before the next message."
TRUNCATED_MARK = "…"

FENCE = "```"
FENCE_LANGUAGE = re.compile(r"```([A-Za-z0-9_+#.\-]{1,20})?\n")
MIN_CHUNK_FRACTION = 0.5  # prefer a boundary in the second half of the window over a tiny chunk
# Boundaries from the best to the worst; each returns the cut positions it allows in a window.
SENTENCE_END = re.compile(r"[.!?…](?=\s)|[。！？．｡」』）]")  # Japanese ends need no following space
CLAUSE_END = re.compile(r"[、，；：]")


def utf16_len(text: str) -> int:
    """Length as Discord counts it: astral characters (emoji, rare kanji) count twice."""
    return len(text.encode("utf-16-le")) // 2


def _prefix_within(text: str, limit: int) -> int:
    """The largest n such that text[:n] is at most `limit` UTF-16 units."""
    total = 0
    for index, char in enumerate(text):
        total += 2 if ord(char) > 0xFFFF else 1
        if total > limit:
            return index
    return len(text)


def _joins_previous(char: str) -> bool:
    """Whether `char` belongs to the grapheme before it (marks, ZWJ, variation selectors, skin tones)."""
    code = ord(char)
    return (
        unicodedata.category(char) in {"Mn", "Me", "Mc"}
        or code == 0x200D
        or 0xFE00 <= code <= 0xFE0F
        or 0xE0100 <= code <= 0xE01EF
        or 0x1F3FB <= code <= 0x1F3FF
        or 0xE0020 <= code <= 0xE007F
    )


def _is_regional_indicator(char: str) -> bool:
    return 0x1F1E6 <= ord(char) <= 0x1F1FF


def safe_cut(text: str, cut: int) -> int:
    """Move a hard cut left until it no longer splits a grapheme or a ``` fence (0 if it cannot)."""
    start = cut
    while 0 < cut < len(text) and (_joins_previous(text[cut]) or text[cut - 1] == "\u200d"):
        cut -= 1
    if 0 < cut < len(text) and _is_regional_indicator(text[cut]):
        run = 0
        while cut - run > 0 and _is_regional_indicator(text[cut - run - 1]):
            run += 1
        cut -= run % 2  # flags are pairs: never leave half of one behind
    while 0 < cut < len(text) and text[cut] == "`" and text[cut - 1] == "`":
        cut -= 1
    return cut if cut > 0 else start


def _starts(pattern: str) -> Callable[[str], list[int]]:
    """Cut before a whitespace separator (the separator is then stripped from the next chunk)."""
    regex = re.compile(pattern)
    return lambda window: [match.start() for match in regex.finditer(window)]


def _ends(regex: re.Pattern[str]) -> Callable[[str], list[int]]:
    """Cut right after a punctuation mark (it stays with the sentence it ends)."""
    return lambda window: [match.end() for match in regex.finditer(window)]


BOUNDARIES: tuple[Callable[[str], list[int]], ...] = (
    _starts(r"\n[ \t]*\n"),  # paragraph
    _starts(r"\n"),  # line
    _ends(SENTENCE_END),
    _starts(r"\s"),  # word
    _ends(CLAUSE_END),  # Japanese has no spaces: a comma is the last soft boundary
)


def find_cut(text: str, budget: int) -> int:
    """Where to end the next chunk of `text` (≤ budget UTF-16 units): the best boundary, else a hard cut."""
    fits = _prefix_within(text, budget)
    if fits == len(text):
        return fits
    window = text[: fits + 1]  # a separator just after the last character that fits is a boundary too
    for min_cut in (max(1, int(fits * MIN_CHUNK_FRACTION)), 1):
        for finder in BOUNDARIES:
            cuts = [cut for cut in finder(window) if min_cut <= cut <= fits]
            if cuts:
                return max(cuts)
    return safe_cut(text, max(fits, 1))


@dataclass(frozen=True)
class FenceState:
    """Whether a ``` code block is open at some point of the text, and its language."""

    is_open: bool = False
    language: str = ""

    def after(self, text: str) -> FenceState:
        """The state after `text` (every ``` toggles; an opening one may name a language)."""
        state = self
        position = text.find(FENCE)
        while position != -1:
            if state.is_open:
                state = FenceState()
            else:
                match = FENCE_LANGUAGE.match(text, position)
                state = FenceState(True, match.group(1) or "" if match else "")
            position = text.find(FENCE, position + len(FENCE))
        return state

    def opener(self) -> str:
        """The line that reopens this block at the start of the next chunk."""
        return f"{FENCE}{self.language}\n" if self.is_open else ""


def split_message(text: str, limit: int = MESSAGE_LIMIT_CHARS) -> list[str]:
    """Split into chunks of at most `limit` UTF-16 units, each with balanced code fences; never empty ones."""
    chunks: list[str] = []
    state = FenceState()
    rest = text.strip()
    closer = "\n" + FENCE
    while rest:
        prefix = state.opener()
        budget = limit - utf16_len(prefix) - utf16_len(closer)
        cut = find_cut(rest, budget)
        body, rest = rest[:cut], rest[cut:]
        state = state.after(body)
        rest = rest.lstrip("\n") if state.is_open else rest.lstrip()
        chunk = prefix + (body.rstrip("\n") + closer if state.is_open else body.rstrip())
        if chunk.strip() and chunk.strip() != FENCE:
            chunks.append(chunk)
    return chunks


def reply_chunks(
    text: str, limit: int = MESSAGE_LIMIT_CHARS, max_chunks: int = MAX_REPLY_CHUNKS
) -> list[str]:
    """The messages to send for a generated reply: the fallback when empty, at most `max_chunks` chunks."""
    chunks = split_message(text, limit) or [FALLBACK_REPLY]
    if len(chunks) <= max_chunks:
        return chunks
    kept = chunks[:max_chunks]
    marked = kept[-1] + "\n" + TRUNCATED_MARK  # after any closing fence, so fences stay balanced
    if utf16_len(marked) <= limit:
        kept[-1] = marked
    return kept


def appended_reply(
    last_chunk: str, addition: str, limit: int = MESSAGE_LIMIT_CHARS
) -> tuple[str | None, list[str]]:
    """How a continuation is posted: (the last message's new text, []) when `last_chunk + addition` still
    fits one message, else (None, the chunks to post after it). `addition` joins exactly (its own space)."""
    joined = last_chunk + addition
    if utf16_len(joined) <= limit:
        return joined, []
    return None, split_message(addition, limit)


def chunk_nonce(message_id: int, chunk_index: int) -> int:
    """A nonce for the chunk answering `message_id`: a retried send of the same chunk cannot post twice."""
    assert 0 <= chunk_index < MAX_REPLY_CHUNKS, chunk_index
    # Snowflakes are < 2**64, so the nonce is < 2**67: at most 21 digits, within Discord's 25 characters.
    return message_id * MAX_REPLY_CHUNKS + chunk_index


THREAD_NAME_LIMIT = 100  # Discord's longest thread name
DEFAULT_THREAD_NAME = "Conversation"


def thread_name(text: str) -> str:
    """A thread's name from the message that opens it: one line, at most 100 units, cut at a space when
    there is one in the second half (Japanese has none: cut between characters), "…" marking the cut."""
    line = " ".join(text.split())
    if not line:
        return DEFAULT_THREAD_NAME
    if utf16_len(line) <= THREAD_NAME_LIMIT:
        return line
    cut = safe_cut(line, _prefix_within(line, THREAD_NAME_LIMIT - utf16_len(TRUNCATED_MARK)))
    space = line.rfind(" ", 0, cut + 1)
    if space >= cut * MIN_CHUNK_FRACTION:
        cut = space
    return line[:cut].rstrip() + TRUNCATED_MARK
