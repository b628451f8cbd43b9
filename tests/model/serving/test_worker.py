"""model.serving.worker: the loop never blocks, the queue is bounded, time limits, errors, repeats, shutdown.

Most tests drive the worker with small scripted engines (tests/helpers/workers.py) over a tiny GPT-2 and
the real tokenizer; the time-limit and lag tests also run real generation. Reloads: test_worker_reload.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from model.api import FALLBACK_REPLY, GenerationFailed, Reply, WorkerBusy, WorkerClosed
from model.encoding import thread_copy
from model.hf_engine import HFGenerateEngine
from model.loading import LoadedModel, ModelLoadError, load_model
from model.prompt import Turn, build_prompt
from model.sampling import SamplingParams
from model.serving import engines
from model.serving.worker import ModelWorker
from tests.helpers.workers import (
    HOG_SEED,
    THE_ID,
    EndlessEngine,
    GpuHogEngine,
    OomOnceEngine,
    RecordingTokenizer,
    force_next_token,
    lag_probe,
    p99,
    request,
    scripted,
    until,
)

# The fixtures (loaded, gates, make_worker) live beside the scripted engines they serve.
pytest_plugins = ["tests.helpers.workers"]

PLAIN_GREEDY = SamplingParams(temperature=0.0, repetition_penalty=1.0, no_repeat_ngram_size=0)


# --- basics -------------------------------------------------------------------------------------------


async def test_real_generation_returns_a_reply_with_accounting(make_worker: Any, loaded: LoadedModel) -> None:
    worker = await make_worker()
    params = SamplingParams(max_new_tokens=8)
    history = (Turn("Alice", "hello"), Turn("Bot", "hi!", is_bot=True), Turn("Alice", "how are you?"))
    reply = await worker.generate(request(history=history, params=params))
    prompt = build_prompt(loaded.tokenizer, "A friendly chat.", history, "Bot", 8, loaded.n_positions)
    assert reply.text and reply.prompt_tokens == len(prompt.input_ids)
    assert 0 <= reply.completion_tokens <= 8 and reply.history_turns_used == 3
    assert reply.stop_reason in ("eos", "turn_end", "max_tokens")
    assert (reply.model_name, reply.model_version) == (loaded.name, loaded.version)
    assert reply.queue_seconds >= 0 and reply.generation_seconds > 0
    assert worker.info().version == loaded.version and worker.queue_depth() == 0


async def test_a_model_that_ends_its_turn_at_once_gets_the_fallback(
    tiny_model_dir: Path, make_worker: Any
) -> None:
    worker = await make_worker(loader=lambda s: force_next_token(load_model(str(tiny_model_dir), "cpu"), 198))
    reply = await worker.generate(request())
    assert (reply.text, reply.stop_reason, reply.completion_tokens) == (FALLBACK_REPLY, "turn_end", 0)


async def test_replies_are_cleaned_of_leaked_speaker_tags(make_worker: Any) -> None:
    factory, _ = scripted(replies=(" Sure thing. Alice: and you?",))
    worker = await make_worker(factory)
    assert (await worker.generate(request())).text == "Sure thing."


async def test_generate_before_start_and_after_close_is_refused(make_worker: Any) -> None:
    with pytest.raises(WorkerClosed):
        await ModelWorker("tiny").generate(request())
    worker = await make_worker()
    await worker.close()
    with pytest.raises(WorkerClosed):
        await worker.generate(request())
    with pytest.raises(WorkerClosed):
        await worker.reload("other")


async def test_start_failure_raises_the_load_error() -> None:
    def broken(source: str) -> LoadedModel:
        raise ModelLoadError("no such model", step="resolve")

    worker = ModelWorker("missing", loader=broken)
    with pytest.raises(ModelLoadError, match="no such model"):
        await worker.start()
    with pytest.raises(WorkerClosed):
        await worker.generate(request())


async def test_prompts_are_built_off_the_gpu_thread_each_builder_with_its_own_tokenizer(
    loaded: LoadedModel, make_worker: Any
) -> None:
    original: set[str] = set()
    copies: set[str] = set()
    clones: list[Any] = []
    recording = RecordingTokenizer(loaded.tokenizer, original, copies, clones)
    worker = await make_worker(
        loader=lambda s: dataclasses.replace(loaded, tokenizer=recording), prompt_threads=2
    )
    original.clear()  # building the engine in the test's own factory does not count
    await asyncio.gather(
        *(worker.generate(request(f"user {i}", params=SamplingParams(max_new_tokens=4))) for i in range(6))
    )
    # The worker thread copied it once per builder while loading; builders tokenize with their own copy.
    assert original == {"model-worker"} and len(clones) == 2
    assert copies and all(name.startswith("prompt-builder") for name in copies)
    assert all(clone.backend_tokenizer is not loaded.tokenizer.backend_tokenizer for clone in clones)
    assert threading.current_thread().name not in original | copies  # never on the event loop


def test_a_thread_copy_encodes_the_same_with_its_own_rust_tokenizer(loaded: LoadedModel) -> None:
    clone = thread_copy(loaded.tokenizer)
    assert clone.backend_tokenizer is not loaded.tokenizer.backend_tokenizer
    text = "Alice: hello there 😀 <|endoftext|>\nBot:"
    assert clone(text)["input_ids"] == loaded.tokenizer(text)["input_ids"]
    assert clone.all_special_tokens == loaded.tokenizer.all_special_tokens


# --- the loop stays responsive ----------------------------------------------------------------------------


async def test_loop_lag_stays_low_while_the_worker_burns_cpu(make_worker: Any) -> None:
    factory, _ = scripted(burn_seconds=5.0)
    worker = await make_worker(factory)
    stop = asyncio.Event()
    probe = asyncio.create_task(lag_probe(stop))
    reply = await worker.generate(request())
    stop.set()
    lags_seconds = await probe
    assert reply.generation_seconds >= 5.0 and len(lags_seconds) > 100
    assert p99(lags_seconds) < 0.1


async def test_loop_lag_stays_low_during_real_generation(make_worker: Any) -> None:
    worker = await make_worker()
    stop = asyncio.Event()
    probe = asyncio.create_task(lag_probe(stop))
    params = SamplingParams(max_new_tokens=60)
    await asyncio.gather(*(worker.generate(request(f"message {i}", params=params)) for i in range(4)))
    stop.set()
    lags_seconds = await probe
    assert len(lags_seconds) > 10 and p99(lags_seconds) < 0.1


# --- the bounded queue -----------------------------------------------------------------------------------


@pytest.mark.parametrize("capacity", [1, 4])
async def test_full_queue_answers_busy_at_once(make_worker: Any, gates: Any, capacity: int) -> None:
    """queue_size counts waiting + running jobs: with 8, a burst of 50 gets 8 replies and 42 WorkerBusy."""
    gate = gates()
    factory, engines = scripted(gate=gate, capacity=capacity)
    worker = await make_worker(factory, queue_size=8)
    tasks = [asyncio.create_task(worker.generate(request(f"user {i}"))) for i in range(50)]
    await asyncio.sleep(0)  # one loop pass: every task has run up to its first await
    busy = [task for task in tasks if task.done() and isinstance(task.exception(), WorkerBusy)]
    assert len(busy) == 42 and worker.queue_depth() == 8
    gate.set()
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    assert sum(isinstance(outcome, Reply) for outcome in outcomes) == 8
    assert sum(isinstance(outcome, WorkerBusy) for outcome in outcomes) == 42
    # Prompts are built off the GPU thread: the engine may start before all 8 are ready, never over capacity.
    assert worker.queue_depth() == 0 and len(engines[0].admitted) == 8 and engines[0].max_active <= capacity


async def test_a_batched_engine_takes_jobs_from_several_channels_at_once(make_worker: Any) -> None:
    # Each job takes 20 steps of 10 ms: far longer than building the other prompts takes.
    factory, engines = scripted(capacity=4, burn_seconds=0.01, steps_per_job=20)
    worker = await make_worker(factory)
    await asyncio.gather(*(worker.generate(request(f"channel {i}")) for i in range(6)))
    assert engines[0].max_active == 4 and len(engines[0].admitted) == 6


# --- time limits --------------------------------------------------------------------------------------


async def test_endless_generation_stops_at_the_time_limit_and_the_next_starts_at_once(
    tiny_model_dir: Path, make_worker: Any
) -> None:
    worker = await make_worker(
        loader=lambda s: force_next_token(load_model(str(tiny_model_dir), "cpu"), THE_ID)
    )
    params = dataclasses.replace(PLAIN_GREEDY, max_new_tokens=900)
    endless = asyncio.create_task(worker.generate(request(params=params, time_limit_seconds=0.5)))
    short = asyncio.create_task(
        worker.generate(request(params=dataclasses.replace(params, max_new_tokens=3), time_limit_seconds=5))
    )
    first, second = await endless, await short
    assert first.stop_reason == "time_limit" and 0 < first.completion_tokens < 900
    assert 0.5 <= first.generation_seconds < 0.5 + 0.5  # one decode step is milliseconds
    assert second.stop_reason == "max_tokens" and second.text
    # The queued request started as soon as the first one stopped.
    assert second.queue_seconds - (first.queue_seconds + first.generation_seconds) < 0.2


async def test_a_batched_engine_stops_each_job_at_its_own_deadline(make_worker: Any) -> None:
    made: list[EndlessEngine] = []
    worker = await make_worker(lambda m: made.append(EndlessEngine(m.tokenizer, capacity=4)) or made[-1])
    replies = await asyncio.gather(
        worker.generate(request("a", time_limit_seconds=0.2)),
        worker.generate(request("b", time_limit_seconds=0.6)),
    )
    assert [reply.stop_reason for reply in replies] == ["time_limit", "time_limit"]
    assert 0.2 <= replies[0].generation_seconds < 0.5 and 0.6 <= replies[1].generation_seconds < 0.9


# --- errors -------------------------------------------------------------------------------------------


async def test_cuda_oom_fails_only_that_request(make_worker: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[OomOnceEngine] = []
    hog_freed_before_empty_cache: list[bool] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(
        torch.cuda, "empty_cache", lambda: hog_freed_before_empty_cache.append(made[0].hog() is None)
    )
    worker = await make_worker(lambda m: made.append(OomOnceEngine(m.tokenizer)) or made[-1])
    with pytest.raises(GenerationFailed, match="out of GPU memory"):
        await worker.generate(request())
    # The failed step's tensors (held by the exception's traceback) were gone when the cache was emptied.
    assert hog_freed_before_empty_cache == [True]
    assert (await worker.generate(request())).text == "Hello there."


async def test_other_cuda_errors_are_fatal(make_worker: Any) -> None:
    fatal: list[BaseException] = []
    factory, _ = scripted(failures=(RuntimeError("CUDA error: device-side assert triggered"),))
    worker = await make_worker(factory, on_fatal=fatal.append)
    with pytest.raises(GenerationFailed):
        await worker.generate(request())
    assert len(fatal) == 1 and "device-side assert" in str(fatal[0])
    await asyncio.wait_for(worker._stopped.wait(), 10)
    assert not worker.is_alive()  # `chatbot health` sees it (bot/operations/health.py)
    await worker.close(grace_seconds=1)
    with pytest.raises(WorkerClosed):
        await worker.generate(request())


async def test_any_other_engine_error_fails_the_request_and_keeps_serving(make_worker: Any) -> None:
    fatal: list[BaseException] = []
    factory, _ = scripted(failures=(ValueError("a bug"),))
    worker = await make_worker(factory, on_fatal=fatal.append)
    with pytest.raises(GenerationFailed, match="ValueError"):
        await worker.generate(request())
    assert (await worker.generate(request())).text == "Hello there." and not fatal
    assert worker.is_alive()


async def test_a_prompt_that_cannot_fit_fails_cleanly(make_worker: Any) -> None:
    factory, engines = scripted()
    worker = await make_worker(factory)
    with pytest.raises(GenerationFailed, match="prompt too long"):  # the persona alone overflows
        await worker.generate(request(persona="word " * 900, params=SamplingParams(max_new_tokens=200)))
    long_history = tuple(Turn(f"user{i}", "word " * 400) for i in range(20))
    await worker.generate(request(history=long_history, params=SamplingParams(max_new_tokens=200)))
    (admitted,) = engines[0].admitted
    assert len(admitted.prompt_ids) + 200 <= 1024


# --- the repeat guard ------------------------------------------------------------------------------------


async def test_a_repeated_reply_is_resampled_once(make_worker: Any, loaded: LoadedModel) -> None:
    factory, engines = scripted(replies=(" Same old.", " Something new!"))
    worker = await make_worker(factory)
    params = SamplingParams(temperature=0.0, seed=7)
    reply = await worker.generate(request(params=params, recent_bot_replies=("same OLD.",)))
    assert reply.text == "Something new!"
    first, retry = engines[0].admitted
    assert retry.prompt_ids == first.prompt_ids and retry.deadline == first.deadline
    assert retry.params.seed == 8 and not retry.params.is_greedy
    both_attempts = loaded.tokenizer.encode(" Same old.") + loaded.tokenizer.encode(" Something new!")
    assert reply.completion_tokens == len(both_attempts)


async def test_resampling_happens_at_most_once_and_only_for_repeats(make_worker: Any) -> None:
    factory, engines = scripted(replies=(" Same old.",))
    worker = await make_worker(factory)
    assert (await worker.generate(request(recent_bot_replies=("Same old.",)))).text == "Same old."
    assert len(engines[0].admitted) == 2
    assert (await worker.generate(request(recent_bot_replies=("Other.",)))).text == "Same old."
    assert len(engines[0].admitted) == 3


# --- cancellation -------------------------------------------------------------------------------------


async def test_cancelled_callers_do_not_break_the_thread(make_worker: Any, gates: Any) -> None:
    gate = gates()
    factory, engines = scripted(gate=gate)
    worker = await make_worker(factory)
    running = asyncio.create_task(worker.generate(request("running")))
    await until(engines[0].is_working)
    queued = asyncio.create_task(worker.generate(request("queued")))
    survivor = asyncio.create_task(worker.generate(request("survivor")))
    await asyncio.sleep(0)  # both are queued now
    running.cancel()
    queued.cancel()
    await asyncio.sleep(0)
    assert worker.queue_depth() == 3  # still queued or running until the thread is done with them
    gate.set()
    assert (await survivor).text == "Hello there."
    texts = [job.prompt_ids for job in engines[0].admitted]
    assert len(texts) == 2  # the cancelled queued job never reached the engine
    assert worker.queue_depth() == 0


# --- shutdown -----------------------------------------------------------------------------------------


async def test_close_rejects_queued_and_lets_in_flight_finish(make_worker: Any, gates: Any) -> None:
    gate = gates()
    factory, engines = scripted(gate=gate)
    worker = await make_worker(factory)
    in_flight = asyncio.create_task(worker.generate(request("in flight")))
    await until(engines[0].is_working)
    queued = [asyncio.create_task(worker.generate(request(f"queued {i}"))) for i in range(5)]
    reload = asyncio.create_task(worker.reload("other"))
    await asyncio.sleep(0)
    closing = asyncio.create_task(worker.close(grace_seconds=10))
    outcomes = await asyncio.gather(*queued, reload, return_exceptions=True)
    assert all(isinstance(outcome, WorkerClosed) for outcome in outcomes)
    assert not in_flight.done()
    gate.set()
    assert (await in_flight).text == "Hello there."
    await closing
    assert not worker._thread.is_alive()  # type: ignore[union-attr]
    with pytest.raises(WorkerClosed):
        await worker.generate(request())


async def test_close_aborts_in_flight_work_after_the_grace_period(make_worker: Any) -> None:
    made: list[EndlessEngine] = []
    worker = await make_worker(lambda m: made.append(EndlessEngine(m.tokenizer)) or made[-1])
    in_flight = asyncio.create_task(worker.generate(request(time_limit_seconds=60)))
    await until(made[0].is_working)
    started = time.monotonic()
    await worker.close(grace_seconds=0.3)
    with pytest.raises(WorkerClosed):
        await in_flight
    assert 0.3 <= time.monotonic() - started < 2.0
    assert not worker._thread.is_alive()  # type: ignore[union-attr]
    assert not made[0].has_work()


async def test_default_engine_factory_picks_an_engine(loaded: LoadedModel) -> None:
    import importlib.util

    engine = engines.default_engine_factory(loaded)
    if importlib.util.find_spec("model.fastgen.engine") is None:
        assert isinstance(engine, HFGenerateEngine)
    else:
        assert type(engine).__name__ == "BatchedGPT2Engine"
        bert = dataclasses.replace(loaded, model=torch.nn.Linear(2, 2))  # not GPT-2: the reference engine
        assert isinstance(engines.default_engine_factory(bert), HFGenerateEngine)


# --- on a real GPU ------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
async def test_real_cuda_oom_fails_one_request_and_memory_returns_to_baseline(tiny_model_dir: Path) -> None:
    worker = ModelWorker(
        str(tiny_model_dir),
        device="cuda",
        engine_factory=lambda m: GpuHogEngine(engines.default_engine_factory(m)),
    )
    async with worker:
        params = SamplingParams(max_new_tokens=8)
        replies = await asyncio.gather(
            *(worker.generate(request(f"user {i}", params=params)) for i in range(8))
        )
        assert all(reply.text for reply in replies)
        allocated, reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
        with pytest.raises(GenerationFailed, match="out of GPU memory"):
            await worker.generate(request(params=SamplingParams(max_new_tokens=8, seed=HOG_SEED)))
        slack_bytes = 64 << 20
        assert torch.cuda.memory_allocated() <= allocated + slack_bytes
        assert torch.cuda.memory_reserved() <= reserved + slack_bytes
        assert (await worker.generate(request(params=params))).text
        assert worker.info().gpu_memory_total_bytes
