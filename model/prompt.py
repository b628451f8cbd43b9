"""The dialogue format shared by serving, export and training, and the exact token budget.

The format (docs/ARCHITECTURE.md, "The dialogue format") is one line per turn:

    {persona}
    {speaker}: {text}
    {bot_name}:

Turn text is folded onto one line, so user text can never start a line and so never forge a turn.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

MAX_SPEAKER_CHARS = 32
DEFAULT_SPEAKER = "User"
DEFAULT_BOT_NAME = "Bot"
# ASCII colon plus the full-width and small colons that NFKC-normalising tokenizers turn into ":".
SPEAKER_COLONS = (":", "\uff1a", "\ufe55", "\ufe13")
# Older lines are counted in batches of about this many characters per token of budget left: English
# GPT-2 text runs ~4 characters a token, so one batch usually fills the budget without counting far past it.
CHUNK_CHARS_PER_TOKEN = 4


@dataclass(frozen=True)
class Turn:
    """One speaker turn: who spoke and what they said (plain text, any length)."""

    speaker: str
    text: str
    is_bot: bool = False


@dataclass(frozen=True)
class Prompt:
    """A tokenised prompt that fits the context window together with max_new_tokens."""

    input_ids: tuple[int, ...]
    text: str
    turns_used: int  # how many of the history turns made it in (always the newest ones)
    newest_truncated: bool  # the newest turn was cut from the left to fit


class PromptTooLong(ValueError):
    """The persona, the open bot turn and max_new_tokens cannot fit in the context window at all."""


def _fold_whitespace(text: str) -> str:
    # str.split() with no argument splits on every Unicode whitespace run: \n, \r, VT, FF, NEL (U+0085),
    # U+2028/U+2029 and the rest, which is exactly the set that could start a new line.
    return " ".join(text.split())


def sanitize_text(text: str, special_tokens: Iterable[str] = ()) -> str:
    """Fold every whitespace run to one space and remove the tokenizer's special-token strings."""
    specials = [s for s in special_tokens if s]
    while True:  # repeat until stable, in case a special string itself contains whitespace
        cleaned = text
        for special in specials:
            # A space, not "", so the halves around a removed string cannot join into another one.
            cleaned = cleaned.replace(special, " ")
        cleaned = _fold_whitespace(cleaned)
        if cleaned == text:
            return cleaned
        text = cleaned


def _clean_name(name: str) -> str:
    for colon in SPEAKER_COLONS:
        name = name.replace(colon, " ")
    return _fold_whitespace(name)[:MAX_SPEAKER_CHARS].strip()


def sanitize_speaker(name: str, bot_name: str) -> str:
    """A human's speaker tag: no colon, one line, ≤ 32 chars; empty or the bot's own name becomes `User`."""
    cleaned = _clean_name(name)
    if not cleaned or cleaned.casefold() == _bot_tag(bot_name).casefold():
        return DEFAULT_SPEAKER
    return cleaned


def _bot_tag(bot_name: str) -> str:
    return _clean_name(bot_name) or DEFAULT_BOT_NAME


def _render_turn(turn: Turn, bot_name: str) -> str:
    speaker = _bot_tag(bot_name) if turn.is_bot else sanitize_speaker(turn.speaker, bot_name)
    return f"{speaker}: {sanitize_text(turn.text)}"


def render_dialogue(persona: str, turns: Sequence[Turn], bot_name: str, open_bot_turn: bool) -> str:
    """The one renderer: persona line, one line per turn, then `{bot_name}:` when the bot is to answer.

    Every line ends with a newline, so a closed dialogue (training, open_bot_turn=False) teaches the model
    that a newline ends its turn; an empty persona gives no persona line.
    """
    persona_line = sanitize_text(persona)
    lines = ([persona_line] if persona_line else []) + [_render_turn(turn, bot_name) for turn in turns]
    text = "".join(line + "\n" for line in lines)
    return (text + f"{_bot_tag(bot_name)}:") if open_bot_turn else text


def _special_strings(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    return [str(token) for token in tokenizer.all_special_tokens]


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    # No BOS/EOS: sentencepiece tokenizers (T5Tokenizer) would append </s> and end the prompt early.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _count(tokenizer: PreTrainedTokenizerBase, text: str) -> int:
    return len(_encode(tokenizer, text))


def _counts(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[int]:
    """Token counts of several strings: one batched pass for fast tokenizers (Rust, without the GIL)."""
    backend = getattr(tokenizer, "backend_tokenizer", None) if tokenizer.is_fast else None
    if backend is None or not texts:
        return [_count(tokenizer, text) for text in texts]
    return [len(encoding.ids) for encoding in backend.encode_batch(list(texts), add_special_tokens=False)]


def encodes_newline(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether `\\n` survives encode → decode (sentencepiece models often fold it into a space)."""
    return "\n" in tokenizer.decode(_encode(tokenizer, "a\nb"))


def _clean_turn(turn: Turn, specials: list[str]) -> Turn:
    return Turn(sanitize_text(turn.speaker, specials), sanitize_text(turn.text, specials), turn.is_bot)


def _keep_last_tokens(tokenizer: PreTrainedTokenizerBase, text: str, keep_tokens: int) -> str:
    """The longest suffix of `text` (cut at a token boundary) that is about `keep_tokens` tokens long."""
    if keep_tokens <= 0:
        return ""
    if tokenizer.is_fast:
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = encoded["offset_mapping"]
        if len(offsets) <= keep_tokens:
            return text
        return text[offsets[len(offsets) - keep_tokens][0] :].lstrip()
    return _keep_last_tokens_by_search(tokenizer, text, keep_tokens)


def _keep_last_tokens_by_search(tokenizer: PreTrainedTokenizerBase, text: str, keep_tokens: int) -> str:
    # Slow tokenizers have no offsets: binary-search the smallest cut whose suffix fits.
    low, high = 0, len(text)
    while low < high:
        middle = (low + high) // 2
        if _count(tokenizer, text[middle:]) <= keep_tokens:
            high = middle
        else:
            low = middle + 1
    return text[low:].lstrip()


def _line(turn: Turn, bot_name: str) -> str:
    return _render_turn(turn, bot_name) + "\n"


def _fit_newest(
    tokenizer: PreTrainedTokenizerBase, newest: Turn, bot_name: str, line_tokens: int, available_tokens: int
) -> tuple[Turn, bool, int]:
    """The newest turn (cut from the left when its line is longer than `available_tokens`) and its count."""
    if line_tokens <= available_tokens:
        return newest, False, line_tokens
    empty = Turn(newest.speaker, "", newest.is_bot)
    overhead_tokens = _count(tokenizer, _line(empty, bot_name))
    if overhead_tokens > available_tokens:
        raise PromptTooLong("no room left for even the speaker tag of the newest turn")
    text = _keep_last_tokens(tokenizer, newest.text, available_tokens - overhead_tokens)
    cut = Turn(newest.speaker, text, newest.is_bot)
    return cut, True, _count(tokenizer, _line(cut, bot_name))


def _fit_older(
    tokenizer: PreTrainedTokenizerBase,
    older: Sequence[Turn],
    specials: list[str],
    bot_name: str,
    available_tokens: int,
) -> list[Turn]:
    """The longest run of the newest older turns whose lines fit in `available_tokens` (cleaned)."""
    kept: list[Turn] = []
    newest_first = older[::-1]  # only as far back as fits: the cost follows the budget, not the history
    while len(kept) < len(newest_first):
        chunk = _next_chunk(newest_first[len(kept) :], specials, bot_name, available_tokens)
        for turn, line_tokens in zip(
            chunk, _counts(tokenizer, [_line(t, bot_name) for t in chunk]), strict=True
        ):
            if line_tokens > available_tokens:
                return kept[::-1]  # oldest turns go first, so the history kept is always contiguous
            available_tokens -= line_tokens
            kept.append(turn)
    return kept[::-1]


def _next_chunk(
    newest_first: Sequence[Turn], specials: list[str], bot_name: str, budget_tokens: int
) -> list[Turn]:
    """The next turns (cleaned) to count in one batch: about enough characters to fill `budget_tokens`."""
    chunk: list[Turn] = []
    chars = 0
    for raw_turn in newest_first:
        turn = _clean_turn(raw_turn, specials)
        chunk.append(turn)
        chars += len(turn.speaker) + len(turn.text) + 3
        if chars >= CHUNK_CHARS_PER_TOKEN * budget_tokens:
            break
    return chunk


def _shorten(tokenizer: PreTrainedTokenizerBase, newest: Turn, over_tokens: int) -> Turn:
    if not newest.text:
        raise PromptTooLong("the prompt does not fit even with the newest turn emptied")
    keep_tokens = _count(tokenizer, newest.text) - over_tokens
    shorter = _keep_last_tokens(tokenizer, newest.text, keep_tokens)
    if shorter == newest.text:  # no progress by offsets (odd tokenizer): drop one character
        shorter = newest.text[1:].lstrip()
    return Turn(newest.speaker, shorter, newest.is_bot)


def _verified(
    tokenizer: PreTrainedTokenizerBase,
    persona: str,
    turns: tuple[list[Turn], Turn],
    bot_name: str,
    budget_tokens: int,
    newest_truncated: bool,
) -> Prompt:
    """Tokenise the final string once; if per-line counts underestimated it, drop or cut more and retry."""
    older, newest = turns
    while True:
        text = render_dialogue(persona, [*older, newest], bot_name, open_bot_turn=True)
        input_ids = _encode(tokenizer, text)
        over_tokens = len(input_ids) - budget_tokens
        if over_tokens <= 0:
            return Prompt(tuple(input_ids), text, len(older) + 1, newest_truncated)
        if older:
            older = older[1:]
        else:
            newest, newest_truncated = _shorten(tokenizer, newest, over_tokens), True


def build_prompt(
    tokenizer: PreTrainedTokenizerBase,
    persona: str,
    history: Sequence[Turn],
    bot_name: str,
    max_new_tokens: int,
    n_positions: int,
) -> Prompt:
    """The prompt for the bot's next turn with `len(input_ids) + max_new_tokens <= n_positions`.

    History is oldest → newest. Oldest turns are dropped first; the persona and the newest turn always
    stay (an over-long newest turn keeps its end). Raises PromptTooLong when even the persona and the
    open bot turn cannot fit next to max_new_tokens.
    """
    specials = _special_strings(tokenizer)
    persona, bot_name = sanitize_text(persona, specials), sanitize_text(bot_name, specials)
    budget_tokens = n_positions - max_new_tokens
    frame = render_dialogue(persona, [], bot_name, open_bot_turn=True)
    newest = _clean_turn(history[-1], specials) if history else None
    # One pass counts the frame and the newest line together: the newest line is counted only here.
    frame_tokens, *newest_counts = _counts(tokenizer, [frame] + ([_line(newest, bot_name)] if newest else []))
    if max_new_tokens < 1 or frame_tokens > budget_tokens:
        raise PromptTooLong(
            f"persona + open bot turn ({frame_tokens} tokens) + max_new_tokens ({max_new_tokens}) "
            f"exceed the context window of {n_positions} tokens: shorten the persona or max_new_tokens"
        )
    if newest is None:
        return Prompt(tuple(_encode(tokenizer, frame)), frame, 0, False)
    (line_tokens,) = newest_counts
    newest, truncated, newest_tokens = _fit_newest(
        tokenizer, newest, bot_name, line_tokens, budget_tokens - frame_tokens
    )
    available_tokens = budget_tokens - frame_tokens - newest_tokens
    older = _fit_older(tokenizer, history[:-1], specials, bot_name, available_tokens)
    return _verified(tokenizer, persona, (older, newest), bot_name, budget_tokens, truncated)
