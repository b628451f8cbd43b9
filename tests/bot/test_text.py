"""Splitting replies into Discord-sized chunks: limits, boundaries, fences, graphemes, fallback, nonces."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from bot.text import (
    FALLBACK_REPLY,
    MAX_REPLY_CHUNKS,
    MESSAGE_LIMIT_CHARS,
    TRUNCATED_MARK,
    chunk_nonce,
    reply_chunks,
    safe_cut,
    split_message,
    thread_name,
    utf16_len,
)


def fences_balanced(chunk: str) -> bool:
    return chunk.count("```") % 2 == 0


def visible(text: str) -> str:
    return "".join(text.split())


def test_short_text_is_one_chunk() -> None:
    assert split_message("  hello there \n") == ["hello there"]


def test_empty_and_blank_output_become_the_fallback() -> None:
    assert split_message("") == []
    assert reply_chunks("") == [FALLBACK_REPLY]
    assert reply_chunks(" \n\t ") == [FALLBACK_REPLY]


def test_paragraph_boundary_preferred_over_line_and_word() -> None:
    first = "word " * 30  # 150 chars
    text = first.strip() + "\n\nsecond paragraph\nwith lines " + "x " * 10
    chunks = split_message(text, limit=190)
    assert chunks[0] == first.strip()
    assert chunks[1].startswith("second paragraph")


def test_sentence_boundary_when_no_line_break() -> None:
    text = "This is one sentence. " * 12
    chunks = split_message(text, limit=100)
    assert all(chunk.endswith(".") for chunk in chunks)
    assert visible("".join(chunks)) == visible(text)


def test_japanese_sentence_ends_without_spaces() -> None:
    text = "今日はいい天気ですね。散歩に行きましょうか？" * 20
    chunks = split_message(text, limit=100)
    assert len(chunks) > 1
    assert all(chunk[-1] in "。？" for chunk in chunks)
    assert "".join(chunks) == text


def test_hard_cut_keeps_emoji_sequences_whole() -> None:
    family = "👨\u200d👩\u200d👧"  # one grapheme of 5 code points, 8 UTF-16 units
    text = family * 40
    chunks = split_message(text, limit=50)
    assert all(utf16_len(chunk) <= 50 for chunk in chunks)
    assert all(chunk.startswith("👨") and chunk.endswith("👧") for chunk in chunks)
    assert "".join(chunks) == text


def test_safe_cut_never_splits_a_flag_or_combining_mark() -> None:
    flags = "🇯🇵🇫🇷"
    assert safe_cut(flags, 3) == 2  # between the two flags, not inside the second
    assert safe_cut("ae\u0301x", 2) == 1  # before the e, not between e and its accent
    assert safe_cut("ab``` c", 4) == 2  # never inside a ``` fence
    assert safe_cut(flags, 1) == 1  # nothing whole fits: a hard cut is the last resort


def test_code_fence_closed_and_reopened_with_language() -> None:
    lines = "\n".join(f"print({i})" for i in range(200))
    text = f"Here you go:\n```python\n{lines}\n```\nDone."
    chunks = split_message(text, limit=300)
    assert len(chunks) > 3
    assert all(fences_balanced(chunk) for chunk in chunks)
    assert all(chunk.startswith("```python\n") for chunk in chunks[1:-1])
    assert chunks[-1].rstrip().endswith("Done.")


def test_five_thousand_characters_with_astral_text_and_code() -> None:
    prose = "Emoji 😀 and rare kanji 𠮷 in a sentence. " * 60
    code = "```js\n" + "\n".join(f"const v{i} = '😀𠮷';" for i in range(120)) + "\n```"
    text = (prose + "\n\n" + code + "\n\n" + prose)[:5000].rsplit(" ", 1)[0]
    chunks = reply_chunks(text)
    assert len(chunks) >= 3
    for chunk in chunks:
        assert 0 < utf16_len(chunk) <= MESSAGE_LIMIT_CHARS
        assert fences_balanced(chunk)
        assert chunk.strip()
        assert "\ud83d" not in chunk  # never a lone surrogate


def test_overlong_reply_is_capped_with_a_mark() -> None:
    text = "word " * 3000
    chunks = reply_chunks(text, limit=100, max_chunks=3)
    assert len(chunks) == 3
    assert chunks[-1].endswith(TRUNCATED_MARK)
    assert all(utf16_len(chunk) <= 100 for chunk in chunks)


def test_chunk_nonce_is_unique_and_fits_discord() -> None:
    message_id = 2**63 - 1
    nonces = {chunk_nonce(message_id, index) for index in range(MAX_REPLY_CHUNKS)}
    assert len(nonces) == MAX_REPLY_CHUNKS
    assert all(len(str(nonce)) <= 25 for nonce in nonces)
    assert chunk_nonce(10, 7) != chunk_nonce(11, 0)


PIECES = [*"ab c\n。、！😀𠮷`\u200d", "\n\n", "é\u0301", "```", "```py\n"]
TEXT = st.lists(st.sampled_from(PIECES), max_size=300).map("".join)


@settings(max_examples=200, deadline=None)
@given(text=TEXT, limit=st.integers(min_value=30, max_value=200))
def test_property_every_chunk_fits_and_is_balanced(text: str, limit: int) -> None:
    chunks = split_message(text, limit=limit)
    for chunk in chunks:
        assert 0 < utf16_len(chunk) <= limit
        assert chunk.strip()
        assert fences_balanced(chunk)


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet=st.sampled_from(list("ab c.\n。😀𠮷é\u0301")), max_size=800))
def test_property_no_visible_text_lost_without_fences(text: str) -> None:
    chunks = split_message(text, limit=40)
    assert visible("".join(chunks)) == visible(text)
    assert all(not re.search(r"[\ud800-\udfff]", chunk) for chunk in chunks)


def test_thread_name_is_one_line_within_discords_limit() -> None:
    assert thread_name("  plan the\n trip  ") == "plan the trip"
    assert thread_name("   ") == "Conversation"
    long_latin = "word " * 40
    name = thread_name(long_latin)
    assert utf16_len(name) <= 100 and name.endswith("word…")  # cut at a space, never inside a word
    japanese = "今日は東京の天気について話しましょう。" * 10  # no spaces: a cut between characters
    name = thread_name(japanese)
    assert utf16_len(name) == 100 and name.endswith("…") and japanese.startswith(name[:-1])
    emoji = "😀" * 80  # astral: two UTF-16 units each
    assert utf16_len(thread_name(emoji)) <= 100 and thread_name(emoji).startswith("😀")
