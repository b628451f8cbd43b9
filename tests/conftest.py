"""Shared fixtures: a tiny GPT-2 built from a config plus the real GPT-2 tokenizer (no hub, no downloads)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.helpers.japanese import build_japanese_model, build_japanese_tokenizer
from tests.helpers.models import GPT2_TOKENIZER_DIR, build_tiny_gpt2

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the hub, even when run by hand
if not torch.cuda.is_available():
    # Without a GPU the fused decode step's Triton kernels run in Triton's interpreter. Triton reads
    # this when it is imported, so it is set before any test imports it.
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer × 64-wide GPT-2 directory, built once per test session."""
    return build_tiny_gpt2(tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="session")
def gpt2_tokenizer():
    """The real GPT-2 BPE tokenizer shipped in the repository."""
    from transformers import GPT2TokenizerFast

    tokenizer = GPT2TokenizerFast.from_pretrained(GPT2_TOKENIZER_DIR)
    assert len(tokenizer) == 50257
    return tokenizer


@pytest.fixture(scope="session")
def japanese_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """spiece.model (vocabulary 1,500, <pad> = 3) + tokenizer_config.json naming T5Tokenizer."""
    return build_japanese_tokenizer(tmp_path_factory.mktemp("ja-tokenizer"))


@pytest.fixture(scope="session")
def japanese_model_dir(tmp_path_factory: pytest.TempPathFactory, japanese_tokenizer_dir: Path) -> Path:
    """A 2-layer × 64-wide GPT-2 with the Japanese vocabulary, laid out like rinna/japanese-gpt2-small."""
    return build_japanese_model(tmp_path_factory.mktemp("ja-gpt2"), japanese_tokenizer_dir)
