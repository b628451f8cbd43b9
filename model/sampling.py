"""Sampling settings for one generation."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token. temperature 0 means greedy decoding."""

    max_new_tokens: int = 60
    temperature: float = 0.8
    top_p: float = 0.9
    top_k: int = 50
    repetition_penalty: float = 1.15
    no_repeat_ngram_size: int = 3
    seed: int | None = None

    def __post_init__(self) -> None:
        # Internal invariant: config validation has already produced readable errors for users.
        assert self.max_new_tokens >= 1, self.max_new_tokens
        assert self.temperature >= 0.0, self.temperature
        assert 0.0 < self.top_p <= 1.0, self.top_p

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0
