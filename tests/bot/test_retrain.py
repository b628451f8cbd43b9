"""Retraining: options ↔ flags, child environment, events and progress text, the child process runner, the
whole export → train → eval → promote pipeline on a tiny GPT-2, and hot reload of a real ModelWorker."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, cast

import pytest
from discord import app_commands

from bot.cogs.common import REFUSED_NOT_ADMIN
from bot.cogs.retrain import (
    RetrainCog,
    RetrainRunner,
    RetrainStatus,
    child_environment,
    format_final,
    format_progress,
    parse_event,
)
from bot.config import Settings
from bot.retrain import (
    RetrainOptions,
    build_parser,
    newest_export,
    promote_step,
    promote_version,
    rollback,
)
from bot.storage import Storage, StoredMessage
from bot.text import MESSAGE_LIMIT_CHARS
from model.training.registry import CurrentWatcher, Registry
from tests.helpers.discord_harness import TEST_COGS, Harness, response_text, running_bot
from tests.helpers.models import build_tiny_gpt2

GUILD, ALICE, BOT = 1, 11, 900
ROOT = Path(__file__).resolve().parents[2]


def test_options_round_trip_through_the_child_flags() -> None:
    options = RetrainOptions(base="gpt2", guild_id=5, bot_user_id=900, max_steps=7, epochs=2.0, batch_size=3,
                             block_size=64, learning_rate=1e-3, sample_prompts=2, force=True,
                             promote=False)  # fmt: skip
    args = vars(build_parser().parse_args(options.to_argv()))
    args.pop("env_file")
    assert RetrainOptions(**args) == options
    assert RetrainOptions(
        **{k: v for k, v in vars(build_parser().parse_args([])).items() if k != "env_file"}
    ) == (RetrainOptions())


def test_child_environment_carries_every_setting_but_never_the_token(tmp_path: Path) -> None:
    settings = Settings(discord_token="secret-token-value", data_dir=tmp_path, owner_ids=frozenset({1, 2}),
                        answer_dms=False, promote_margin=0.05)  # fmt: skip
    env = child_environment(settings, {"PATH": "/bin", "DISCORD_TOKEN": "secret-token-value"})
    assert "secret-token-value" not in json.dumps(env)
    assert env["PATH"] == "/bin"
    assert Settings.from_env(env) == dataclasses.replace(settings, discord_token=None)


def test_child_environment_never_carries_the_token_file(tmp_path: Path) -> None:
    secret = tmp_path / "discord_token"
    secret.write_text("secret-token-value")
    settings = Settings.from_env({"DISCORD_TOKEN_FILE": str(secret), "BOT_DATA_DIR": str(tmp_path)})
    env = child_environment(settings, {"PATH": "/bin", "DISCORD_TOKEN_FILE": str(secret)})
    assert "DISCORD_TOKEN_FILE" not in env and "DISCORD_TOKEN" not in env
    assert Settings.from_env(env).discord_token is None


def test_parse_event() -> None:
    assert parse_event(b'{"event": "stage", "stage": "train"}\n') == {"event": "stage", "stage": "train"}
    assert parse_event(b"{'loss': 3.2}\n") is None  # a stray print from a library
    assert parse_event(b'["event"]') is None
    assert parse_event(b'{"no": "event"}') is None


def test_status_and_messages() -> None:
    status = RetrainStatus(admin_id=1, started_at=100.0)
    for event in (
        {"event": "stage", "stage": "export"},
        {"event": "export", "train": 40, "val": 4},
        {"event": "stage", "stage": "train"},
        {"event": "train", "step": 12, "max_steps": 60, "loss": 3.25, "eta_seconds": 80.0},
    ):
        status.apply(event)
    text = format_progress(status, now=130.0)
    assert "train (30s elapsed)" in text
    assert "40 training and 4 validation" in text
    assert "step 12/60, loss 3.250, about 1m 20s left" in text
    assert not status.is_finished
    table = "| metric | new: v1 | serving |\n|---|---|---|\n| held-out perplexity | 41.0 | 44.0 |\n\n" + (
        "| prompt | a | b |\n" + "| x | y | z |\n" * 400
    )
    status.apply({"event": "done", "version": "v1", "promoted": True, "val_ppl": 41.0, "current_ppl": 44.0,
                  "reason": "", "table": table})  # fmt: skip
    final = format_final(status, now=200.0)
    assert final.startswith("Retraining finished: v1 promoted (held-out perplexity 41.00 vs 44.00 now)")
    assert "| held-out perplexity | 41.0 | 44.0 |" in final and "| x | y | z |" not in final
    assert len(final) <= MESSAGE_LIMIT_CHARS
    failed = RetrainStatus(admin_id=1, started_at=0.0)
    failed.apply({"event": "error", "stage": "export", "message": "no consented conversations"})
    assert format_final(failed, 1.0).startswith("Retraining failed (export: no consented conversations)")


FAKE_CHILD = """
import json, sys, time
for step in range(3):
    print(json.dumps({"event": "train", "step": step + 1, "max_steps": 3, "loss": 1.0}), flush=True)
print("not json", flush=True)
print("a log line", file=sys.stderr, flush=True)
if sys.argv[1] == "hang":
    time.sleep(60)
print(json.dumps({"event": "done", "version": "v1", "promoted": False}), flush=True)
"""


async def test_runner_reads_events_and_logs_stderr(tmp_path: Path) -> None:
    runner = RetrainRunner([sys.executable, "-c", FAKE_CHILD, "finish"], {}, tmp_path / "logs" / "child.log")
    await runner.start()
    events = [event async for event in runner.events()]
    assert await runner.wait() == 0
    assert [e["event"] for e in events] == ["train", "train", "train", "done"]
    assert (tmp_path / "logs" / "child.log").read_text() == "a log line\n"


async def test_runner_cancel_terminates_the_child(tmp_path: Path) -> None:
    runner = RetrainRunner([sys.executable, "-c", FAKE_CHILD, "hang"], {}, tmp_path / "child.log")
    await runner.start()
    events = runner.events()
    assert (await anext(events))["step"] == 1
    started = time.monotonic()
    await runner.cancel(grace_seconds=5.0)
    assert time.monotonic() - started < 5.0
    assert not runner.is_running
    assert await runner.wait() != 0


# --- the real pipeline on a tiny model ------------------------------------------------------------------


async def seed_conversations(settings: Settings, count: int) -> None:
    async with Storage.open(settings.db_path) as storage:
        await storage.set_guild_training_export(GUILD, True)
        await storage.set_training_opt_in(ALICE, True, at=1.0)
        for i in range(count):
            at = 1_700_000_000.0 + i * 10_000
            asked, answered = 10 * i + 1, 10 * i + 2
            texts = (f"hi bot, how is day {i}?", f"day {i} is good, thanks for asking!")
            await storage.add_message(StoredMessage(asked, 100, GUILD, ALICE, "alice", False, texts[0], at))
            await storage.add_message(StoredMessage(answered, 100, GUILD, BOT, "Bot", True, texts[1], at + 5,
                                                    reply_to_id=asked))  # fmt: skip


@pytest.fixture
def retrain_settings(tmp_path: Path, tiny_model_dir: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data", model=str(tiny_model_dir), device="cpu", bot_name="Bot")


TINY_RUN = RetrainOptions(
    bot_user_id=BOT, max_steps=4, batch_size=4, block_size=64, learning_rate=3e-3, sample_prompts=1
)


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
async def test_child_pipeline_exports_trains_evaluates_and_promotes(retrain_settings: Settings,
                                                                   tmp_path: Path) -> None:  # fmt: skip
    settings = retrain_settings
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


async def test_promote_and_rollback_commands(
    retrain_settings: Settings, tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    registry = Registry(retrain_settings.models_dir)
    registry.add(tiny_model_dir)
    registry.add(build_tiny_gpt2(tmp_path / "other", seed=1))
    assert promote_version(retrain_settings, "v1", val_ppl=50.0, current_ppl=60.0) == 0
    assert promote_version(retrain_settings, "v2", val_ppl=70.0, current_ppl=50.0) == 1
    assert "worse than the current version v1" in capsys.readouterr().err
    assert promote_version(retrain_settings, "v2", val_ppl=70.0, current_ppl=50.0, force=True) == 0
    assert rollback(retrain_settings) == 0
    assert registry.current().name == "v1"  # type: ignore[union-attr]
    assert rollback(retrain_settings) == 1
    assert promote_version(retrain_settings, "v9") == 1
    assert promote_version(retrain_settings, "v2") == 1  # no export to measure it on
    assert "no export found" in capsys.readouterr().err


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


async def test_promoted_model_is_served_by_the_running_worker(tmp_path: Path, tiny_model_dir: Path) -> None:
    from model.serving.worker import ModelWorker

    registry = Registry(tmp_path / "models")
    first = registry.add(tiny_model_dir)
    second = registry.add(build_tiny_gpt2(tmp_path / "wider", n_embd=32, seed=3))
    registry.promote(first.name, val_ppl=None, current_ppl=None, margin=0.02)
    async with ModelWorker(str(first.path), device="cpu", dtype="float32", queue_size=4) as worker:
        assert worker.info().total_params != 0
        before = worker.info()
        watcher = CurrentWatcher(registry.models_dir, worker.reload)
        assert await watcher.poll() is None
        registry.promote(second.name, val_ppl=10.0, current_ppl=10.0, margin=0.02)
        assert await watcher.poll() == str(second.path)
        after = worker.info()
        assert after.total_params < before.total_params  # the 32-wide model is serving now
        registry.rollback()
        await asyncio.wait_for(watcher.poll(), 30)
        assert worker.info().total_params == before.total_params


# --- /retrain in simcord (a fake child process stands in for the real pipeline) ---------------------------

FAKE_PIPELINE = """
import json, sys, time
from pathlib import Path
from model.training.registry import Registry
models_dir, mode = Path(sys.argv[1]), sys.argv[2]
def emit(**event): print(json.dumps(event), flush=True)
emit(event="stage", stage="export")
emit(event="export", train=30, val=3)
emit(event="stage", stage="train")
emit(event="train", step=1, max_steps=2, loss=3.5, eta_seconds=1.0)
if mode == "hang":
    time.sleep(60)
model = models_dir.parent / "trained"
model.mkdir(parents=True, exist_ok=True)
(model / "config.json").write_text("{}")
version = Registry(models_dir).add(model, move=True)
Registry(models_dir).promote(version.name, val_ppl=40.0, current_ppl=50.0, margin=0.02)
table = "| metric | new | serving |\\n|---|---|---|\\n| held-out perplexity | 40.0 | 50.0 |\\n\\n| prompt |"
emit(event="done", version=version.name, promoted=True, val_ppl=40.0, current_ppl=50.0, reason="",
     table=table)
"""


@asynccontextmanager
async def retrain_bot(tmp_path: Path, mode: str) -> AsyncIterator[tuple[Harness, RetrainCog]]:
    async with running_bot(tmp_path, cog_modules=(*TEST_COGS, "bot.cogs.retrain")) as h:
        # load_extension executes the module afresh, so its class is not this module's RetrainCog.
        cog = cast(RetrainCog, h.bot.get_cog("RetrainCog"))
        assert type(cog).__name__ == "RetrainCog"
        cog.command = [sys.executable, "-c", FAKE_PIPELINE, str(h.bot.settings.models_dir), mode]
        cog.external_wait = lambda awaitable: h.env.external_wait(awaitable, reason="retrain child")
        yield h, cog


async def test_retrain_is_admin_only(tmp_path: Path) -> None:
    async with retrain_bot(tmp_path, "finish") as (h, cog):
        h.open_command_to("retrain", h.alice)
        result = await h.alice.slash(h.channel, "retrain start")
        assert result.ephemeral and response_text(result) == REFUSED_NOT_ADMIN
        assert [type(e) for e in h.env.errors] == [app_commands.MissingPermissions]
        assert cog.runner is None
        [entry] = await h.storage.audit_log()
        assert (entry.action, entry.allowed) == ("retrain start", False)


async def test_retrain_runs_the_child_reports_and_hot_reloads(tmp_path: Path) -> None:
    async with retrain_bot(tmp_path, "finish") as (h, cog):
        result = await h.admin.slash(h.channel, "retrain start", steps=2)
        assert result.acknowledged and result.ephemeral
        assert cog.follower is not None
        await asyncio.wait_for(cog.follower, 30)
        await h.env.settle()
        text = result.response.content  # type: ignore[union-attr]
        assert text.startswith(
            "Retraining finished: v1 promoted (held-out perplexity 40.00 vs 50.00 now). Now"
        )
        assert "| held-out perplexity | 40.0 | 50.0 |" in text
        assert [a.filename for f in result.followups for a in f.attachments] == ["retrain-report.md"]
        assert h.generator.reloads == [str(h.bot.settings.models_dir / "versions" / "v1")]
        assert await cog.poll_registry() is None  # the watcher saw it already: no second reload
        actions = [(e.action, e.detail) for e in await h.storage.audit_log()]
        assert actions == [("retrain start", "started (steps=2, force=False)")]


async def test_second_retrain_is_refused_and_cancel_stops_the_child(tmp_path: Path) -> None:
    async with retrain_bot(tmp_path, "hang") as (h, cog):
        first = await h.admin.slash(h.channel, "retrain start")
        assert cog.runner is not None and cog.runner.is_running
        second = await h.admin.slash(h.channel, "retrain start")
        assert "already running" in response_text(second)
        cancel = await h.admin.slash(h.channel, "retrain cancel")
        assert "cancelled" in response_text(cancel)
        assert not cog.runner.is_running
        assert cog.follower is not None
        await asyncio.wait_for(cog.follower, 30)
        await h.env.settle()
        assert first.response.content.startswith("Retraining cancelled")  # type: ignore[union-attr]
        assert h.generator.reloads == []
        assert Registry(h.bot.settings.models_dir).versions() == []
        status = await h.admin.slash(h.channel, "retrain status")
        assert response_text(status).startswith("Retraining cancelled")


async def test_watcher_task_reloads_after_a_promotion_from_a_shell(tmp_path: Path) -> None:
    async with retrain_bot(tmp_path, "finish") as (h, _):
        registry = Registry(h.bot.settings.models_dir)
        version = registry.add(build_tiny_gpt2(tmp_path / "model"))
        registry.promote(version.name, val_ppl=None, current_ppl=None, margin=0.02)
        await h.env.advance_time(6)  # one watcher interval
        assert h.generator.reloads == [str(version.path)]


async def test_failed_hot_reload_is_reported_and_the_old_model_kept(tmp_path: Path) -> None:
    async with retrain_bot(tmp_path, "finish") as (h, cog):
        h.generator.fail_reload_at = "load"
        result = await h.admin.slash(h.channel, "retrain start")
        assert cog.follower is not None
        await asyncio.wait_for(cog.follower, 30)
        await h.env.settle()
        text = result.response.content  # type: ignore[union-attr]
        assert "But the hot reload of v1 failed: reload failed at step 'load'" in text
        assert h.generator.model_name == "fake"  # still the old model
        status = await h.admin.slash(h.channel, "retrain status")
        assert "Last hot reload: hot reload of v1 failed" in response_text(status)


def test_progress_callback_emits_step_loss_and_eta(monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from bot.retrain import progress_callback

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
