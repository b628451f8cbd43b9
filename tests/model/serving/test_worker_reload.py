"""model.serving.worker reloads: load → smoke → swap, broken models refused, reloads under load, draining."""

from __future__ import annotations

import asyncio
import dataclasses
import pathlib
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from model.api import ReloadFailed, ReloadInProgress, Reply
from model.loading import LoadedModel, ModelLoadError, load_model
from model.sampling import SamplingParams
from model.serving import readiness
from model.serving.worker import ModelWorker
from tests.helpers.models import build_tiny_gpt2
from tests.helpers.workers import (
    RecordingTokenizer,
    ScriptedEngine,
    request,
    scripted,
    until,
)

# The fixtures (loaded, gates, make_worker) live beside the scripted engines they serve.
pytest_plugins = ["tests.helpers.workers"]


def copy_model(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


class _SideEffect:
    """Unpickling this creates a file: proof that code ran during loading."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[pathlib.Path]]:
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def truncated_safetensors(tiny: Path, tmp_path: Path) -> Path:
    broken = copy_model(tiny, tmp_path / "truncated")
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return broken


def wrong_architecture(tiny: Path, tmp_path: Path) -> Path:
    from transformers import BertConfig, BertModel

    folder = tmp_path / "bert"
    BertModel(
        BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    ).save_pretrained(folder)
    return folder


def nan_weights(tiny: Path, tmp_path: Path) -> Path:
    from safetensors.torch import load_file, save_file

    broken = copy_model(tiny, tmp_path / "nan")
    tensors = load_file(broken / "model.safetensors")
    tensors = {name: torch.full_like(tensor, float("nan")) for name, tensor in tensors.items()}
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    return broken


def pickle_with_side_effect(tiny: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(tiny / "config.json", folder / "config.json")
    torch.save({"transformer.wte.weight": _SideEffect(tmp_path / "code-ran")}, folder / "pytorch_model.bin")
    return folder


@pytest.mark.parametrize("allow_pickle", [False, True])
async def test_broken_models_are_refused_while_the_old_one_keeps_answering(
    tiny_model_dir: Path, tmp_path: Path, allow_pickle: bool
) -> None:
    broken = [
        make(tiny_model_dir, tmp_path)
        for make in (truncated_safetensors, wrong_architecture, nan_weights, pickle_with_side_effect)
    ]
    async with ModelWorker(str(tiny_model_dir), device="cpu", allow_pickle=allow_pickle) as worker:
        version = worker.info().version
        for folder in broken:
            with pytest.raises(ReloadFailed) as caught:
                await worker.reload(str(folder))
            assert caught.value.step in ("load", "smoke"), folder
            reply = await worker.generate(request(params=SamplingParams(max_new_tokens=3)))
            assert reply.model_version == version == worker.info().version
    assert not (tmp_path / "code-ran").exists()


async def test_nan_weights_that_slip_past_the_loader_fail_the_smoke_step(
    tiny_model_dir: Path, make_worker: Any, loaded: LoadedModel
) -> None:
    def unchecked_nan_loader(source: str) -> LoadedModel:
        fresh = load_model(str(tiny_model_dir), "cpu")
        with torch.no_grad():
            for parameter in fresh.model.parameters():
                parameter.fill_(float("nan"))
        return dataclasses.replace(fresh, version="nan")

    worker = await make_worker(loader=lambda s: loaded if s == "tiny" else unchecked_nan_loader(s))
    with pytest.raises(ReloadFailed, match="non-finite") as caught:
        await worker.reload("nan")
    assert caught.value.step == "smoke"
    assert (
        await worker.generate(request(params=SamplingParams(max_new_tokens=3)))
    ).model_version == loaded.version


async def test_each_reload_step_failure_is_named_and_keeps_the_old_model(
    make_worker: Any, loaded: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    def loader(source: str) -> LoadedModel:
        if source == "unloadable":
            raise ModelLoadError("cannot read", step="weights")
        return dataclasses.replace(loaded, version=source)

    def engine_factory(model: LoadedModel) -> Any:
        if model.version == "unsmokable":
            raise RuntimeError("engine cannot start")
        return ScriptedEngine(model.tokenizer)

    worker = await make_worker(engine_factory, loader=loader)
    for source, step in (("unloadable", "load"), ("unsmokable", "smoke")):
        with pytest.raises(ReloadFailed) as caught:
            await worker.reload(source)
        assert caught.value.step == step and worker.info().version == "tiny"
    real_model_info = readiness.model_info
    monkeypatch.setattr(
        "model.serving.worker_thread.model_info", lambda m: real_model_info(m) if m.version != "v3" else 1 / 0
    )
    with pytest.raises(ReloadFailed, match="division by zero") as caught:
        await worker.reload("v3")
    assert caught.value.step == "swap" and worker.info().version == "tiny"
    assert (await worker.generate(request())).model_version == "tiny"
    assert (await worker.reload("v4")).version == "v4"
    assert (await worker.generate(request())).model_version == "v4"


async def test_reload_under_steady_load_fails_nothing_and_a_second_reload_is_refused(
    tiny_model_dir: Path, tmp_path: Path, make_worker: Any
) -> None:
    other = build_tiny_gpt2(tmp_path / "other", seed=1)
    worker = await make_worker(source=str(tiny_model_dir), loader=lambda source: load_model(source, "cpu"))
    old_version = worker.info().version
    params = SamplingParams(max_new_tokens=4)
    stop, warmed_up = asyncio.Event(), asyncio.Event()

    async def chat(user: int) -> list[Reply]:
        replies = []
        while not stop.is_set():
            replies.append(await worker.generate(request(f"user {user}", params=params)))
            warmed_up.set()
        return replies

    chatters = [asyncio.create_task(chat(user)) for user in range(3)]
    await warmed_up.wait()  # requests are flowing before the reload is queued
    first = asyncio.create_task(worker.reload(str(other)))
    await asyncio.sleep(0)
    with pytest.raises(ReloadInProgress):
        await worker.reload(str(tiny_model_dir))
    info = await first
    await worker.generate(request(params=params))
    stop.set()
    replies = [reply for chatter in chatters for reply in await chatter]  # any failure would raise here
    versions = {reply.model_version for reply in replies}
    assert info.version != old_version and versions == {old_version, info.version}
    assert (await worker.generate(request(params=params))).model_version == info.version


async def test_reload_waits_for_the_engine_to_drain(
    make_worker: Any, loaded: LoadedModel, gates: Any
) -> None:
    gate = gates()
    factory, engines = scripted(gate=gate, capacity=4)
    busy_at_load: list[bool] = []

    def loader(source: str) -> LoadedModel:
        if engines:
            busy_at_load.append(engines[0].has_work())
        return dataclasses.replace(loaded, version=source)

    worker = await make_worker(factory, loader=loader)
    in_flight = [asyncio.create_task(worker.generate(request(f"user {i}"))) for i in range(2)]
    await asyncio.sleep(0)
    reload = asyncio.create_task(worker.reload("new"))
    after = asyncio.create_task(worker.generate(request("after the reload")))
    await asyncio.sleep(0)
    gate.set()
    replies = await asyncio.gather(*in_flight)
    assert (await reload).version == "new" and busy_at_load == [False]
    assert [reply.model_version for reply in replies] == ["tiny", "tiny"]
    assert (await after).model_version == "new"


async def test_a_repeat_guard_retry_runs_before_a_queued_reload(
    make_worker: Any, loaded: LoadedModel, gates: Any
) -> None:
    """The retry's prompt was built with the old tokenizer, so it must not run on the new model."""
    gate = gates()
    factory, engines = scripted(replies=(" Same old.", " New one."), gate=gate, capacity=4, steps_per_job=2)
    admitted_at_load: list[int] = []

    def loader(source: str) -> LoadedModel:
        admitted_at_load.extend([len(engines[0].admitted)] if engines else [])
        return dataclasses.replace(loaded, version=source)

    worker = await make_worker(factory, loader=loader)
    first = asyncio.create_task(worker.generate(request(recent_bot_replies=("Same old.",))))
    await until(engines[0].is_working)
    reload = asyncio.create_task(worker.reload("new"))
    await asyncio.sleep(0)  # the reload is queued behind the job in flight
    gate.set()
    reply = await first
    assert (reply.text, reply.model_version) == ("New one.", "tiny")
    assert (await reload).version == "new" and admitted_at_load == [2]


async def test_prompts_after_a_reload_are_built_with_the_new_tokenizer(
    make_worker: Any, loaded: LoadedModel
) -> None:
    new_callers: set[str] = set()
    new_copies: set[str] = set()
    clones: list[Any] = []
    recording = RecordingTokenizer(loaded.tokenizer, new_callers, new_copies, clones)

    def loader(source: str) -> LoadedModel:
        if source == "tiny":
            return loaded
        return dataclasses.replace(loaded, tokenizer=recording, version=source)

    factory, _ = scripted()
    worker = await make_worker(factory, loader=loader, prompt_threads=2)
    assert (await worker.generate(request())).model_version == loaded.version and not new_copies
    assert (await worker.reload("new")).version == "new"
    replies = await asyncio.gather(*(worker.generate(request(f"user {i}")) for i in range(4)))
    assert {reply.model_version for reply in replies} == {"new"}
    # The builders switched to copies of the new tokenizer, made while the reload loaded it.
    assert len(clones) == 2 and new_copies and all(name.startswith("prompt-builder") for name in new_copies)
