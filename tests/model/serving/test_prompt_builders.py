"""model.serving.prompt_builders: jobs waiting together are built together, each delivered as it was alone."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from model.api import GenerationFailed, ReplyRequest
from model.prompt import Turn, build_prompt
from model.sampling import SamplingParams
from model.serving import prompt_builders
from model.serving.jobs import BuiltPrompt, GenerateJob, Serving
from model.serving.prompt_builders import PromptBuilders
from tests.helpers.tokenizers import counting_copy

N_POSITIONS = 256
DELIVERY_TIMEOUT_SECONDS = 30.0


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def serving_with(tokenizer: Any) -> Serving:
    """A Serving whose builders take `tokenizer` (their copy) and whose model has N_POSITIONS positions."""
    loaded = SimpleNamespace(tokenizer=tokenizer, n_positions=N_POSITIONS)
    serving = Serving(loaded, engine=None, stop_ids=frozenset())  # type: ignore[arg-type]
    serving.tokenizer_copies.put(tokenizer)
    return serving


def job(loop: asyncio.AbstractEventLoop, text: str, max_new_tokens: int = 16) -> GenerateJob:
    request = ReplyRequest("Persona.", (Turn("Alice", text),), params=SamplingParams(max_new_tokens))
    return GenerateJob(request, loop.create_future(), 0.0)


class Deliveries:
    """The deliver callback: records each delivery; the first waits for `release` (holding its thread)."""

    def __init__(self, expected: int, holds_first_delivery: bool = True) -> None:
        self.built: list[BuiltPrompt] = []
        self.sizes: list[int] = []  # BuiltPrompts per delivery: one delivery per batch built
        self.holding = threading.Event()  # the first delivery holds its thread
        self.release = threading.Event()
        if not holds_first_delivery:
            self.release.set()
        self._all = threading.Event()
        self._expected = expected

    def __call__(self, built: list[BuiltPrompt]) -> None:
        self.built += built
        self.sizes.append(len(built))
        if len(self.sizes) == 1:
            self.holding.set()
            self.release.wait(DELIVERY_TIMEOUT_SECONDS)
        if len(self.built) == self._expected:
            self._all.set()

    def wait(self) -> list[BuiltPrompt]:
        assert self._all.wait(DELIVERY_TIMEOUT_SECONDS)
        return self.built


def build_burst(serving: Serving, burst: list[GenerateJob], deliveries: Deliveries) -> list[BuiltPrompt]:
    """Submit the first job, then the rest while its delivery holds the one builder thread."""
    builders = PromptBuilders(1, deliveries)
    try:
        builders.submit(burst[:1], serving, generation=1)
        assert deliveries.holding.wait(DELIVERY_TIMEOUT_SECONDS)
        for one in burst[1:]:  # as the worker hands them over when they arrive one by one
            builders.submit([one], serving, generation=1)
        deliveries.release.set()
        return deliveries.wait()
    finally:
        builders.shutdown()


def test_jobs_waiting_together_are_built_in_one_call(gpt2_tokenizer: Any, loop: Any) -> None:
    tokenizer, counting = counting_copy(gpt2_tokenizer)
    burst = [job(loop, f"hello number {i} " * 20) for i in range(12)]
    burst.append(job(loop, "too long", max_new_tokens=N_POSITIONS))  # no room even for the open turn
    deliveries = Deliveries(len(burst))
    built = build_burst(serving_with(tokenizer), burst, deliveries)
    assert [one.job for one in built] == burst and {one.generation for one in built} == {1}
    # The first job alone (the thread was idle), then every job that waited meanwhile: two calls.
    assert counting.calls == 2 and deliveries.sizes == [1, len(burst) - 1]
    for one in built[:-1]:
        request = one.job.request
        expected = build_prompt(gpt2_tokenizer, "Persona.", request.history, "Bot", 16, N_POSITIONS)
        assert one.prompt == expected and one.error is None and one.speaker_names == ("Bot", "Alice")
    assert built[-1].prompt is None and isinstance(built[-1].error, GenerationFailed)
    assert str(built[-1].error).startswith("prompt too long: persona + open bot turn")


def test_a_failing_batch_is_built_again_one_by_one(
    gpt2_tokenizer: Any, loop: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug in one build fails that job alone, with the error the worker has always reported."""

    def failing_build_prompts(*args: Any) -> Any:
        raise RuntimeError("a bug in the batched path")

    def build_prompt_failing_on_boom(
        tokenizer: Any, persona: str, history: Any, *args: Any, **kwargs: Any
    ) -> Any:
        if history[-1].text == "boom":
            raise KeyError("boom")
        return build_prompt(tokenizer, persona, history, *args, **kwargs)

    monkeypatch.setattr(prompt_builders, "build_prompts", failing_build_prompts)
    monkeypatch.setattr(prompt_builders, "build_prompt", build_prompt_failing_on_boom)
    burst = [job(loop, "first"), job(loop, "hello"), job(loop, "boom"), job(loop, "bye")]
    built = build_burst(serving_with(gpt2_tokenizer), burst, Deliveries(len(burst)))
    assert [one.job for one in built] == burst
    assert [one.prompt is not None for one in built] == [True, True, False, True]
    assert str(built[2].error) == "prompt building failed: KeyError"


def test_jobs_of_two_generations_are_built_with_their_own_tokenizers(gpt2_tokenizer: Any, loop: Any) -> None:
    old, old_counting = counting_copy(gpt2_tokenizer)
    new, new_counting = counting_copy(gpt2_tokenizer)
    deliveries = Deliveries(4)
    builders = PromptBuilders(1, deliveries)
    try:
        builders.submit([job(loop, "first")], serving_with(old), generation=1)
        assert deliveries.holding.wait(DELIVERY_TIMEOUT_SECONDS)
        builders.submit([job(loop, "old")], serving_with(old), generation=1)
        new_serving = serving_with(new)
        builders.submit([job(loop, "new"), job(loop, "new too")], new_serving, generation=2)
        deliveries.release.set()
        built = deliveries.wait()
    finally:
        builders.shutdown()
    assert [one.generation for one in built] == [1, 1, 2, 2]
    assert [one.prompt.text.split("\n")[1] for one in built if one.prompt] == [
        "Alice: first", "Alice: old", "Alice: new", "Alice: new too"
    ]  # fmt: skip
    assert (old_counting.calls, new_counting.calls) == (2, 1)


def test_one_submit_of_many_jobs_is_built_batch_after_batch(gpt2_tokenizer: Any, loop: Any) -> None:
    """One pool task takes batch after batch until the queue is empty: no job is left behind."""
    tokenizer, counting = counting_copy(gpt2_tokenizer)
    burst = [job(loop, f"hello {i}") for i in range(5)]
    deliveries = Deliveries(len(burst), holds_first_delivery=False)
    builders = PromptBuilders(1, deliveries, max_batch=2)
    try:
        builders.submit(burst, serving_with(tokenizer), generation=1)
        built = deliveries.wait()
    finally:
        builders.shutdown()
    assert [one.job for one in built] == burst and deliveries.sizes == [2, 2, 1]
    assert counting.calls == 3 and all(one.prompt is not None for one in built)


def test_shutdown_drops_the_jobs_no_thread_has_taken(gpt2_tokenizer: Any, loop: Any) -> None:
    """A pool task that is building when shutdown() comes finishes its batch and takes no more."""
    burst = [job(loop, f"hello {i}") for i in range(5)]
    deliveries = Deliveries(len(burst))
    builders = PromptBuilders(1, deliveries, max_batch=1)
    builders.submit(burst, serving_with(gpt2_tokenizer), generation=1)
    assert deliveries.holding.wait(DELIVERY_TIMEOUT_SECONDS)  # the first batch is being delivered
    builders.shutdown()
    deliveries.release.set()
    builders._executor.shutdown(wait=True)  # a test may peek: wait for the pool thread to end
    assert deliveries.sizes == [1]
