"""Japanese GPT-2 models (sentencepiece `spiece.model` + T5Tokenizer, as rinna's) load offline.

A sentencepiece model is trained here on the Japanese chatterbot-corpus lines (once per session) and put
beside a tiny random GPT-2 with that vocabulary: the same file layout as rinna/japanese-gpt2-small.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch

from model.encoding import encodes_newline
from model.loading import load_model, set_seed
from model.prompt import Turn, build_prompt
from tests.helpers.japanese import JAPANESE


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

    from model.hf_engine import _SpeakerTagCriteria

    tokenizer = AutoTokenizer.from_pretrained(japanese_tokenizer_dir)
    ids = tokenizer("元気です ユーザー: はい", add_special_tokens=False)["input_ids"]
    criteria = _SpeakerTagCriteria(tokenizer, prompt_length=0, speakers=("ボット", "ユーザー"))
    fired_at = next(end for end in range(1, len(ids) + 1) if criteria(torch.tensor([ids[:end]]), None).all())
    assert tokenizer.decode(ids[:fired_at]).rstrip().endswith(":")  # the first step that completes the tag
    assert not _SpeakerTagCriteria(tokenizer, 0, ("ボット",))(torch.tensor([ids]), None).any()


async def test_worker_stops_japanese_turns_at_speaker_tags(japanese_model_dir: Path) -> None:
    """A tokenizer without a newline token gets the speaker names as stop conditions, and serving works."""
    from model.api import ReplyRequest
    from model.hf_engine import HFGenerateEngine
    from model.sampling import SamplingParams
    from model.serving.worker import ModelWorker

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
    from model.hf_engine import HFGenerateEngine
    from model.serving.engines import default_engine_factory

    engine = default_engine_factory(load_model(str(japanese_model_dir), device="cpu"))
    assert isinstance(engine, HFGenerateEngine)  # GPT-2 architecture, but turns end at speaker tags
