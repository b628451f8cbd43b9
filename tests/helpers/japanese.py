"""A Japanese GPT-2 laid out like rinna/japanese-gpt2-small: sentencepiece `spiece.model` + T5Tokenizer.

The sentencepiece model is trained on the Japanese chatterbot-corpus lines; the GPT-2 is tiny and random.
"""

from __future__ import annotations

import io
import json
import re
import shutil
from pathlib import Path

import torch

JAPANESE = re.compile(r"[\u3040-\u30ff\u4e00-\u9fff]")  # hiragana, katakana, CJK ideographs
TOKENIZER_CONFIG = {
    "tokenizer_class": "T5Tokenizer",
    "extra_ids": 0,  # as rinna's: no <extra_id_N> tokens beyond the sentencepiece vocabulary
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "pad_token": "<pad>",
}


def japanese_corpus_lines() -> list[str]:
    """Every utterance of chatterbot-corpus's Japanese conversations (package data, data/japanese/*.yml)."""
    import chatterbot_corpus
    import yaml

    folder = Path(chatterbot_corpus.__file__).parent / "data" / "japanese"
    lines = []
    for path in sorted(folder.glob("*.yml")):
        for conversation in yaml.safe_load(path.read_text(encoding="utf-8")).get("conversations", []):
            lines.extend(str(line).strip() for line in conversation if str(line).strip())
    return lines


def build_japanese_tokenizer(folder: Path) -> Path:
    """spiece.model (vocabulary 1,500, <pad> = 3) + tokenizer_config.json naming T5Tokenizer."""
    import sentencepiece

    lines = japanese_corpus_lines()
    assert len(lines) > 1000
    model_bytes = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model_bytes,
        vocab_size=1500,  # must exceed the ~1,050 distinct characters
        character_coverage=0.9995,
        pad_id=3,
        num_threads=1,  # deterministic, and CI has 2 cores
        minloglevel=2,
    )
    (folder / "spiece.model").write_bytes(model_bytes.getvalue())
    (folder / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG))
    return folder


def build_japanese_model(folder: Path, japanese_tokenizer_dir: Path) -> Path:
    """A 2-layer × 64-wide GPT-2 with the Japanese vocabulary, laid out like rinna/japanese-gpt2-small."""
    from transformers import GPT2Config, GPT2LMHeadModel

    for path in japanese_tokenizer_dir.iterdir():
        shutil.copy(path, folder / path.name)
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=1500, n_layer=2, n_embd=64, n_head=2, n_positions=256, bos_token_id=1, eos_token_id=2
    )
    GPT2LMHeadModel(config).save_pretrained(folder)
    return folder
