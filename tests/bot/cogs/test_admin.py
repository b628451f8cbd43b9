"""Admin commands in simcord: real permission checks, audited refusals, /reload, /stats, /channel, /config."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import pytest
import simcord
from discord import app_commands

from bot.cogs.admin import REFUSED_OTHER_MODEL, LoopLagProbe, format_stats, percentile
from bot.cogs.common import REFUSED_NOT_ADMIN, is_guild_admin
from bot.cogs.sampling import validate_sampling
from bot.storage import Stats
from model.api import ModelInfo, ReloadInProgress
from tests.helpers import discord_harness
from tests.helpers.discord_harness import Harness, response_text, running_bot

harness = discord_harness.harness  # fixtures: the bot with default test settings, built for simcord_env
simcord_bot = discord_harness.simcord_bot


def mention(h: Harness, text: str = "hello") -> str:
    assert h.bot.user is not None
    return f"{h.bot.user.mention} {text}"


@pytest.mark.parametrize(
    ("command", "options"),
    [
        ("reload", {"model": "other"}),
        ("privacy logging", {"enabled": False, "confirm": True}),
        ("privacy export", {"enabled": True}),
        ("channel enable", {}),
        ("config set", {"temperature": 0.1}),
        ("stats", {}),
    ],
)
async def test_non_admin_is_refused_ephemerally_with_no_side_effect(
    harness: Harness, command: str, options: dict[str, object]
) -> None:
    await harness.alice.send(harness.channel, "a stored message")
    harness.open_command_to(command.split()[0], harness.alice)  # the UI hint alone must not be the guard
    result = await harness.alice.slash(harness.channel, command, **options)
    assert result.ephemeral
    assert response_text(result) == REFUSED_NOT_ADMIN
    assert [type(e) for e in harness.env.errors] == [app_commands.MissingPermissions]
    assert harness.generator.reloads == []
    guild = await harness.storage.guild_settings(harness.guild.id)
    assert guild.logging_enabled and not guild.training_export_enabled and not guild.sampling_overrides
    assert not (await harness.storage.channel_settings(harness.channel.id)).answer_all
    assert (await harness.storage.stats()).messages == 1
    [entry] = await harness.storage.audit_log()
    assert (entry.actor_id, entry.action, entry.allowed) == (harness.alice.id, command, False)


async def test_admin_commands_are_not_offered_in_dms_and_refused_there(harness: Harness) -> None:
    with pytest.raises(simcord.SetupError, match="context"):
        await harness.admin.user.slash("reload")
    with pytest.raises(app_commands.NoPrivateMessage):
        await is_guild_admin(SimpleNamespace(guild=None))  # type: ignore[arg-type]


async def test_bot_owner_passes_the_check_without_manage_server(tmp_path: Path) -> None:
    async with running_bot(tmp_path, owner_ids=frozenset()) as h:
        h.bot.settings = dataclasses.replace(h.bot.settings, owner_ids=frozenset({h.alice.id}))
        h.open_command_to("channel", h.alice)
        result = await h.alice.slash(h.channel, "channel enable")
        assert "every message" in response_text(result)
        assert (await h.storage.channel_settings(h.channel.id)).answer_all


def make_admin_an_owner(h: Harness) -> None:
    h.bot.settings = dataclasses.replace(h.bot.settings, owner_ids=frozenset({h.admin.id}))


async def test_only_owners_pick_another_model_but_admins_reload_the_current_one(harness: Harness) -> None:
    refused = await harness.admin.slash(harness.channel, "reload", model="someone/else")
    assert refused.ephemeral and response_text(refused) == REFUSED_OTHER_MODEL
    assert harness.generator.reloads == []
    [entry] = await harness.storage.audit_log()
    assert (entry.action, entry.allowed) == ("reload", False)
    await harness.admin.slash(harness.channel, "reload")
    assert harness.generator.reloads == [harness.bot.settings.model]


async def test_reload_with_a_broken_model_keeps_the_old_one(harness: Harness) -> None:
    make_admin_an_owner(harness)
    harness.generator.fail_reload_at = "smoke"
    result = await harness.admin.slash(harness.channel, "reload", model="broken-model")
    assert harness.deferred() and result.ephemeral
    assert "step 'smoke'" in response_text(result) and "old model keeps serving" in response_text(result)
    assert harness.generator.info().name == "fake"
    await harness.alice.send(harness.channel, mention(harness))
    assert harness.generator.requests and harness.bot_messages()
    [entry] = await harness.storage.audit_log()
    assert entry.allowed and "failed at smoke" in entry.detail


async def test_reload_swaps_the_model_and_refuses_a_second_reload(harness: Harness) -> None:
    make_admin_an_owner(harness)
    result = await harness.admin.slash(harness.channel, "reload", model="tiny-model")
    assert "Now serving tiny-model v2" in response_text(result)
    assert harness.generator.reloads == ["tiny-model"]

    async def busy_reload(source: str) -> ModelInfo:
        raise ReloadInProgress("one at a time")

    harness.generator.reload = busy_reload  # type: ignore[method-assign]
    second = await harness.admin.slash(harness.channel, "reload", model="another")
    assert "already running" in response_text(second)


async def test_stats_shows_every_field(harness: Harness) -> None:
    await harness.alice.send(harness.channel, mention(harness))
    await harness.env.advance_time(2)  # a few lag samples and some uptime
    result = await harness.admin.slash(harness.channel, "stats")
    text = response_text(result)
    assert harness.deferred() and result.ephemeral
    for field in ("Uptime: 00h 00m 02s", "2 messages, 1 bot replies", "Reply latency: p50", "p95",
                  "Queue depth: 0", "Model: fake v1", "parameters", "cpu", "Loop lag: p50"):  # fmt: skip
        assert field in text, field
    assert "GPU memory" not in text


def test_format_stats_shows_gpu_memory_and_missing_latency() -> None:
    stats = Stats(1, 2, 3, 0, 0, None, None)
    gpu = ModelInfo("gpt2", "v3", "cuda:0", "float16", 124_000_000, 0, 1024, 2**30, 80 * 2**30)
    text = format_stats(90_061, stats, 4, gpu, [0.001, 0.002, 0.050])
    assert "Uptime: 1d 01h 01m 01s" in text
    assert "GPU memory: 1.00 GiB of 80.0 GiB" in text
    assert "p50 n/a, p95 n/a" in text
    assert "124,000,000 parameters, cuda:0, float16" in text
    assert "p99 50 ms" in text
    assert "Engine:" not in text  # a generator that names no engine
    cpu = ModelInfo(
        "starter", "v1", "CPU", "float32", 9_000_000, 0, 256, engine="ctranslate2 int8 (2 CPU threads)"
    )
    assert "Engine: ctranslate2 int8 (2 CPU threads)" in format_stats(1, stats, 0, cpu, [])


def test_lag_probe_and_percentile() -> None:
    probe = LoopLagProbe(interval_seconds=0.5)
    for now in (0.0, 0.5, 1.0, 2.5, 3.0):
        probe.tick(now)
    assert list(probe.samples) == [0.0, 0.0, 1.0, 0.0]
    assert percentile([3, 1, 2], 0.5) == 2 and percentile([], 0.5) is None


def test_validate_sampling_names_the_bad_setting() -> None:
    assert validate_sampling({"temperature": 0.7, "top_k": 0}) is None
    error = validate_sampling({"top_p": 0.0})
    assert error is not None and error.startswith("top_p must be between 0.01 and 1") and "\n" not in error


async def test_config_set_validates_and_persists(harness: Harness) -> None:
    bad = await harness.admin.slash(harness.channel, "config set", temperature=9.0)
    assert "temperature must be between 0 and 5" in response_text(bad)
    assert not (await harness.storage.guild_settings(harness.guild.id)).sampling_overrides
    good = await harness.admin.slash(harness.channel, "config set", temperature=0.5, top_k=10)
    assert "temperature=0.5" in response_text(good) and "top_k=10" in response_text(good)
    await harness.admin.slash(harness.channel, "config persona", text="A pirate who loves tea.")
    await harness.alice.send(harness.channel, mention(harness))
    request = harness.generator.requests[-1]
    assert (request.params.temperature, request.params.top_k) == (0.5, 10)
    assert request.persona == "A pirate who loves tea."
    await harness.admin.slash(harness.channel, "config reset")
    guild = await harness.storage.guild_settings(harness.guild.id)
    assert guild.persona is None and not guild.sampling_overrides


async def test_reset_forgets_the_channel_context(harness: Harness) -> None:
    await harness.alice.send(harness.channel, "old topic: llamas")
    await harness.env.advance_time(1)
    result = await harness.admin.slash(harness.channel, "reset")
    assert result.ephemeral
    await harness.env.advance_time(1)
    await harness.alice.send(harness.channel, mention(harness, "new topic"))
    texts = [turn.text for turn in harness.generator.requests[-1].history]
    assert texts == ["new topic"]
    assert (await harness.storage.stats()).messages >= 2  # the rows stay


async def test_reset_works_in_a_dm_for_the_user(harness: Harness) -> None:
    await harness.alice.user.send_dm("remember llamas")
    await harness.env.advance_time(1)
    result = await harness.alice.user.slash("reset")
    assert result.ephemeral and "starts now" in response_text(result)
    await harness.env.advance_time(1)
    await harness.alice.user.send_dm("what do you remember?")
    texts = [turn.text for turn in harness.generator.requests[-1].history]
    assert "remember llamas" not in texts
