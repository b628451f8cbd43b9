"""model.ct2.engine: CT2Engine against the reference HF engine on a tiny real GPT-2 (float32 and int8)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from model.api import ReplyRequest
from model.ct2.engine import CT2Engine, _RowWatch, build_ct2_engine, describe_threads, thread_layout
from model.engine import EngineJob, EngineResult
from model.hf_engine import HFGenerateEngine
from model.loading import LoadedModel, load_model
from model.prompt import Turn
from model.replies import stop_token_ids
from model.sampling import SamplingParams
from model.serving.engines import EngineOptions
from model.serving.worker import ModelWorker
from tests.helpers.models import force_next_token, perturbed

pytest.importorskip("ctranslate2")

NEWLINE_ID = 198
EOS_ID = 50256
GREEDY = SamplingParams(max_new_tokens=12, temperature=0.0)  # with the default penalties
PLAIN_GREEDY = SamplingParams(
    max_new_tokens=12, temperature=0.0, repetition_penalty=1.0, no_repeat_ngram_size=0
)
TEXTS = (
    "A friendly chat.\nAlice: hi\nBot:",
    "A friendly chat.\nAlice: what are you up to today?\nBot:",
    "A friendly chat.\nAlice: hello there\nBob: what is up\nBot:",
    "A friendly chat.\nAlice: what are you up to today?\nBot:",  # the same length as the second: one call
)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path) -> LoadedModel:
    """The tiny GPT-2 with noise on its biases and norms, so greedy decoding does not repeat one token."""
    loaded = load_model(str(tiny_model_dir), device="cpu")
    perturbed(loaded.model)
    return loaded


def jobs_for(loaded: LoadedModel, params: SamplingParams, time_limit: float = 60.0) -> list[EngineJob]:
    stops = stop_token_ids(loaded.tokenizer)
    deadline = time.monotonic() + time_limit
    return [
        EngineJob(i, tuple(loaded.tokenizer.encode(text)), params, deadline, stops)
        for i, text in enumerate(TEXTS)
    ]


def run_all(engine: Any, jobs: list[EngineJob]) -> tuple[dict[int, EngineResult], int]:
    """Admit every job, step until done; the results by job id and the number of steps taken."""
    for job in jobs:
        engine.admit(job)
    results, steps = {}, 0
    while engine.has_work():
        results |= {result.job_id: result for result in engine.step()}
        steps += 1
    return results, steps


@pytest.mark.parametrize("params", [PLAIN_GREEDY, GREEDY], ids=["plain", "penalties"])
def test_greedy_tokens_equal_hf_generate_in_float32_with_mixed_prompt_lengths(
    tiny: LoadedModel, tmp_path: Path, params: SamplingParams
) -> None:
    engine = build_ct2_engine(tiny, tmp_path, "float32", threads=2)
    jobs = jobs_for(tiny, params)
    assert len({len(job.prompt_ids) for job in jobs}) == 3
    got, steps = run_all(engine, jobs)
    expected, _ = run_all(HFGenerateEngine(tiny.model, tiny.tokenizer), jobs)
    assert got == expected
    # Two parallel calls (a tiny model runs one thread per call): the first two groups, then the third;
    # the two prompts of equal length and settings shared one call.
    assert steps == 2
    tokens = {token for result in got.values() for token in result.token_ids}
    assert len(tokens) >= 5 or params is PLAIN_GREEDY  # the penalties bite (plain greedy repeats one token)


def test_a_settings_change_splits_the_call_and_a_seed_reproduces_the_reference_engine(
    tiny: LoadedModel, tmp_path: Path
) -> None:
    engine = build_ct2_engine(tiny, tmp_path, "float32", threads=2)
    seeded = SamplingParams(max_new_tokens=8, seed=7)
    greedy = jobs_for(tiny, GREEDY)
    prompt, deadline = greedy[1].prompt_ids, time.monotonic() + 60
    jobs = [*greedy[:2], *(EngineJob(i, prompt, seeded, deadline, frozenset()) for i in (10, 11))]
    got, steps = run_all(engine, jobs)
    assert steps == 3  # two greedy prompts of different lengths side by side, two seeded jobs one at a time
    assert got[10].token_ids == got[11].token_ids and len(got[10].token_ids) == 8
    reference, _ = run_all(HFGenerateEngine(tiny.model, tiny.tokenizer), jobs[2:3])
    assert reference[10] == got[10]


def test_a_small_model_runs_one_thread_per_call_and_a_wide_one_splits_each_call() -> None:
    assert thread_layout(2, width=256) == (2, 1)  # the starter
    assert thread_layout(4, width=64) == (4, 1)
    assert thread_layout(2, width=768) == (1, 2)  # GPT-2 124M
    assert describe_threads(1, 2) == "2 CPU threads" and describe_threads(1, 1) == "1 CPU thread"


def test_a_step_runs_the_oldest_groups_side_by_side_and_halves_a_lone_group(
    tiny: LoadedModel, tmp_path: Path
) -> None:
    engine = build_ct2_engine(tiny, tmp_path, "int8", threads=2)
    assert engine.parallel_calls == 2
    greedy = jobs_for(tiny, GREEDY)
    same = [EngineJob(20 + i, greedy[0].prompt_ids, GREEDY, greedy[0].deadline, greedy[0].stop_token_ids)
            for i in range(5)]  # fmt: skip
    for job in same:
        engine.admit(job)
    assert [[job.job_id for job in call] for call in engine._plan()] == [[20, 21, 22], [23, 24]]
    engine.abort_all()
    seeded = EngineJob(30, greedy[0].prompt_ids, SamplingParams(seed=1), greedy[0].deadline, frozenset())
    for job in [greedy[1], seeded, *greedy[2:], greedy[0]]:
        engine.admit(job)
    # Age order of each group's oldest job; the seeded job waits until it is the oldest; at most two calls.
    assert [[job.job_id for job in call] for call in engine._plan()] == [[1, 3], [2]]
    results, steps = run_all(engine, [])
    assert sorted(results) == [0, 1, 2, 3, 30] and steps == 3  # {1,3}+{2}, then the seeded job, then {0}


def test_a_job_past_its_deadline_stops_after_one_token(tiny: LoadedModel, tmp_path: Path) -> None:
    engine = build_ct2_engine(tiny, tmp_path, "int8", threads=1)
    late, on_time = jobs_for(tiny, PLAIN_GREEDY, time_limit=-1.0)[0], jobs_for(tiny, PLAIN_GREEDY)[0]
    on_time = EngineJob(9, on_time.prompt_ids, PLAIN_GREEDY, on_time.deadline, on_time.stop_token_ids)
    results, steps = run_all(engine, [late, on_time])
    assert steps == 1
    assert results[late.job_id].stop_reason == "time_limit" and len(results[late.job_id].token_ids) == 1
    assert len(results[9].token_ids) == PLAIN_GREEDY.max_new_tokens  # its row ran on: one row stops alone


@pytest.mark.parametrize(("token_id", "reason"), [(NEWLINE_ID, "turn_end"), (EOS_ID, "eos")])
def test_stop_ids_end_the_reply_with_the_right_reason(
    tiny_model_dir: Path, tmp_path: Path, token_id: int, reason: str
) -> None:
    loaded = load_model(str(tiny_model_dir), device="cpu")
    force_next_token(loaded.model, token_id)
    engine = build_ct2_engine(loaded, tmp_path, "int8", threads=1)
    results, _ = run_all(engine, jobs_for(loaded, PLAIN_GREEDY)[:1])
    assert results[0] == EngineResult(0, (), reason)


def test_the_callback_ends_a_row_at_a_speaker_tag(japanese_tokenizer_dir: Path) -> None:
    from model.loading import load_tokenizer

    tokenizer = load_tokenizer(str(japanese_tokenizer_dir))
    job = EngineJob(0, (5,), PLAIN_GREEDY, time.monotonic() + 60, frozenset(), stop_speakers=("アリス",))
    watch = _RowWatch([job], tokenizer)
    ids = tokenizer.encode("こんにちは アリス: 元気", add_special_tokens=False)
    stops = [watch(SimpleNamespace(batch_id=0, token_id=i)) for i in ids]
    assert stops.index(True) < len(ids) - 1 and watch.has_tag == [True]  # stopped at the tag, not later
    assert not any(stops[: stops.index(True)])


async def test_int8_replies_through_the_worker_are_well_formed(tiny: LoadedModel, tmp_path: Path) -> None:
    options = EngineOptions("ct2", "int8", 2, tmp_path / "ct2")
    params = SamplingParams(max_new_tokens=16)  # the bot's default sampling otherwise
    async with ModelWorker("tiny", loader=lambda _: tiny, engine_options=options) as worker:
        assert worker.info().engine == "ctranslate2 int8 (2 parallel calls × 1 CPU thread)"
        requests = [
            ReplyRequest("A friendly chat.", (Turn("Alice", "hi " * n),), params=params) for n in range(6)
        ]
        replies = await asyncio.gather(*(worker.generate(request) for request in requests))
    for reply in replies:
        assert reply.text.strip() and "\n" not in reply.text
        assert 1 <= reply.completion_tokens <= 16 * 2  # a repeat-guard retry may add a second attempt
        assert reply.stop_reason in ("eos", "turn_end", "max_tokens")
    assert len(list((tmp_path / "ct2").iterdir())) == 1  # one int8 conversion


async def test_a_japanese_sentencepiece_model_is_served_by_ct2(
    japanese_model_dir: Path, tmp_path: Path
) -> None:
    options = EngineOptions("auto", "int8", 1, tmp_path)
    async with ModelWorker(str(japanese_model_dir), device="cpu", engine_options=options) as worker:
        assert worker.info().engine.startswith("ctranslate2 int8")
        request = ReplyRequest("楽しい会話。", (Turn("アリス", "こんにちは"),), bot_name="ボット")
        reply = await worker.generate(request)
    assert reply.text and reply.completion_tokens >= 1


def test_engine_is_a_decode_engine(tiny: LoadedModel, tmp_path: Path) -> None:
    engine: CT2Engine = build_ct2_engine(tiny, tmp_path, "int8", threads=1, max_batch_size=2)
    jobs = jobs_for(tiny, PLAIN_GREEDY)
    engine.admit(jobs[0])
    assert engine.can_admit()
    engine.admit(jobs[1])
    assert not engine.can_admit() and engine.has_work()
    assert engine.abort_all() == [0, 1] and not engine.has_work()
