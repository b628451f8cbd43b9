"""model.hf_engine and model.replies: stop tokens, the HF engine (stop reasons, deadline, seeds), cleanup."""

from __future__ import annotations

import random
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

import model.replies as generation
from model.api import FALLBACK_REPLY
from model.engine import EngineJob
from model.hf_engine import HFGenerateEngine, generation_config
from model.replies import clean_reply, is_repeat, resample_params, stop_token_ids
from model.sampling import SamplingParams
from tests.helpers.models import force_next_token

NEWLINE_ID = 198  # "\n" in GPT-2
EOS_ID = 50256
THE_ID = 262  # " the": neither a newline nor end-of-text
# Plain greedy decoding: the penalties would steer a forced model away from its one token.
PLAIN_GREEDY = SamplingParams(temperature=0.0, repetition_penalty=1.0, no_repeat_ngram_size=0)


# --- helpers ------------------------------------------------------------------------------------------


def tiny_gpt2() -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=2, n_positions=1024, vocab_size=50257)
    return GPT2LMHeadModel(config).eval()


def job(
    prompt_ids: tuple[int, ...],
    params: SamplingParams,
    stop_ids: frozenset[int],
    time_limit_seconds: float = 30.0,
    job_id: int = 1,
) -> EngineJob:
    return EngineJob(job_id, prompt_ids, params, time.monotonic() + time_limit_seconds, stop_ids)


@pytest.fixture(scope="module")
def stop_ids(gpt2_tokenizer: Any) -> frozenset[int]:
    return stop_token_ids(gpt2_tokenizer)


@pytest.fixture(scope="module")
def prompt_ids(gpt2_tokenizer: Any) -> tuple[int, ...]:
    return tuple(gpt2_tokenizer.encode("A friendly chat.\nAlice: hi there\nBot:"))


# --- stop tokens ------------------------------------------------------------------------------------


def test_stop_ids_are_eos_plus_exactly_the_newline_tokens(
    gpt2_tokenizer: Any, stop_ids: frozenset[int]
) -> None:
    # The fast path reads token strings; the slow truth decodes every id one by one.
    decoded_with_newline = {i for i in range(len(gpt2_tokenizer)) if "\n" in gpt2_tokenizer.decode([i])}
    assert stop_ids == frozenset(decoded_with_newline | {EOS_ID})
    assert {NEWLINE_ID, 628, EOS_ID} <= stop_ids  # "\n", "\n\n", end-of-text
    assert THE_ID not in stop_ids


class _CharTokenizer:
    """A minimal non-byte-level tokenizer: one id per character of a fixed alphabet."""

    def __init__(self, alphabet: str, eos_token_id: int | None, keeps_newline: bool) -> None:
        self.alphabet = alphabet
        self.eos_token_id = eos_token_id
        self.keeps_newline = keeps_newline

    def __len__(self) -> int:
        return len(self.alphabet)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not self.keeps_newline:  # like a sentencepiece normaliser folding "\n" into a space
            text = text.replace("\n", " ")
        return [self.alphabet.index(ch) for ch in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.alphabet[i] for i in ids)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return ["<0x0A>" if self.alphabet[i] == "\n" else self.alphabet[i] for i in ids]

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return "".join("\n" if token == "<0x0A>" else token for token in tokens)


def test_stop_ids_generic_path_decodes_each_id() -> None:
    tokenizer = _CharTokenizer("ab \n.", eos_token_id=4, keeps_newline=True)
    assert stop_token_ids(tokenizer) == frozenset({3, 4})


def test_stop_ids_are_only_eos_when_the_tokenizer_cannot_encode_newline() -> None:
    tokenizer = _CharTokenizer("ab \n.", eos_token_id=4, keeps_newline=False)
    assert stop_token_ids(tokenizer) == frozenset({4})


def test_stop_ids_on_a_real_sentencepiece_tokenizer_that_folds_newlines(tmp_path: Path) -> None:
    import sentencepiece as spm
    from transformers import AutoTokenizer

    lines = [
        "こんにちは、元気ですか？",
        "はい、元気です。",
        "今日はいい天気ですね。",
        "hello there",
        "how are you",
    ]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines * 20), model_prefix=str(tmp_path / "spiece"),
        vocab_size=40, hard_vocab_limit=False,
        character_coverage=1.0, model_type="unigram", minloglevel=2,
    )  # fmt: skip
    (tmp_path / "tokenizer_config.json").write_text('{"tokenizer_class": "T5Tokenizer"}')
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert "\n" not in tokenizer.decode(tokenizer.encode("a\nb", add_special_tokens=False))
    assert stop_token_ids(tokenizer) == frozenset({tokenizer.eos_token_id})


# --- the engine: config, stop reasons, deadline, seeds -----------------------------------------------


def test_generation_config_comes_only_from_sampling_params() -> None:
    params = SamplingParams(
        temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.3, no_repeat_ngram_size=2
    )
    config = generation_config(params, frozenset({198, 50256}), pad_id=50256)
    assert (config.do_sample, config.temperature, config.top_p, config.top_k) == (True, 0.7, 0.8, 20)
    assert (config.repetition_penalty, config.no_repeat_ngram_size) == (1.3, 2)
    assert (config.max_new_tokens, config.eos_token_id, config.pad_token_id) == (60, [198, 50256], 50256)
    assert generation_config(SamplingParams(temperature=0.0), frozenset(), 0).do_sample is False


@pytest.mark.parametrize(
    ("forced_id", "reason"), [(NEWLINE_ID, "turn_end"), (EOS_ID, "eos"), (THE_ID, "max_tokens")]
)
def test_engine_reports_the_exact_stop_reason(
    gpt2_tokenizer: Any, stop_ids: frozenset[int], prompt_ids: tuple[int, ...], forced_id: int, reason: str
) -> None:
    engine = HFGenerateEngine(force_next_token(tiny_gpt2(), forced_id), gpt2_tokenizer)
    engine.admit(job(prompt_ids, replace(PLAIN_GREEDY, max_new_tokens=5), stop_ids))
    (result,) = engine.step()
    assert result.stop_reason == reason
    # The stop token itself is never part of the reply.
    assert result.token_ids == (() if reason != "max_tokens" else (THE_ID,) * 5)
    assert not engine.has_work()


def test_engine_stops_at_the_deadline_within_a_step(
    gpt2_tokenizer: Any, stop_ids: frozenset[int], prompt_ids: tuple[int, ...]
) -> None:
    engine = HFGenerateEngine(force_next_token(tiny_gpt2(), THE_ID), gpt2_tokenizer)
    params = SamplingParams(max_new_tokens=1000 - len(prompt_ids), temperature=0.0)
    started = time.monotonic()
    engine.admit(job(prompt_ids, params, stop_ids, time_limit_seconds=0.3))
    (result,) = engine.step()
    elapsed_seconds = time.monotonic() - started
    assert result.stop_reason == "time_limit"
    assert 0 < len(result.token_ids) < params.max_new_tokens
    # One decode step of this model takes milliseconds; the slack only covers a loaded CI machine.
    assert 0.3 <= elapsed_seconds < 0.3 + 0.5


def test_seeded_sampling_repeats_and_leaves_the_global_rng_alone(
    gpt2_tokenizer: Any, stop_ids: frozenset[int], prompt_ids: tuple[int, ...]
) -> None:
    engine = HFGenerateEngine(tiny_gpt2(), gpt2_tokenizer)
    seeded = SamplingParams(max_new_tokens=12, temperature=1.0, top_k=0, top_p=1.0, seed=7)
    outputs = []
    for seed in (7, 7, 8):
        before = torch.get_rng_state()
        engine.admit(job(prompt_ids, SamplingParams(**{**seeded.__dict__, "seed": seed}), stop_ids))
        outputs.append(engine.step()[0].token_ids)
        assert torch.equal(torch.get_rng_state(), before)
    assert outputs[0] == outputs[1]
    assert outputs[0] != outputs[2]


def test_engine_is_batch_size_one_and_keeps_a_failed_job_for_abort(
    gpt2_tokenizer: Any,
    stop_ids: frozenset[int],
    prompt_ids: tuple[int, ...],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    engine = HFGenerateEngine(tiny_gpt2(), gpt2_tokenizer)
    assert engine.can_admit() and not engine.has_work()
    engine.admit(job(prompt_ids, PLAIN_GREEDY, stop_ids, job_id=41))
    assert not engine.can_admit() and engine.has_work()

    def broken_generate(**kwargs: Any) -> Any:
        raise RuntimeError("boom")

    monkeypatch.setattr(engine.model, "generate", broken_generate)
    with pytest.raises(RuntimeError, match="boom"):
        engine.step()
    assert engine.abort_all() == [41]
    assert engine.can_admit() and not engine.has_work()


# --- reply cleanup ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("  Hello there!  ", "Hello there!"),
        (" Sure.\nAlice: no", "Sure."),
        (" I agree. Alice: me too", "I agree."),
        (" yes alice : me too", "yes"),  # tags are matched case-insensitively, space before the colon too
        (" Malice: is a word", "Malice: is a word"),  # a name inside another word is not a tag
        (" ratio 3:2 is fine", "ratio 3:2 is fine"),
        (" はい、そうです。アリス：こんにちは", "はい、そうです。"),  # full-width colon
        (" I like it. And then the", "I like it."),
        (' He said "yes." and then', 'He said "yes."'),
        (" はい。そうです。でも", "はい。そうです。"),
        (" 元気ですか？うん", "元気ですか？"),
        (" 元気ですか?うん", "元気ですか?"),  # NFKC-normalised Japanese question mark
        (" Version 3.5 is out", "Version 3.5 is out"),  # no complete sentence: nothing to drop
        (" and then the", "and then the"),
        (" Great! 😂", "Great! 😂"),  # an emoji after the last sentence is not a half-sentence
        (" 😂", "😂"),
        (" caf\ufffd", "caf"),  # a multi-byte character cut in half by the token limit
        ("", ""),
        ("   \n  ", ""),
        (" ...", ""),
        (" Alice: hi", ""),  # the model wrote someone else's turn and nothing of its own
    ],
)
def test_clean_reply(raw: str, expected: str) -> None:
    assert clean_reply(raw, ["Alice", "アリス", "Bot"]) == expected


def test_the_last_sentence_end_is_where_the_last_match_ends() -> None:
    """_last_sentence_end searches from the right; scanning every match of the pattern is the reference."""
    rng = random.Random(0)
    alphabet = "ab3 \n." + generation._ANYWHERE_MARKS + generation._CLOSERS
    for _ in range(5000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(25)))
        ends = [match.end() for match in generation._SENTENCE_END.finditer(text)]
        assert generation._last_sentence_end(text) == (ends[-1] if ends else 0), repr(text)


def test_clean_reply_keeps_a_line_the_model_ended_itself() -> None:
    assert clean_reply(" Sure. lol ok", ["Bot"], has_ended_turn=True) == "Sure. lol ok"
    assert clean_reply(" Sure. lol ok", ["Bot"]) == "Sure."


def test_fallback_is_a_friendly_line() -> None:
    assert clean_reply(FALLBACK_REPLY) == FALLBACK_REPLY


# --- the repeat guard -------------------------------------------------------------------------------


def test_is_repeat_ignores_case_and_spacing_but_not_words() -> None:
    assert is_repeat("I  like CATS.", ["Hello", "i like cats."])
    assert not is_repeat("I like dogs.", ["I like cats."])
    assert not is_repeat("", [""])


def test_resample_params_move_the_seed_and_leave_greedy() -> None:
    assert resample_params(SamplingParams(seed=7)).seed == 8
    assert resample_params(SamplingParams()).seed is None
    retry = resample_params(SamplingParams(temperature=0.0, top_k=5))
    assert not retry.is_greedy and retry.top_k == 5
