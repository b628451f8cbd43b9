"""Shared fixtures: a tiny GPT-2 built from a config plus the real GPT-2 tokenizer (no hub, no downloads)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the hub, even when run by hand
if not torch.cuda.is_available():
    # Without a GPU the fused decode step's Triton kernels run in Triton's interpreter. Triton reads
    # this when it is imported, so it is set before any test imports it.
    os.environ.setdefault("TRITON_INTERPRET", "1")

GPT2_TOKENIZER_DIR = Path(__file__).resolve().parent.parent / "model" / "assets" / "gpt2-tokenizer"


def build_tiny_gpt2(out_dir: Path, n_layer: int = 2, n_embd: int = 64, seed: int = 0) -> Path:
    """Save a randomly initialised GPT-2 (real vocabulary) with the real tokenizer into out_dir."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=2, n_positions=1024, vocab_size=50257)
    GPT2LMHeadModel(config).save_pretrained(out_dir)  # safetensors by default
    GPT2TokenizerFast.from_pretrained(GPT2_TOKENIZER_DIR).save_pretrained(out_dir)
    return out_dir


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
