"""`chatbot run` with Discord's API on a closed loopback port and a model that takes a minute to load.

Run as `python -m tests.helpers.unreachable_run PORT` (DISCORD_TOKEN and BOT_DATA_DIR in the environment):
the start-up check must fail, and the process exit, long before the slow load would have finished.
"""

from __future__ import annotations

import sys
import time

import discord.http

from bot import cli, runtime
from bot.config import Settings
from model.serving.worker import ModelWorker

SLOW_LOAD_SECONDS = 60.0


def slow_worker(settings: Settings) -> ModelWorker:
    """A worker whose model load sleeps for a minute, then fails (it must never get that far)."""

    def load(source: str) -> object:
        time.sleep(SLOW_LOAD_SECONDS)
        raise RuntimeError("the slow load finished: start-up did not fail fast")

    return ModelWorker("slow", loader=load)  # type: ignore[arg-type]


if __name__ == "__main__":
    discord.http.Route.BASE = f"http://127.0.0.1:{int(sys.argv[1])}/api/v10"
    runtime.create_worker = slow_worker  # type: ignore[assignment]
    sys.exit(cli.main(["--env-file", "/nonexistent/.env", "run"]))
