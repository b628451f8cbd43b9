"""Japanese GPT-2 models (sentencepiece `spiece.model` + T5Tokenizer, as rinna's) load offline.

A sentencepiece model is trained here on the Japanese chatterbot-corpus lines (once per session) and put
beside a tiny random GPT-2 with that vocabulary: the same file layout as rinna/japanese-gpt2-small.
"""

from __future__ import annotations

import io
import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from model.encoding import encodes_newline
from model.loading import load_model, set_seed
from model.prompt import Turn, build_prompt

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


@pytest.fixture(scope="session")
def japanese_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
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
    folder = tmp_path_factory.mktemp("ja-tokenizer")
    (folder / "spiece.model").write_bytes(model_bytes.getvalue())
    (folder / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG))
    return folder


@pytest.fixture(scope="session")
def japanese_model_dir(tmp_path_factory: pytest.TempPathFactory, japanese_tokenizer_dir: Path) -> Path:
    """A 2-layer × 64-wide GPT-2 with the Japanese vocabulary, laid out like rinna/japanese-gpt2-small."""
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path_factory.mktemp("ja-gpt2")
    for path in japanese_tokenizer_dir.iterdir():
        shutil.copy(path, folder / path.name)
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=1500, n_layer=2, n_embd=64, n_head=2, n_positions=256, bos_token_id=1, eos_token_id=2
    )
    GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


def test_sentencepiece_tokenizer_loads_through_auto_tokenizer(japanese_tokenizer_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(japanese_tokenizer_dir)
    assert len(tokenizer) == 1500  # not the 4-token tokenizer of the transformers 5 trap
    # sentencepiece's NFKC normalisation turns the full-width ？ into ?.
    assert tokenizer.tokenize("こんにちは、元気ですか？") == ["▁こんにちは", "、", "元気", "ですか", "?"]
    ids = tokenizer("こんにちは、元気ですか？", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == "こんにちは、元気ですか?"


def test_japanese_model_loads_keeps_its_tokens_and_generates(
    japanese_model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="model.loading"):
        loaded = load_model(str(japanese_model_dir), device="cpu")
    tokenizer = loaded.tokenizer
    assert "T5" in type(tokenizer).__name__ and len(tokenizer) == 1500
    # Its own pad and end-of-text tokens are respected: pad is not replaced by eos.
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<pad>", 3)
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("</s>", 2)
    assert loaded.n_positions == 256
    # sentencepiece folds "\n" into a space: the loader warns that turns run together in the prompt.
    assert not encodes_newline(tokenizer)
    assert "cannot encode a newline" in caplog.text
    assert generate_text(loaded.model, tokenizer, "こんにちは") != ""


def generate_text(model: Any, tokenizer: Any, prompt: str) -> str:
    """Sample 20 tokens (never a special one) and decode them; the text must contain Japanese."""
    set_seed(0)
    input_ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    output = model.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        do_sample=True,
        max_new_tokens=20,
        min_new_tokens=20,
        bad_words_ids=[[token_id] for token_id in tokenizer.all_special_ids],
    )
    text = tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True)
    assert output.shape[1] == input_ids.shape[1] + 20
    assert JAPANESE.search(text), text
    return str(text)


def test_prompt_budget_holds_with_a_sentencepiece_tokenizer(japanese_model_dir: Path) -> None:
    loaded = load_model(str(japanese_model_dir), device="cpu")
    history = [Turn("ユーザー", "こんにちは、元気ですか？" * (i + 1)) for i in range(60)]
    prompt = build_prompt(
        loaded.tokenizer, "親切なボットとの会話。", history, "ボット", 40, loaded.n_positions
    )
    assert len(prompt.input_ids) + 40 <= loaded.n_positions
    assert list(prompt.input_ids) == loaded.tokenizer(prompt.text, add_special_tokens=False)["input_ids"]
    assert prompt.text.endswith("\nボット:") and 1 <= prompt.turns_used < 60
    assert loaded.tokenizer.eos_token_id not in prompt.input_ids  # no </s> appended to the prompt


def test_speaker_tag_ends_the_turn_when_there_is_no_newline_token(japanese_tokenizer_dir: Path) -> None:
    from transformers import AutoTokenizer

    from model.generation import _SpeakerTagCriteria

    tokenizer = AutoTokenizer.from_pretrained(japanese_tokenizer_dir)
    ids = tokenizer("元気です ユーザー: はい", add_special_tokens=False)["input_ids"]
    criteria = _SpeakerTagCriteria(tokenizer, prompt_length=0, speakers=("ボット", "ユーザー"))
    fired_at = next(end for end in range(1, len(ids) + 1) if criteria(torch.tensor([ids[:end]]), None).all())
    assert tokenizer.decode(ids[:fired_at]).rstrip().endswith(":")  # the first step that completes the tag
    assert not _SpeakerTagCriteria(tokenizer, 0, ("ボット",))(torch.tensor([ids]), None).any()


async def test_worker_stops_japanese_turns_at_speaker_tags(japanese_model_dir: Path) -> None:
    """A tokenizer without a newline token gets the speaker names as stop conditions, and serving works."""
    from model.api import ReplyRequest
    from model.generation import HFGenerateEngine
    from model.sampling import SamplingParams
    from model.worker import ModelWorker

    jobs: list[Any] = []

    class RecordingEngine(HFGenerateEngine):
        def admit(self, job: Any) -> None:
            jobs.append(job)
            super().admit(job)

    history = (Turn("ユーザー", "こんにちは"),)
    request = ReplyRequest("会話。", history, "ボット", SamplingParams(max_new_tokens=8))
    async with ModelWorker(
        str(japanese_model_dir), device="cpu", engine_factory=lambda m: RecordingEngine(m.model, m.tokenizer)
    ) as worker:
        reply = await worker.generate(request)
    assert jobs[-1].stop_speakers == ("ボット", "ユーザー")
    assert reply.text and reply.completion_tokens <= 8


def test_default_engine_without_newline_tokens_checks_speaker_tags(japanese_model_dir: Path) -> None:
    from model.generation import HFGenerateEngine
    from model.jobs import default_engine_factory

    engine = default_engine_factory(load_model(str(japanese_model_dir), device="cpu"))
    assert isinstance(engine, HFGenerateEngine)  # GPT-2 architecture, but turns end at speaker tags
