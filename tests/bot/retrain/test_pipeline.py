"""The child pipeline: export → train → eval → promote on a tiny GPT-2 in a real child process, the
refusal to promote an unmeasured model, and the training progress events."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import pytest

from bot.config import Settings
from bot.retrain.options import RetrainOptions
from bot.retrain.pipeline import progress_callback, promote_step
from bot.retrain.runner import RetrainRunner, child_environment
from bot.retrain.versions import newest_export
from model.training.registry import Registry
from tests.helpers.retrain import TINY_RUN, retrain_settings, seed_conversations

ROOT = Path(__file__).resolve().parents[3]


async def run_child(settings: Settings, options: RetrainOptions, tmp_path: Path) -> list[dict[str, Any]]:
    command = [sys.executable, "-m", "bot.retrain", "--env-file=", *options.to_argv()]
    env = child_environment(
        settings, {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    )
    runner = RetrainRunner(command, env, tmp_path / "child.log")
    await runner.start()
    events = [event async for event in runner.events()]
    code = await runner.wait()
    assert code == 0, (tmp_path / "child.log").read_text()[-3000:]
    return events


@pytest.mark.slow
async def test_child_pipeline_exports_trains_evaluates_and_promotes(tmp_path: Path,
                                                                   tiny_model_dir: Path) -> None:  # fmt: skip
    settings = retrain_settings(tmp_path, tiny_model_dir)
    await seed_conversations(settings, 40)
    events = await run_child(settings, TINY_RUN, tmp_path)
    stages = [e["stage"] for e in events if e["event"] == "stage"]
    assert stages == ["export", "train", "eval", "promote"]
    [export] = [e for e in events if e["event"] == "export"]
    assert export["train"] > 0 and export["val"] > 0
    done = events[-1]
    assert done["event"] == "done" and done["version"] == "v1"
    # The base is a random tiny model: a few steps on the data beat it by far.
    assert done["val_ppl"] < done["current_ppl"] and done["promoted"], done["reason"]
    assert "| held-out perplexity |" in done["table"]
    registry = Registry(settings.models_dir)
    assert registry.current().name == "v1"  # type: ignore[union-attr]
    assert (registry.current().path / "model.safetensors").is_file()  # type: ignore[union-attr]
    assert not (settings.models_dir / "staging").exists()
    assert (
        newest_export(settings.exports_dir)
        == settings.exports_dir / next(settings.exports_dir.iterdir()).name
    )


def test_an_unmeasured_model_is_not_promoted_unless_forced(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    Registry(settings.models_dir).add(model)
    promoted, reason = promote_step(settings, "v1", (None, 40.0), force=False)
    assert not promoted and "could not be measured" in reason
    assert Registry(settings.models_dir).current() is None
    assert promote_step(settings, "v1", (None, 40.0), force=True) == (True, "")


def test_progress_callback_emits_step_loss_and_eta(monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    clock = iter([0.0, 0.0, 10.0, 10.5, 20.0])
    monkeypatch.setattr(time, "monotonic", lambda: next(clock))
    events: list[dict[str, Any]] = []
    callback = progress_callback(events.append, interval_seconds=1.0)
    callback.on_train_begin(None, None, None)
    callback.on_log(None, None, None, logs={"loss": 2.5})
    for step in (1, 2, 4):
        callback.on_step_end(None, SimpleNamespace(global_step=step, max_steps=4), None)
    # step 1 at t=10 (10 s per step, 3 left), step 2 at t=10.5 is within the interval, the last step always.
    assert events == [
        {"event": "train", "step": 1, "max_steps": 4, "loss": 2.5, "eta_seconds": 30.0},
        {"event": "train", "step": 4, "max_steps": 4, "loss": 2.5, "eta_seconds": 0.0},
    ]
