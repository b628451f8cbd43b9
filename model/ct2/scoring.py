"""Held-out perplexity through CTranslate2 (`chatbot eval --engine ct2`): the int8 model's quality, measured.

It scores the same packed blocks as model.training.evaluate.perplexity, with the same rule for what is
scored: every next token except the pad id (end-of-text for GPT-2, which the training collator masks).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from model.ct2.convert import converted_model


def ct2_perplexity(
    model: Any,
    tokenizer: Any,
    blocks: Sequence[Sequence[int]],
    cache_dir: Path,
    compute_type: str,
    batch_size: int = 8,
) -> tuple[float, int]:
    """Token-weighted perplexity of the model converted for `compute_type`; (perplexity, scored tokens)."""
    import ctranslate2

    path = converted_model(model, tokenizer, cache_dir, compute_type)
    generator = ctranslate2.Generator(str(path), device="cpu", compute_type=compute_type)
    vocabulary = json.loads((path / "vocabulary.json").read_text(encoding="utf-8"))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    total_nll, total_tokens = 0.0, 0
    for start in range(0, len(blocks), batch_size):
        batch = [list(block) for block in blocks[start : start + batch_size]]
        results = generator.score_batch(
            [[vocabulary[i] for i in block] for block in batch], max_input_length=0
        )
        for block, result in zip(batch, results, strict=True):
            # log_probs[t] is the log-probability of block[t + 1] given block[: t + 1].
            for target, log_prob in zip(block[1:], result.log_probs, strict=True):
                if target != pad_id:
                    total_nll -= log_prob
                    total_tokens += 1
    if total_tokens == 0:
        raise ValueError("no tokens to score: the validation split is empty")
    return math.exp(total_nll / total_tokens), total_tokens
