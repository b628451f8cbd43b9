"""Tokenizer wrappers for prompt tests: a copy whose Rust backend counts its calls (tests that pin how often
prompts are encoded), and one seen through its transformers call alone (no fast path)."""

from __future__ import annotations

import copy
from typing import Any


class CountingBackend:
    """A Rust tokenizer that counts its encode calls and the characters they encode, whoever calls it."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls = 0
        self.characters = 0

    def _count(self, texts: list[str]) -> None:
        self.calls += 1
        self.characters += sum(map(len, texts))

    def encode(self, text: str, *args: Any, **kwargs: Any) -> Any:
        self._count([text])
        return self.inner.encode(text, *args, **kwargs)

    def encode_batch(self, texts: list[str], *args: Any, **kwargs: Any) -> Any:
        self._count(texts)
        return self.inner.encode_batch(texts, *args, **kwargs)

    def encode_batch_fast(self, texts: list[str], *args: Any, **kwargs: Any) -> Any:
        self._count(texts)
        return self.inner.encode_batch_fast(texts, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def counting_copy(tokenizer: Any) -> tuple[Any, CountingBackend]:
    """A copy of `tokenizer` whose Rust tokenizer counts: the transformers call goes through it too."""
    clone = copy.copy(tokenizer)
    clone._tokenizer = counting = CountingBackend(tokenizer.backend_tokenizer)
    return clone, counting


class WrapperOnly:
    """A tokenizer seen through its transformers call alone, so build_prompt takes none of its fast paths.

    With is_fast=False it is served as a slow tokenizer is: one call per string, no offsets.
    """

    def __init__(self, tokenizer: Any, is_fast: bool = True) -> None:
        self.inner = tokenizer
        self.is_fast = is_fast

    def __call__(self, text: str, **kwargs: Any) -> Any:
        return self.inner(text, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)
