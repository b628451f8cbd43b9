"""The bot's side of the child: its environment, a real child process read, followed and cancelled."""

from __future__ import annotations

import dataclasses
import itertools
import json
import sys
import time
from pathlib import Path

from bot.config import Settings
from bot.retrain.progress import RetrainStatus
from bot.retrain.runner import RetrainRunner, child_environment, follow, parse_event


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


FAKE_CHILD = """
import json, sys, time
for step in range(3):
    print(json.dumps({"event": "train", "step": step + 1, "max_steps": 3, "loss": 1.0}), flush=True)
print("not json", flush=True)
print("a log line", file=sys.stderr, flush=True)
if sys.argv[1] == "hang":
    time.sleep(60)
if sys.argv[1] == "crash":
    sys.exit(3)
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


class Shown:
    """The progress texts `follow` showed; it can refuse them after the first (an expired message)."""

    def __init__(self, accept: int) -> None:
        self.texts: list[str] = []
        self.accept = accept

    async def __call__(self, text: str) -> bool:
        self.texts.append(text)
        return len(self.texts) < self.accept


async def test_follow_folds_events_and_shows_progress_until_refused(tmp_path: Path) -> None:
    runner = RetrainRunner([sys.executable, "-c", FAKE_CHILD, "finish"], {}, tmp_path / "child.log")
    status = RetrainStatus(admin_id=1, started_at=0.0)
    clock = itertools.count(0.0, 5.0).__next__  # every event is one edit interval after the last
    shown = Shown(accept=2)
    await runner.start()
    await follow(runner, status, clock, shown)
    assert status.result == {"event": "done", "version": "v1", "promoted": False}
    assert status.error is None and status.is_finished
    assert len(shown.texts) == 2  # shown at steps 1 and 2, then refused: never asked again
    assert "step 1/3" in shown.texts[0] and "step 2/3" in shown.texts[1]


async def test_follow_reports_a_child_that_exits_without_a_result(tmp_path: Path) -> None:
    runner = RetrainRunner([sys.executable, "-c", FAKE_CHILD, "crash"], {}, tmp_path / "child.log")
    status = RetrainStatus(admin_id=1, started_at=0.0)
    await runner.start()
    await follow(runner, status, time.monotonic, Shown(accept=10))
    assert status.result is None
    assert status.error == f"exit code 3; see {tmp_path / 'child.log'}"
