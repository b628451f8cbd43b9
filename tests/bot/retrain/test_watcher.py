"""The hot reload: a new `current` in the registry reaches the reload function (a real ModelWorker too),
once; a failed reload is remembered, not retried; a busy worker is retried; a broken registry is logged."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from bot.retrain.watcher import RegistryWatcher
from model.api import ReloadInProgress
from model.training.registry import Registry
from tests.helpers.models import build_tiny_gpt2, fake_model_dir


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "models")


class ReloadRecorder:
    def __init__(self, fail_on: str | None = None) -> None:
        self.sources: list[str] = []
        self.fail_on = fail_on

    async def reload(self, source: str) -> None:
        self.sources.append(source)
        if self.fail_on and source.endswith(self.fail_on):
            raise RuntimeError("broken weights")


async def test_watcher_reloads_only_when_current_changes(registry: Registry, tmp_path: Path) -> None:
    for i in (1, 2, 3):
        registry.add(fake_model_dir(tmp_path / f"run{i}"))
    registry.promote("v1", val_ppl=50.0, current_ppl=None, margin=0.02)
    recorder = ReloadRecorder(fail_on="v3")
    watcher = RegistryWatcher(registry.models_dir, recorder.reload)
    assert await watcher.poll() is None  # v1 was already serving at start-up
    registry.promote("v2", val_ppl=40.0, current_ppl=50.0, margin=0.02)
    assert await watcher.poll() == str(registry.models_dir / "versions" / "v2")
    assert await watcher.poll() is None
    registry.promote("v3", val_ppl=30.0, current_ppl=40.0, margin=0.02)
    assert await watcher.poll() is None
    assert watcher.failed_source == str(registry.models_dir / "versions" / "v3")
    assert watcher.last_error == "hot reload of v3 failed: broken weights; the old model keeps serving"
    assert await watcher.poll() is None  # a broken version is not retried every poll
    registry.rollback()
    assert await watcher.poll() == str(registry.models_dir / "versions" / "v2")
    assert watcher.failed_source is None and watcher.last_error is None  # a success clears the failure
    assert [Path(s).name for s in recorder.sources] == ["v2", "v3", "v2"]


async def test_watcher_retries_when_another_reload_is_running(registry: Registry, tmp_path: Path) -> None:
    registry.add(fake_model_dir(tmp_path / "run1"))
    attempts: list[str] = []

    async def reload(source: str) -> None:
        attempts.append(source)
        if len(attempts) == 1:
            raise ReloadInProgress("busy")

    watcher = RegistryWatcher(registry.models_dir, reload)
    registry.promote("v1", val_ppl=None, current_ppl=None, margin=0.02)
    assert await watcher.poll() is None
    assert await watcher.poll() == str(registry.models_dir / "versions" / "v1")
    assert len(attempts) == 2


async def test_catch_up_says_whether_the_promoted_version_is_served(
    registry: Registry, tmp_path: Path
) -> None:
    for i in (1, 2):
        registry.add(fake_model_dir(tmp_path / f"run{i}"))
    watcher = RegistryWatcher(registry.models_dir, ReloadRecorder(fail_on="v2").reload)
    assert await watcher.catch_up() is None  # nothing promoted yet
    registry.promote("v1", val_ppl=None, current_ppl=None, margin=0.02)
    assert await watcher.catch_up() is True
    assert await watcher.catch_up() is True  # already served: no second reload needed to know it
    registry.promote("v2", val_ppl=10.0, current_ppl=10.0, margin=0.02)
    assert await watcher.catch_up() is False
    assert watcher.last_error is not None and "broken weights" in watcher.last_error


async def test_a_broken_registry_is_logged_and_polling_goes_on(
    registry: Registry, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    registry.add(fake_model_dir(tmp_path / "run1"))
    recorder = ReloadRecorder()
    watcher = RegistryWatcher(registry.models_dir, recorder.reload)
    registry.path.write_text("{not json")
    assert await watcher.poll() is None
    assert "cannot read the model registry" in caplog.text
    registry.path.unlink()
    registry.promote("v1", val_ppl=None, current_ppl=None, margin=0.02)
    assert await watcher.poll() == str(registry.models_dir / "versions" / "v1")


async def test_promoted_model_is_served_by_the_running_worker(tmp_path: Path, tiny_model_dir: Path) -> None:
    from model.serving.worker import ModelWorker

    registry = Registry(tmp_path / "models")
    first = registry.add(tiny_model_dir)
    second = registry.add(build_tiny_gpt2(tmp_path / "wider", n_embd=32, seed=3))
    registry.promote(first.name, val_ppl=None, current_ppl=None, margin=0.02)
    async with ModelWorker(str(first.path), device="cpu", dtype="float32", queue_size=4) as worker:
        assert worker.info().total_params != 0
        before = worker.info()
        watcher = RegistryWatcher(registry.models_dir, worker.reload)
        assert await watcher.poll() is None
        registry.promote(second.name, val_ppl=10.0, current_ppl=10.0, margin=0.02)
        assert await watcher.poll() == str(second.path)
        after = worker.info()
        assert after.total_params < before.total_params  # the 32-wide model is serving now
        registry.rollback()
        await asyncio.wait_for(watcher.poll(), 30)
        assert worker.info().total_params == before.total_params
