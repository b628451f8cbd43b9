"""/retrain in simcord (a fake child process stands in for the real pipeline): admin only, progress and
result, one run at a time, cancel, and the registry watcher's hot reload with its failure report."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import cast

from discord import app_commands

from bot.cogs.common import REFUSED_NOT_ADMIN
from bot.cogs.retrain import RetrainCog
from bot.retrain.options import describe
from model.training.registry import Registry
from tests.helpers.discord_harness import TEST_COGS, Harness, response_text, running_bot
from tests.helpers.models import build_tiny_gpt2

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


def test_slash_options_are_described_by_the_retrain_options() -> None:
    start = RetrainCog.retrain.get_command("start")
    assert isinstance(start, app_commands.Command)
    descriptions = {p.name: p.description for p in start.parameters}
    assert descriptions == {"steps": describe("max_steps"), "force": describe("force")}


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
        assert await cog.watcher.poll() is None  # the watcher saw it already: no second reload
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
