"""The dialogue format shared by serving, export and training, and the exact token budget.

Long because: the format (persona, facts, turns) and its exact token budget are one contract: the budget
counts what rendering writes.

The format (docs/ARCHITECTURE.md, "The dialogue format") is one line per turn:

    {persona}
    - {fact}          (a channel's remembered facts, if any: /remember)
    {speaker}: {text}
    {bot_name}:

Turn and fact text is folded onto one line, so user text can never start a line and so never forge a turn.
To continue a reply instead, the open bot turn (the "tail") carries its start: `{bot_name}: {continue_text}`
with no newline, so the model writes on from there; the budget counts it like any line.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache, partial
from itertools import chain
from typing import TYPE_CHECKING

from model.encoding import Encoder, count_tokens, joins_cleanly

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
# A remembered fact's line starts with this: a bulleted note under the persona, as web text lists them,
# not `Fact: …`, which GPT-2 would read as one more speaker's turn.
FACT_PREFIX = "- "


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
    facts_used: int = 0  # how many of the facts made it in (always the newest ones)


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
        # Stable, or no special string left (then one more pass would change nothing: folding is idempotent).
        if cleaned == text or not any(special in cleaned for special in specials):
            return cleaned
        text = cleaned


@lru_cache(maxsize=4096)  # a burst's prompts share their speakers: ~4 µs a name a prompt otherwise
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


def _speaker_tag(turn: Turn, bot_name: str) -> str:
    return _bot_tag(bot_name) if turn.is_bot else sanitize_speaker(turn.speaker, bot_name)


def _render_turn(turn: Turn, bot_name: str) -> str:
    return f"{_speaker_tag(turn, bot_name)}: {sanitize_text(turn.text)}"


def _fact_lines(facts: Iterable[str], specials: Iterable[str] = ()) -> list[str]:
    """Each fact folded onto its own bulleted line ("\n" included); an empty fact gives no line."""
    specials = list(specials)
    return [FACT_PREFIX + text + "\n" for text in (sanitize_text(fact, specials) for fact in facts) if text]


def render_dialogue(
    persona: str,
    turns: Sequence[Turn],
    bot_name: str,
    open_bot_turn: bool,
    facts: Sequence[str] = (),
    continue_text: str = "",
) -> str:
    """The one renderer: persona line, a line per fact, a line per turn, then `{bot_name}:` to answer.

    Every line ends with a newline, so a closed dialogue (training, open_bot_turn=False) teaches the model
    that a newline ends its turn; an empty persona gives no persona line. Training renders no facts.
    `continue_text` (folded like any bot turn) goes into the open bot turn, which then ends without a
    newline: the model continues it.
    """
    persona_line = sanitize_text(persona)
    head = ([persona_line + "\n"] if persona_line else []) + _fact_lines(facts)
    lines = [_render_turn(turn, bot_name) for turn in turns]
    text = "".join(head) + "".join(line + "\n" for line in lines)
    return (text + open_turn(bot_name, continue_text)) if open_bot_turn else text


def open_turn(bot_name: str, continue_text: str = "") -> str:
    """The open bot turn (the prompt's tail): `{bot_name}:`, or `{bot_name}: {continue_text}` to continue."""
    started = sanitize_text(continue_text)
    return f"{_bot_tag(bot_name)}: {started}" if started else f"{_bot_tag(bot_name)}:"


def _special_strings(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    return [str(token) for token in tokenizer.all_special_tokens]


@dataclass(frozen=True)
class _Line:
    """One turn as its prompt line ("\\n" included) and that line's ids, encoded alone."""

    turn: Turn
    text: str
    ids: list[int]


@dataclass(frozen=True)
class _Fact:
    """One fact as its prompt line ("\n" included) and that line's ids, encoded alone."""

    text: str
    ids: list[int]

    @property
    def fact(self) -> str:
        return self.text.removeprefix(FACT_PREFIX).removesuffix("\n")


@dataclass(frozen=True)
class _Frame:
    """The persona line ("" without a persona) and the open bot turn, with their ids."""

    head: str
    tail: str
    parts_ids: list[list[int]]  # [head ids, tail ids] when those join as the text does, else [frame ids]

    @property
    def text(self) -> str:
        return self.head + self.tail

    @property
    def tokens(self) -> int:
        return sum(map(len, self.parts_ids))


def _clean_turn(turn: Turn, specials: list[str]) -> Turn:
    return Turn(sanitize_text(turn.speaker, specials), sanitize_text(turn.text, specials), turn.is_bot)


def _keep_last_tokens(encoder: Encoder, text: str, keep_tokens: int) -> str:
    """The longest suffix of `text` (cut at a token boundary) that is about `keep_tokens` tokens long."""
    if keep_tokens <= 0:
        return ""
    if encoder.tokenizer.is_fast:
        start = encoder.last_tokens_start(text, keep_tokens)
        return text if start is None else text[start:].lstrip()
    return _keep_last_tokens_by_search(encoder.tokenizer, text, keep_tokens)


def _keep_last_tokens_by_search(tokenizer: PreTrainedTokenizerBase, text: str, keep_tokens: int) -> str:
    # Slow tokenizers have no offsets: binary-search the smallest cut whose suffix fits.
    low, high = 0, len(text)
    while low < high:
        middle = (low + high) // 2
        if count_tokens(tokenizer, text[middle:]) <= keep_tokens:
            high = middle
        else:
            low = middle + 1
    return text[low:].lstrip()


def _line(turn: Turn, bot_name: str) -> str:
    return _render_turn(turn, bot_name) + "\n"


class _Renderer:
    """Cleans turns and renders their lines for one build."""

    def __init__(self, specials: list[str], bot_name: str) -> None:
        self.specials = specials
        self.bot_name = bot_name

    def clean(self, turn: Turn) -> Turn:
        return _clean_turn(turn, self.specials)

    def line(self, turn: Turn) -> str:
        """`_line(turn, bot_name)` for a cleaned turn, whose text is folded already."""
        return f"{_speaker_tag(turn, self.bot_name)}: {turn.text}\n"


def _first_turns(
    newest_first: Iterator[Turn], renderer: _Renderer, head_chars: int, budget_tokens: int
) -> list[Turn]:
    """The newest turn, then as many older ones as the budget left may hold by characters (cleaned)."""
    newest = next(newest_first, None)
    if newest is None:
        return []
    turns = [renderer.clean(newest)]
    guess_tokens = budget_tokens - (head_chars + len(turns[0].text)) // CHUNK_CHARS_PER_TOKEN
    return turns + _next_chunk(newest_first, renderer, guess_tokens)


def _encode_lines(encoder: Encoder, renderer: _Renderer, turns: list[Turn]) -> list[_Line]:
    """The lines of `turns` (cleaned), encoded in one pass."""
    if not turns:
        return []
    texts = [renderer.line(turn) for turn in turns]
    return [_Line(*line) for line in zip(turns, texts, encoder.encode_many(texts), strict=True)]


def _fit_newest(encoder: Encoder, newest: _Line, bot_name: str, available_tokens: int) -> tuple[_Line, bool]:
    """The newest line (its text cut from the left when longer than `available_tokens`) and whether cut."""
    if len(newest.ids) <= available_tokens:
        return newest, False
    speaker, is_bot = newest.turn.speaker, newest.turn.is_bot
    overhead_tokens = len(encoder.encode(_line(Turn(speaker, "", is_bot), bot_name)))
    if overhead_tokens > available_tokens:
        raise PromptTooLong("no room left for even the speaker tag of the newest turn")
    text = _keep_last_tokens(encoder, newest.turn.text, available_tokens - overhead_tokens)
    cut = Turn(speaker, text, is_bot)
    line = _line(cut, bot_name)
    return _Line(cut, line, encoder.encode(line)), True


def _fit_older(
    encoder: Encoder,
    renderer: _Renderer,
    chunk: list[_Line],
    newest_first: Iterator[Turn],
    available_tokens: int,
) -> list[_Line]:
    """The longest run of the newest older turns whose lines fit in `available_tokens`.

    `chunk` holds the first older lines, encoded already; `newest_first` yields the turns before them.
    """
    kept: list[_Line] = []
    while chunk:
        for line in chunk:
            if len(line.ids) > available_tokens:
                return kept[::-1]  # oldest turns go first, so the history kept is always contiguous
            available_tokens -= len(line.ids)
            kept.append(line)
        # Only as far back as fits: the cost follows the budget, not the history.
        chunk = _encode_lines(encoder, renderer, _next_chunk(newest_first, renderer, available_tokens))
    return kept[::-1]


def _fit_facts(facts: list[_Fact], available_tokens: int) -> list[_Fact]:
    """The newest facts whose lines fit in `available_tokens`: the oldest go first, as older turns do."""
    kept: list[_Fact] = []
    for fact in reversed(facts):
        if len(fact.ids) > available_tokens:
            break
        available_tokens -= len(fact.ids)
        kept.append(fact)
    return kept[::-1]


def _next_chunk(newest_first: Iterator[Turn], renderer: _Renderer, budget_tokens: int) -> list[Turn]:
    """The next turns (cleaned) to count in one batch: about enough characters to fill `budget_tokens`."""
    chunk: list[Turn] = []
    chars = 0
    for raw_turn in newest_first:
        turn = renderer.clean(raw_turn)
        chunk.append(turn)
        chars += len(turn.speaker) + len(turn.text) + 3
        if chars >= CHUNK_CHARS_PER_TOKEN * budget_tokens:
            break
    return chunk


def _joined(
    frame: _Frame, facts: list[_Fact], lines: list[_Line], budget_tokens: int, newest_truncated: bool
) -> Prompt | None:
    """The prompt from the ids in hand, when they join exactly as the text does (joins_lines) and fit."""
    pieces: list[_Fact | _Line] = [*facts, *lines]
    if len(frame.parts_ids) != 2 or not all(joins_cleanly(piece.text) for piece in pieces):
        return None  # the encoder does not join lines, or a line ends (or starts) with whitespace
    head_ids, tail_ids = frame.parts_ids
    input_ids = (*head_ids, *chain.from_iterable(piece.ids for piece in pieces), *tail_ids)
    if len(input_ids) > budget_tokens:
        return None  # a cut newest line came out longer than asked for: _verified cuts more
    text = frame.head + "".join(piece.text for piece in pieces) + frame.tail
    return Prompt(input_ids, text, len(lines), newest_truncated, len(facts))


def _shorten(encoder: Encoder, newest: Turn, over_tokens: int) -> Turn:
    if not newest.text:
        raise PromptTooLong("the prompt does not fit even with the newest turn emptied")
    keep_tokens = len(encoder.encode(newest.text)) - over_tokens
    shorter = _keep_last_tokens(encoder, newest.text, keep_tokens)
    if shorter == newest.text:  # no progress by offsets (odd tokenizer): drop one character
        shorter = newest.text[1:].lstrip()
    return Turn(newest.speaker, shorter, newest.is_bot)


def _verified(
    encoder: Encoder,
    head: tuple[str, list[str]],
    turns: tuple[list[Turn], Turn | None],
    frame: tuple[str, str],
    budget_tokens: int,
    newest_truncated: bool,
) -> Prompt:
    """Tokenise the final string once; if per-line counts underestimated it, drop or cut more and retry.

    What goes first: older turns (oldest first), then facts (oldest first), then the newest turn's start.
    `frame` is (bot name, continue text): the open bot turn, exactly as the first pass rendered it.
    """
    (persona, facts), (older, newest) = head, turns
    bot_name, continue_text = frame
    while True:
        kept = [*older, newest] if newest is not None else older
        text = render_dialogue(persona, kept, bot_name, True, facts=facts, continue_text=continue_text)
        input_ids = encoder.encode(text)
        over_tokens = len(input_ids) - budget_tokens
        if over_tokens <= 0:
            return Prompt(tuple(input_ids), text, len(kept), newest_truncated, len(facts))
        if older:
            older = older[1:]
        elif facts:
            facts = facts[1:]
        elif newest is not None:
            newest, newest_truncated = _shorten(encoder, newest, over_tokens), True
        else:  # the frame alone is measured exactly by _first_pass: not reached
            raise PromptTooLong("the persona and the open bot turn do not fit")


@dataclass(frozen=True)
class PromptRequest:
    """build_prompt's arguments but the tokenizer: one prompt of a batch (build_prompts)."""

    persona: str
    history: Sequence[Turn]
    bot_name: str
    max_new_tokens: int
    n_positions: int
    facts: Sequence[str] = ()  # remembered facts, oldest first; rendered after the persona line
    continue_text: str = ""  # the start of the bot's turn to continue ("" = a new turn)


class _Build:
    """One build split at its first pass, so that builds can share one call: `texts`, then `finish`."""

    def __init__(self, encoder: Encoder, specials: list[str], request: PromptRequest) -> None:
        self.encoder = encoder
        self.persona = sanitize_text(request.persona, specials)
        self.renderer = renderer = _Renderer(specials, sanitize_text(request.bot_name, specials))
        self.max_new_tokens, self.n_positions = request.max_new_tokens, request.n_positions
        self.budget_tokens = request.n_positions - request.max_new_tokens
        self.newest_first = reversed(request.history)  # no copy of a long history
        self.fact_texts = _fact_lines(request.facts, specials)
        head_chars = len(self.persona) + sum(map(len, self.fact_texts))
        self.turns = _first_turns(self.newest_first, renderer, head_chars, self.budget_tokens)
        self.head = render_dialogue(self.persona, [], renderer.bot_name, open_bot_turn=False)  # or ""
        self.continue_text = sanitize_text(request.continue_text, specials)  # folded like any bot turn
        self.tail = open_turn(renderer.bot_name, self.continue_text)
        apart = encoder.joins_lines and all(joins_cleanly(piece) for piece in (self.head, self.tail) if piece)
        self.frame_texts = [self.head, self.tail] if apart else [self.head + self.tail]
        # The first pass: the frame, the facts, the newest line and the first older lines.
        self.texts = [*self.frame_texts, *self.fact_texts, *map(renderer.line, self.turns)]

    def finish(self, encoded: list[list[int]]) -> Prompt:
        """The prompt from the ids of `texts`; tokenises more only where the first pass was not enough.

        The newest turn first, then the facts, then older turns: each takes what the one before left.
        """
        encoder, bot_name, budget_tokens = self.encoder, self.renderer.bot_name, self.budget_tokens
        frame, all_facts, lines = self._first_pass(encoded)
        if not lines and not all_facts:
            return Prompt(tuple(encoder.encode(frame.text)), frame.text, 0, False)
        available_tokens, newest, truncated = budget_tokens - frame.tokens, [], False
        if lines:
            newest_line, truncated = _fit_newest(encoder, lines[0], bot_name, available_tokens)
            available_tokens, newest = available_tokens - len(newest_line.ids), [newest_line]
            if truncated:  # the newest turn's cut start has the first claim on any token left
                available_tokens = 0
        facts = _fit_facts(all_facts, available_tokens)
        available_tokens -= sum(len(fact.ids) for fact in facts)
        older = _fit_older(encoder, self.renderer, lines[1:], self.newest_first, available_tokens)
        joined = _joined(frame, facts, [*older, *newest], budget_tokens, truncated)
        if joined is not None:
            return joined
        head = (self.persona, [fact.fact for fact in facts])
        turns = ([line.turn for line in older], newest[0].turn if newest else None)
        frame_args = (bot_name, self.continue_text)
        return _verified(encoder, head, turns, frame_args, budget_tokens, truncated)

    def _first_pass(self, encoded: list[list[int]]) -> tuple[_Frame, list[_Fact], list[_Line]]:
        """The frame, the facts and the first lines with their ids; PromptTooLong when the frame can't fit."""
        frame_parts, facts_end = len(self.frame_texts), len(self.frame_texts) + len(self.fact_texts)
        frame = _Frame(self.head, self.tail, encoded[:frame_parts])
        if self.max_new_tokens < 1 or frame.tokens > self.budget_tokens:
            raise PromptTooLong(
                f"persona + open bot turn ({frame.tokens} tokens) + max_new_tokens ({self.max_new_tokens}) "
                f"exceed the context window of {self.n_positions} tokens: "
                "shorten the persona or max_new_tokens"
            )
        facts = [
            _Fact(text, ids)
            for text, ids in zip(self.fact_texts, encoded[frame_parts:facts_end], strict=True)
        ]
        lines = zip(self.turns, self.texts[facts_end:], encoded[facts_end:], strict=True)
        return frame, facts, [_Line(*line) for line in lines]


def _build_one(tokenizer: PreTrainedTokenizerBase, request: PromptRequest) -> Prompt:
    encoder = Encoder.of(tokenizer)
    build = _Build(encoder, _special_strings(tokenizer), request)
    return build.finish(encoder.encode_many(build.texts))


def build_prompt(
    tokenizer: PreTrainedTokenizerBase,
    persona: str,
    history: Sequence[Turn],
    bot_name: str,
    max_new_tokens: int,
    n_positions: int,
    *,
    facts: Sequence[str] = (),
    continue_text: str = "",
) -> Prompt:
    """The prompt for the bot's next turn with `len(input_ids) + max_new_tokens <= n_positions`.

    History is oldest → newest. Oldest turns are dropped first; the persona and the newest turn always
    stay (an over-long newest turn keeps its end). Facts (oldest first) come after the persona line and
    before any older turn, but after the newest turn: they go, oldest first, when the newest turn needs
    their room. Raises PromptTooLong when even the persona and the open bot turn (with `continue_text`, the
    start of a reply to continue) cannot fit next to max_new_tokens.
    """
    request = PromptRequest(
        persona, history, bot_name, max_new_tokens, n_positions, facts=facts, continue_text=continue_text
    )
    return _build_one(tokenizer, request)


def build_prompts(
    tokenizer: PreTrainedTokenizerBase, requests: Sequence[PromptRequest]
) -> list[Prompt | PromptTooLong]:
    """What build_prompt returns (or raises: PromptTooLong) for each request, first passes in one call.

    A typical GPT-2 build is its first pass alone, so a burst costs one Rust call for all its prompts,
    which the tokenizers' thread pool may spread over the cores, GIL released. Builds that need more
    (long histories, an over-long newest turn) make their further calls alone, as build_prompt does.
    Batched only where the Rust tokenizer is called directly: then each text's ids do not depend on the
    rest of the batch (no padding), and no build changes the tokenizer's settings on the way (only the
    transformers call does), so one Encoder serves them all; other tokenizers build one by one.
    Other errors than PromptTooLong propagate.
    """
    encoder, specials = Encoder.of(tokenizer), _special_strings(tokenizer)
    if encoder.rust is None:
        finishers = [partial(_build_one, tokenizer, request) for request in requests]
    else:
        builds = [_Build(encoder, specials, request) for request in requests]
        distinct = list(dict.fromkeys(chain.from_iterable(build.texts for build in builds)))  # persona once
        ids = dict(zip(distinct, encoder.encode_many(distinct), strict=True))
        finishers = [partial(build.finish, [ids[text] for text in build.texts]) for build in builds]
    return [_outcome(finish) for finish in finishers]


def _outcome(finish: Callable[[], Prompt]) -> Prompt | PromptTooLong:
    try:
        return finish()
    except PromptTooLong as exc:
        return exc
