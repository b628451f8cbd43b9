"""Exact and fast tokenizer calls for prompt building: the Rust tokenizer directly wherever that gives
exactly what `tokenizer(text, add_special_tokens=False)` gives, and when per-line ids may be joined; and
for decoding replies (Decoder), likewise exact to `tokenizer.decode(ids, skip_special_tokens=True)`; and a
tokenizer's copy for another thread (thread_copy).

Split out of model/prompt.py, which decides what goes into a prompt; this decides how it is tokenised.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def encode_text(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """The ids of `text` through the transformers call, without special tokens."""
    # No BOS/EOS: sentencepiece tokenizers (T5Tokenizer) would append </s> and end the prompt early.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def count_tokens(tokenizer: PreTrainedTokenizerBase, text: str) -> int:
    """How many tokens `text` is (the transformers call)."""
    return len(encode_text(tokenizer, text))


def encodes_newline(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether `\\n` survives encode → decode (sentencepiece models often fold it into a space)."""
    return "\n" in tokenizer.decode(encode_text(tokenizer, "a\nb"))


def rust_tokenizer(tokenizer: PreTrainedTokenizerBase) -> Any | None:
    """The Rust tokenizer, when calling it directly gives exactly `tokenizer(text, add_special_tokens=False)`.

    transformers 5 answers that call by turning truncation and padding off, setting encode_special_tokens
    and calling the Rust `encode_batch`, then copies the ids into a BatchEncoding in Python, GIL held. So
    the Rust tokenizer gives the same ids when it is in that state already and the class changes nothing on
    the way; slow tokenizers, transformers 4 and subclasses with their own `_encode_plus` keep the wrapper.
    """
    is_plain = _keeps_backend_methods(tokenizer, "__call__", "_encode_plus") and not hasattr(
        type(tokenizer),
        "_switch_to_input_mode",  # seq2seq tokenizers swap templates per call
    )
    rust = tokenizer.backend_tokenizer if is_plain else None
    if rust is None or rust.truncation is not None or rust.padding is not None:
        return None
    return rust if rust.encode_special_tokens == tokenizer.split_special_tokens else None


def _keeps_backend_methods(tokenizer: PreTrainedTokenizerBase, *names: str) -> bool:
    """Whether `tokenizer` is fast and its class takes these methods unchanged from transformers 5's
    fast-tokenizer base (False on transformers 4, which builds its calls differently)."""
    if not tokenizer.is_fast:
        return False
    try:
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:
        return False
    cls = type(tokenizer)
    return all(getattr(cls, name, None) is getattr(TokenizersBackend, name) for name in names)


def joins_lines(rust: Any) -> bool:
    """Whether the ids of lines that pass joins_cleanly, encoded apart and concatenated, are their join's.

    True for byte-level BPE (GPT-2) with no normaliser and no added token that holds a "\\n" or strips
    whitespace. Added tokens then never match across a line end, and ByteLevel's regex splits "…x\\ny…"
    (x, y not whitespace) into "…x", "\\n", "y…" exactly as it splits "…x\\n" and "y…" apart: only its
    whitespace alternatives take "\\n", `\\s+(?!\\S)` cannot before y so `\\s+` takes it alone, and no
    alternative looks behind. BPE merges only inside those pieces. tests/model/test_prompt.py checks the
    regex's whitespace against str.isspace over every code point, and joined ids against the wrapper's.
    """
    from tokenizers import models, pre_tokenizers, processors

    pre_tokenizer, model = rust.pre_tokenizer, rust.model
    if rust.normalizer is not None or not isinstance(pre_tokenizer, pre_tokenizers.ByteLevel):
        return False
    if pre_tokenizer.add_prefix_space or not pre_tokenizer.use_regex:
        return False
    if not isinstance(model, models.BPE) or model.dropout:
        return False
    if not isinstance(rust.post_processor, (type(None), processors.ByteLevel, processors.TemplateProcessing)):
        return False
    added = rust.get_added_tokens_decoder().values()
    return all("\n" not in token.content and not (token.lstrip or token.rstrip) for token in added)


def joins_cleanly(piece: str) -> bool:
    """A line, or the open bot turn, that starts and ends (newline aside) with non-whitespace."""
    text = piece.removesuffix("\n")
    return bool(text) and not text[0].isspace() and not text[-1].isspace()


@dataclass(frozen=True)
class Encoder:
    """How one build tokenises: the Rust tokenizer directly wherever that is exact, else the wrapper."""

    tokenizer: PreTrainedTokenizerBase
    rust: Any | None  # see rust_tokenizer
    joins_lines: bool  # see joins_lines

    @classmethod
    def of(cls, tokenizer: PreTrainedTokenizerBase) -> Encoder:
        rust = rust_tokenizer(tokenizer)
        return cls(tokenizer, rust, rust is not None and joins_lines(rust))

    def encode(self, text: str) -> list[int]:
        """Exactly `tokenizer(text, add_special_tokens=False)["input_ids"]`."""
        if self.rust is None:
            return encode_text(self.tokenizer, text)
        # The batch call, not `encode`: only it releases the GIL. `_fast` skips the offsets.
        return self.rust.encode_batch_fast([text], add_special_tokens=False)[0].ids

    def encode_many(self, texts: list[str]) -> list[list[int]]:
        """The ids of each text, for counting: one batched pass for fast tokenizers (Rust, no GIL)."""
        if self.rust is not None:
            return [encoding.ids for encoding in self.rust.encode_batch_fast(texts, add_special_tokens=False)]
        backend = getattr(self.tokenizer, "backend_tokenizer", None) if self.tokenizer.is_fast else None
        if backend is None or not texts:
            return [encode_text(self.tokenizer, text) for text in texts]
        return [encoding.ids for encoding in backend.encode_batch(texts, add_special_tokens=False)]

    def last_tokens_start(self, text: str, keep_tokens: int) -> int | None:
        """The character where the last `keep_tokens` tokens of `text` start (None: it has no more).

        Fast tokenizers only: they have offsets.
        """
        if self.rust is not None:  # one token's offsets, not a Python list of them all
            encoding = self.rust.encode_batch([text], add_special_tokens=False)[0]
            count = len(encoding)
            return None if count <= keep_tokens else encoding.token_to_chars(count - keep_tokens)[0]
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = encoded["offset_mapping"]
        return None if len(offsets) <= keep_tokens else offsets[len(offsets) - keep_tokens][0]


def rust_decoder(tokenizer: PreTrainedTokenizerBase) -> Any | None:
    """The Rust tokenizer, when its `decode_batch` gives exactly what `tokenizer.decode(ids,
    skip_special_tokens=True)` gives for each sequence.

    transformers 5's fast decode is the Rust decode plus an optional clean-up of spaces, after a
    `to_py_obj` walk over the ids that cost ~15 µs of Python for a 48-token reply (more than the decode).
    """
    if tokenizer.clean_up_tokenization_spaces or not _keeps_backend_methods(tokenizer, "decode", "_decode"):
        return None
    return tokenizer.backend_tokenizer


@dataclass(frozen=True)
class Decoder:
    """How the worker turns replies' ids into text: one Rust call for a batch wherever that is exact."""

    tokenizer: PreTrainedTokenizerBase
    rust: Any | None  # see rust_decoder

    @classmethod
    def of(cls, tokenizer: PreTrainedTokenizerBase) -> Decoder:
        """The decoder for `tokenizer`: its Rust tokenizer where that is exact, else the wrapper."""
        return cls(tokenizer, rust_decoder(tokenizer))

    def decode_many(self, sequences: list[list[int]]) -> list[str]:
        """Exactly `[tokenizer.decode(ids, skip_special_tokens=True) for ids in sequences]`."""
        if self.rust is not None:  # the batch call releases the GIL
            return list(self.rust.decode_batch(sequences, skip_special_tokens=True))
        return [str(self.tokenizer.decode(ids, skip_special_tokens=True)) for ids in sequences]


def thread_copy(tokenizer: Any) -> Any:
    """A copy of `tokenizer` for another thread: a fast tokenizer gets its own Rust tokenizer.

    Not copy.deepcopy for fast tokenizers: unpickling the Rust tokenizer holds the GIL for ~100 ms, which
    would stall the event loop; rebuilding it from its JSON (`from_str`) releases the GIL. The rest of the
    wrapper (special tokens, settings) is only read, so a shallow copy shares it safely.
    """
    if not tokenizer.is_fast:
        return copy.deepcopy(tokenizer)
    backend = tokenizer.backend_tokenizer
    clone = copy.copy(tokenizer)
    clone._tokenizer = type(backend).from_str(backend.to_str())  # what backend_tokenizer returns
    return clone
