"""The dialogue format shared by serving, export and training, and the exact token budget."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Turn:
    """One speaker turn: who spoke and what they said (plain text, any length)."""

    speaker: str
    text: str
    is_bot: bool = False
