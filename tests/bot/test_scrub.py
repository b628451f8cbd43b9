"""Scrubbing of exported text: every kind of personal or secret string goes, ordinary text stays."""

from __future__ import annotations

import pytest

from bot.scrub import (
    EMAIL_PLACEHOLDER,
    PHONE_PLACEHOLDER,
    SECRET_PLACEHOLDER,
    URL_PLACEHOLDER,
    scrub_discord_markup,
    scrub_text,
)

NAMES = {123: "Alice", 456: "Bob"}


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("hi <@123>", "hi Alice"),
        ("hi <@!456>", "hi Bob"),
        ("hi <@999>", "hi someone"),
        ("ping <@&42> in <#77>", "ping @role in #channel"),
        ("@everyone and @here look", "everyone and here look"),
        ("use </help:123456> or <:pepe:98765> <a:dance:1>", "use /help or :pepe: :dance:"),
        ("at <t:1700000000:R>", "at a time"),
    ],
)
def test_discord_markup(raw: str, expected: str) -> None:
    assert scrub_discord_markup(raw, NAMES) == expected


@pytest.mark.parametrize(
    ("raw", "placeholder", "canary"),
    [
        ("see https://example.com/a?b=c#d now", URL_PLACEHOLDER, "example.com"),
        ("see www.example.org/page now", URL_PLACEHOLDER, "example.org"),
        ("join discord.gg/abcdef now", URL_PLACEHOLDER, "abcdef"),
        ("mail john.doe+tag@mail.example.co.uk please", EMAIL_PLACEHOLDER, "john.doe"),
        ("call +1 (555) 123-4567 today", PHONE_PLACEHOLDER, "123-4567"),
        ("call 555-0199 today", PHONE_PLACEHOLDER, "0199"),
        ("電話は090-1234-5678です", PHONE_PLACEHOLDER, "1234"),
        ("tel 07700 900123 ok", PHONE_PLACEHOLDER, "900123"),
        (
            "token MTA5ODc2NTQzMjEwOTg3NjU0.GaBcDe.abcdefghijklmnopqrstuvwxyz0123456789 leaked",
            SECRET_PLACEHOLDER,
            "GaBcDe",
        ),
        ("key sk-abcdef1234567890ABCDEFGHIJKL here", SECRET_PLACEHOLDER, "1234567890"),
        ("sha 0123456789abcdef0123456789abcdef01234567 here", SECRET_PLACEHOLDER, "0123456789abcdef"),
        ("ghp_16C7e42F292c6912E7710c838347Ae178B4a ok", SECRET_PLACEHOLDER, "16C7e42F"),
        ("card 4111 1111 1111 1111 ok", SECRET_PLACEHOLDER, "4111"),
        ("id 123456789012345678 ok", SECRET_PLACEHOLDER, "123456789012345678"),
    ],
)
def test_sensitive_strings_replaced(raw: str, placeholder: str, canary: str) -> None:
    scrubbed = scrub_text(raw, NAMES)
    assert placeholder in scrubbed
    assert canary not in scrubbed


@pytest.mark.parametrize(
    "text",
    [
        "I have 3 cats and 12 dogs since 2024",
        "meet on 2024-01-15 at 10:30",
        "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa lol",
        "こんにちは、元気ですか？ 今日はいい天気ですね。",
        "what music do you like? 🎸🎶",
        "the score was 3-2 and 1,000,000 people watched",
    ],
)
def test_ordinary_text_untouched(text: str) -> None:
    assert scrub_text(text, NAMES) == text


def test_token_inside_url_and_mention_digits_are_not_mangled() -> None:
    text = "<@123> see https://x.example/?key=abcdef1234567890abcdef1234567890 bye"
    assert scrub_text(text, NAMES) == f"Alice see {URL_PLACEHOLDER} bye"


def test_japanese_text_around_contacts_is_kept() -> None:
    scrubbed = scrub_text("メールはjohn@example.comです。電話は03-1234-5678まで", NAMES)
    assert scrubbed == f"メールは{EMAIL_PLACEHOLDER}です。電話は{PHONE_PLACEHOLDER}まで"


def test_scrubbing_is_idempotent() -> None:
    once = scrub_text("mail a@b.example, call 555-0199, <@123>, https://x.example", NAMES)
    assert scrub_text(once, NAMES) == once
