"""model.serving.worker on a continue request: a real tiny GPT-2 writes on from the reply's text, and the
reply's text is only what follows it, joined exactly (GPT-2 keeps its leading space, Japanese has none)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from model.api import ReplyTooLongToContinue
from model.loading import load_model
from model.prompt import Turn, build_prompt
from model.sampling import SamplingParams
from tests.helpers.workers import THE_ID, force_next_token, request

pytest_plugins = ["tests.helpers.workers"]

GREEDY = SamplingParams(max_new_tokens=3, temperature=0.0, repetition_penalty=1.0, no_repeat_ngram_size=0)


async def test_a_continuation_keeps_its_leading_space(tiny_model_dir: Path, make_worker: Any) -> None:
    loaded = force_next_token(load_model(str(tiny_model_dir), "cpu"), THE_ID)  # " the" every step
    worker = await make_worker(loader=lambda s: loaded)
    history = (Turn("Alice", "where did you go?"),)
    reply = await worker.generate(request(history=history, params=GREEDY, continue_text="I went to"))
    assert reply.text == " the the the"  # "I went to" + text joins as the model wrote it
    prompt = build_prompt(
        loaded.tokenizer, "A friendly chat.", history, "Bot", 3, loaded.n_positions, continue_text="I went to"
    )
    assert prompt.text.endswith("Bot: I went to") and reply.prompt_tokens == len(prompt.input_ids)
    fresh = await worker.generate(request(history=history, params=GREEDY))
    assert fresh.text == "the the the"  # a new reply is stripped as before


@pytest.mark.parametrize(("piece", "expected"), [("元気", "元気元気元気"), ("▁はい", " はい はい はい")])
async def test_a_japanese_continuation_joins_with_no_stray_space(
    japanese_model_dir: Path, make_worker: Any, piece: str, expected: str
) -> None:
    loaded = load_model(str(japanese_model_dir), "cpu")
    forced = force_next_token(loaded, loaded.tokenizer.convert_tokens_to_ids(piece))
    worker = await make_worker(loader=lambda s: forced)
    japanese = request(history=(Turn("ユーザー", "こんにちは"),), bot_name="ボット", params=GREEDY)
    reply = await worker.generate(dataclasses.replace(japanese, continue_text="こんにちは"))
    # "▁" is a word's leading space: decoded with the reply's end it stays; "元気" joins with none.
    assert reply.text == expected


async def test_a_reply_too_long_to_continue_fails_with_its_own_error(make_worker: Any) -> None:
    worker = await make_worker()
    with pytest.raises(ReplyTooLongToContinue):
        await worker.generate(request(params=GREEDY, continue_text="word " * 2000))
