"""Scrubbing of exported message text: Discord mentions, URLs, e-mail addresses, phone numbers, secrets.

Pure functions on plain strings, applied to every turn (bot turns included: the bot may have echoed a user)
before anything leaves the database for training. Placeholders are short bracketed words so the model learns
"a link was here" rather than a made-up address. The order of the passes matters: a mention holds digits
that the phone pass would eat, and a token cut apart by the phone pass would no longer look like a token.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

URL_PLACEHOLDER = "[link]"
EMAIL_PLACEHOLDER = "[email]"
PHONE_PLACEHOLDER = "[phone]"
SECRET_PLACEHOLDER = "[secret]"
UNKNOWN_USER = "someone"
MIN_PHONE_DIGITS = 7
MAX_PHONE_DIGITS = 15  # E.164 allows at most 15 digits; longer digit runs are ids or card numbers → secret

USER_MENTION = re.compile(r"<@!?(\d{1,20})>")
ROLE_MENTION = re.compile(r"<@&\d{1,20}>")
CHANNEL_MENTION = re.compile(r"<#\d{1,20}>")
COMMAND_MENTION = re.compile(r"</([\w -]{1,96}):\d{1,20}>")
CUSTOM_EMOJI = re.compile(r"<a?:(\w{1,32}):\d{1,20}>")
TIMESTAMP = re.compile(r"<t:-?\d{1,16}(?::[tTdDfFR])?>")
MASS_MENTION = re.compile(r"@(everyone|here)\b")
URL = re.compile(r"(?:\b(?:https?|ftp)://|\bwww\.|\bdiscord\.gg/)[^\s<>\"'`]+", re.IGNORECASE)
EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
# Discord bot tokens: base64 user id . base64 timestamp . HMAC (the shape Discord's own secret scanner uses).
DISCORD_TOKEN = re.compile(r"\b[\w-]{23,28}\.[\w-]{6,7}\.[\w-]{27,}")
# Any long run of base64/hex-ish characters that mixes letters and digits: API keys, hashes, passwords.
LONG_TOKEN = re.compile(r"[A-Za-z0-9+/_=-]{24,}")
HEX_TOKEN = re.compile(r"\b(?:0x)?[0-9a-fA-F]{32,}\b")
LONG_NUMBER = re.compile(r"(?<![A-Za-z0-9_.])\d(?:[ -]?\d){15,}(?![A-Za-z0-9_])")
# ASCII-only boundaries: in Japanese text the characters around a number are word characters too.
PHONE = re.compile(r"(?<![A-Za-z0-9_+])\+?\(?\d[\d\s().-]{5,22}\d(?![A-Za-z0-9_])")
ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}|\d{1,2}[./-]\d{1,2}[./-]\d{2,4}")


def scrub_discord_markup(text: str, display_names: Mapping[int, str]) -> str:
    """Mentions → display names ("someone" if unknown), roles/channels → "@role"/"#channel", no @everyone."""

    def user(match: re.Match[str]) -> str:
        return display_names.get(int(match.group(1)), UNKNOWN_USER)

    text = USER_MENTION.sub(user, text)
    text = ROLE_MENTION.sub("@role", text)
    text = CHANNEL_MENTION.sub("#channel", text)
    text = COMMAND_MENTION.sub(lambda m: "/" + m.group(1), text)
    text = CUSTOM_EMOJI.sub(lambda m: ":" + m.group(1) + ":", text)
    text = TIMESTAMP.sub("a time", text)
    # Without the "@" a trained model never learns to ping everyone, even if a send forgot allowed_mentions.
    return MASS_MENTION.sub(lambda m: m.group(1), text)


def _is_secret_like(token: str) -> bool:
    has_letter = any(c.isalpha() for c in token)
    has_digit = any(c.isdigit() for c in token)
    return has_letter and has_digit


def _replace_if(pattern: re.Pattern[str], text: str, placeholder: str, keep: Callable[[str], bool]) -> str:
    return pattern.sub(lambda m: m.group(0) if keep(m.group(0)) else placeholder, text)


def scrub_secrets(text: str) -> str:
    """Discord tokens, long hex strings, long mixed letter+digit runs and long digit runs → "[secret]"."""
    text = DISCORD_TOKEN.sub(SECRET_PLACEHOLDER, text)
    text = _replace_if(HEX_TOKEN, text, SECRET_PLACEHOLDER, keep=lambda t: not _is_secret_like(t))
    text = _replace_if(LONG_TOKEN, text, SECRET_PLACEHOLDER, keep=lambda t: not _is_secret_like(t))
    return LONG_NUMBER.sub(SECRET_PLACEHOLDER, text)


def _is_phone(candidate: str) -> bool:
    digits = sum(c.isdigit() for c in candidate)
    if not MIN_PHONE_DIGITS <= digits <= MAX_PHONE_DIGITS:
        return False
    return ISO_DATE.fullmatch(candidate.strip()) is None  # "2024-01-15" is a date, not a number to hide


def scrub_contacts(text: str) -> str:
    """E-mail addresses and phone numbers → placeholders."""
    text = EMAIL.sub(EMAIL_PLACEHOLDER, text)
    return _replace_if(PHONE, text, PHONE_PLACEHOLDER, keep=lambda t: not _is_phone(t))


def scrub_text(text: str, display_names: Mapping[int, str] | None = None) -> str:
    """Every pass in a safe order: Discord markup, URLs, secrets (before phones cut them apart), contacts."""
    text = scrub_discord_markup(text, display_names or {})
    text = URL.sub(URL_PLACEHOLDER, text)
    text = scrub_secrets(text)
    return scrub_contacts(text)
